// Python entry points of the native GGUF kernels (gguf_kernels.h), built once per instruction set:
// llmopt_gguf_avx2 (-mavx2 -mfma -mf16c), llmopt_gguf_avx512 (+ -mavx512f/bw/vl),
// llmopt_gguf_avx512_vnni (+ -mavx512vnni: only the int8-activation dot products differ) and
// llmopt_gguf_avx512_amx (+ -mamx-tile -mamx-int8: the int8 mode's rows 16 at a time on AMX tiles,
// gguf_amx.h, same bits). Which one runs is decided in Python (gguf_linear.cpu_path) from what the
// CPU reports.
//
// gemm(x [M, K] fp32, data, type, N, K, bias) -> [M, N]:
//   M <= small_m : register tiles (weights decoded in registers, reused by up to 4 rows), groups of
//                  4 panels (64 columns) so the weights stay in L1/L2 across row tiles;
//   M >  small_m : the rows packed k-major per row tile (one sequential stream per tile; once per
//                  call, per row block of ~XB bytes, by the threads that reach the block first, into
//                  one buffer they share), then per thread a chunk of KC k's of PP panels is
//                  dequantized to fp32 (L1) once and every row tile (AVX-512: 12 rows x 2 panels,
//                  24 zmm accumulators; AVX2: 6 x 1) runs the fp32 micro-kernel on it.
// Both keep one fma chain per output in k order (see gguf_kernels.h), so the result does not
// depend on M, on small_m, on the thread count or on the ISA.
// Threads: OpenMP (torch's pool size); a few contiguous column runs per thread (long sequential
// weight streams for the hardware prefetcher), handed out dynamically (a preempted thread does
// not stall the call on a shared machine).
//
// kernel_table() hands the same kernels, per panel range and without threads of their own, to the
// fused decode step (decode.cpp; gguf_kernels.h: KernelTable): one compiled kernel per type for
// both, so the step's projections give these calls' bits.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>
#include <omp.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <limits>
#include <vector>

#include "gguf_kernels.h"
#include "gguf_amx.h"

namespace {

using namespace llmopt_gguf;

#if defined(__AVX512F__)
constexpr int NP_R1 = 4, NP_R2 = 2, NP_R4 = 2;  // panels per register tile by row count
#ifndef LLMOPT_BUF_PP
#define LLMOPT_BUF_PP 2
#endif
#ifndef LLMOPT_BUF_R
#define LLMOPT_BUF_R 12
#endif
#else
constexpr int NP_R1 = 2, NP_R2 = 2, NP_R4 = 1;
#ifndef LLMOPT_BUF_PP
#define LLMOPT_BUF_PP 1
#endif
#ifndef LLMOPT_BUF_R
#define LLMOPT_BUF_R 6
#endif
#endif
#ifndef LLMOPT_BUF_KC
#define LLMOPT_BUF_KC 256
#endif
#ifndef LLMOPT_BUF_XB
#define LLMOPT_BUF_XB (1 << 20)
#endif
constexpr int PP = LLMOPT_BUF_PP;     // panels per micro-kernel tile
constexpr int PG = 4;                 // panels per group on the register path
constexpr int MAX_R = 4;              // rows per register tile
constexpr int BUF_R = LLMOPT_BUF_R;   // rows per micro-kernel tile (AVX-512: 12 x 2 panels = 24 zmm accumulators)
constexpr int64_t KC = LLMOPT_BUF_KC; // k per dequantized chunk (at least one block: max(KC, QB))
constexpr int64_t XB = LLMOPT_BUF_XB; // bytes of packed activations per row block (L2)

// M*N*K below this (int8 calls count a quarter of it, int16 a half): the calling thread only. Measured
// (Zen 4, 2 threads, Q5_0, 30 distinct weights per shape so that they stream from DRAM as a model's layers
// do; benchmarks/bench_gguf_threads.py): 1 << 18 against the first 1 << 22, per call
// 3072 x 576 int8 M=1 56 -> 43 us, M=8 131 -> 79, int16 M=4 113 -> 71, fp32 M=1 121 -> 63; 576 x 1536
// int8 M=8 71 -> 50, int16 M=8 137 -> 74; only 576 x 576 at M=4 lost (int8 14 -> 17 us). The fused decode
// step splits its own work; these are the op-by-op calls (steps mixing prompt rows with decode rows).
int64_t g_min_parallel_work = int64_t(1) << 18;
constexpr int64_t kItemsPerThread = 2;

template <class Fn>
void parallel_units(int64_t units, int64_t work, const Fn& f) {
  if (units <= 0) return;
  const int nt = at::get_num_threads();
  if (nt <= 1 || units <= 1 || work < g_min_parallel_work || at::in_parallel_region() || omp_in_parallel()) {
    f(0, units);
    return;
  }
  const int64_t per = (units + nt * kItemsPerThread - 1) / (nt * kItemsPerThread);
  const int64_t items = (units + per - 1) / per;
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt)
  {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= items) break;
      f(c * per, std::min(units, (c + 1) * per));
    }
  }
}

// out tile [R][16] of panel p, rows m0.. -> y (+ bias), valid columns only
GGUF_INLINE void write_rows(const Job& J, int64_t p, int64_t m0, int R, const float* t, int64_t ldt) {
  const int64_t n0 = p * LANES;
  const int nc = (int)std::min<int64_t>(LANES, J.N - n0);
  for (int r = 0; r < R; ++r) {
    float* yr = J.y + (m0 + r) * J.ldy + n0;
    const float* tr = t + r * ldt;
    if (J.bias) {
      for (int c = 0; c < nc; ++c) yr[c] = tr[c] + J.bias[n0 + c];
    } else {
      std::memcpy(yr, tr, sizeof(float) * nc);
    }
  }
}

template <class T, int NP, int R>
void reg_tile(const Job& J, int64_t p, int64_t m0) {
  const uint8_t* pan[NP];
  for (int i = 0; i < NP; ++i) pan[i] = J.w + (p + i) * J.nblk * T::BB;
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = J.x + (m0 + r) * J.K;
  alignas(64) float out[NP * R * LANES];
  tile_reg<T, NP, R>(pan, xr, J.nblk, out);
  for (int i = 0; i < NP; ++i) write_rows(J, p + i, m0, R, out + i * R * LANES, LANES);
}

// panels [p, pe) for rows m0 .. m0+R, NP panels at a time
template <class T, int R, int NP>
void reg_rows(const Job& J, int64_t p, int64_t pe, int64_t m0) {
  if constexpr (NP > 1) {
    for (; p + NP <= pe; p += NP) reg_tile<T, NP, R>(J, p, m0);
  }
  for (; p < pe; ++p) reg_tile<T, 1, R>(J, p, m0);
}

// panels [p0, p1), every row: groups of PG panels, balanced row tiles of up to MAX_R rows
template <class T>
void reg_panels(const Job& J, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; p += PG) {
    const int64_t pe = std::min(p1, p + PG);
    const int64_t ntiles = (J.M + MAX_R - 1) / MAX_R;
    int64_t m0 = 0;
    for (int64_t t = 0; t < ntiles; ++t) {
      const int R = (int)((J.M - m0) / (ntiles - t));  // balanced row tiles
      switch (R) {
        case 1: reg_rows<T, 1, NP_R1>(J, p, pe, m0); break;
        case 2: reg_rows<T, 2, NP_R2>(J, p, pe, m0); break;
        case 3: reg_rows<T, 3, NP_R4>(J, p, pe, m0); break;
        default: reg_rows<T, 4, NP_R4>(J, p, pe, m0); break;
      }
      m0 += R;
    }
  }
}

template <class T>
void run_reg(const Job& J) {
  const int64_t groups = (J.P + PG - 1) / PG;
  parallel_units(groups, J.M * J.N * J.K,
                 [&](int64_t g0, int64_t g1) { reg_panels<T>(J, g0 * PG, std::min(J.P, g1 * PG)); });
}

// Balanced row tiles of up to BUF_R rows over mn rows: f(m0, R) for each (the first tiles get
// mn / ntiles rows, the last mn % ntiles tiles one more: row_tile gives tile t directly)
template <class Fn>
GGUF_INLINE void for_row_tiles(int64_t mn, const Fn& f) {
  const int64_t ntiles = (mn + BUF_R - 1) / BUF_R;
  int64_t m0 = 0;
  for (int64_t t = 0; t < ntiles; ++t) {
    const int R = (int)((mn - m0) / (ntiles - t));
    f(m0, R);
    m0 += R;
  }
}

int64_t row_tiles(int64_t mn) { return (mn + BUF_R - 1) / BUF_R; }

// tile t of for_row_tiles(mn): first row m0, R rows
GGUF_INLINE void row_tile(int64_t mn, int64_t t, int64_t& m0, int& R) {
  const int64_t nt = row_tiles(mn), q = mn / nt, big = nt - mn % nt;  // tiles [big, nt) have q + 1 rows
  m0 = t * q + std::max<int64_t>(0, t - big);
  R = (int)(q + (t >= big ? 1 : 0));
}

// ---- activations packed k-major per row tile: R rows [R][K] (stride K) -> xp [K][R] ----------
// A copy (the bits of x), by in-register transposes of W k x W rows (W = 16 on AVX-512, 8 on AVX2;
// R <= W: the rows >= R of the transpose are not read and their lanes not stored).

#if defined(__AVX512F__)
constexpr int PACK_W = 16;
// c[j] = 4-row groups: rows 4g..4g+3 of columns (j, j+4, j+8, j+12) in the 128-bit lanes, j = 0..3
GGUF_INLINE void pack_quad(const float* x, int64_t K, int rows, __m512 c[4]) {
  __m512 r[4];
  for (int i = 0; i < 4; ++i) r[i] = _mm512_loadu_ps(x + (i < rows ? i : 0) * K);
  const __m512 t0 = _mm512_unpacklo_ps(r[0], r[1]), t1 = _mm512_unpackhi_ps(r[0], r[1]);
  const __m512 t2 = _mm512_unpacklo_ps(r[2], r[3]), t3 = _mm512_unpackhi_ps(r[2], r[3]);
  c[0] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  c[1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  c[2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  c[3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
}

template <int R>
GGUF_INLINE void pack_step(const float* x, int64_t K, float* xp) {  // 16 k
  constexpr int G = (R + 3) / 4;  // 4-row groups read
  __m512 c[4][4];
  for (int g = 0; g < G; ++g) pack_quad(x + 4 * g * K, K, std::min(4, R - 4 * g), c[g]);
  for (int g = G; g < 4; ++g)
    for (int j = 0; j < 4; ++j) c[g][j] = c[0][j];  // lanes never stored
  constexpr __mmask16 m = (__mmask16)((1u << R) - 1);
  for (int j = 0; j < 4; ++j) {
    const __m512 a = _mm512_shuffle_f32x4(c[0][j], c[1][j], 0x88), b = _mm512_shuffle_f32x4(c[2][j], c[3][j], 0x88);
    const __m512 e = _mm512_shuffle_f32x4(c[0][j], c[1][j], 0xdd), f = _mm512_shuffle_f32x4(c[2][j], c[3][j], 0xdd);
    _mm512_mask_storeu_ps(xp + (j + 0) * R, m, _mm512_shuffle_f32x4(a, b, 0x88));
    _mm512_mask_storeu_ps(xp + (j + 8) * R, m, _mm512_shuffle_f32x4(a, b, 0xdd));
    _mm512_mask_storeu_ps(xp + (j + 4) * R, m, _mm512_shuffle_f32x4(e, f, 0x88));
    _mm512_mask_storeu_ps(xp + (j + 12) * R, m, _mm512_shuffle_f32x4(e, f, 0xdd));
  }
}
#else
constexpr int PACK_W = 8;
template <int R>
GGUF_INLINE void pack_step(const float* x, int64_t K, float* xp) {  // 8 k
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(x + (i < R ? i : 0) * K);
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i + 0] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  alignas(32) static constexpr int32_t kMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  const __m256i m = _mm256_loadu_si256((const __m256i*)(kMask + 8 - R));
  for (int j = 0; j < 4; ++j) {
    _mm256_maskstore_ps(xp + j * R, m, _mm256_permute2f128_ps(u[j], u[j + 4], 0x20));
    _mm256_maskstore_ps(xp + (j + 4) * R, m, _mm256_permute2f128_ps(u[j], u[j + 4], 0x31));
  }
}
#endif

template <int R>
void pack_tile(const float* x, int64_t K, float* xp) {
  int64_t k = 0;
  if constexpr (R <= PACK_W) {
    for (; k + PACK_W <= K; k += PACK_W) pack_step<R>(x + k, K, xp + k * R);
  }
  for (; k < K; ++k)
    for (int r = 0; r < R; ++r) xp[k * R + r] = x[r * K + k];
}

template <int... Rs>
GGUF_INLINE void pack_tile_n(int R, const float* x, int64_t K, float* xp, std::integer_sequence<int, Rs...>) {
  ((R == Rs + 1 ? (pack_tile<Rs + 1>(x, K, xp), 0) : 0), ...);
}

// row tile (m0, R) of x [.., K] -> xp + m0 * K, k-major ([K][R])
void pack_row_tile(const float* x, int64_t K, int64_t m0, int R, float* xp) {
  pack_tile_n(R, x + m0 * K, K, xp + m0 * K, std::make_integer_sequence<int, BUF_R>{});
}

template <int NPP, int... Rs>
GGUF_INLINE void tile_buf_n(int R, const float* const* buf, const float* xp, int64_t kn, float* yt, int64_t ldy,
                            bool first, std::integer_sequence<int, Rs...>) {
  ((R == Rs + 1 ? (tile_buf<Rs + 1, NPP>(buf, xp, kn, yt, ldy, first), 0) : 0), ...);
}

// every row tile of the packed row block xp [mn rows], k in [k0, k0 + kn), K per row
template <int NPP>
void buf_rows(const float* const* buf, const float* xp, int64_t mn, int64_t K, int64_t k0, int64_t kn, float* yt,
              int64_t ldy, bool first) {
  for_row_tiles(mn, [&](int64_t m0, int R) {
    tile_buf_n<NPP>(R, buf, xp + m0 * K + k0 * R, kn, yt + m0 * ldy, ldy, first, std::make_integer_sequence<int, BUF_R>{});
  });
}

// fewer than PP panels left (the last of a range)
template <int... Ns>
GGUF_INLINE void buf_tail_n(int np, const float* const* buf, const float* xp, int64_t mn, int64_t K, int64_t k0,
                            int64_t kn, float* yt, int64_t ldy, bool first, std::integer_sequence<int, Ns...>) {
  ((np == Ns + 1 ? (buf_rows<Ns + 1>(buf, xp, mn, K, k0, kn, yt, ldy, first), 0) : 0), ...);
}
void buf_panels_tail(int np, const float* const* buf, const float* xp, int64_t mn, int64_t K, int64_t k0, int64_t kn,
                     float* yt, int64_t ldy, bool first) {
  buf_tail_n(np, buf, xp, mn, K, k0, kn, yt, ldy, first, std::make_integer_sequence<int, PP - 1>{});
}

// rows per packed row block: about XB bytes of activations, whole tiles
int64_t row_block(int64_t M, int64_t K) {
  const int64_t mc = std::max<int64_t>(BUF_R, XB / (int64_t)sizeof(float) / std::max<int64_t>(K, 1) / BUF_R * BUF_R);
  const int64_t nb = (M + mc - 1) / mc;
  return (M + nb - 1) / nb;  // balanced blocks
}

// The rows of one call packed once, shared by its threads: xp [M * K] (row block at xp + mb0 * K),
// each row block packed when the first thread reaches it, its tiles claimed one at a time by every
// thread that reaches it meanwhile (no barrier: a thread waits only for the tiles of that block
// other threads are packing right then; one that arrives later finds the block packed).
struct alignas(64) BlockPack {
  std::atomic<int64_t> next{0};  // tiles claimed
  char pad[64 - sizeof(std::atomic<int64_t>)];
  std::atomic<int64_t> done{0};  // tiles packed
};

struct SharedRows {
  float* xp = nullptr;
  BlockPack* blocks = nullptr;
  int64_t mc = 0;
};

// row block mb0 / mc of sr packed (packs tiles of it as long as some are unclaimed, then waits for the rest)
void ensure_block(const Job& J, const SharedRows& sr, int64_t mb0, int64_t mn) {
  BlockPack& b = sr.blocks[mb0 / sr.mc];
  const int64_t nt = row_tiles(mn);
  if (b.done.load(std::memory_order_acquire) == nt) return;
  for (;;) {
    const int64_t t = b.next.fetch_add(1, std::memory_order_relaxed);
    if (t >= nt) break;
    int64_t m0;
    int R;
    row_tile(mn, t, m0, R);
    pack_row_tile(J.x + mb0 * J.K, J.K, m0, R, sr.xp + mb0 * J.K);
    b.done.fetch_add(1, std::memory_order_release);
  }
  for (int spin = 0; b.done.load(std::memory_order_acquire) < nt; ++spin) {
    if (spin < 4096) _mm_pause();
    else std::this_thread::yield();  // the packer was preempted
  }
}

// panels [p0, p1), every row: per row block (shared: packed once per call by the threads that
// reach it, sr; else packed by this thread into a thread-local buffer), PP panels at a time,
// dequantized KC k's at a time
template <class T>
void buf_panels(const Job& J, int64_t p0, int64_t p1, const SharedRows* sr = nullptr) {
  constexpr int64_t kc = std::max<int64_t>(KC, T::QB);
  const int64_t bpc = kc / T::QB;  // blocks per chunk
  const int64_t mc = sr ? sr->mc : row_block(J.M, J.K);
  thread_local std::vector<float> bufv, ytv, xpv;
  if (bufv.size() < (size_t)(PP * kc * LANES + 16)) bufv.resize((size_t)PP * kc * LANES + 16);
  if (ytv.size() < (size_t)(mc * PP * LANES + 16)) ytv.resize((size_t)mc * PP * LANES + 16);
  if (!sr && xpv.size() < (size_t)(mc * J.K)) xpv.resize((size_t)(mc * J.K));
  float* bufp = bufv.data();
  float* yt = ytv.data();
  const float* buf[PP];
  for (int i = 0; i < PP; ++i) buf[i] = bufp + (size_t)i * kc * LANES;
  for (int64_t mb0 = 0; mb0 < J.M; mb0 += mc) {
    const int64_t mn = std::min(mc, J.M - mb0);
    const float* xp;
    if (sr) {
      ensure_block(J, *sr, mb0, mn);
      xp = sr->xp + mb0 * J.K;
    } else {
      for_row_tiles(mn, [&](int64_t m0, int R) { pack_row_tile(J.x + mb0 * J.K, J.K, m0, R, xpv.data()); });
      xp = xpv.data();
    }
    for (int64_t p = p0; p < p1; p += PP) {
      const int np = (int)std::min<int64_t>(PP, p1 - p);
      const int64_t ldy = np * LANES;
      for (int64_t b0 = 0; b0 < J.nblk; b0 += bpc) {
        const int64_t b1 = std::min(J.nblk, b0 + bpc);
        for (int i = 0; i < np; ++i) dequant_panel<T>(J.w + (p + i) * J.nblk * T::BB, b0, b1, bufp + (size_t)i * kc * LANES);
        const int64_t kn = (b1 - b0) * T::QB, k0 = b0 * T::QB;
        if (np == PP) buf_rows<PP>(buf, xp, mn, J.K, k0, kn, yt, ldy, b0 == 0);
        else buf_panels_tail(np, buf, xp, mn, J.K, k0, kn, yt, ldy, b0 == 0);
      }
      for (int i = 0; i < np; ++i) write_rows(J, p + i, mb0, (int)mn, yt + i * LANES, ldy);
    }
  }
}

// 1: the caller packs every row block before the threads start (for comparison; 0, the default:
// the threads pack each block when they first reach it, see SharedRows)
int g_buf_pack_in_caller = 0;

template <class T>
void run_buf(const Job& J) {
  const int64_t units = (J.P + PP - 1) / PP;
  // the calling thread's buffers (the threads of this call share them; a call runs to its end)
  thread_local std::vector<float> xpv;
  thread_local std::unique_ptr<BlockPack[]> blocks;
  thread_local int64_t nblocks_cap = 0;
  SharedRows sr;
  sr.mc = row_block(J.M, J.K);
  const int64_t nb = (J.M + sr.mc - 1) / sr.mc;
  if (xpv.size() < (size_t)(J.M * J.K)) xpv.resize((size_t)(J.M * J.K));
  if (nblocks_cap < nb) {
    blocks.reset(new BlockPack[nb]);
    nblocks_cap = nb;
  }
  for (int64_t b = 0; b < nb; ++b) {
    blocks[b].next.store(0, std::memory_order_relaxed);
    blocks[b].done.store(0, std::memory_order_relaxed);
  }
  sr.xp = xpv.data();
  sr.blocks = blocks.get();
  if (g_buf_pack_in_caller)
    for (int64_t mb0 = 0; mb0 < J.M; mb0 += sr.mc) ensure_block(J, sr, mb0, std::min(sr.mc, J.M - mb0));
  parallel_units(units, J.M * J.N * J.K,
                 [&](int64_t u0, int64_t u1) { buf_panels<T>(J, u0 * PP, std::min(J.P, u1 * PP), &sr); });
  if (xpv.size() > ((size_t)64 << 20) / sizeof(float)) std::vector<float>().swap(xpv);  // keep at most 64 MiB
}

// ---- int8 activations ----------------------------------------------------------------------

// one row: per 32 k, dx = amax / QMAX and xq = round-half-even(x * (QMAX / amax)) (0 if amax == 0), QMAX the
// largest Q (int8: 127, int16: 32767), xs = sum xq; perm8: store each group of 8 in the order (0, 2, 4, 6, 1, 3, 5, 7)
template <class Q>
void quant_row(const float* x, int64_t K, bool perm8, Q* xq, float* dx, int32_t* xs) {
  static constexpr int kPerm[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  constexpr float qmax = float(std::numeric_limits<Q>::max());
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* xb = x + b * 32;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
    volatile float amax_v = amax;  // the divisions exactly as written (the torch reference does the same)
    const float inv = amax_v > 0.f ? qmax / amax_v : 0.f;
    dx[b] = amax_v / qmax;
    int32_t sum = 0;
    Q q[32];
    for (int i = 0; i < 32; ++i) {
      q[i] = (Q)std::nearbyint(xb[i] * inv);
      sum += q[i];
    }
    xs[b] = sum;
    Q* o = xq + b * 32;
    if (perm8) {
      for (int g = 0; g < 32; g += 8)
        for (int i = 0; i < 8; ++i) o[g + i] = q[g + kPerm[i]];
    } else {
      std::memcpy(o, q, sizeof(q));
    }
  }
}

void quant_row_a8(const float* x, int64_t K, bool perm8, int8_t* xq, float* dx, int32_t* xs) {
  quant_row<int8_t>(x, K, perm8, xq, dx, xs);
}

template <class T, int NP, int R>
void a8_tile(const Job& J, const A8Row* rows, int64_t p, int64_t m0) {
  const uint8_t* pan[NP];
  for (int i = 0; i < NP; ++i) pan[i] = J.w + (p + i) * J.nblk * T::BB;
  alignas(64) float out[NP * R * LANES];
  tile_a8<T, NP, R>(pan, rows + m0, J.nblk, out);
  for (int i = 0; i < NP; ++i) write_rows(J, p + i, m0, R, out + i * R * LANES, LANES);
}

template <class T, int R, int NP>
void a8_rows(const Job& J, const A8Row* rows, int64_t p, int64_t pe, int64_t m0) {
  if constexpr (NP > 1) {
    for (; p + NP <= pe; p += NP) a8_tile<T, NP, R>(J, rows, p, m0);
  }
  for (; p < pe; ++p) a8_tile<T, 1, R>(J, rows, p, m0);
}

#if defined(LLMOPT_GGUF_AMX)
// Rows from which a 16-row AMX tile beats the VNNI register tiles: the int8 mode runs its rows in
// tiles of 16 on AMX, a last tile of fewer than this many rows on tile_a8 (same bits either way).
// Measured (Xeon, 1 thread, 576x1536 Q4_1 / Q5_0, 1536x576 Q6_K, all rows on AMX vs all on VNNI):
// 8 rows 1.14-1.75x slower on AMX, 12 rows 0.90-1.17x, 16 rows 0.73-0.99x.
int64_t g_amx_min_rows = 12;

// rows [0, mt) of the int8 mode on AMX tiles of 16 (the last one padded with zero rows), panels [p0, p1)
template <class T>
void amx_panels(const Job& J, const A8Row* rows, int64_t mt, int64_t p0, int64_t p1) {
  thread_local std::vector<uint8_t> bbuf;
  thread_local std::vector<int8_t> abuf, zq;
  thread_local std::vector<float> zdx, obuf;
  thread_local std::vector<int32_t> zxs, cbuf;
  thread_local std::vector<A8Row> trows;
  thread_local std::vector<AmxRowConst> rconst;
  thread_local std::vector<const int8_t*> abase;
  thread_local std::vector<int64_t> lda;
  const int64_t K = J.K, nsb = K / 32, ntiles = (mt + AMX_M - 1) / AMX_M;
  const int64_t bstride = J.nblk * T::NS * kAmxSubBytes<T>;
  if ((int64_t)bbuf.size() < AMX_NP * bstride) bbuf.resize(AMX_NP * bstride);
  if ((int64_t)zq.size() < K) zq.assign(K, 0);
  if ((int64_t)zdx.size() < nsb) { zdx.assign(nsb, 0.f); zxs.assign(nsb, 0); }
  obuf.resize(AMX_M * LANES);
  cbuf.resize(2 * AMX_M * LANES);
  trows.resize(ntiles * AMX_M);
  // A operands: a tile's 16 rows read in place when equally spaced (the callers' layout), else staged
  abase.resize(ntiles);
  lda.resize(ntiles);
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t r0 = t * AMX_M, cnt = std::min<int64_t>(AMX_M, mt - r0);
    bool even = cnt == AMX_M;
    const int64_t st = cnt > 1 ? rows[r0 + 1].xq - rows[r0].xq : 0;
    for (int64_t r = 1; even && r < cnt; ++r) even = rows[r0 + r].xq - rows[r0 + r - 1].xq == st && st > 0;
    for (int64_t r = 0; r < AMX_M; ++r) trows[r0 + r] = r < cnt ? rows[r0 + r] : A8Row{zq.data(), zdx.data(), zxs.data()};
    if (even) {
      abase[t] = rows[r0].xq;
      lda[t] = st;
    } else {
      if ((int64_t)abuf.size() < ntiles * AMX_M * K) abuf.resize(ntiles * AMX_M * K);
      int8_t* a = abuf.data() + t * AMX_M * K;
      for (int64_t r = 0; r < AMX_M; ++r) std::memcpy(a + r * K, trows[r0 + r].xq, K);
      abase[t] = a;
      lda[t] = K;
    }
  }
  const int64_t nsub = J.nblk * T::NS;
  rconst.resize(ntiles * nsub);
  for (int64_t t = 0; t < ntiles; ++t) amx_row_consts<T>(trows.data() + t * AMX_M, J.nblk, rconst.data() + t * nsub);
  amx_configure<T>();
  for (int64_t p = p0; p < p1; p += AMX_NP) {
    const int np = (int)std::min<int64_t>(AMX_NP, p1 - p);
    const uint8_t* pan[AMX_NP];
    for (int i = 0; i < np; ++i) {
      pan[i] = J.w + (p + i) * J.nblk * T::BB;
      amx_unpack_panel<T>(pan[i], J.nblk, bbuf.data() + i * bstride);
    }
    for (int64_t t = 0; t < ntiles; ++t) {
      const int cnt = (int)std::min<int64_t>(AMX_M, mt - t * AMX_M);
      for (int i = 0; i < np; ++i) {
        amx_rows<T>(pan[i], bbuf.data() + i * bstride, abase[t], lda[t], rconst.data() + t * nsub, J.nblk,
                    obuf.data(), cbuf.data());
        write_rows(J, p + i, t * AMX_M, cnt, obuf.data(), LANES);
      }
    }
  }
  _tile_release();
}
#endif

// panels [p0, p1), every row, int8 activations rows[0 .. M): AMX tiles of 16 rows where built and
// allowed (the avx512_amx build), register tiles of up to MAX_R rows for the rest
template <class T>
void a8_panels(const Job& J, const A8Row* rows, int64_t p0, int64_t p1) {
  int64_t m_begin = 0;
#if defined(LLMOPT_GGUF_AMX)
  if (g_amx_min_rows > 0 && J.M >= g_amx_min_rows && amx_request()) {
    const int64_t rem = J.M % AMX_M;
    m_begin = rem >= g_amx_min_rows || rem == 0 ? J.M : J.M - rem;
    if (m_begin > 0) amx_panels<T>(J, rows, m_begin, p0, p1);
  }
#endif
  if (m_begin >= J.M) return;
  for (int64_t p = p0; p < p1; p += PG) {
    const int64_t pe = std::min(p1, p + PG);
    const int64_t ntiles = (J.M - m_begin + MAX_R - 1) / MAX_R;
    int64_t m0 = m_begin;
    for (int64_t t = 0; t < ntiles; ++t) {
      const int R = (int)((J.M - m0) / (ntiles - t));
      switch (R) {
        case 1: a8_rows<T, 1, NP_R1>(J, rows, p, pe, m0); break;
        case 2: a8_rows<T, 2, NP_R2>(J, rows, p, pe, m0); break;
        case 3: a8_rows<T, 3, NP_R4>(J, rows, p, pe, m0); break;
        default: a8_rows<T, 4, NP_R4>(J, rows, p, pe, m0); break;
      }
      m0 += R;
    }
  }
}

// The rows of one int8 / int16 call (Q, Row: int8_t, A8Row or int16_t, A16Row) quantized by quant_row<Q>,
// split over the threads (rows are independent: the same bits however split), into buffers of the calling
// thread kept between calls (a fresh vector per call costs its page faults at a prompt's hundreds of rows)
template <class Q, class Row>
struct QuantRows {
  std::vector<Q> xq;
  std::vector<float> dx;
  std::vector<int32_t> xs;
  std::vector<Row> rows;

  static QuantRows& of_this_thread() {
    thread_local QuantRows b;
    return b;
  }

  const Row* quantize(const Job& J, bool perm8) {
    const int64_t K = J.K, nsb = K / 32;
    if (xq.size() < (size_t)(J.M * K)) xq.resize((size_t)(J.M * K));
    if (dx.size() < (size_t)(J.M * nsb)) {
      dx.resize((size_t)(J.M * nsb));
      xs.resize((size_t)(J.M * nsb));
    }
    if (rows.size() < (size_t)J.M) rows.resize((size_t)J.M);
    Q* const xqp = xq.data();  // the caller's buffers: a worker thread naming of_this_thread() gets its own
    float* const dxp = dx.data();
    int32_t* const xsp = xs.data();
    Row* const rp = rows.data();
    parallel_units(J.M, J.M * K * 64, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        quant_row<Q>(J.x + m * K, K, perm8, xqp + m * K, dxp + m * nsb, xsp + m * nsb);
        rp[m] = {xqp + m * K, dxp + m * nsb, xsp + m * nsb};
      }
    });
    return rp;
  }

  void trim() {  // after the call: keep at most 32 MiB of activations
    if (xq.size() * sizeof(Q) > ((size_t)32 << 20)) *this = QuantRows();
  }
};

template <class T>
void run_a8(const Job& J) {
  auto& q = QuantRows<int8_t, A8Row>::of_this_thread();
  const A8Row* rows = q.quantize(J, T::L == 4);
  const int64_t groups = (J.P + PG - 1) / PG;
  parallel_units(groups, J.M * J.N * J.K / 4,
                 [&](int64_t g0, int64_t g1) { a8_panels<T>(J, rows, g0 * PG, std::min(J.P, g1 * PG)); });
  q.trim();
}

// ---- int16 activations (tile_a16) -----------------------------------------------------------

#if defined(__AVX512F__)
constexpr int A16_R = 8;  // rows per int16 register tile (one panel: 8 int32 + 8 fp32 accumulators + 4 code zmm)
#else
constexpr int A16_R = 2;  // AVX2: a 16-lane vector is two ymm, 16 of them
#endif

template <class T, int R>
void a16_tile(const Job& J, const A16Row* rows, int64_t p, int64_t m0) {
  const uint8_t* pan[1] = {J.w + p * J.nblk * T::BB};
  alignas(64) float out[R * LANES];
  tile_a16<T, 1, R>(pan, rows + m0, J.nblk, out);
  write_rows(J, p, m0, R, out, LANES);
}

// A16_BR: rows per tile on a decoded panel; g_a16_buf_min_rows: from this many rows, each panel's codes are
// decoded once for all row tiles (AVX2: 4; its 2-row register tiles ran 0.9-1.5x the fp32 chain's time at
// 4-12 rows, the decoded panel's 6-row tiles 0.8-0.9x)
#if defined(__AVX512F__)
constexpr int A16_BR = 12;  // 12 int32 + 12 fp32 accumulators + 4 code zmm
int64_t g_a16_buf_min_rows = 16;
#else
constexpr int A16_BR = 6;  // tile_a16_buf_ymm: 12 int32 accumulator ymm + 2 code ymm + 1 activation ymm
int64_t g_a16_buf_min_rows = 4;
#endif

template <class T, int R>
void a16_buf_tile(const Job& J, const I* dec, const A16Row* rows, int64_t p, int64_t m0) {
  alignas(64) float out[R * LANES];
#if defined(__AVX512F__)
  tile_a16_buf<T, R>(dec, rows + m0, J.nblk, out);
#else
  tile_a16_buf_ymm<T, R>(dec, rows + m0, J.nblk, out);
#endif
  write_rows(J, p, m0, R, out, LANES);
}

// panels [p0, p1), every row: tiles of A16_R rows (or, from g_a16_buf_min_rows rows, of A16_BR rows on the
// panel decoded once), then the remainder's binary parts (same bits either way)
template <class T>
void a16_panels(const Job& J, const A16Row* rows, int64_t p0, int64_t p1) {
  if (J.M >= g_a16_buf_min_rows) {
    thread_local std::vector<I> dec;
    const size_t need = (size_t)(J.nblk * T::NS * kA16SubVecs<T>);
    if (dec.size() < need) dec.resize(need);
    // row blocks whose int16 activations (~256 KB) stay in L2 while every panel of [p0, p1) passes over them;
    // each panel decoded once per row block (a few % of the block's multiply-adds)
    const int64_t mb = std::max<int64_t>(A16_BR, (int64_t(256) << 10) / (2 * J.K) / A16_BR * A16_BR);
    for (int64_t mb0 = 0; mb0 < J.M; mb0 += mb) {
      const int64_t mb1 = std::min(J.M, mb0 + mb);
      for (int64_t p = p0; p < p1; ++p) {
        a16_decode_panel<T>(J.w + p * J.nblk * T::BB, J.nblk, dec.data());
        int64_t m0 = mb0;
        for (; m0 + A16_BR <= mb1; m0 += A16_BR) a16_buf_tile<T, A16_BR>(J, dec.data(), rows, p, m0);
        if constexpr (A16_BR > 8) {
          if (m0 + 8 <= mb1) { a16_buf_tile<T, 8>(J, dec.data(), rows, p, m0); m0 += 8; }
        }
        if constexpr (A16_BR > 4) {
          if (m0 + 4 <= mb1) { a16_buf_tile<T, 4>(J, dec.data(), rows, p, m0); m0 += 4; }
        }
        if (m0 + 2 <= mb1) { a16_buf_tile<T, 2>(J, dec.data(), rows, p, m0); m0 += 2; }
        if (m0 < mb1) a16_buf_tile<T, 1>(J, dec.data(), rows, p, m0);
      }
    }
    return;
  }
  for (int64_t p = p0; p < p1; ++p) {
    int64_t m0 = 0;
    for (; m0 + A16_R <= J.M; m0 += A16_R) a16_tile<T, A16_R>(J, rows, p, m0);
    if constexpr (A16_R > 4) {
      if (m0 + 4 <= J.M) { a16_tile<T, 4>(J, rows, p, m0); m0 += 4; }
    }
    if constexpr (A16_R > 2) {
      if (m0 + 2 <= J.M) { a16_tile<T, 2>(J, rows, p, m0); m0 += 2; }
    }
    if (m0 < J.M) a16_tile<T, 1>(J, rows, p, m0);
  }
}

template <class T>
void run_a16(const Job& J) {
  auto& q = QuantRows<int16_t, A16Row>::of_this_thread();
  const A16Row* rows = q.quantize(J, T::L == 4);
  parallel_units(J.P, J.M * J.N * J.K / 2, [&](int64_t u0, int64_t u1) { a16_panels<T>(J, rows, u0, u1); });
  q.trim();
}

#if defined(LLMOPT_GGUF_AMX_BF16)
// ---- fp32 activations as three bf16 parts on AMX-BF16 tiles (gguf_amx.h: "bf16x3") -----------

// The rows of one call: parts h, m, l [Mp][K] bf16 (Mp = M rounded up to 16; rows >= M are zeros) and
// per 16-row tile the rows' sums per sub-block, xs [ntiles][nsub][16]
struct Bf3Rows {
  const uint16_t* part[3];
  const float* xs;
  int64_t ntiles, nsub;
};

constexpr int BF3_NP = 2 * BF3_G;  // panels whose B tiles are unpacked together (2, 4, 8 measured alike, earlier version)

// panels [p0, p1), every row: groups of BF3_NP panels (their bf16 B tiles unpacked once per group),
// every 16-row tile through each
template <class T>
void bf3_panels(const Job& J, const Bf3Rows& R, int64_t p0, int64_t p1) {
  thread_local std::vector<uint8_t> ibuf, bbuf;
  thread_local std::vector<float> obuf, cbuf;
  const int64_t istride = R.nsub * kAmxSubBytes<T>, bstride = R.nsub * kBf3SubBytes<T>;
  if ((int64_t)ibuf.size() < istride) ibuf.resize(istride);
  if ((int64_t)bbuf.size() < BF3_NP * bstride) bbuf.resize(BF3_NP * bstride);
  obuf.resize(BF3_NP * AMX_M * LANES);
  cbuf.resize(2 * BF3_G * AMX_M * LANES);
  const int64_t lda = J.K * (int64_t)sizeof(uint16_t);
  amx_bf3_configure<T>();
  for (int64_t p = p0; p < p1; p += BF3_NP) {
    const int np = (int)std::min<int64_t>(BF3_NP, p1 - p);
    const uint8_t* pan[BF3_NP];
    for (int i = 0; i < np; ++i) {
      pan[i] = J.w + (p + i) * J.nblk * T::BB;
      amx_unpack_panel<T>(pan[i], J.nblk, ibuf.data());
      bf3_widen<T>(ibuf.data(), istride, bbuf.data() + i * bstride);
    }
    // a last group of fewer than G panels repeats its last panel (results not written)
    const int npg = (np + BF3_G - 1) / BF3_G * BF3_G;
    const uint8_t* bt[BF3_NP];
    for (int i = 0; i < npg; ++i) {
      bt[i] = bbuf.data() + std::min(i, np - 1) * bstride;
      pan[i] = pan[std::min(i, np - 1)];
    }
    for (int64_t t = 0; t < R.ntiles; ++t) {
      const int cnt = (int)std::min<int64_t>(AMX_M, J.M - t * AMX_M);
      const uint16_t* a[3] = {R.part[0] + t * AMX_M * J.K, R.part[1] + t * AMX_M * J.K, R.part[2] + t * AMX_M * J.K};
      amx_bf3_rows<T>(pan, bt, npg, a, lda, R.xs + t * R.nsub * AMX_M, J.nblk, obuf.data(), cbuf.data());
      for (int i = 0; i < np; ++i) write_rows(J, p + i, t * AMX_M, cnt, obuf.data() + i * AMX_M * LANES, LANES);
    }
  }
  _tile_release();
}

template <class T>
void run_bf3(const Job& J) {
  const int64_t K = J.K, k16 = K / 16, ntiles = (J.M + AMX_M - 1) / AMX_M, Mp = ntiles * AMX_M;
  const int64_t nsub = J.nblk * T::NS;
  thread_local std::vector<uint16_t> parts;
  thread_local std::vector<float> s16v, xsv;
  if ((int64_t)parts.size() < 3 * Mp * K) parts.resize(3 * Mp * K);
  if ((int64_t)s16v.size() < Mp * k16) s16v.resize(Mp * k16);
  if ((int64_t)xsv.size() < ntiles * nsub * AMX_M) xsv.resize(ntiles * nsub * AMX_M);
  uint16_t* ph = parts.data();
  uint16_t* pm = ph + Mp * K;
  uint16_t* pl = pm + Mp * K;
  float* s16 = s16v.data();
  float* xs = xsv.data();
  parallel_units(ntiles, J.M * K * 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t m = t * AMX_M; m < (t + 1) * AMX_M; ++m) {
        if (m < J.M) {
          bf3_split_row(J.x + m * K, K, T::L == 4, ph + m * K, pm + m * K, pl + m * K, s16 + m * k16);
        } else {
          std::memset(ph + m * K, 0, K * sizeof(uint16_t));
          std::memset(pm + m * K, 0, K * sizeof(uint16_t));
          std::memset(pl + m * K, 0, K * sizeof(uint16_t));
          std::memset(s16 + m * k16, 0, k16 * sizeof(float));
        }
      }
      for (int64_t j = 0; j < nsub; ++j) {
        for (int r = 0; r < AMX_M; ++r) {
          const float* sr = s16 + (t * AMX_M + r) * k16 + j * T::S / 16;
          float v = sr[0];
          for (int i = 1; i < T::S / 16; ++i) v += sr[i];
          xs[(t * nsub + j) * AMX_M + r] = v;
        }
      }
    }
  });
  const Bf3Rows R{{ph, pm, pl}, xs, ntiles, nsub};
  parallel_units(J.P, J.M * J.N * J.K, [&](int64_t q0, int64_t q1) { bf3_panels<T>(J, R, q0, q1); });
}
#endif

int64_t block_bytes(int64_t type) {
  int64_t bb = -1;
  with_type(type, [&](auto t) { bb = decltype(t)::BB; });
  TORCH_CHECK(bb > 0, "gguf: no native kernel for ggml type id ", type);
  return bb;
}

int64_t block_size(int64_t type) {
  int64_t qb = -1;
  with_type(type, [&](auto t) { qb = decltype(t)::QB; });
  TORCH_CHECK(qb > 0, "gguf: no native kernel for ggml type id ", type);
  return qb;
}

void check_data(const at::Tensor& data, int64_t type, int64_t N, int64_t K) {
  const int64_t qb = block_size(type), bb = block_bytes(type);
  TORCH_CHECK(N > 0 && K > 0 && K % qb == 0, "gguf: K = ", K, " is not a positive multiple of the block size ", qb);
  const int64_t P = (N + LANES - 1) / LANES;
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous() && data.device().is_cpu() &&
                  data.numel() == P * (K / qb) * bb,
              "gguf: packed data must be a contiguous uint8 CPU tensor of ", P * (K / qb) * bb, " bytes");
}

// The job for y = x @ W.T + bias once the operands are checked: x made contiguous and the bias
// float32 (both kept alive by the caller's x and bb), y allocated [M, N] (or the caller's out: a
// contiguous float32 CPU [M, N], e.g. a row range of a larger result) and returned.
static at::Tensor start_job(Job& J, at::Tensor& x, const at::Tensor& data, int64_t type, int64_t N, int64_t K,
                            const c10::optional<at::Tensor>& bias, at::Tensor& bb, const char* who,
                            const c10::optional<at::Tensor>& out = c10::nullopt) {
  x = x.contiguous();
  if (bias.has_value() && bias->defined()) {
    bb = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bb.numel() == N, who, ": bias must have ", N, " elements");
    J.bias = bb.data_ptr<float>();
  }
  const int64_t M = x.size(0);
  at::Tensor y;
  if (out.has_value() && out->defined()) {
    y = *out;
    TORCH_CHECK(y.scalar_type() == at::kFloat && y.device().is_cpu() && y.dim() == 2 && y.size(0) == M &&
                    y.size(1) == N && y.is_contiguous(),
                who, ": out must be a contiguous float32 CPU tensor [", M, ", ", N, "]");
  } else {
    y = at::empty({M, N}, x.options());
  }
  J.M = M; J.N = N; J.K = K; J.ldy = N;
  if (M == 0) return y;
  J.x = x.data_ptr<float>();
  J.w = data.data_ptr<uint8_t>();
  J.y = y.data_ptr<float>();
  J.P = (N + LANES - 1) / LANES;
  J.nblk = K / block_size(type);
  return y;
}

at::Tensor gemm(at::Tensor x, at::Tensor data, int64_t type, int64_t N, int64_t K, c10::optional<at::Tensor> bias,
                int64_t small_m, c10::optional<at::Tensor> out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.size(1) == K,
              "gguf.gemm: x must be a float32 CPU tensor [M, ", K, "]");
  check_data(data, type, N, K);
  at::Tensor bb;
  Job J{};
  auto y = start_job(J, x, data, type, N, K, bias, bb, "gguf.gemm", out);
  if (J.M == 0) return y;
  with_type(type, [&](auto t) {
    using T = decltype(t);
    if (J.M <= small_m) run_reg<T>(J);
    else run_buf<T>(J);
  });
  return y;
}

// y = x @ W.T + bias on a type of the int8 mode's set (kA8), computed by run(T{}, J)
template <class Run>
at::Tensor gemm_a8_types(at::Tensor x, const at::Tensor& data, int64_t type, int64_t N, int64_t K,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& out, const char* who,
                         const char* kind, Run&& run) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.size(1) == K, who,
              ": x must be a float32 CPU tensor [M, ", K, "]");
  check_data(data, type, N, K);
  bool ok = false;
  with_type(type, [&](auto t) { ok = kA8<decltype(t)>; });
  TORCH_CHECK(ok, who, ": no ", kind, " kernel for ggml type id ", type);
  at::Tensor bb;
  Job J{};
  auto y = start_job(J, x, data, type, N, K, bias, bb, who, out);
  if (J.M == 0) return y;
  with_type(type, [&](auto t) {
    if constexpr (kA8<decltype(t)>) run(t, J);
  });
  return y;
}

// y = x @ W.T + bias with x quantized to int8 per row and 32 k (see tile_a8)
at::Tensor gemm_a8(at::Tensor x, at::Tensor data, int64_t type, int64_t N, int64_t K, c10::optional<at::Tensor> bias,
                   c10::optional<at::Tensor> out) {
  return gemm_a8_types(x, data, type, N, K, bias, out, "gguf.gemm_a8", "int8-activation",
                       [](auto t, const Job& J) { run_a8<decltype(t)>(J); });
}

// y = x @ W.T + bias with x quantized to int16 per row and 32 k (see tile_a16)
at::Tensor gemm_a16(at::Tensor x, at::Tensor data, int64_t type, int64_t N, int64_t K, c10::optional<at::Tensor> bias,
                    c10::optional<at::Tensor> out) {
  return gemm_a8_types(x, data, type, N, K, bias, out, "gguf.gemm_a16", "int16-activation",
                       [](auto t, const Job& J) { run_a16<decltype(t)>(J); });
}

// y = x @ W.T + bias with x as three bf16 parts on AMX-BF16 tiles (see gguf_amx.h)
at::Tensor gemm_bf3(at::Tensor x, at::Tensor data, int64_t type, int64_t N, int64_t K, c10::optional<at::Tensor> bias,
                    c10::optional<at::Tensor> out) {
#if defined(LLMOPT_GGUF_AMX_BF16)
  TORCH_CHECK(amx_request(), "gguf.gemm_bf3: the OS did not grant the AMX tile state");
  return gemm_a8_types(x, data, type, N, K, bias, out, "gguf.gemm_bf3", "bf16x3",
                       [](auto t, const Job& J) { run_bf3<decltype(t)>(J); });
#else
  (void)x, (void)data, (void)type, (void)N, (void)K, (void)bias, (void)out;
  TORCH_CHECK(false, "gguf.gemm_bf3: this build (", kIsa, ") has no AMX-BF16 kernels");
#endif
}

bool has_a8(int64_t type) {
  bool ok = false;
  with_type(type, [&](auto t) { ok = kA8<decltype(t)>; });
  return ok;
}

at::Tensor dequant(at::Tensor data, int64_t type, int64_t N, int64_t K) {
  check_data(data, type, N, K);
  auto out = at::empty({N, K}, at::TensorOptions().dtype(at::kFloat));
  const int64_t P = (N + LANES - 1) / LANES;
  const uint8_t* w = data.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  with_type(type, [&](auto t) {
    using T = decltype(t);
    const int64_t nblk = K / T::QB;
    parallel_units(P, N * K, [&](int64_t p0, int64_t p1) {
      std::vector<float> buf((size_t)K * LANES);
      for (int64_t p = p0; p < p1; ++p) {
        dequant_panel<T>(w + p * nblk * T::BB, 0, nblk, buf.data());
        const int nc = (int)std::min<int64_t>(LANES, N - p * LANES);
        for (int c = 0; c < nc; ++c) {
          float* orow = o + (p * LANES + c) * K;
          for (int64_t k = 0; k < K; ++k) orow[k] = buf[k * LANES + c];
        }
      }
    });
  });
  return out;
}

// ---- the kernel table (gguf_kernels.h: KernelTable) ------------------------------------------

int64_t table_block_bytes(int64_t type) {
  int64_t bb = 0;
  with_type(type, [&](auto t) { bb = decltype(t)::BB; });
  return bb;
}

int64_t table_block_size(int64_t type) {
  int64_t qb = 0;
  with_type(type, [&](auto t) { qb = decltype(t)::QB; });
  return qb;
}

int table_a8_kind(int64_t type) {
  int kind = -1;
  with_type(type, [&](auto t) {
    using T = decltype(t);
    if constexpr (kA8<T>) kind = T::L == 4 ? 1 : 0;
  });
  return kind;
}

void table_gemm_panels(const Job* J, int64_t type, int64_t p0, int64_t p1, int64_t small_m) {
  with_type(type, [&](auto t) {
    using T = decltype(t);
    if (J->M <= small_m) reg_panels<T>(*J, p0, p1);
    else buf_panels<T>(*J, p0, p1);
  });
}

void table_gemm_a8_panels(const Job* J, int64_t type, const A8Row* rows, int64_t p0, int64_t p1) {
  with_type(type, [&](auto t) {
    using T = decltype(t);
    if constexpr (kA8<T>) a8_panels<T>(*J, rows, p0, p1);
  });
}

const KernelTable kTable = {kTableAbi,          (int32_t)sizeof(KernelTable), kIsa,         &table_block_bytes,
                            &table_block_size,  &table_a8_kind,               &table_gemm_panels, &quant_row_a8,
                            &table_gemm_a8_panels};

// g_prefetch<T>[family] of ggml type `type` (std::invalid_argument, a Python ValueError, for a
// type without kernels or a family other than 0 / 1)
int64_t& prefetch_slot(int64_t type, int64_t family) {
  if (family != 0 && family != 1) throw std::invalid_argument("family must be 0 (fp32 tiles) or 1 (int8 tiles)");
  int64_t* slot = nullptr;
  if (!with_type(type, [&](auto t) { slot = &g_prefetch<decltype(t)>[family]; }))
    throw std::invalid_argument("unsupported ggml type " + std::to_string(type));
  return *slot;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llmopt native GGUF block-type kernels (one build per instruction set)";
  // out (optional): the result is written there (a contiguous float32 [M, N]) and returned
  m.def("gemm", &gemm, "y = x @ dequant(W).T + bias on the packed GGUF layout", py::arg("x"), py::arg("data"),
        py::arg("type"), py::arg("N"), py::arg("K"), py::arg("bias") = py::none(), py::arg("small_m") = 4,
        py::arg("out") = py::none());
  m.def("gemm_a8", &gemm_a8, "y = x @ dequant(W).T + bias with int8 activations (per row, per 32 k)",
        py::arg("x"), py::arg("data"), py::arg("type"), py::arg("N"), py::arg("K"), py::arg("bias") = py::none(),
        py::arg("out") = py::none());
  m.def("gemm_a16", &gemm_a16, "y = x @ dequant(W).T + bias with int16 activations (per row, per 32 k)",
        py::arg("x"), py::arg("data"), py::arg("type"), py::arg("N"), py::arg("K"), py::arg("bias") = py::none(),
        py::arg("out") = py::none());
  m.def("gemm_bf3", &gemm_bf3,
        "y = x @ dequant(W).T + bias, x split exactly into three bf16 parts on AMX-BF16 tiles (x @ W.T up to fp32 "
        "rounding; bits independent of the batch)",
        py::arg("x"), py::arg("data"), py::arg("type"), py::arg("N"), py::arg("K"), py::arg("bias") = py::none(),
        py::arg("out") = py::none());
  m.def(
      "bf3_ready",
      []() {
#if defined(LLMOPT_GGUF_AMX_BF16)
        return amx_request();
#else
        return false;
#endif
      },
      "whether gemm_bf3 runs here (built for AMX-BF16 and the OS granted the tile state)");
  m.def("has_a8", &has_a8, "whether a ggml type has the int8-activation kernel");
  m.def("dequant", &dequant, "packed GGUF layout -> fp32 [N, K]", py::arg("data"), py::arg("type"), py::arg("N"),
        py::arg("K"));
  m.def("block_bytes", &block_bytes, "bytes of one 16-column packed block of a ggml type");
  m.def("isa", []() { return std::string(kIsa); }, "instruction set this build was compiled for");
  m.def("kernel_table", []() { return py::capsule((void*)&kTable, kTableName); },
        "the panel-level kernels of this build as a capsule (gguf_kernels.h: KernelTable), for the fused decode step");
  m.def(
      "set_prefetch", [](int64_t type, int64_t family, int64_t bytes) { prefetch_slot(type, family) = bytes; },
      "set the software prefetch distance (bytes ahead in the weight stream; 0 = off; -1 = the next group of "
      "panels, block by block) of one ggml type's "
      "fp32-activation (family 0) or int8-activation (family 1) register tiles; results do not depend on it",
      py::arg("type"), py::arg("family"), py::arg("bytes"));
  m.def(
      "prefetch", [](int64_t type, int64_t family) { return prefetch_slot(type, family); },
      "the software prefetch distance of one ggml type's fp32 (0) or int8 (1) register tiles", py::arg("type"),
      py::arg("family"));
  m.def(
      "amx_ready",
      []() {
#if defined(LLMOPT_GGUF_AMX)
        return amx_request();
#else
        return false;
#endif
      },
      "whether this build runs the int8 mode on AMX tiles here (built for AMX and the OS granted the tile state)");
  m.def(
      "_set_amx_min_rows",
      [](int64_t r) -> int64_t {
#if defined(LLMOPT_GGUF_AMX)
        const int64_t old = g_amx_min_rows;
        g_amx_min_rows = r;
        return old;
#else
        (void)r;
        return 0;
#endif
      },
      "rows from which the int8 mode takes AMX tiles (<= 0: never; default 12; results do not depend on it); "
      "returns the previous value (0 in a build without AMX)");
  m.def("_set_buf_pack_in_caller", [](int64_t v) { g_buf_pack_in_caller = (int)v; },
        "1: the fp32 prompt path's activations are packed by the calling thread before the threads start; 0 "
        "(default): by the threads as they reach each row block (results do not depend on it)");
  m.def(
      "_set_a16_buf_min_rows",
      [](int64_t r) -> int64_t {
        const int64_t old = g_a16_buf_min_rows;
        g_a16_buf_min_rows = r;
        return old;
      },
      "rows from which the int16 mode decodes each panel once for all row tiles (results do not depend on "
      "it); returns the previous value");
  m.def("_set_min_parallel_work",
        [](int64_t w) {
          const int64_t old = g_min_parallel_work;
          g_min_parallel_work = w;
          return old;
        },
        "M*N*K below which a call runs on the calling thread (tests use 0); returns the previous value");
}
