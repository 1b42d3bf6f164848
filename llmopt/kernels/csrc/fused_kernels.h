// Row-level AVX2/FMA kernels shared by the standalone fused ops (fused.cpp) and the one-call decode
// step (decode.cpp): reductions, exp, RMSNorm rows, residual add + RMSNorm rows, SiLU*mul ranges,
// rotary embedding of one head, and the tiled online-softmax attention of one (sequence, kv head)
// over a token range of a paged KV cache.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace llmopt_f {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 floats: x = n*ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial (Cephes
// coefficients, ~1 ulp), 2^n built in the exponent bits. Returns +inf above ~88.72, 0 below
// ~-87.34 (no denormals), NaN for NaN.
inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 lo = _mm256_set1_ps(-87.3365447504f);
  const __m256 inf_at = _mm256_set1_ps(88.72283935546875f);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f);
  const __m256 ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  const __m256 one = _mm256_set1_ps(1.0f);

  const __m256 overflow = _mm256_cmp_ps(x, inf_at, _CMP_GT_OQ);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  // min/max return their second operand when one is NaN: keep x second so NaN propagates.
  __m256 xc = _mm256_max_ps(lo, _mm256_min_ps(hi, x));

  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, ln2_hi, xc);
  r = _mm256_fnmadd_ps(n, ln2_lo, r);

  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));

  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()), overflow);
  y = _mm256_andnot_ps(underflow, y);
  return y;
}

// sum(a[i] * b[i]) with four independent FMA chains.
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline float sum_squares(const float* a, int64_t n) { return dot(a, a, n); }

// out[i] = (x[i] * inv) * w[i]  (HF order: normalize, then scale by the weight)
inline void scale_by_weight(const float* x, const float* w, float* out, int64_t n, float inv) {
  const __m256 vinv = _mm256_set1_ps(inv);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(v, _mm256_loadu_ps(w + i)));
  }
  for (; i < n; ++i) out[i] = (x[i] * inv) * w[i];
}

// out[0:H] = rms_norm(x[0:H]) * w  (HF order: normalize, then scale by the weight)
inline void rms_norm_row(const float* x, const float* w, float* out, int64_t H, float eps) {
  const float inv = 1.0f / std::sqrt(sum_squares(x, H) / static_cast<float>(H) + eps);
  scale_by_weight(x, w, out, H, inv);
}

// sr[0:H] += x[0:H] (in place: sr becomes the sum); out = rms_norm(sr) * w. One pass adds, stores
// the sum and accumulates its squares; a second re-reads the (L1-resident) sum and normalizes.
inline void add_rms_norm_row(const float* xr, float* sr, const float* w, float* out, int64_t H, float eps) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= H; i += 16) {
    const __m256 s0 = _mm256_add_ps(_mm256_loadu_ps(sr + i), _mm256_loadu_ps(xr + i));
    const __m256 s1 = _mm256_add_ps(_mm256_loadu_ps(sr + i + 8), _mm256_loadu_ps(xr + i + 8));
    _mm256_storeu_ps(sr + i, s0);
    _mm256_storeu_ps(sr + i + 8, s1);
    a0 = _mm256_fmadd_ps(s0, s0, a0);
    a1 = _mm256_fmadd_ps(s1, s1, a1);
  }
  for (; i + 8 <= H; i += 8) {
    const __m256 s0 = _mm256_add_ps(_mm256_loadu_ps(sr + i), _mm256_loadu_ps(xr + i));
    _mm256_storeu_ps(sr + i, s0);
    a0 = _mm256_fmadd_ps(s0, s0, a0);
  }
  float ss = hsum(_mm256_add_ps(a0, a1));
  for (; i < H; ++i) {
    const float s = sr[i] + xr[i];
    sr[i] = s;
    ss += s * s;
  }
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
  scale_by_weight(sr, w, out, H, inv);
}

// o[c] = silu(g[c]) * u[c] for c in [c0, c1). Sigmoid from e = exp(-|g|) in (0, 1]: 1/(1+e) for
// g >= 0, e/(1+e) for g < 0; the denominator stays in [1, 2], so rcp + one Newton step (~2 ulp)
// replaces the slow divide.
inline void silu_mul_range(const float* g, const float* u, float* o, int64_t c0, int64_t c1) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 two = _mm256_set1_ps(2.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t c = c0;
  for (; c + 8 <= c1; c += 8) {
    const __m256 vg = _mm256_loadu_ps(g + c);
    const __m256 e = exp256(_mm256_or_ps(vg, sign));  // exp(-|g|)
    const __m256 den = _mm256_add_ps(one, e);
    __m256 r = _mm256_rcp_ps(den);
    r = _mm256_mul_ps(r, _mm256_fnmadd_ps(den, r, two));
    const __m256 sig = _mm256_blendv_ps(r, _mm256_mul_ps(e, r), vg);  // picks e*r where g < 0
    _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_mul_ps(vg, sig), _mm256_loadu_ps(u + c)));
  }
  for (; c < c1; ++c) o[c] = g[c] / (1.0f + std::exp(-g[c])) * u[c];
}

inline void rope_head(float* x, const float* cs, int64_t half) {
  const float* cosp = cs;
  const float* sinp = cs + half;
  float* x1 = x;
  float* x2 = x + half;
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 c = _mm256_loadu_ps(cosp + i), s = _mm256_loadu_ps(sinp + i);
    const __m256 a = _mm256_loadu_ps(x1 + i), b = _mm256_loadu_ps(x2 + i);
    _mm256_storeu_ps(x1 + i, _mm256_fmsub_ps(a, c, _mm256_mul_ps(b, s)));
    _mm256_storeu_ps(x2 + i, _mm256_fmadd_ps(b, c, _mm256_mul_ps(a, s)));
  }
  for (; i < half; ++i) {
    const float a = x1[i], b = x2[i];
    x1[i] = a * cosp[i] - b * sinp[i];
    x2[i] = b * cosp[i] + a * sinp[i];
  }
}

constexpr int64_t kTile = 32;

// acc[0:D] += sum_i p[i] * rows[i][0:D] for i < n.
inline void accumulate_pv(float* acc, const float* p, const float* const* rows, int64_t n, int64_t D) {
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    __m256 a0 = _mm256_loadu_ps(acc + d), a1 = _mm256_loadu_ps(acc + d + 8);
    __m256 a2 = _mm256_loadu_ps(acc + d + 16), a3 = _mm256_loadu_ps(acc + d + 24);
    __m256 a4 = _mm256_loadu_ps(acc + d + 32), a5 = _mm256_loadu_ps(acc + d + 40);
    __m256 a6 = _mm256_loadu_ps(acc + d + 48), a7 = _mm256_loadu_ps(acc + d + 56);
    for (int64_t i = 0; i < n; ++i) {
      const __m256 w = _mm256_broadcast_ss(p + i);
      const float* v = rows[i] + d;
      a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), a0);
      a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), a1);
      a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), a2);
      a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), a3);
      a4 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 32), a4);
      a5 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 40), a5);
      a6 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 48), a6);
      a7 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 56), a7);
    }
    _mm256_storeu_ps(acc + d, a0);
    _mm256_storeu_ps(acc + d + 8, a1);
    _mm256_storeu_ps(acc + d + 16, a2);
    _mm256_storeu_ps(acc + d + 24, a3);
    _mm256_storeu_ps(acc + d + 32, a4);
    _mm256_storeu_ps(acc + d + 40, a5);
    _mm256_storeu_ps(acc + d + 48, a6);
    _mm256_storeu_ps(acc + d + 56, a7);
  }
  for (; d + 8 <= D; d += 8) {
    __m256 a = _mm256_loadu_ps(acc + d);
    for (int64_t i = 0; i < n; ++i) a = _mm256_fmadd_ps(_mm256_broadcast_ss(p + i), _mm256_loadu_ps(rows[i] + d), a);
    _mm256_storeu_ps(acc + d, a);
  }
  for (; d < D; ++d) {
    float a = acc[d];
    for (int64_t i = 0; i < n; ++i) a += p[i] * rows[i][d];
    acc[d] = a;
  }
}

// Horizontal sums of 8 vectors: result[j] = sum of all lanes of v_j.
inline __m256 reduce8(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5, __m256 v6, __m256 v7) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(v4, v5), _mm256_hadd_ps(v6, v7));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

inline __m128 reduce4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// ---- AVX-512 attention steps with the AVX2 steps' bits ----------------------------------------------
// Where the CPU has AVX-512 F/DQ (and LLMOPT_CPU_PATH does not ask for avx2 / reference), the two
// inner loops of attend_tile run on 512-bit registers: tile_scores_avx512 puts two heads side by side
// in one register (lanes 0-7 head g, 8-15 head g + 1), so each lane holds the FMA chain over d = lane
// mod 8 that the AVX2 micro-kernel's lane does, and reduces each half in reduce8's order (pairs, then
// pairs of pairs, then the two 128-bit halves); accumulate_pv2_avx512 is lane-wise (16 d's per
// register, tokens in the same order). So every score and every output bit equals the AVX2 path's:
// the choice of path changes no result, and no batch-invariance rule depends on it (tests compare the
// two paths bit for bit). Functions carry their own target attribute: the modules stay AVX2 builds.
inline bool attn_avx512_cpu() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}

inline bool attn_avx512_detect() {
  const char* e = std::getenv("LLMOPT_CPU_PATH");
  if (e != nullptr) {
    std::string s(e);
    for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (s.find("avx2") != std::string::npos || s.find("reference") != std::string::npos) return false;
  }
  return attn_avx512_cpu();
}

// whether attend_tile uses the AVX-512 steps: chosen once at load; each module's attn_avx512(on)
// switches it (tests), never above what the CPU runs
inline bool g_attn_avx512 = attn_avx512_detect();

// the modules' attn_avx512 binding: on = 0 / 1 sets, -1 only reads; returns the setting in force
inline bool attn_avx512_set(int64_t on) {
  if (on >= 0) g_attn_avx512 = on != 0 && attn_avx512_cpu();
  return g_attn_avx512;
}
// whether decode rows may be walked whole (walk_rows_whole); attn_walk_rows(on) switches it (benchmarks, tests)
inline bool g_walk_whole = true;
inline bool attn_walk_rows_set(int64_t on) {
  if (on >= 0) g_walk_whole = on != 0;
  return g_walk_whole;
}
#define LLMOPT_F_ATTN_AVX512_DEF(m)                                                                               \
  m.def("attn_avx512", &llmopt_f::attn_avx512_set,                                                             \
        "attention's inner loops on AVX-512 (same bits as AVX2): 1 / 0 sets (never above the CPU), -1 reads; "   \
        "returns the setting in force",                                                                         \
        py::arg("on") = -1);                                                                                    \
  m.def("attn_walk_rows", &llmopt_f::attn_walk_rows_set,                                                       \
        "decode rows walked one row, all kv heads, per item where enough rows (same bits): 1 / 0 sets, -1 "     \
        "reads; returns the setting in force",                                                                  \
        py::arg("on") = -1)

#define LLMOPT_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma")))

// hadd of two 512-bit registers, per 128-bit lane as _mm256_hadd_ps does: [x0+x1, x2+x3, y0+y1, y2+y3]
LLMOPT_AVX512 inline __m512 hadd512(__m512 x, __m512 y) {
  return _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x88), _mm512_shuffle_ps(x, y, 0xDD));
}

// a0..a3: tokens i..i+3 of heads (g, g + 1) in lanes (0-7, 8-15); writes the 8 scores as reduce8 would
LLMOPT_AVX512 inline void store_pair_scores(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float* sg, float* sg1) {
  const __m512 h = hadd512(hadd512(a0, a1), hadd512(a2, a3));         // per 128-bit lane: 4 tokens' partial sums
  const __m512 t = _mm512_add_ps(h, _mm512_shuffle_f32x4(h, h, 0xB1));  // lane k + lane k ^ 1
  _mm_storeu_ps(sg, _mm512_castps512_ps128(t));
  _mm_storeu_ps(sg1, _mm512_extractf32x4_ps(t, 2));
}

// tile_scores' 4-token groups for heads [0, 2 * (G / 2)) (D % 8 == 0, n >= 4); returns the tokens
// done (n rounded down to 4). Heads go in pairs (qp: the pairs' q rows interleaved 8 floats at a time),
// two pairs per pass: 4 broadcast K loads + 2 q loads feed 8 FMAs of 16 lanes.
LLMOPT_AVX512 inline int64_t tile_scores_avx512(const float* qs, const float* const* rows, int64_t n, int64_t G,
                                                int64_t D, float* sc) {
  const int64_t P = G / 2, S = D / 8;
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < P * D * 2) buf.resize(P * D * 2);
  float* qp = buf.data();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t s = 0; s < S; ++s) {
      std::copy(qs + (2 * p) * D + 8 * s, qs + (2 * p) * D + 8 * s + 8, qp + (p * S + s) * 16);
      std::copy(qs + (2 * p + 1) * D + 8 * s, qs + (2 * p + 1) * D + 8 * s + 8, qp + (p * S + s) * 16 + 8);
    }
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float *k0 = rows[i], *k1 = rows[i + 1], *k2 = rows[i + 2], *k3 = rows[i + 3];
    int64_t p = 0;
    for (; p + 2 <= P; p += 2) {
      const float* qa = qp + p * S * 16;
      const float* qb = qa + S * 16;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
      for (int64_t s = 0; s < S; ++s) {
        const __m512 x0 = _mm512_broadcast_f32x8(_mm256_loadu_ps(k0 + 8 * s));
        const __m512 x1 = _mm512_broadcast_f32x8(_mm256_loadu_ps(k1 + 8 * s));
        const __m512 x2 = _mm512_broadcast_f32x8(_mm256_loadu_ps(k2 + 8 * s));
        const __m512 x3 = _mm512_broadcast_f32x8(_mm256_loadu_ps(k3 + 8 * s));
        const __m512 va = _mm512_loadu_ps(qa + 16 * s), vb = _mm512_loadu_ps(qb + 16 * s);
        a0 = _mm512_fmadd_ps(va, x0, a0);
        a1 = _mm512_fmadd_ps(va, x1, a1);
        a2 = _mm512_fmadd_ps(va, x2, a2);
        a3 = _mm512_fmadd_ps(va, x3, a3);
        b0 = _mm512_fmadd_ps(vb, x0, b0);
        b1 = _mm512_fmadd_ps(vb, x1, b1);
        b2 = _mm512_fmadd_ps(vb, x2, b2);
        b3 = _mm512_fmadd_ps(vb, x3, b3);
      }
      store_pair_scores(a0, a1, a2, a3, sc + (2 * p) * kTile + i, sc + (2 * p + 1) * kTile + i);
      store_pair_scores(b0, b1, b2, b3, sc + (2 * p + 2) * kTile + i, sc + (2 * p + 3) * kTile + i);
    }
    if (p < P) {
      const float* qa = qp + p * S * 16;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      for (int64_t s = 0; s < S; ++s) {
        const __m512 va = _mm512_loadu_ps(qa + 16 * s);
        a0 = _mm512_fmadd_ps(va, _mm512_broadcast_f32x8(_mm256_loadu_ps(k0 + 8 * s)), a0);
        a1 = _mm512_fmadd_ps(va, _mm512_broadcast_f32x8(_mm256_loadu_ps(k1 + 8 * s)), a1);
        a2 = _mm512_fmadd_ps(va, _mm512_broadcast_f32x8(_mm256_loadu_ps(k2 + 8 * s)), a2);
        a3 = _mm512_fmadd_ps(va, _mm512_broadcast_f32x8(_mm256_loadu_ps(k3 + 8 * s)), a3);
      }
      store_pair_scores(a0, a1, a2, a3, sc + (2 * p) * kTile + i, sc + (2 * p + 1) * kTile + i);
    }
  }
  return i;
}

// accumulate_pv for two heads at once (accA / pA and accB / pB), D % 16 == 0: each V row is loaded
// once for both; lane-wise, so each head's bits are accumulate_pv's.
LLMOPT_AVX512 inline void accumulate_pv2_avx512(float* accA, const float* pA, float* accB, const float* pB,
                                                const float* const* rows, int64_t n, int64_t D) {
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    __m512 a0 = _mm512_loadu_ps(accA + d), a1 = _mm512_loadu_ps(accA + d + 16);
    __m512 a2 = _mm512_loadu_ps(accA + d + 32), a3 = _mm512_loadu_ps(accA + d + 48);
    __m512 b0 = _mm512_loadu_ps(accB + d), b1 = _mm512_loadu_ps(accB + d + 16);
    __m512 b2 = _mm512_loadu_ps(accB + d + 32), b3 = _mm512_loadu_ps(accB + d + 48);
    for (int64_t i = 0; i < n; ++i) {
      const __m512 wa = _mm512_set1_ps(pA[i]), wb = _mm512_set1_ps(pB[i]);
      const float* v = rows[i] + d;
      const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
      const __m512 v2 = _mm512_loadu_ps(v + 32), v3 = _mm512_loadu_ps(v + 48);
      a0 = _mm512_fmadd_ps(wa, v0, a0);
      a1 = _mm512_fmadd_ps(wa, v1, a1);
      a2 = _mm512_fmadd_ps(wa, v2, a2);
      a3 = _mm512_fmadd_ps(wa, v3, a3);
      b0 = _mm512_fmadd_ps(wb, v0, b0);
      b1 = _mm512_fmadd_ps(wb, v1, b1);
      b2 = _mm512_fmadd_ps(wb, v2, b2);
      b3 = _mm512_fmadd_ps(wb, v3, b3);
    }
    _mm512_storeu_ps(accA + d, a0);
    _mm512_storeu_ps(accA + d + 16, a1);
    _mm512_storeu_ps(accA + d + 32, a2);
    _mm512_storeu_ps(accA + d + 48, a3);
    _mm512_storeu_ps(accB + d, b0);
    _mm512_storeu_ps(accB + d + 16, b1);
    _mm512_storeu_ps(accB + d + 32, b2);
    _mm512_storeu_ps(accB + d + 48, b3);
  }
  for (; d < D; d += 16) {
    __m512 a = _mm512_loadu_ps(accA + d), b = _mm512_loadu_ps(accB + d);
    for (int64_t i = 0; i < n; ++i) {
      const __m512 v = _mm512_loadu_ps(rows[i] + d);
      a = _mm512_fmadd_ps(_mm512_set1_ps(pA[i]), v, a);
      b = _mm512_fmadd_ps(_mm512_set1_ps(pB[i]), v, b);
    }
    _mm512_storeu_ps(accA + d, a);
    _mm512_storeu_ps(accB + d, b);
  }
}

// exp256 on 16 lanes: the same operations, lane for lane (so the same bits)
LLMOPT_AVX512 inline __m512 exp512(__m512 x) {
  const __m512 hi = _mm512_set1_ps(88.3762626647949f);
  const __m512 lo = _mm512_set1_ps(-87.3365447504f);
  const __m512 inf_at = _mm512_set1_ps(88.72283935546875f);
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
  const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  const __m512 one = _mm512_set1_ps(1.0f);

  const __mmask16 overflow = _mm512_cmp_ps_mask(x, inf_at, _CMP_GT_OQ);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  __m512 xc = _mm512_max_ps(lo, _mm512_min_ps(hi, x));

  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, xc);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);

  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, one));

  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  y = _mm512_mask_blend_ps(overflow, y, _mm512_set1_ps(std::numeric_limits<float>::infinity()));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), y);
}

// attend_tile's exp step for one head's kTile = 32 scores s, in place: s becomes p = exp(s - m_new)
LLMOPT_AVX512 inline void exp_tile_avx512(float* s, float m_new) {
  static_assert(kTile == 32, "two 16-float registers per tile");
  const __m512 vm = _mm512_set1_ps(m_new);
  _mm512_storeu_ps(s, exp512(_mm512_sub_ps(_mm512_loadu_ps(s), vm)));
  _mm512_storeu_ps(s + 16, exp512(_mm512_sub_ps(_mm512_loadu_ps(s + 16), vm)));
}

// sum of a tile's kTile probabilities p (8-float chunks added lane by lane, then across lanes): one
// out-of-line function for both exp paths, so -ffast-math's reassociation cannot give them two orders
__attribute__((noinline)) inline float tile_sum(const float* p) {
  __m256 vsum = _mm256_loadu_ps(p);
  for (int64_t i = 8; i < kTile; i += 8) vsum = _mm256_add_ps(vsum, _mm256_loadu_ps(p + i));
  return hsum(vsum);
}

// One head's scores for 4 tokens (tile_scores' odd last head, on either path): out[j] = qa . k[j][:],
// D % 8 == 0, 8-lane FMA chains reduced as reduce8 reduces each of its heads.
inline void head_scores4(const float* qa, const float* const* k, int64_t D, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 va = _mm256_loadu_ps(qa + d);
    a0 = _mm256_fmadd_ps(va, _mm256_loadu_ps(k[0] + d), a0);
    a1 = _mm256_fmadd_ps(va, _mm256_loadu_ps(k[1] + d), a1);
    a2 = _mm256_fmadd_ps(va, _mm256_loadu_ps(k[2] + d), a2);
    a3 = _mm256_fmadd_ps(va, _mm256_loadu_ps(k[3] + d), a3);
  }
  _mm_storeu_ps(out, reduce4(a0, a1, a2, a3));
}

// sc[g * kTile + i] = qs[g, :] . rows[i][:] for g < G, i < n.
// Micro-kernel: 4 tokens x 2 heads per pass (6 loads feed 8 independent FMA chains), then one
// transpose-style reduction writes the 8 scores; D % 8 != 0 and leftover tokens use plain dots.
// With g_attn_avx512 the head pairs' 4-token groups run in tile_scores_avx512 (same bits).
inline void tile_scores(const float* qs, const float* const* rows, int64_t n, int64_t G, int64_t D, float* sc) {
  int64_t i = 0;
  if (D % 8 == 0) {
    if (g_attn_avx512 && G >= 2 && n >= 4) {
      const int64_t done = tile_scores_avx512(qs, rows, n, G, D, sc);
      if (G % 2 == 1)  // the odd last head, as below
        for (int64_t j = 0; j < done; j += 4) head_scores4(qs + (G - 1) * D, rows + j, D, sc + (G - 1) * kTile + j);
      i = done;
    }
    for (; i + 4 <= n; i += 4) {
      const float *k0 = rows[i], *k1 = rows[i + 1], *k2 = rows[i + 2], *k3 = rows[i + 3];
      int64_t g = 0;
      for (; g + 2 <= G; g += 2) {
        const float* qa = qs + g * D;
        const float* qb = qa + D;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 x0 = _mm256_loadu_ps(k0 + d), x1 = _mm256_loadu_ps(k1 + d);
          const __m256 x2 = _mm256_loadu_ps(k2 + d), x3 = _mm256_loadu_ps(k3 + d);
          const __m256 va = _mm256_loadu_ps(qa + d), vb = _mm256_loadu_ps(qb + d);
          a0 = _mm256_fmadd_ps(va, x0, a0);
          a1 = _mm256_fmadd_ps(va, x1, a1);
          a2 = _mm256_fmadd_ps(va, x2, a2);
          a3 = _mm256_fmadd_ps(va, x3, a3);
          b0 = _mm256_fmadd_ps(vb, x0, b0);
          b1 = _mm256_fmadd_ps(vb, x1, b1);
          b2 = _mm256_fmadd_ps(vb, x2, b2);
          b3 = _mm256_fmadd_ps(vb, x3, b3);
        }
        const __m256 r = reduce8(a0, a1, a2, a3, b0, b1, b2, b3);
        _mm_storeu_ps(sc + g * kTile + i, _mm256_castps256_ps128(r));
        _mm_storeu_ps(sc + (g + 1) * kTile + i, _mm256_extractf128_ps(r, 1));
      }
      if (g < G) head_scores4(qs + g * D, rows + i, D, sc + g * kTile + i);
    }
  }
  for (; i < n; ++i)
    for (int64_t g = 0; g < G; ++g) sc[g * kTile + i] = dot(qs + g * D, rows[i], D);
}

inline void scale_inplace(float* x, int64_t n, float s) {
  const __m256 vs = _mm256_set1_ps(s);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vs));
  for (; i < n; ++i) x[i] *= s;
}

// The cache line at p into L1 (prefetcht0). An asm statement, not _mm_prefetch: GCC treats the builtin
// as free of side effects, so a function that only prefetches (PagedKV::prefetch_block) was found
// "const" and every call to it deleted (no prefetch instruction was left in the built module).
inline void prefetch_line(const void* p) { __asm__ volatile("prefetcht0 %0" ::"m"(*static_cast<const char*>(p))); }

// n rows of D floats from p, stride floats apart, into the cache (ahead of use: PagedKV::prefetch_block,
// Quest's block summaries)
inline void prefetch_rows(const float* p, int64_t n, int64_t stride, int64_t D) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t d = 0; d < D; d += 16) prefetch_line(p + r * stride + d);
}

// A paged KV cache seen by one (sequence, kv head): token t lives at base + bt[t / BS] * s0 +
// (t % BS) * s1 (base already offset to the kv head).
struct PagedKV {
  const float* k;
  const float* v;
  int64_t ks0, ks1, vs0, vs1;
  const int32_t* bt;  // this sequence's block table
  int64_t BS;

  // the first n rows of block j (its index in bt) into the cache, fetched while a walk reads the block
  // before it: a block table need not follow memory order, and a kv head's rows are D of every Hk * D
  // floats, which the hardware prefetcher did not keep up with (8k-token decode 1.22x faster; quest.h).
  // kv_int8.h PagedKV8 has the same.
  void prefetch_block(int64_t j, int64_t n, int64_t D) const {
    prefetch_rows(k + bt[j] * ks0, n, ks1, D);
    prefetch_rows(v + bt[j] * vs0, n, vs1, D);
  }
};

// A walk over a paged cache up to token `end` (exclusive) at slot `slot` of block j: at a block start,
// the next block's rows are fetched while this one is read (the float and 8-bit walks' shared rule).
// The walk passes j and slot it computed for its own read: a second t / BS per token (a 64-bit
// division) cost more than the prefetch saved.
template <class KV>
__attribute__((always_inline)) inline void prefetch_next_block(const KV& kv, int64_t j, int64_t slot, int64_t end,
                                                               int64_t D) {
  if (slot == 0 && (j + 1) * kv.BS < end) kv.prefetch_block(j + 1, std::min(kv.BS, end - (j + 1) * kv.BS), D);
}

// One online-softmax step over a tile of n <= kTile tokens whose K and V rows are krow[i] / vrow[i]:
// the G query heads qs [G, D] (already multiplied by the softmax scale) update their running max
// m[g], sum l[g] and unnormalized output acc[g, :]. Scratch: sc [G * kTile]. Shared by the float
// paged attention below, the int8 one (kv_int8.h), which hands it dequantized tile rows, and the
// Quest walk (quest.h).
inline void attend_tile(const float* qs, int64_t G, int64_t D, const float* const* krow, const float* const* vrow,
                        int64_t n, float* m, float* l, float* acc, float* sc) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // scores: sc[g, i] = (q_g * scale) . k_i ; padded with -inf up to kTile
  tile_scores(qs, krow, n, G, D, sc);
  for (int64_t g = 0; g < G; ++g) {
    float* s = sc + g * kTile;
    for (int64_t i = n; i < kTile; ++i) s[i] = neg_inf;
    // online softmax: one rescale of (l, acc) per tile
    __m256 vmax = _mm256_set1_ps(neg_inf);
    for (int64_t i = 0; i < kTile; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + i));
    const float m_new = std::max(m[g], hmax(vmax));
    if (g_attn_avx512) {
      exp_tile_avx512(s, m_new);
    } else {
      const __m256 vm = _mm256_set1_ps(m_new);
      for (int64_t i = 0; i < kTile; i += 8) _mm256_storeu_ps(s + i, exp256(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm)));
    }
    const float alpha = std::exp(m[g] - m_new);  // 0 on the first tile (m = -inf)
    if (alpha != 1.0f) scale_inplace(acc + g * D, D, alpha);
    l[g] = l[g] * alpha + tile_sum(s);
    m[g] = m_new;
  }
  // acc_g += P_g @ V_tile
  int64_t g = 0;
  if (g_attn_avx512 && D % 16 == 0)
    for (; g + 2 <= G; g += 2)
      accumulate_pv2_avx512(acc + g * D, sc + g * kTile, acc + (g + 1) * D, sc + (g + 1) * kTile, vrow, n, D);
  for (; g < G; ++g) accumulate_pv(acc + g * D, sc + g * kTile, vrow, n, D);
}

// Online-softmax attention of R query rows of one sequence that share a block table and a window
// start t0 and end at t1[0] <= t1[1] <= ... <= t1[R-1] (consecutive prefill rows: t1[r] = t1[0] + r;
// one decode row: R = 1), G query heads each: qs [R, G, D] (already multiplied by the softmax scale),
// m / l [R, G], acc [R, G, D] hold the R rows' G heads in order. Tokens are walked in tiles of kTile
// from t0: fill(i, t) makes krow[i] / vrow[i] token t's K / V rows (points them into a float cache,
// or dequantizes an int8 cache's rows into the buffers they point at), once per tile up to the
// longest row's end, for every row; then each row gets attend_tile over its own count
// n_r = min(kTile, t1[r] - tile) (a row whose context ends inside the tile sees the same -inf
// padding; rows past their end skip the tile), so every row's steps are those it gets alone
// (R = 1). attend_tile's arithmetic for one head depends only on n, not on which or how many other
// heads share the call, so rows with the same n_r (a run of rows, as t1 is sorted; every row on a
// full tile) share one call. On return m is the running max, l the sum of exp(s - m) and acc the
// unnormalized sum of exp(s - m) * v (m = -inf, l = 0, acc = 0 for an empty range). Scratch:
// sc [R * G * kTile], krow / vrow [kTile]. The float attend_range_rows below and the int8 one
// (kv_int8.h) are this with their fill.
template <class Fill>
inline void attend_tiles_rows(const float* qs, int64_t R, int64_t G, int64_t D, int64_t t0, const int64_t* t1,
                              float* m, float* l, float* acc, float* sc, const float* const* krow,
                              const float* const* vrow, Fill&& fill) {
  std::fill(acc, acc + R * G * D, 0.0f);
  std::fill(m, m + R * G, -std::numeric_limits<float>::infinity());
  std::fill(l, l + R * G, 0.0f);
  const int64_t end = t1[R - 1];
  int64_t r_lo = 0;  // rows before r_lo have ended
  for (int64_t tile = t0; tile < end; tile += kTile) {
    const int64_t n_max = std::min(kTile, end - tile);
    for (int64_t i = 0; i < n_max; ++i) fill(i, tile + i);
    while (t1[r_lo] <= tile) ++r_lo;
    for (int64_t r = r_lo; r < R;) {
      const int64_t n = std::min(kTile, t1[r] - tile);
      int64_t r1 = r + 1;
      while (r1 < R && std::min(kTile, t1[r1] - tile) == n) ++r1;
      const int64_t h = r * G;
      attend_tile(qs + h * D, (r1 - r) * G, D, krow, vrow, n, m + h, l + h, acc + h * D, sc);
      r = r1;
    }
  }
}

// The first token a row with context L attends to (sliding_window <= 0: none, token 0).
inline int64_t window_start(int64_t L, int64_t sliding_window) {
  return sliding_window > 0 ? std::max<int64_t>(0, L - sliding_window) : 0;
}

// Splits the rows [0, B) of a paged attention call (block tables bt [B, MB], context lengths cl
// [B]) into groups for attend_tiles_rows: group j = rows [first[j], first[j + 1]), at most R rows
// each; row e joins row e - 1's group when its context is one token longer, its window starts at
// the same token and its block table agrees with row e - 1's on every block row e - 1 reads (so by
// induction the last row's table serves the whole group).
inline std::vector<int64_t> group_rows_of(const int32_t* bt, const int32_t* cl, int64_t B, int64_t MB, int64_t BS,
                                          int64_t sliding_window, int64_t R) {
  std::vector<int64_t> first;
  first.reserve(B + 1);
  for (int64_t b = 0; b < B;) {
    first.push_back(b);
    int64_t e = b + 1;
    for (; e < B && e - b < R; ++e) {
      const int64_t Lp = cl[e - 1], L = cl[e];
      if (L != Lp + 1 || window_start(L, sliding_window) != window_start(Lp, sliding_window)) break;
      const int64_t j0 = window_start(Lp, sliding_window) / BS, j1 = (Lp + BS - 1) / BS;
      if (!std::equal(bt + (e - 1) * MB + j0, bt + (e - 1) * MB + j1, bt + e * MB + j0)) break;
    }
    b = e;
  }
  first.push_back(B);
  return first;
}

// ---- float16 KV cache (EngineConfig(kv_dtype="float16")) --------------------------------------
// K/V rows stored as IEEE half (uint16_t bits: torch.float16), half the bytes of float rows. The walks
// below take either view (PagedKV, PagedKV16); on a float16 one each tile's rows are converted to floats
// (F16C, exact) in a per-thread buffer and the float attend_tile runs on them: every output bit is the
// float walk's on a float cache holding the same (rounded) values.

// n halves from src to floats
inline void half_to_float(const uint16_t* src, float* dst, int64_t n) {
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d))));
  for (; d < n; ++d) dst[d] = _cvtsh_ss(src[d]);
}

// n floats from src to halves, rounded to nearest even (the cache write; torch's .to(torch.float16))
inline void float_to_half(const float* src, uint16_t* dst, int64_t n) {
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; d < n; ++d) dst[d] = _cvtss_sh(src[d], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// The cache lines of n bytes from p into the cache
inline void prefetch_bytes(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < n; b += 64) prefetch_line(c + b);
}

// PagedKV of a float16 cache (strides in halves)
struct PagedKV16 {
  const uint16_t* k;
  const uint16_t* v;
  int64_t ks0, ks1, vs0, vs1;
  const int32_t* bt;
  int64_t BS;

  void prefetch_block(int64_t j, int64_t n, int64_t D) const {
    for (int64_t r = 0; r < n; ++r) {
      prefetch_bytes(k + bt[j] * ks0 + r * ks1, D * 2);
      prefetch_bytes(v + bt[j] * vs0 + r * vs1, D * 2);
    }
  }
};

// Per-thread float rows of a float16 tile: [2 * n * D] (K rows, then V rows)
inline float* half_tile_buffer(int64_t n, int64_t D) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < 2 * n * D) buf.resize(2 * n * D);
  return buf.data();
}

// Row r of a walk's tile as floats: a float cache's row itself; a float16 row converted into buf + r * D
inline const float* tile_row(const float* row, float*, int64_t, int64_t) { return row; }
inline const float* tile_row(const uint16_t* row, float* buf, int64_t r, int64_t D) {
  half_to_float(row, buf + r * D, D);
  return buf + r * D;
}

// The element of a paged view's rows (float or uint16_t), and the views the walks below accept
template <class KV>
using kv_elem_t = std::remove_cv_t<std::remove_pointer_t<decltype(KV::k)>>;
template <class KV>
constexpr bool is_float_view = std::is_same_v<KV, PagedKV> || std::is_same_v<KV, PagedKV16>;

// attend_tiles_rows over a paged cache (kv.bt: a block table valid up to t1[R-1]): krow / vrow point straight
// at a float cache's rows, or at a float16 cache's rows converted into the thread's buffer.
template <class KV>
inline void attend_range_rows(const float* qs, int64_t R, int64_t G, int64_t D, const KV& kv, int64_t t0,
                              const int64_t* t1, float* m, float* l, float* acc, float* sc, const float** krow,
                              const float** vrow) {
  static_assert(is_float_view<KV>, "a float32 or float16 paged view (kv_int8.h walks the 8-bit ones)");
  const int64_t end = t1[R - 1];
  float* const kf = std::is_same_v<KV, PagedKV> ? nullptr : half_tile_buffer(kTile, D);
  float* const vf = kf == nullptr ? nullptr : kf + kTile * D;
  attend_tiles_rows(qs, R, G, D, t0, t1, m, l, acc, sc, krow, vrow, [&](int64_t i, int64_t t) {
    const int64_t j = t / kv.BS, slot = t % kv.BS, blk = kv.bt[j];
    if (R == 1) prefetch_next_block(kv, j, slot, end, D);  // a group re-reads what the one before it read
    krow[i] = tile_row(kv.k + blk * kv.ks0 + slot * kv.ks1, kf, i, D);
    vrow[i] = tile_row(kv.v + blk * kv.vs0 + slot * kv.vs1, vf, i, D);
  });
}

// attend_range_rows for one row over tokens [t0, t1) (qs [G, D], m / l [G], acc [G, D]).
template <class KV>
inline void attend_range(const float* qs, int64_t G, int64_t D, const KV& kv, int64_t t0, int64_t t1,
                         float* m, float* l, float* acc, float* sc, const float** krow, const float** vrow) {
  attend_range_rows(qs, 1, G, D, kv, t0, &t1, m, l, acc, sc, krow, vrow);
}

// attend_range for the kv heads [0, Hk) of one row at once: kv is head 0's view, head h's rows are hk
// elements further (the cache's head stride, K and V alike); qs [Hk, G, D], m / l [Hk, G], acc [Hk, G, D]
// (head h's part is what attend_range gives it alone: the same tiles and attend_tile calls), krow / vrow
// [Hk * kTile]. Each tile's tokens are read for every head in turn, so a token's rows (the heads sit side
// by side in the cache) are used together: the walk reads the blocks front to back, where a walk per head
// reads every Hk-th piece of them. Each token prefetches the rows of the token kPrefetchTokens ahead
// (every head). Decode of 4 rows x 2,048 tokens x 30 layers, SmolLM2 shapes, 2 threads: 27.0 ms per pass
// with a walk per head (its block prefetch), 22.7 with this walk and a block prefetch, 21.4 with this one.
// A float16 view converts each token's Hk rows into the thread's buffer (head h's at row h * kTile + i).
constexpr int64_t kPrefetchTokens = 8;

template <class KV>
inline void attend_range_heads(const float* qs, int64_t Hk, int64_t G, int64_t D, const KV& kv, int64_t hk,
                               int64_t t0, int64_t t1, float* m, float* l, float* acc, float* sc, const float** krow,
                               const float** vrow) {
  static_assert(is_float_view<KV>, "a float32 or float16 paged view");
  using E = kv_elem_t<KV>;
  std::fill(acc, acc + Hk * G * D, 0.0f);
  std::fill(m, m + Hk * G, -std::numeric_limits<float>::infinity());
  std::fill(l, l + Hk * G, 0.0f);
  float* const kf = std::is_same_v<KV, PagedKV> ? nullptr : half_tile_buffer(Hk * kTile, D);
  float* const vf = kf == nullptr ? nullptr : kf + Hk * kTile * D;
  const int64_t width = ((Hk - 1) * hk + D) * static_cast<int64_t>(sizeof(E));  // bytes of a token's heads
  for (int64_t tile = t0; tile < t1; tile += kTile) {
    const int64_t n = std::min(kTile, t1 - tile);
    int64_t j = tile / kv.BS, slot = tile % kv.BS;
    for (int64_t i = 0; i < n; ++i) {
      if (tile + i + kPrefetchTokens < t1) {
        int64_t jp = j, sp = slot + kPrefetchTokens;
        while (sp >= kv.BS) sp -= kv.BS, ++jp;
        prefetch_bytes(kv.k + kv.bt[jp] * kv.ks0 + sp * kv.ks1, width);
        prefetch_bytes(kv.v + kv.bt[jp] * kv.vs0 + sp * kv.vs1, width);
      }
      const E* kr = kv.k + kv.bt[j] * kv.ks0 + slot * kv.ks1;
      const E* vr = kv.v + kv.bt[j] * kv.vs0 + slot * kv.vs1;
      for (int64_t h = 0; h < Hk; ++h) {
        krow[h * kTile + i] = tile_row(kr + h * hk, kf, h * kTile + i, D);
        vrow[h * kTile + i] = tile_row(vr + h * hk, vf, h * kTile + i, D);
      }
      if (++slot == kv.BS) slot = 0, ++j;
    }
    for (int64_t h = 0; h < Hk; ++h)
      attend_tile(qs + h * G * D, G, D, krow + h * kTile, vrow + h * kTile, n, m + h * G, l + h * G,
                  acc + h * G * D, sc);
  }
}

// Whether a call with B decode rows (one query each, no token split) on nt threads walks one item per
// row (attend_range_heads) rather than one per (row, kv head): the rows must keep every thread busy.
// Either way every head's bits are the same.
inline bool walk_rows_whole(int64_t B, int64_t Hk, int64_t nt) {
  return g_walk_whole && Hk > 1 && B > 0 && (B % nt == 0 || B >= 2 * nt);
}

// H2O's attention mass of one query row (engine/kv_policy.py): its G query heads qs [G, D] (already
// multiplied by the softmax scale) over tokens [0, L), fill(i, t) pointing krow[i] at token t's K row
// (a float cache's row, or an 8-bit row dequantized into a buffer). out[t] = sum_g exp(s_gt - m_g) / l_g
// (written, not added) with s the attention's own tile_scores, m_g = max_t s_gt and l_g = sum_t
// exp(s_gt - m_g): the softmax probabilities the attention weighted V with, summed over the group.
// K is read once (every score kept in s_all [G * L] between the passes). Scratch: sc [G * kTile].
template <class Fill>
inline void attention_mass_row(const float* qs, int64_t G, int64_t D, int64_t L, float* out, float* s_all,
                               float* sc, const float* const* krow, Fill&& fill) {
  for (int64_t tile = 0; tile < L; tile += kTile) {
    const int64_t n = std::min(kTile, L - tile);
    for (int64_t i = 0; i < n; ++i) fill(i, tile + i);
    tile_scores(qs, krow, n, G, D, sc);
    for (int64_t g = 0; g < G; ++g) std::copy(sc + g * kTile, sc + g * kTile + n, s_all + g * L + tile);
  }
  std::fill(out, out + L, 0.0f);
  for (int64_t g = 0; g < G; ++g) {
    float* s = s_all + g * L;
    __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t t = 0;
    for (; t + 8 <= L; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + t));
    float mx = hmax(vmax);
    for (; t < L; ++t) mx = std::max(mx, s[t]);
    const __m256 vm = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    t = 0;
    for (; t + 8 <= L; t += 8) {
      const __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
      _mm256_storeu_ps(s + t, p);
      vsum = _mm256_add_ps(vsum, p);
    }
    float sum = hsum(vsum);
    for (; t < L; ++t) {
      s[t] = std::exp(s[t] - mx);
      sum += s[t];
    }
    const __m256 vinv = _mm256_set1_ps(1.0f / sum);
    t = 0;
    for (; t + 8 <= L; t += 8)
      _mm256_storeu_ps(out + t, _mm256_fmadd_ps(_mm256_loadu_ps(s + t), vinv, _mm256_loadu_ps(out + t)));
    for (; t < L; ++t) out[t] += s[t] * (1.0f / sum);
  }
}

// attention_mass_row over the B x Hk (row, kv head) items of a paged cache, `threads` OpenMP threads
// (fused.cpp attention_mass: a float cache; kv_int8.cpp attention_mass_int8: an 8-bit one). q [B, Hk * G,
// D]; each item's G query heads are multiplied by `scale`, and its mass is written to out + item * max_len.
// fill_for(b, h, krow, kf) returns the item's fill(i, t) for attention_mass_row: it points krow[i] at K
// row t, or (tile_buffer) dequantizes it into kf + i * D, the kTile x D buffer krow already points into.
template <class FillFor>
inline void attention_mass_items(const float* q, int64_t B, int64_t Hk, int64_t G, int64_t D,
                                 const int32_t* context_lens, int64_t max_len, float scale, int threads,
                                 bool tile_buffer, float* out, FillFor&& fill_for) {
  const int64_t items = B * Hk;
#pragma omp parallel num_threads(threads) if (items > 1)
  {
    std::vector<float> qs(G * D), sc(G * kTile), s_all(G * max_len), kf(tile_buffer ? kTile * D : 0);
    std::vector<const float*> krow(kTile);
    if (tile_buffer)
      for (int64_t i = 0; i < kTile; ++i) krow[i] = kf.data() + i * D;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / Hk, h = item % Hk;
      for (int64_t g = 0; g < G; ++g) {
        const float* src = q + ((b * Hk + h) * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qs[g * D + d] = src[d] * scale;
      }
      attention_mass_row(qs.data(), G, D, context_lens[b], out + item * max_len, s_all.data(), sc.data(),
                         krow.data(), fill_for(b, h, krow.data(), kf.data()));
    }
  }
}

// Token chunks of one row's attention (flash-decoding), a rule that depends on the row's own context L
// and window and the model and thread count only, never on the batch: when the model has fewer kv heads
// than threads (one row alone leaves threads idle), a row whose window holds span > kSplitTokens tokens is cut into
// chunks of kSplitTokens tokens from its window start (the last one shorter), each an item of its own,
// and the chunks' partials are merged in order (merge_splits); else one walk. So a row gets the same
// bits alone or in any batch (prefill groups share their chunk boundaries: the same window start).
// With Hk >= threads every batch has enough (row, kv head) items and nothing is split.
constexpr int64_t kSplitTokens = 256;
inline int64_t token_chunks(int64_t L, int64_t sliding_window, int64_t Hk, int64_t nt) {
  const int64_t span = L - window_start(L, sliding_window);
  return Hk < nt && span > kSplitTokens ? (span + kSplitTokens - 1) / kSplitTokens : 1;
}

// Flash-decoding merge of S token splits for one (sequence, kv head) pair bh and query head g:
// dst[0:D] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over the splits' partial (m, l, acc)
// (pm / pl [pairs * S, G], pacc [pairs * S, G, D]); zeros for an empty context.
inline void merge_splits(const float* pm, const float* pl, const float* pacc, int64_t S, int64_t G, int64_t D,
                         int64_t bh, int64_t g, float* dst) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::fill(dst, dst + D, 0.0f);
  float M = neg_inf;
  for (int64_t s = 0; s < S; ++s) M = std::max(M, pm[(bh * S + s) * G + g]);
  if (M == neg_inf) return;  // empty context
  float denom = 0.0f;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t idx = (bh * S + s) * G + g;
    if (pm[idx] == neg_inf) continue;
    const float w = std::exp(pm[idx] - M);
    denom += w * pl[idx];
    const float* a = pacc + idx * D;
    const __m256 vw = _mm256_set1_ps(w);
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      _mm256_storeu_ps(dst + d, _mm256_fmadd_ps(vw, _mm256_loadu_ps(a + d), _mm256_loadu_ps(dst + d)));
    for (; d < D; ++d) dst[d] += w * a[d];
  }
  scale_inplace(dst, D, 1.0f / denom);
}

}  // namespace llmopt_f
