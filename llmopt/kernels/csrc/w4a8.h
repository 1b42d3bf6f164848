// int4 grouped weights x per-token, per-group int8 activations (AVX2): the pieces shared by the
// standalone GEMM entry point (qgemm.cpp: w4a8_gemm) and the fused decode step (decode.cpp).
//
//   y[m,n] = sum_g scale[n,g] * sx[m,g] * sum_{k in g} q[n,k] xq[m,k] + sum_g min[n,g] * xsum[m,g] + bias[n]
//
// Weights: uint8 [N, roundup(K, 64) / 2], two 4-bit codes per byte. Layout 0 ("w4a8", ggml halves):
// byte i of a 64-block = q[i] | q[i+32] << 4. Layout 1 ("int4 lanes", formats.pack_lanes): handled by
// permuting each 64-block of the int8 activations once (permute_row_to_lanes), so one kernel reads
// both. maddubs(q u8 in [0,15], x s8) pair sums are <= 2*15*127 = 3810: up to 8 of them (group 256)
// add up in int16 without overflow.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#define LLMOPT_INLINE inline __attribute__((always_inline))

namespace llmopt_q {

enum ScaleKind : int { SK_F32 = 0, SK_F16 = 1, SK_E8M0 = 2 };

// Software prefetch distance (bytes ahead in a column's weight stream) of the int4 kernels and the
// int8 head below; 0 turns it off. The hardware prefetcher alone leaves DRAM bandwidth unused at
// one activation row: 2048x8192 int4 g64 GEMV, 2 threads, weights streamed from DRAM, same run:
// 0.185 vs 0.231 ms (2048 B ahead vs none); SmolLM2 int4 decode 1.2-1.4x tok/s single-stream.
// Each extension that includes this header has its own copy (set through _set_w4_prefetch).
inline int64_t w4_prefetch_bytes = 2048;

LLMOPT_INLINE void prefetch_w4(const uint8_t* p) {
  if (w4_prefetch_bytes > 0) _mm_prefetch((const char*)(p + w4_prefetch_bytes), _MM_HINT_T0);
}

LLMOPT_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// scales/mins -> fp32 scratch
inline void load_params(const void* src, int kind, int64_t count, float* dst) {
  int64_t i = 0;
  if (kind == SK_F32) {
    std::memcpy(dst, src, sizeof(float) * count);
    return;
  }
  if (kind == SK_F16) {
    const uint16_t* s = (const uint16_t*)src;
    for (; i + 8 <= count; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))));
    for (; i < count; ++i) dst[i] = _cvtsh_ss(s[i]);
    return;
  }
  // E8M0: 2^(e-127); e == 0 is treated as 0 (never produced by the quantizer)
  const uint8_t* s = (const uint8_t*)src;
  for (; i < count; ++i) {
    uint32_t bits = uint32_t(s[i]) << 23;
    float f;
    std::memcpy(&f, &bits, 4);
    dst[i] = f;
  }
}

LLMOPT_INLINE float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One activation row: symmetric int8 per group of gs (round half to even, like torch.round) into
// d[0:Kp] (zero padded past K), its scale per group into sx[0:Gp] (zero past G) and the exact float
// sum per group into xsum[0:G].
inline void quant_row_group_i8(const float* xr, int64_t K, int64_t Kp, int64_t gs, int8_t* d, float* sx,
                               float* xsum, int64_t Gp) {
  const int64_t G = K / gs;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t g = 0; g < G; ++g) {
    const float* xg = xr + g * gs;
    __m256 am = _mm256_setzero_ps(), sm = _mm256_setzero_ps();
    for (int64_t k = 0; k < gs; k += 8) {
      const __m256 v = _mm256_loadu_ps(xg + k);
      am = _mm256_max_ps(am, _mm256_and_ps(v, absmask));
      sm = _mm256_add_ps(sm, v);
    }
    __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(am), _mm256_extractf128_ps(am, 1));
    a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
    a4 = _mm_max_ss(a4, _mm_movehdup_ps(a4));
    volatile float amax_v = _mm_cvtss_f32(a4);  // keep the divisions exactly as written (matches torch)
    const float inv = amax_v > 0.f ? 127.0f / amax_v : 0.f;
    sx[g] = amax_v / 127.0f;
    xsum[g] = hsum(sm);
    const __m256 iv = _mm256_set1_ps(inv);
    for (int64_t k = 0; k < gs; k += 8) {
      __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xg + k), iv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m256i i32 = _mm256_cvtps_epi32(v);
      __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
      _mm_storel_epi64((__m128i*)(d + g * gs + k), _mm_packs_epi16(i16, i16));
    }
  }
  for (int64_t k = K; k < Kp; ++k) d[k] = 0;
  for (int64_t g = G; g < Gp; ++g) sx[g] = 0.f;
}

// The int4 "8 lanes x j" layout (formats.pack_lanes) read by the maddubs kernel: for a 64-block
// loaded as 32 bytes, (v & 0xF) byte 4l+b is weight 16b+l and ((v >> 4) & 0xF) byte 4l+b is weight
// 16b+8+l (l = lane 0..7, b = byte 0..3). Permuting each 64-block of one int8 activation row into
// that order lets int4 weights use the integer kernel unchanged (whole-block groups only: group
// size a multiple of 64, since the two halves mix the two 32-halves of a block).
inline void permute_row_to_lanes(int8_t* row, int64_t Kp) {
  int8_t tmp[64];
  for (int64_t b0 = 0; b0 < Kp; b0 += 64) {
    int8_t* d = row + b0;
    std::memcpy(tmp, d, 64);
    for (int l = 0; l < 8; ++l)
      for (int b = 0; b < 4; ++b) {
        d[4 * l + b] = tmp[16 * b + l];
        d[32 + 4 * l + b] = tmp[16 * b + 8 + l];
      }
  }
}

// comb[g] = scale[g] * sx[g]: the per-group float factor of the integer group sums
template <int R, int GS>
LLMOPT_INLINE void dot_w4a8(const uint8_t* __restrict w, const float* const* comb, const int8_t* const* xq, int64_t b0,
                            int64_t b1, float* out) {
  constexpr int NA = (R == 1) ? 4 : 2;  // independent FMA chains per row (latency 4)
  __m256 acc[R][NA];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < NA; ++a) acc[r][a] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  // accumulator indices must be compile-time constants (else acc[][] lives in memory): unroll
  if constexpr (GS == 32) {
    auto blk = [&](int64_t b, auto ac) {
      constexpr int a = decltype(ac)::value;
      const __m256i v = _mm256_loadu_si256((const __m256i*)(w + b * 32));
      const __m256i lo = _mm256_and_si256(v, m4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      for (int r = 0; r < R; ++r) {
        const __m256i i0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)(xq[r] + b * 64))), ones);
        const __m256i i1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xq[r] + b * 64 + 32))), ones);
        acc[r][a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_broadcast_ss(comb[r] + 2 * b), acc[r][a]);
        acc[r][a + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_broadcast_ss(comb[r] + 2 * b + 1), acc[r][a + 1]);
      }
    };
    int64_t b = b0;
    if constexpr (NA == 4) {
      for (; b + 2 <= b1; b += 2) {
        prefetch_w4(w + b * 32);
        blk(b, std::integral_constant<int, 0>{});
        blk(b + 1, std::integral_constant<int, 2>{});
      }
    }
    for (; b < b1; ++b) blk(b, std::integral_constant<int, 0>{});
  } else {
    constexpr int BPG = GS / 64;
    auto grp = [&](int64_t b, auto ac) {
      constexpr int a = decltype(ac)::value;
      __m256i s16[R];
      for (int r = 0; r < R; ++r) s16[r] = _mm256_setzero_si256();
      for (int i = 0; i < BPG; ++i) {
        const int64_t bb = b + i;
        const __m256i v = _mm256_loadu_si256((const __m256i*)(w + bb * 32));
        const __m256i lo = _mm256_and_si256(v, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        for (int r = 0; r < R; ++r) {
          const __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)(xq[r] + bb * 64)));
          const __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xq[r] + bb * 64 + 32)));
          s16[r] = _mm256_add_epi16(s16[r], _mm256_add_epi16(p0, p1));
        }
      }
      const int64_t g = b / BPG;
      for (int r = 0; r < R; ++r) {
        // (tried: two shifts + add instead of madd here: 10-25% slower)
        const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[r], ones));
        acc[r][a] = _mm256_fmadd_ps(f, _mm256_broadcast_ss(comb[r] + g), acc[r][a]);
      }
    };
    int64_t b = b0;
    for (; b + NA * BPG <= b1; b += NA * BPG) {
      for (int q = 0; q < NA * BPG; q += 2) prefetch_w4(w + (b + q) * 32);  // one per 64-byte line
      grp(b, std::integral_constant<int, 0>{});
      grp(b + BPG, std::integral_constant<int, 1>{});
      if constexpr (NA == 4) {
        grp(b + 2 * BPG, std::integral_constant<int, 2>{});
        grp(b + 3 * BPG, std::integral_constant<int, 3>{});
      }
    }
    for (; b < b1; b += BPG) grp(b, std::integral_constant<int, 0>{});
  }
  for (int r = 0; r < R; ++r) {
    __m256 a = acc[r][0];
    for (int i = 1; i < NA; ++i) a = _mm256_add_ps(a, acc[r][i]);
    out[r] += hsum(a);
  }
}


// Quantized activations of one product: M rows of Kp int8 (lane-permuted for layout 1), sx [M, Gp]
// scales, xsum [M, G] exact group sums.
struct W4A8Act {
  const int8_t* xq;
  const float* sx;
  const float* xsum;
  int64_t M, K, Kp, G, Gp;
};

inline W4A8Act w4a8_act_shape(int64_t M, int64_t K, int64_t gs) {
  W4A8Act a{};
  a.M = M;
  a.K = K;
  a.Kp = (K + 63) / 64 * 64;
  a.G = K / gs;
  a.Gp = std::max<int64_t>(a.G, (a.Kp + gs - 1) / gs);
  return a;
}

// Per-thread scratch of w4a8_cols (grown on demand, reused across calls).
struct W4A8Scratch {
  std::vector<float> acc, sc, mn, comb;
  void reserve(int64_t M, int64_t CB, int64_t G, int64_t Gp) {
    if ((int64_t)acc.size() < M * CB) acc.resize(M * CB);
    if ((int64_t)sc.size() < CB * Gp) sc.resize(CB * Gp, 0.f);
    if ((int64_t)mn.size() < G) mn.resize(G);
    if ((int64_t)comb.size() < 4 * Gp) comb.resize(4 * Gp);
  }
};

// R (1-3) activation rows, fp16 scales and mins: one weight row at a time, whole K, the per-group
// factors scale * sx converted straight from fp16. Same arithmetic in the same order as the blocked
// path below (bit-identical results: 3 rows are 2 + 1, the third re-reading the row from L1, as
// there); about 10% less time at one row, where the blocked path's extra passes over scales and
// mins cost as much as a tenth of the integer work.
template <int GS, int R>
void w4a8_cols_rows(const W4A8Act& A, const uint8_t* W, const uint16_t* scales, const uint16_t* mins,
                    const float* bp, float* Y, int64_t ldy, int64_t n0, int64_t n1, W4A8Scratch& S) {
  const int64_t Kp = A.Kp, G = A.G, Gp = A.Gp;
  S.reserve(R, 1, G, Gp);
  float* comb = S.comb.data();
  float* mn = S.mn.data();
  const int8_t* xr[R];
  const float* cr[R];
  for (int r = 0; r < R; ++r) {
    xr[r] = A.xq + r * Kp;
    cr[r] = comb + r * Gp;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* s = scales + n * G;
    const uint16_t* mp = mins + n * G;
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
      const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + g)));
      for (int r = 0; r < R; ++r) _mm256_storeu_ps(comb + r * Gp + g, _mm256_mul_ps(sv, _mm256_loadu_ps(A.sx + r * Gp + g)));
      _mm256_storeu_ps(mn + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mp + g))));
    }
    for (; g < G; ++g) {
      for (int r = 0; r < R; ++r) comb[r * Gp + g] = _cvtsh_ss(s[g]) * A.sx[r * Gp + g];
      mn[g] = _cvtsh_ss(mp[g]);
    }
    float o[R];
    for (int r = 0; r < R; ++r) o[r] = 0.f;
    if constexpr (R == 3) {
      dot_w4a8<2, GS>(W + n * Kp / 2, cr, xr, 0, Kp / 64, o);
      dot_w4a8<1, GS>(W + n * Kp / 2, cr + 2, xr + 2, 0, Kp / 64, o + 2);
    } else {
      dot_w4a8<R, GS>(W + n * Kp / 2, cr, xr, 0, Kp / 64, o);
    }
    const float b = bp ? bp[n] : 0.f;
    for (int r = 0; r < R; ++r) Y[r * ldy + n] = o[r] + dot_f32(mn, A.xsum + r * G, G) + b;
  }
}

// Output columns [n0, n1) of Y [M, N] (row stride ldy) for weights W [N, Kp/2], scales/mins [N, G]
// (float32 or float16 per scale_kind / min_kind), optional bias [N].
template <int GS>
void w4a8_cols(const W4A8Act& A, const uint8_t* W, const void* scales, int scale_kind, const void* mins,
               int min_kind, const float* bp, float* Y, int64_t ldy, int64_t n0, int64_t n1, W4A8Scratch& S) {
  const int64_t M = A.M, Kp = A.Kp, G = A.G, Gp = A.Gp;
  if (M <= 3 && scale_kind == SK_F16 && min_kind == SK_F16) {
    const uint16_t *s16 = (const uint16_t*)scales, *m16 = (const uint16_t*)mins;
    if (M == 1) return w4a8_cols_rows<GS, 1>(A, W, s16, m16, bp, Y, ldy, n0, n1, S);
    if (M == 2) return w4a8_cols_rows<GS, 2>(A, W, s16, m16, bp, Y, ldy, n0, n1, S);
    return w4a8_cols_rows<GS, 3>(A, W, s16, m16, bp, Y, ldy, n0, n1, S);
  }
  const int64_t nblk = Kp / 64;
  // k-chunk (in 64-blocks, a multiple of the group) keeps a tile of activation rows in L1
  int64_t kcb = nblk;
  if (M > 1) {
    kcb = std::max<int64_t>(64, GS / 64);
    if (kcb >= nblk) kcb = nblk;
  }
  const int ssz = scale_kind == SK_F32 ? 4 : 2, msz = min_kind == SK_F32 ? 4 : 2;
  constexpr int64_t CB = 16;
  S.reserve(M, CB, G, Gp);
  float* acc = S.acc.data();
  float* sc = S.sc.data();
  float* comb = S.comb.data();
  for (int64_t nc = n0; nc < n1; nc += CB) {
    const int64_t nce = std::min(nc + CB, n1);
    std::fill(acc, acc + M * CB, 0.f);
    for (int64_t n = nc; n < nce; ++n) load_params((const char*)scales + n * G * ssz, scale_kind, G, &sc[(n - nc) * Gp]);
    for (int64_t kb = 0; kb < nblk; kb += kcb) {
      const int64_t kbe = std::min(kb + kcb, nblk);
      // group range of this k-chunk (GS == 32: two groups per block)
      const int64_t g0 = GS == 32 ? 2 * kb : kb / (GS / 64), g1 = GS == 32 ? 2 * kbe : (kbe + GS / 64 - 1) / (GS / 64);
      auto tile = [&](auto rc, int64_t m) {
        constexpr int R = decltype(rc)::value;
        const int8_t* xr[R];
        const float* cr[R];
        for (int r = 0; r < R; ++r) {
          xr[r] = A.xq + (m + r) * Kp;
          cr[r] = comb + r * Gp;
        }
        for (int64_t n = nc; n < nce; ++n) {
          const float* s = &sc[(n - nc) * Gp];
          for (int r = 0; r < R; ++r) {
            const float* sxr = A.sx + (m + r) * Gp;
            float* c = comb + r * Gp;
            int64_t g = g0;
            for (; g + 8 <= g1; g += 8)
              _mm256_storeu_ps(c + g, _mm256_mul_ps(_mm256_loadu_ps(s + g), _mm256_loadu_ps(sxr + g)));
            for (; g < g1; ++g) c[g] = s[g] * sxr[g];
          }
          float o[R];
          for (int r = 0; r < R; ++r) o[r] = 0.f;
          dot_w4a8<R, GS>(W + n * Kp / 2, cr, xr, kb, kbe, o);
          for (int r = 0; r < R; ++r) acc[(m + r) * CB + (n - nc)] += o[r];
        }
      };
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) tile(std::integral_constant<int, 4>{}, m);
      if (M - m >= 2) {
        tile(std::integral_constant<int, 2>{}, m);
        m += 2;
      }
      if (m < M) tile(std::integral_constant<int, 1>{}, m);
    }
    float* mn = S.mn.data();
    for (int64_t n = nc; n < nce; ++n) {
      load_params((const char*)mins + n * G * msz, min_kind, G, mn);
      const float b = bp ? bp[n] : 0.f;
      for (int64_t m = 0; m < M; ++m) Y[m * ldy + n] = acc[m * CB + (n - nc)] + dot_f32(mn, A.xsum + m * G, G) + b;
    }
  }
}

// Runtime group size -> template (32/64/128/256; the caller checks the value).
template <class F>
LLMOPT_INLINE void with_group(int64_t gs, const F& f) {
  switch (gs) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: f(std::integral_constant<int, 256>{}); break;
  }
}

}  // namespace llmopt_q

namespace llmopt_q {

// Re-layout of per-group fp16 scales (or mins) [N, G] into [N/4, G, 4]: the four values a 4-column
// tile needs for one group are one 8-byte load (N % 4 == 0).
inline void interleave4_f16(const uint16_t* src, int64_t N, int64_t G, uint16_t* dst) {
  for (int64_t n4 = 0; n4 < N / 4; ++n4)
    for (int64_t g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) dst[(n4 * G + g) * 4 + c] = src[(n4 * 4 + c) * G + g];
}

// {sum of v[0], sum of v[1], sum of v[2], sum of v[3]} (all 8 int32 lanes of each)
LLMOPT_INLINE __m128i hsum4_i32(const __m256i* v) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// 4 output columns x R activation rows (R = 1, 2) for the int4 lane layout (group GS, a multiple
// of 64): each 32-byte weight block is decoded once for the R rows; the integer group sums of the 4
// columns are reduced horizontally to one int32x4 per row (exact), then one float FMA per group and
// row applies scale * sx to all four, and a second adds min * xsum. W points at the first column's
// row (rows rowbytes apart); sc4 / mn4 at the tile's [G, 4] fp16 scales / mins; xq / sx / xsum at
// row 0 of the activations (rows Kp / Gp / G apart).
template <int GS, int R>
LLMOPT_INLINE void gemv4_w4a8(const uint8_t* __restrict W, int64_t rowbytes, const uint16_t* __restrict sc4,
                              const uint16_t* __restrict mn4, int64_t G, const int8_t* __restrict xq, int64_t Kp,
                              const float* __restrict sx, int64_t Gp, const float* __restrict xsum, __m128* out) {
  constexpr int BPG = GS / 64;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m128 acc[R], accm[R];
  for (int r = 0; r < R; ++r) acc[r] = accm[r] = _mm_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i s[R][4];
    for (int c = 0; c < 4; ++c) {
      const uint8_t* wc = W + c * rowbytes + g * BPG * 32;
      if constexpr (BPG == 1) {
        if (!(g & 1)) prefetch_w4(wc);
      } else {
        for (int i = 0; i < BPG; i += 2) prefetch_w4(wc + i * 32);
      }
      __m256i s16[R];
      for (int r = 0; r < R; ++r) s16[r] = _mm256_setzero_si256();
      for (int i = 0; i < BPG; ++i) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(wc + i * 32));
        const __m256i lo = _mm256_and_si256(v, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        for (int r = 0; r < R; ++r) {
          const int8_t* xb = xq + r * Kp + (g * BPG + i) * 64;
          const __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)xb));
          const __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xb + 32)));
          s16[r] = _mm256_add_epi16(s16[r], _mm256_add_epi16(p0, p1));
        }
      }
      for (int r = 0; r < R; ++r) s[r][c] = _mm256_madd_epi16(s16[r], ones);
    }
    const __m128 sc = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(sc4 + g * 4)));
    const __m128 mn = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(mn4 + g * 4)));
    for (int r = 0; r < R; ++r) {
      const __m128i t = hsum4_i32(s[r]);
      acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(t), _mm_mul_ps(sc, _mm_set1_ps(sx[r * Gp + g])), acc[r]);
      accm[r] = _mm_fmadd_ps(mn, _mm_set1_ps(xsum[r * G + g]), accm[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm_add_ps(acc[r], accm[r]);
}

// Rows from which the 4-column tiles (w4a8_cols4) beat the column kernels (w4a8_cols): SmolLM2-135M
// int4 decode step, 1 thread: M=1 8.3 vs 6.9 ms, M=2 11.4 vs 9.1, M=4 16.5 vs 19.9, M=16 40.2 vs
// 48.4 ms; one 576x1536 linear, M=4 / 16 / 64: 0.047 vs 0.070, 0.177 vs 0.262, 0.67 vs 1.22 ms.
constexpr int64_t kW4TileMinRows = 4;

// Columns [n0, n1) (multiples of 4) of Y [A.M, N] for the int4 lane layout with interleaved fp16
// scales / mins (interleave4_f16). Each 4-column weight slice stays in L1 across the rows.
// The rows of one 4-column tile at column n, two at a time (then an odd last one):
// tile(integral_constant R, m, out) writes rows m..m+R-1 into out[0..R); each plus bias[n..n+4)
// is stored at Y[row, n..n+4).
template <class Tile>
LLMOPT_INLINE void tile_rows(int64_t M, const float* bp, float* Y, int64_t ldy, int64_t n, const Tile& tile) {
  const __m128 b = bp ? _mm_loadu_ps(bp + n) : _mm_setzero_ps();
  __m128 r[2];
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) {
    tile(std::integral_constant<int, 2>{}, m, r);
    _mm_storeu_ps(Y + m * ldy + n, _mm_add_ps(r[0], b));
    _mm_storeu_ps(Y + (m + 1) * ldy + n, _mm_add_ps(r[1], b));
  }
  if (m < M) {
    tile(std::integral_constant<int, 1>{}, m, r);
    _mm_storeu_ps(Y + m * ldy + n, _mm_add_ps(r[0], b));
  }
}

template <int GS>
void w4a8_cols4(const W4A8Act& A, const uint8_t* W, const uint16_t* sc4, const uint16_t* mn4, const float* bp,
                float* Y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t rowbytes = A.Kp / 2, G = A.G;
  for (int64_t n = n0; n < n1; n += 4)
    tile_rows(A.M, bp, Y, ldy, n, [&](auto rc, int64_t m, __m128* r) {
      gemv4_w4a8<GS, decltype(rc)::value>(W + n * rowbytes, rowbytes, sc4 + n * G, mn4 + n * G, G, A.xq + m * A.Kp,
                                          A.Kp, A.sx + m * A.Gp, A.Gp, A.xsum + m * G, r);
    });
}

// ---- int8 grouped (symmetric) weights x per-group int8 activations ----------------------------
// The decode-time lm_head: weights int8 [N, Kp] natural order (formats "int8", q in [-127, 127],
// rows padded to Kp = roundup(K, 32)), fp16 scale per group of GS; activations quantized per group
// of GS (quant_row_group_i8, no lane permutation). |w| (u8) * sign(x, w) (s8) pair sums are
// <= 2 * 127 * 127 < 2^15: each maddubs is widened to int32 at once.
//   y[m, n] = sum_g scale[n, g] * sx[m, g] * sum_{k in g} q[n, k] xq[m, k] + bias[n]
template <int GS, int R>
LLMOPT_INLINE void gemv4_i8(const int8_t* __restrict W, int64_t Kp, const uint16_t* __restrict sc4, int64_t G,
                            const int8_t* __restrict xq, int64_t xKp, const float* __restrict sx, int64_t Gp,
                            __m128* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m128 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i s[R][4];
    for (int c = 0; c < 4; ++c) {
      for (int r = 0; r < R; ++r) s[r][c] = _mm256_setzero_si256();
      for (int i = 0; i < GS; i += 64) prefetch_w4((const uint8_t*)(W + c * Kp + g * GS + i));
      for (int i = 0; i < GS / 32; ++i) {
        const __m256i wv = _mm256_loadu_si256((const __m256i*)(W + c * Kp + g * GS + i * 32));
        const __m256i aw = _mm256_abs_epi8(wv);
        for (int r = 0; r < R; ++r) {
          const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + r * xKp + g * GS + i * 32));
          const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv)), ones);
          s[r][c] = _mm256_add_epi32(s[r][c], p);
        }
      }
    }
    const __m128 sc = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(sc4 + g * 4)));
    for (int r = 0; r < R; ++r) {
      const __m128i t = hsum4_i32(s[r]);
      acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(t), _mm_mul_ps(sc, _mm_set1_ps(sx[r * Gp + g])), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

// Columns [n0, n1) (multiples of 4) of Y [A.M, N]; A from quant_row_group_i8 with group GS (rows
// A.Kp apart, which must cover the weight rows' Kp).
template <int GS>
void i8_cols4(const W4A8Act& A, const int8_t* W, int64_t Kp, const uint16_t* sc4, const float* bp, float* Y,
              int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t G = A.G;
  for (int64_t n = n0; n < n1; n += 4)
    tile_rows(A.M, bp, Y, ldy, n, [&](auto rc, int64_t m, __m128* r) {
      gemv4_i8<GS, decltype(rc)::value>(W + n * Kp, Kp, sc4 + n * G, G, A.xq + m * A.Kp, A.Kp, A.sx + m * A.Gp, A.Gp,
                                        r);
    });
}

}  // namespace llmopt_q
