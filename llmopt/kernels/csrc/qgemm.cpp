// llmopt native quantized GEMV / small-M GEMM kernels (AVX2 + FMA + F16C, OpenMP via ATen).
//
// Weight layouts are documented in llmopt/quant/formats.py. Summary: each output row n of the
// packed weight is a sequence of blocks of BLOCK = 8*J weights along K; inside a block,
// "segment" j (j = 0..J-1) holds the 8 consecutive weights k = 8j..8j+7, and D::dec<j>() turns
// it into 8 floats c such that c * PRE[j] is the code value (int code for the integer formats,
// the fp value for fp8/fp4). The activations are pre-multiplied by PRE[j] once per call
// ("prescaled x"), so the hot loop never multiplies by PRE; e.g. for int4 the decode of segment j
// is just cvt(L & (0xF << 4j)) = q * 16^j (exact), and PRE[j] = 16^-j (exact power of two).
//
// y[m, n] = sum_g scale[n,g] * sum_{k in g} q[n,k] x[m,k]  +  sum_g min[n,g] * xsum[m,g]  + bias[n]
//
// Float formats (weight-only, fp32 activations, exact vs "dequantize then x @ W.T" up to fp32
// summation order): int4, int3, int2 (asymmetric), int8 (symmetric), fp8 (e4m3), fp4 (MXFP4).
//   GEMV and M <= 64: fused decode-in-registers kernel, each decoded 8-weight vector reused by a
//   tile of up to 4 activation rows; M > 64 is handled in Python (decode chunk + fp32 GEMM).
// Integer formats (activations quantized at run time):
//   w8a8 = per-token int8 activations x per-channel int8 weights (sign trick with
//          _mm256_maddubs_epi16: |w| (u8) * sign(x, w) (s8) never saturates since |w|,|x| <= 127);
//   w4a8 = int4 grouped weights x per-token-per-group int8 activations (maddubs(q u8, x s8));
//          the same kernel reads int4's lane layout (w4a8_gemm layout=1) after permuting the
//          int8 activations per 64-block: that is "int4 with int8 activations" (qlinear.INT4_ACT).
// Threads: OpenMP (torch's pool size), dynamic chunks of output columns.

// Minimal torch includes (torch/extension.h triples the compile time).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <omp.h>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "w4a8.h"

namespace {

using namespace llmopt_q;

enum Fmt : int64_t { F_INT4 = 0, F_INT8 = 1, F_INT3 = 2, F_INT2 = 3, F_FP8 = 4, F_FP4 = 5 };

template <int I, int N, class F>
LLMOPT_INLINE void static_for(F& f) {
  if constexpr (I < N) {
    f(std::integral_constant<int, I>{});
    static_for<I + 1, N>(f);
  }
}

LLMOPT_INLINE int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// ------------------------------------------------------------------------------------------
// decoders
// ------------------------------------------------------------------------------------------

struct DecInt4 {
  static constexpr int J = 8, BYTES = 32, BLOCK = 64;
  static constexpr bool G4 = true, G8 = true, G16 = false, GRT = true, GPC = false, FULL_R = true;
  static constexpr bool AFFINE = true;
  using St = __m256i;
  static LLMOPT_INLINE St load(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  template <int j>
  static LLMOPT_INLINE __m256 dec(const St& v) {
    if constexpr (j == 7) return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28));
    else return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF << (4 * j))));
  }
  static float pre(int j) { return j == 7 ? 1.f : std::ldexp(1.f, -4 * j); }
};

struct DecFp4 {  // same nibble layout as int4, nibble = e2m1 code
  static constexpr int J = 8, BYTES = 32, BLOCK = 64;
  static constexpr bool G4 = true, G8 = false, G16 = false, GRT = false, GPC = false, FULL_R = false;
  static constexpr bool AFFINE = false;
  using St = __m256i;
  static LLMOPT_INLINE St load(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  template <int j>
  static LLMOPT_INLINE __m256 dec(const St& v) {
    const __m256 lut = _mm256_setr_ps(0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f);
    __m256i idx = (j == 0) ? v : _mm256_srli_epi32(v, 4 * j);
    __m256 mag = _mm256_permutevar8x32_ps(lut, idx);  // uses bits 0..2 of each lane
    __m256i sgn = (j == 7) ? v : _mm256_slli_epi32(v, 28 - 4 * j);
    sgn = _mm256_and_si256(sgn, _mm256_set1_epi32(int(0x80000000u)));
    return _mm256_or_ps(mag, _mm256_castsi256_ps(sgn));
  }
  static float pre(int) { return 1.f; }
};

struct DecInt2 {
  static constexpr int J = 16, BYTES = 32, BLOCK = 128;
  static constexpr bool G4 = true, G8 = true, G16 = true, GRT = true, GPC = false, FULL_R = false;
  static constexpr bool AFFINE = true;
  using St = __m256i;
  static LLMOPT_INLINE St load(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  template <int j>
  static LLMOPT_INLINE __m256 dec(const St& v) {
    if constexpr (j == 15) return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 30));
    else return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(3 << (2 * j))));
  }
  static float pre(int j) { return j == 15 ? 1.f : std::ldexp(1.f, -2 * j); }
};

struct DecInt3 {
  static constexpr int J = 16, BYTES = 48, BLOCK = 128;
  static constexpr bool G4 = true, G8 = true, G16 = true, GRT = true, GPC = false, FULL_R = false;
  static constexpr bool AFFINE = true;
  struct St { __m256i lo, hi; };
  static LLMOPT_INLINE St load(const uint8_t* p) {
    return {_mm256_loadu_si256((const __m256i*)p),
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p + 32)))};
  }
  template <int j>
  static LLMOPT_INLINE __m256 dec(const St& s) {
    __m256 lo;
    if constexpr (j == 15) lo = _mm256_cvtepi32_ps(_mm256_srli_epi32(s.lo, 30));
    else lo = _mm256_cvtepi32_ps(_mm256_and_si256(s.lo, _mm256_set1_epi32(3 << (2 * j))));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_and_si256(s.hi, _mm256_set1_epi32(1 << j)));
    // hi * 2^j must become 4 * 4^j (j < 15) or 4 (j == 15, lo unscaled)
    constexpr float mult = (j == 15) ? 1.0f / 8192.0f : float(1u << (j + 2));
    return _mm256_fmadd_ps(hi, _mm256_set1_ps(mult), lo);
  }
  static float pre(int j) { return j == 15 ? 1.f : std::ldexp(1.f, -2 * j); }
};

struct DecInt8 {
  static constexpr int J = 4, BYTES = 32, BLOCK = 32;
  static constexpr bool G4 = true, G8 = false, G16 = false, GRT = true, GPC = true, FULL_R = true;
  static constexpr bool AFFINE = false;
  using St = const uint8_t*;
  static LLMOPT_INLINE St load(const uint8_t* p) { return p; }
  template <int j>
  static LLMOPT_INLINE __m256 dec(const St& p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * j))));
  }
  static float pre(int) { return 1.f; }
};

struct DecFp8 {  // e4m3fn -> fp16 bits by shift+mask (exact incl. subnormals) -> F16C; value/256
  static constexpr int J = 4, BYTES = 32, BLOCK = 32;
  static constexpr bool G4 = false, G8 = false, G16 = false, GRT = false, GPC = true, FULL_R = false;
  static constexpr bool AFFINE = false;
  using St = const uint8_t*;
  static LLMOPT_INLINE St load(const uint8_t* p) { return p; }
  template <int j>
  static LLMOPT_INLINE __m256 dec(const St& p) {
    __m128i h = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)(p + 8 * j)));
    h = _mm_and_si128(_mm_slli_epi16(h, 7), _mm_set1_epi16(int16_t(0xBF80)));
    return _mm256_cvtph_ps(h);
  }
  static float pre(int) { return 256.f; }
};

// ------------------------------------------------------------------------------------------
// the dot kernel: R activation rows x 1 weight row, blocks [b0, b1)
//   GB > 0 : group = GB segments, boundaries inside a block (compile time)
//   GB == -1: group = bpg whole blocks (runtime)
//   GB == 0 : one group (per-channel); the scale is applied by the caller
// ------------------------------------------------------------------------------------------

// software prefetch distance (bytes ahead in the weight stream) of the float-decode kernels:
// measured +25-40% on DRAM-streaming GEMV here (HW prefetch alone lags behind). w8a8 was measured
// slower with it (-20%) and does not prefetch; w4a8 has its own distance (w4a8.h).
// Tunable for experiments through _set_prefetch().
int64_t PREFETCH_BYTES = 2048;

template <class D, int R, int GB>
LLMOPT_INLINE void dot_rows(const uint8_t* __restrict w, const float* __restrict sc,
                            const float* const* xp, int b0, int b1, int bpg, float* out) {
  constexpr int J = D::J;
  constexpr int NA = (R == 1) ? 2 : 1;
  __m256 t[R][NA];
  __m256 tot[R];
  for (int r = 0; r < R; ++r) {
    tot[r] = _mm256_setzero_ps();
    for (int a = 0; a < NA; ++a) t[r][a] = _mm256_setzero_ps();
  }
  int gcount = 0;
  for (int b = b0; b < b1; ++b) {
    if (D::BYTES > 32 || !(b & 1)) _mm_prefetch((const char*)(w + (size_t)b * D::BYTES + PREFETCH_BYTES), _MM_HINT_T0);
    const typename D::St st = D::load(w + (size_t)b * D::BYTES);
    const size_t kb = (size_t)b * D::BLOCK;
    auto body = [&](auto jc) {
      constexpr int j = decltype(jc)::value;
      const __m256 c = D::template dec<j>(st);
      for (int r = 0; r < R; ++r)
        t[r][j % NA] = _mm256_fmadd_ps(c, _mm256_loadu_ps(xp[r] + kb + 8 * j), t[r][j % NA]);
      if constexpr (GB > 0) {
        if constexpr ((j + 1) % GB == 0) {
          const __m256 s = _mm256_broadcast_ss(sc + (size_t)b * (J / GB) + j / GB);
          for (int r = 0; r < R; ++r) {
            __m256 a = t[r][0];
            for (int i = 1; i < NA; ++i) a = _mm256_add_ps(a, t[r][i]);
            tot[r] = _mm256_fmadd_ps(s, a, tot[r]);
            for (int i = 0; i < NA; ++i) t[r][i] = _mm256_setzero_ps();
          }
        }
      }
    };
    static_for<0, J>(body);
    if constexpr (GB == -1) {
      if (++gcount == bpg) {
        gcount = 0;
        const __m256 s = _mm256_broadcast_ss(sc + b / bpg);
        for (int r = 0; r < R; ++r) {
          __m256 a = t[r][0];
          for (int i = 1; i < NA; ++i) a = _mm256_add_ps(a, t[r][i]);
          tot[r] = _mm256_fmadd_ps(s, a, tot[r]);
          for (int i = 0; i < NA; ++i) t[r][i] = _mm256_setzero_ps();
        }
      }
    }
  }
  if constexpr (GB == 0) {
    for (int r = 0; r < R; ++r) {
      __m256 a = t[r][0];
      for (int i = 1; i < NA; ++i) a = _mm256_add_ps(a, t[r][i]);
      tot[r] = a;
    }
  }
  for (int r = 0; r < R; ++r) out[r] += hsum(tot[r]);
}

// Dynamic scheduling over output-column chunks (atomic counter): a thread that gets preempted
// (shared / oversubscribed machines) does not stall the whole call as a static split would.
// Uses torch's OpenMP pool size; runs inline when already inside a parallel region.
constexpr int64_t COLS_PER_TASK = 32;

// Below this many multiply-adds a call runs on the calling thread: waking the pool costs more than
// the work (a decode-sized int4 GEMV of a 576x960 weight is ~20 us of work; measured on SmolLM2 int4
// decode, 2 threads: 9.9 vs 11.9 ms per token, median of 8 runs). LLMOPT_QGEMM_MIN_PAR
// overrides it (0 = always parallel).
int64_t min_parallel_work() {
  static const int64_t v = [] {
    const char* e = std::getenv("LLMOPT_QGEMM_MIN_PAR");
    return e ? std::atoll(e) : int64_t(1) << 22;
  }();
  return v;
}

constexpr int64_t kItemsPerThread = 2;

template <class F>
void parallel_columns(int64_t begin, int64_t end, int64_t chunk, const F& f, int64_t work = -1) {
  if (begin >= end) return;
  const int64_t nchunks = (end - begin + chunk - 1) / chunk;
  const int nt = at::get_num_threads();
  if (nt <= 1 || nchunks <= 1 || (work >= 0 && work < min_parallel_work()) || at::in_parallel_region() ||
      omp_in_parallel()) {
    f(begin, end);
    return;
  }
  // a few large contiguous items per thread (a multiple of `chunk` columns each): long sequential
  // runs of weight rows keep the hardware prefetcher streaming; small interleaved items did not
  // (int4 decode step, 2 threads: slower than 1 thread with 32-column items)
  const int64_t per = (nchunks + nt * kItemsPerThread - 1) / (nt * kItemsPerThread);
  const int64_t items = (nchunks + per - 1) / per;
  chunk *= per;
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt)
  {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= items) break;
      f(begin + c * chunk, std::min(end, begin + (c + 1) * chunk));
    }
  }
}

template <class F>
void parallel_columns_w(int64_t work, int64_t begin, int64_t end, int64_t chunk, const F& f) {
  parallel_columns(begin, end, chunk, f, work);
}

struct Problem {
  const float* x;        // [M, K]
  int64_t ldx;
  const uint8_t* qw;     // [N, row_bytes]
  int64_t row_bytes;
  const void* scales;    // [N, G]
  int scale_kind;
  const void* mins;      // [N, G] or null
  int min_kind;
  const float* bias;     // [N] or null
  float* y;              // [M, N]
  int64_t M, N, K, G, gs;
};

template <class D, int GB>
void run_float_gb(const Problem& P, int bpg) {
  constexpr int BLOCK = D::BLOCK, J = D::J;
  const int64_t M = P.M, N = P.N, K = P.K, G = P.G, gs = P.gs;
  const int64_t nblk = (K + BLOCK - 1) / BLOCK;
  const int64_t Kp = nblk * BLOCK;
  const int64_t Gp = (GB == 0) ? 1 : (GB > 0 ? nblk * (J / GB) : nblk / bpg);

  // prescaled, zero-padded activations + group sums (affine formats)
  std::vector<float> xp((size_t)M * Kp);
  std::vector<float> xs(D::AFFINE ? (size_t)M * G : 0);
  float pre[J];
  for (int j = 0; j < J; ++j) pre[j] = D::pre(j);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = P.x + m * P.ldx;
      float* d = xp.data() + m * Kp;
      for (int64_t k = 0; k < K; k += 8) {
        const int j = int((k % BLOCK) / 8);
        if (k + 8 <= K) {
          _mm256_storeu_ps(d + k, _mm256_mul_ps(_mm256_loadu_ps(xr + k), _mm256_set1_ps(pre[j])));
        } else {
          for (int64_t kk = k; kk < K; ++kk) d[kk] = xr[kk] * pre[j];
        }
      }
      for (int64_t k = K; k < Kp; ++k) d[k] = 0.f;
      if (D::AFFINE) {
        float* s = xs.data() + m * G;
        for (int64_t g = 0; g < G; ++g) {
          __m256 a = _mm256_setzero_ps();
          int64_t k = g * gs;
          const int64_t ke = k + gs;
          for (; k + 8 <= ke; k += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(xr + k));
          float v = hsum(a);
          for (; k < ke; ++k) v += xr[k];
          s[g] = v;
        }
      }
    }
  });

  // k-chunking keeps a tile of rows of x in L1/L2 (not needed for GEMV)
  int64_t kcb = nblk;
  if (M > 1) {
    kcb = std::max<int64_t>(1, 1024 / BLOCK);
    if (GB == -1) kcb = (kcb + bpg - 1) / bpg * bpg;
    if (kcb >= nblk) kcb = nblk;
  }
  constexpr int64_t CB = 16;  // columns per chunk (their weights stay in L2 across row tiles)

  parallel_columns_w(M * N * K, 0, N, COLS_PER_TASK, [&](int64_t n0, int64_t n1) {
    std::vector<float> scl((size_t)CB * Gp, 0.f);
    std::vector<float> mnb(D::AFFINE ? (size_t)G : 0);
    std::vector<float> pcs(CB, 1.f);
    for (int64_t nc = n0; nc < n1; nc += CB) {
      const int64_t nce = std::min(nc + CB, n1);
      for (int64_t n = nc; n < nce; ++n) {
        if (GB == 0) {
          load_params((const char*)P.scales + n * G * (P.scale_kind == SK_F32 ? 4 : P.scale_kind == SK_F16 ? 2 : 1),
                      P.scale_kind, 1, &pcs[n - nc]);
        } else {
          float* s = scl.data() + (n - nc) * Gp;
          load_params((const char*)P.scales + n * G * (P.scale_kind == SK_F32 ? 4 : P.scale_kind == SK_F16 ? 2 : 1),
                      P.scale_kind, G, s);
          for (int64_t g = G; g < Gp; ++g) s[g] = 0.f;
        }
        for (int64_t m = 0; m < M; ++m) P.y[m * N + n] = 0.f;
      }
      for (int64_t kb = 0; kb < nblk; kb += kcb) {
        const int kbe = (int)std::min(kb + kcb, nblk);
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
          const float* xr[4] = {xp.data() + m * Kp, xp.data() + (m + 1) * Kp, xp.data() + (m + 2) * Kp,
                                xp.data() + (m + 3) * Kp};
          for (int64_t n = nc; n < nce; ++n) {
            float o[4] = {0, 0, 0, 0};
            dot_rows<D, 4, GB>(P.qw + n * P.row_bytes, scl.data() + (n - nc) * Gp, xr, (int)kb, kbe, bpg, o);
            for (int r = 0; r < 4; ++r) P.y[(m + r) * N + n] += o[r];
          }
        }
        if constexpr (D::FULL_R) {
          if (M - m >= 2) {
            const float* xr[2] = {xp.data() + m * Kp, xp.data() + (m + 1) * Kp};
            for (int64_t n = nc; n < nce; ++n) {
              float o[2] = {0, 0};
              dot_rows<D, 2, GB>(P.qw + n * P.row_bytes, scl.data() + (n - nc) * Gp, xr, (int)kb, kbe, bpg, o);
              for (int r = 0; r < 2; ++r) P.y[(m + r) * N + n] += o[r];
            }
            m += 2;
          }
        }
        for (; m < M; ++m) {
          const float* xr[1] = {xp.data() + m * Kp};
          for (int64_t n = nc; n < nce; ++n) {
            float o[1] = {0};
            dot_rows<D, 1, GB>(P.qw + n * P.row_bytes, scl.data() + (n - nc) * Gp, xr, (int)kb, kbe, bpg, o);
            P.y[m * N + n] += o[0];
          }
        }
      }
      // epilogue: per-channel scale, min term, bias
      for (int64_t n = nc; n < nce; ++n) {
        if (D::AFFINE) load_params((const char*)P.mins + n * G * (P.min_kind == SK_F32 ? 4 : 2), P.min_kind, G,
                                   mnb.data());
        const float b = P.bias ? P.bias[n] : 0.f;
        const float ps = pcs[n - nc];
        for (int64_t m = 0; m < M; ++m) {
          float v = P.y[m * N + n];
          if (GB == 0) v *= ps;
          if (D::AFFINE) v += dot_f32(mnb.data(), xs.data() + m * G, G);
          P.y[m * N + n] = v + b;
        }
      }
    }
  });
}

// group-size dispatch; the supported set per format is mirrored by qlinear.supports_native
template <class D>
void run_float(const Problem& P) {
  const int64_t gs = P.gs;
  if constexpr (D::GPC) {
    if (P.G == 1) return run_float_gb<D, 0>(P, 1);
  }
  if constexpr (D::G4) {
    if (gs == 32) return run_float_gb<D, 4>(P, 1);
  }
  if constexpr (D::G8) {
    if (gs == 64) return run_float_gb<D, 8>(P, 1);
  }
  if constexpr (D::G16) {
    if (gs == 128) return run_float_gb<D, 16>(P, 1);
  }
  if constexpr (D::GRT) {
    if (gs % D::BLOCK == 0) return run_float_gb<D, -1>(P, (int)(gs / D::BLOCK));
  }
  TORCH_CHECK(false, "qgemm: unsupported group_size ", gs, " for this format");
}

int scale_kind_of(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return SK_F32;
  if (t.scalar_type() == at::kHalf) return SK_F16;
  if (t.scalar_type() == at::kByte) return SK_E8M0;
  TORCH_CHECK(false, "qgemm: unsupported scale dtype ", t.scalar_type());
}

// ------------------------------------------------------------------------------------------
// python entry points
// ------------------------------------------------------------------------------------------

at::Tensor qgemm(at::Tensor x, int64_t fmt, at::Tensor qweight, at::Tensor scales,
                    c10::optional<at::Tensor> mins, int64_t N, int64_t K, int64_t gs,
                    c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "qgemm: x must be 2-D float32");
  TORCH_CHECK(x.size(1) == K, "qgemm: x has ", x.size(1), " features, expected ", K);
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous(), "qgemm: packed tensors must be contiguous");
  TORCH_CHECK(qweight.size(0) == N, "qgemm: qweight rows != N");
  x = x.contiguous();
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  Problem P;
  P.x = x.data_ptr<float>();
  P.ldx = K;
  P.qw = (const uint8_t*)qweight.data_ptr();
  P.row_bytes = qweight.numel() * qweight.element_size() / N;
  P.scales = scales.data_ptr();
  P.scale_kind = scale_kind_of(scales);
  at::Tensor mn;
  P.mins = nullptr;
  P.min_kind = SK_F32;
  if (mins.has_value() && mins->defined()) {
    mn = mins->contiguous();
    P.mins = mn.data_ptr();
    P.min_kind = scale_kind_of(mn);
    TORCH_CHECK(P.min_kind != SK_E8M0, "qgemm: mins must be float16/float32");
  }
  at::Tensor bb;
  P.bias = nullptr;
  if (bias.has_value() && bias->defined()) {
    bb = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bb.numel() == N, "qgemm: bias size");
    P.bias = bb.data_ptr<float>();
  }
  P.y = y.data_ptr<float>();
  P.M = M; P.N = N; P.K = K; P.gs = gs;
  TORCH_CHECK(gs > 0 && K % gs == 0, "qgemm: K must be a multiple of group_size");
  P.G = K / gs;
  TORCH_CHECK(scales.numel() == N * P.G, "qgemm: scales must have N*K/gs elements");
  TORCH_CHECK(!P.mins || mn.numel() == N * P.G, "qgemm: mins must have N*K/gs elements");
  auto expect_row = [&](int64_t block, int64_t bytes) {
    TORCH_CHECK(P.row_bytes == (K + block - 1) / block * bytes, "qgemm: qweight row size ", P.row_bytes,
                " does not match the packed layout");
  };
  TORCH_CHECK((fmt == F_FP4) == (P.scale_kind == SK_E8M0), "qgemm: fp4 needs uint8 E8M0 scales, other formats "
              "float16/float32 scales");
  switch (fmt) {
    case F_INT4: expect_row(64, 32); TORCH_CHECK(P.mins, "int4 needs mins"); run_float<DecInt4>(P); break;
    case F_INT3: expect_row(128, 48); TORCH_CHECK(P.mins, "int3 needs mins"); run_float<DecInt3>(P); break;
    case F_INT2: expect_row(128, 32); TORCH_CHECK(P.mins, "int2 needs mins"); run_float<DecInt2>(P); break;
    case F_INT8: expect_row(32, 32); run_float<DecInt8>(P); break;
    case F_FP8: expect_row(32, 32); run_float<DecFp8>(P); break;
    case F_FP4: expect_row(64, 32); run_float<DecFp4>(P); break;
    default: TORCH_CHECK(false, "qgemm: unknown format ", fmt);
  }
  return y;
}

// dequantize rows [n0, n1) of a packed weight to fp32 [n1-n0, K] (one pass: decode, scale, store)
template <class D>
void dequant_rows(const Problem& P, int64_t n0, int64_t n1, float* out) {
  constexpr int J = D::J, BLOCK = D::BLOCK;
  const int64_t K = P.K, G = P.G, gs = P.gs;
  const int64_t nblk = (K + BLOCK - 1) / BLOCK;
  float pre[J];
  for (int j = 0; j < J; ++j) pre[j] = D::pre(j);
  const int ssz = P.scale_kind == SK_F32 ? 4 : P.scale_kind == SK_F16 ? 2 : 1;
  parallel_columns(n0, n1, COLS_PER_TASK, [&](int64_t a, int64_t b) {
    std::vector<float> s(G), mn(D::AFFINE ? G : 0);
    for (int64_t n = a; n < b; ++n) {
      load_params((const char*)P.scales + n * G * ssz, P.scale_kind, G, s.data());
      if (D::AFFINE) load_params((const char*)P.mins + n * G * (P.min_kind == SK_F32 ? 4 : 2), P.min_kind, G, mn.data());
      const uint8_t* w = P.qw + n * P.row_bytes;
      float* o = out + (n - n0) * K;
      for (int64_t bk = 0; bk < nblk; ++bk) {
        const typename D::St st = D::load(w + bk * D::BYTES);
        const int64_t kb = bk * BLOCK;
        auto body = [&](auto jc) {
          constexpr int j = decltype(jc)::value;
          const int64_t k = kb + 8 * j;
          if (k >= K) return;
          const int64_t g = k / gs;
          const __m256 v = _mm256_fmadd_ps(D::template dec<j>(st), _mm256_set1_ps(s[g] * pre[j]),
                                           _mm256_set1_ps(D::AFFINE ? mn[g] : 0.f));
          if (k + 8 <= K) {
            _mm256_storeu_ps(o + k, v);
          } else {
            alignas(32) float tmp[8];
            _mm256_store_ps(tmp, v);
            for (int64_t kk = k; kk < K; ++kk) o[kk] = tmp[kk - k];
          }
        };
        static_for<0, J>(body);
      }
    }
  });
}

at::Tensor dequant(int64_t fmt, at::Tensor qweight, at::Tensor scales, c10::optional<at::Tensor> mins,
                      int64_t N, int64_t K, int64_t gs, int64_t n0, int64_t n1, c10::optional<at::Tensor> out_opt) {
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous(), "dequant: packed tensors must be contiguous");
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N, "dequant: bad row range");
  TORCH_CHECK(gs > 0 && K % gs == 0, "dequant: K must be a multiple of group_size");
  at::Tensor out;
  if (out_opt.has_value() && out_opt->defined()) {
    out = *out_opt;
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == n1 - n0 &&
                    out.size(1) == K, "dequant: out must be a contiguous float32 [n1-n0, K] tensor");
  } else {
    out = at::empty({n1 - n0, K}, at::TensorOptions().dtype(at::kFloat));
  }
  Problem P{};
  P.qw = (const uint8_t*)qweight.data_ptr();
  P.row_bytes = qweight.numel() * qweight.element_size() / N;
  P.scales = scales.data_ptr();
  P.scale_kind = scale_kind_of(scales);
  at::Tensor mn;
  if (mins.has_value() && mins->defined()) {
    mn = mins->contiguous();
    P.mins = mn.data_ptr();
    P.min_kind = scale_kind_of(mn);
  }
  P.N = N; P.K = K; P.gs = gs; P.G = K / gs;
  float* o = out.data_ptr<float>();
  switch (fmt) {
    case F_INT4: dequant_rows<DecInt4>(P, n0, n1, o); break;
    case F_INT3: dequant_rows<DecInt3>(P, n0, n1, o); break;
    case F_INT2: dequant_rows<DecInt2>(P, n0, n1, o); break;
    case F_INT8: dequant_rows<DecInt8>(P, n0, n1, o); break;
    case F_FP8: dequant_rows<DecFp8>(P, n0, n1, o); break;
    case F_FP4: dequant_rows<DecFp4>(P, n0, n1, o); break;
    default: TORCH_CHECK(false, "dequant: unknown format ", fmt);
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// W8A8
// ------------------------------------------------------------------------------------------

// per-token symmetric int8 quantization (round half to even, like torch.round)
void quant_rows_i8(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* xq, float* sx) {
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = x + m * K;
      __m256 am = _mm256_setzero_ps();
      const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) am = _mm256_max_ps(am, _mm256_and_ps(_mm256_loadu_ps(xr + k), absmask));
      __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(am), _mm256_extractf128_ps(am, 1));
      a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
      a4 = _mm_max_ss(a4, _mm_movehdup_ps(a4));
      float amax = _mm_cvtss_f32(a4);
      for (; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
      volatile float amax_v = amax;  // keep the division exactly as written (matches torch)
      const float inv = amax_v > 0.f ? 127.0f / amax_v : 0.f;
      sx[m] = amax_v / 127.0f;
      int8_t* d = xq + m * Kp;
      const __m256 iv = _mm256_set1_ps(inv);
      k = 0;
      for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), iv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256i i32 = _mm256_cvtps_epi32(v);
        __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
        __m128i i8 = _mm_packs_epi16(i16, i16);
        _mm_storel_epi64((__m128i*)(d + k), i8);
      }
      for (; k < K; ++k) d[k] = (int8_t)std::nearbyint(xr[k] * inv);
      for (k = K; k < Kp; ++k) d[k] = 0;
    }
  });
}

constexpr int64_t W8A8_KC = 4096;

template <int R>
LLMOPT_INLINE void dot_i8(const int8_t* __restrict w, const int8_t* const* xq, int64_t k0, int64_t k1, int32_t* out) {
  // |w| (u8) * sign(x, w) (s8): pair sums <= 2*127*127 < 2^15, so maddubs never saturates
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  auto step = [&](int64_t k, int u) {
    const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + k));
    const __m256i aw = _mm256_abs_epi8(wv);
    for (int r = 0; r < R; ++r) {
      const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq[r] + k));
      const __m256i p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
      acc[r][u] = _mm256_add_epi32(acc[r][u], _mm256_madd_epi16(p16, ones));
    }
  };
  int64_t k = k0;
  for (; k + 64 <= k1; k += 64) {
    step(k, 0);
    step(k + 32, 1);
  }
  if (k < k1) step(k, 0);
  for (int r = 0; r < R; ++r) out[r] += hsum_i32(_mm256_add_epi32(acc[r][0], acc[r][1]));
}

// W8A8 core: Y[M, N] = (quant(x) @ W.T) * sx * ws + bias; W is int8 [N, Kp] (Kp % 32 == 0)
void w8a8_core(const float* x, int64_t M, int64_t K, const int8_t* W, int64_t Kp, int64_t N, const float* wsp,
               const float* bp, float* Y) {
  std::vector<int8_t> xq((size_t)M * Kp);
  std::vector<float> sx(M);
  quant_rows_i8(x, M, K, Kp, xq.data(), sx.data());
  int64_t kc = Kp;
  if (M > 1) kc = std::min<int64_t>(Kp, W8A8_KC);
  constexpr int64_t CB = 16;
  parallel_columns_w(M * N * K, 0, N, COLS_PER_TASK, [&](int64_t n0, int64_t n1) {
    std::vector<int32_t> acc((size_t)M * CB);
    for (int64_t nc = n0; nc < n1; nc += CB) {
      const int64_t nce = std::min(nc + CB, n1);
      std::fill(acc.begin(), acc.end(), 0);
      for (int64_t k0 = 0; k0 < Kp; k0 += kc) {
        const int64_t k1 = std::min(k0 + kc, Kp);
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
          const int8_t* xr[4] = {&xq[m * Kp], &xq[(m + 1) * Kp], &xq[(m + 2) * Kp], &xq[(m + 3) * Kp]};
          for (int64_t n = nc; n < nce; ++n) {
            int32_t o[4] = {0, 0, 0, 0};
            dot_i8<4>(W + n * Kp, xr, k0, k1, o);
            for (int r = 0; r < 4; ++r) acc[(m + r) * CB + (n - nc)] += o[r];
          }
        }
        for (; m < M; ++m) {
          const int8_t* xr[1] = {&xq[m * Kp]};
          for (int64_t n = nc; n < nce; ++n) {
            int32_t o[1] = {0};
            dot_i8<1>(W + n * Kp, xr, k0, k1, o);
            acc[m * CB + (n - nc)] += o[0];
          }
        }
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = nc; n < nce; ++n)
          Y[m * N + n] = float(acc[m * CB + (n - nc)]) * (sx[m] * wsp[n]) + (bp ? bp[n] : 0.f);
    }
  });
}

at::Tensor w8a8_gemm(at::Tensor x, at::Tensor qweight, at::Tensor wscale, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "w8a8: x must be 2-D float32");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous(), "w8a8: qweight int8 contiguous");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), Kp = qweight.size(1);
  TORCH_CHECK(Kp % 32 == 0 && Kp >= K && Kp < K + 32, "w8a8: qweight must be [N, roundup(K, 32)]");
  auto ws = wscale.to(at::kFloat).contiguous();
  TORCH_CHECK(ws.numel() == N, "w8a8: scales must be [N]");
  at::Tensor bb;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    bb = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bb.numel() == N, "w8a8: bias size");
    bp = bb.data_ptr<float>();
  }
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  w8a8_core(x.data_ptr<float>(), M, K, qweight.data_ptr<int8_t>(), Kp, N, ws.data_ptr<float>(), bp,
            y.data_ptr<float>());
  return y;
}

// ------------------------------------------------------------------------------------------
// W4A8: int4 asymmetric grouped weights (byte i of a 64-block = q[i] | q[i+32] << 4) x int8
// activations quantized per token and per weight group. maddubs(q u8 in [0,15], x s8) pair sums
// are <= 2*15*127 = 3810, so up to 8 of them (group 256) add up in int16 without overflow.
//   y[m,n] = sum_g scale[n,g] * sx[m,g] * sum_{k in g} q[n,k] xq[m,k] + sum_g min[n,g] * xsum[m,g]
// ------------------------------------------------------------------------------------------

// W4A8 (int4 grouped weights x per-token, per-group int8 activations; kernels in w4a8.h)

// per-row, per-group symmetric int8 (round half to even) + exact float group sums; lanes: permute
// each 64-block for the int4 lane layout
void quant_rows_group_i8(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t gs, int8_t* xq, float* sx,
                         float* xsum, int64_t Gp, bool lanes = false) {
  const int64_t G = K / gs;
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      quant_row_group_i8(x + m * K, K, Kp, gs, xq + m * Kp, sx + m * Gp, xsum + m * G, Gp);
      if (lanes) permute_row_to_lanes(xq + m * Kp, Kp);
    }
  });
}

template <int GS>
void w4a8_core(const float* x, int64_t M, int64_t K, const uint8_t* W, int64_t N, const void* scales, int scale_kind,
               const void* mins, int min_kind, const float* bp, float* Y, bool lanes = false,
               const uint16_t* sc4 = nullptr, const uint16_t* mn4 = nullptr) {
  const W4A8Act shape = w4a8_act_shape(M, K, GS);
  std::vector<int8_t> xq((size_t)M * shape.Kp);
  std::vector<float> sx((size_t)M * shape.Gp), xsum((size_t)M * shape.G);
  quant_rows_group_i8(x, M, K, shape.Kp, GS, xq.data(), sx.data(), xsum.data(), shape.Gp, lanes);
  W4A8Act A = shape;
  A.xq = xq.data();
  A.sx = sx.data();
  A.xsum = xsum.data();
  if constexpr (GS >= 64) {
    if (sc4 && M >= kW4TileMinRows) {  // 4-column tiles (chunks are multiples of 4 columns; N % 4 == 0)
      parallel_columns_w(M * N * K, 0, N, COLS_PER_TASK, [&](int64_t n0, int64_t n1) {
        w4a8_cols4<GS>(A, W, sc4, mn4, bp, Y, N, n0, n1);
      });
      return;
    }
  }
  parallel_columns_w(M * N * K, 0, N, COLS_PER_TASK, [&](int64_t n0, int64_t n1) {
    thread_local W4A8Scratch scratch;
    w4a8_cols<GS>(A, W, scales, scale_kind, mins, min_kind, bp, Y, N, n0, n1, scratch);
  });
}

// layout 0: w4a8 (ggml halves), 1: int4 lanes (group size must then be a multiple of 64).
// scales4 / mins4: optional fp16 copies of scales / mins interleaved by 4 columns ([N/4, G, 4], see
// interleave4_f16); with them, 4+ rows run the 4-column tiles (group >= 64, N % 4 == 0).
at::Tensor w4a8_gemm(at::Tensor x, at::Tensor qweight, at::Tensor scales, at::Tensor mins, int64_t gs,
                     c10::optional<at::Tensor> bias, int64_t layout, c10::optional<at::Tensor> scales4,
                     c10::optional<at::Tensor> mins4) {
  TORCH_CHECK(layout == 0 || (layout == 1 && gs % 64 == 0), "w4a8: layout 1 (int4 lanes) needs a group size "
              "multiple of 64, got layout ", layout, " group ", gs);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "w4a8: x must be 2-D float32");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous(), "w4a8: qweight uint8 contiguous");
  TORCH_CHECK(gs == 32 || gs == 64 || gs == 128 || gs == 256, "w4a8: group size must be 32/64/128/256");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(K % gs == 0, "w4a8: K must be a multiple of group_size");
  TORCH_CHECK(qweight.size(1) == (K + 63) / 64 * 32, "w4a8: qweight must be [N, roundup(K, 64) / 2]");
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == N * (K / gs), "w4a8: scales must be [N, K/gs]");
  auto mn = mins.contiguous();
  TORCH_CHECK(mn.numel() == N * (K / gs), "w4a8: mins must be [N, K/gs]");
  const int sk = scale_kind_of(scales), mk = scale_kind_of(mn);
  TORCH_CHECK(sk != SK_E8M0 && mk != SK_E8M0, "w4a8: scales/mins must be float16/float32");
  at::Tensor bb;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    bb = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bb.numel() == N, "w4a8: bias size");
    bp = bb.data_ptr<float>();
  }
  const uint16_t *sc4 = nullptr, *mn4 = nullptr;
  if (scales4.has_value() && scales4->defined()) {
    TORCH_CHECK(mins4.has_value() && mins4->defined(), "w4a8: scales4 needs mins4");
    TORCH_CHECK(gs >= 64 && N % 4 == 0, "w4a8: 4-column tiles need group >= 64 and N % 4 == 0");
    for (const at::Tensor* t : {&*scales4, &*mins4})
      TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->numel() == N * (K / gs),
                  "w4a8: scales4 / mins4 must be contiguous float16 [N/4, K/gs, 4]");
    sc4 = (const uint16_t*)scales4->data_ptr();
    mn4 = (const uint16_t*)mins4->data_ptr();
  }
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const uint8_t* W = qweight.data_ptr<uint8_t>();
  float* Y = y.data_ptr<float>();
  with_group(gs, [&](auto g) {
    w4a8_core<decltype(g)::value>(xp, M, K, W, N, scales.data_ptr(), sk, mn.data_ptr(), mk, bp, Y, layout == 1, sc4,
                                  mn4);
  });
  return y;
}

std::vector<at::Tensor> quantize_act_i8_grouped(at::Tensor x, int64_t gs) {
  x = x.contiguous().to(at::kFloat);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(gs > 0 && gs % 8 == 0 && K % gs == 0, "quantize_act_i8_grouped: bad group size");
  const int64_t G = K / gs;
  auto xq = at::empty({M, K}, at::TensorOptions().dtype(at::kChar));
  auto sx = at::empty({M, G}, x.options());
  std::vector<float> xs((size_t)M * G);
  quant_rows_group_i8(x.data_ptr<float>(), M, K, K, gs, xq.data_ptr<int8_t>(), sx.data_ptr<float>(), xs.data(), G);
  return {xq, sx};
}

std::vector<at::Tensor> quantize_act_i8(at::Tensor x) {
  x = x.contiguous().to(at::kFloat);
  const int64_t M = x.size(0), K = x.size(1);
  auto xq = at::empty({M, K}, at::TensorOptions().dtype(at::kChar));
  auto sx = at::empty({M, 1}, x.options());
  std::vector<int8_t> buf((size_t)M * K);
  quant_rows_i8(x.data_ptr<float>(), M, K, K, buf.data(), sx.data_ptr<float>());
  std::memcpy(xq.data_ptr<int8_t>(), buf.data(), buf.size());
  return {xq, sx};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llmopt quantized GEMV/GEMM kernels (AVX2/FMA/F16C)";
  m.def("qgemm", &qgemm, "y = x @ dequant(W).T + bias for weight-only formats",
        py::arg("x"), py::arg("fmt"), py::arg("qweight"), py::arg("scales"), py::arg("mins"), py::arg("N"),
        py::arg("K"), py::arg("group_size"), py::arg("bias"));
  m.def("dequant", &dequant, "dequantize rows [n0, n1) to fp32", py::arg("fmt"), py::arg("qweight"),
        py::arg("scales"), py::arg("mins"), py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("n0"),
        py::arg("n1"), py::arg("out") = py::none());
  m.def("w8a8_gemm", &w8a8_gemm, "per-token int8 activations x per-channel int8 weights", py::arg("x"),
        py::arg("qweight"), py::arg("wscale"), py::arg("bias"));
  m.def("quantize_act_i8", &quantize_act_i8, "per-token int8 activation quantization (for tests)");
  m.def("w4a8_gemm", &w4a8_gemm, "int4 grouped weights x per-group int8 activations", py::arg("x"),
        py::arg("qweight"), py::arg("scales"), py::arg("mins"), py::arg("group_size"), py::arg("bias"),
        py::arg("layout") = 0, py::arg("scales4") = py::none(), py::arg("mins4") = py::none());
  m.def("quantize_act_i8_grouped", &quantize_act_i8_grouped, "per-token per-group int8 activations (for tests)");
  m.def("_set_prefetch", [](int64_t bytes) { PREFETCH_BYTES = bytes; },
        "set the software prefetch distance (bytes) of the float-decode kernels");
  m.def("_set_w4_prefetch", [](int64_t bytes) { w4_prefetch_bytes = bytes; },
        "set the software prefetch distance (bytes, 0 = off) of the int4 x int8 kernels");
  m.attr("FMT_INT4") = (int64_t)F_INT4;
  m.attr("FMT_INT8") = (int64_t)F_INT8;
  m.attr("FMT_INT3") = (int64_t)F_INT3;
  m.attr("FMT_INT2") = (int64_t)F_INT2;
  m.attr("FMT_FP8") = (int64_t)F_FP8;
  m.attr("FMT_FP4") = (int64_t)F_FP4;
}
