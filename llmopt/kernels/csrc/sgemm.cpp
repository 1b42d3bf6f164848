// llmopt fp32 small-M GEMM on a pre-packed weight (AVX2 + FMA, OpenMP): y = x @ W.T + bias.
//
// Built for decode: M (activation rows) is small (1..64), W [N, K] is large and comes from DRAM
// on every call, so the kernel must stream W at memory bandwidth (M = 1) and reuse each loaded
// weight vector across a register tile of activation rows (M > 1).
//
// Packed layout "P16" (made by pack(), undone by dense.unpack_weight()):
//
//   packed : float32 [P][K][16],  P = ceil(N / 16)
//   packed[p][k][j] = W[16 p + j][k]      (0 for 16 p + j >= N: zero padding of the last panel)
//
//   +-- panel p (16 output rows, K * 64 bytes, contiguous) ----------------------------+
//   | k = 0   : W[16p+0][0]   W[16p+1][0]   ... W[16p+15][0]      <- one 64-byte line  |
//   | k = 1   : W[16p+0][1]   W[16p+1][1]   ... W[16p+15][1]                           |
//   | ...                                                                               |
//   | k = K-1 : W[16p+0][K-1] ...             W[16p+15][K-1]                            |
//   +-----------------------------------------------------------------------------------+
//
// Every k step of the micro-kernel reads exactly one 64-byte cache line (two ymm) of the panel
// and broadcasts x[m][k] for each of the R rows of the tile: 2 loads + R broadcasts for 2 R FMAs,
// accumulators acc[r][0..1] = 16 output columns of row r. No K tail (one k per step), no N tail
// in the kernel (zero padded panel; the last panel's store is masked in scalar code), M tails
// through the R = 1..6 instantiations. R = 1..3 additionally split K into U interleaved
// accumulator sets so enough independent FMA chains are in flight (FMA latency 4 x 2 pipes).
//
// Threads: OpenMP with torch's pool size (at::get_num_threads()); panels are split statically
// into nt contiguous ranges, so each thread streams one contiguous region of the packed weight
// (the hardware prefetchers and our software prefetch see one long stream); a thread that
// finishes its range early steals chunks of the others' (see gemm()). Inside a thread: for each
// panel, for each M tile of up to 6 rows: the first tile streams the panel from DRAM (software
// prefetch PREFETCH_BYTES ahead), the second tile (M > 6) prefetches the next panel while it
// re-reads the current one from L1/L2, further tiles just re-read it.
// Small problems (N * K * max(M,4) below kParallelMinWork) run on the calling thread; a layer
// with fewer than 2 panels per thread but many rows is split over rows instead.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <vector>
#include <cstdint>
#include <cstring>

#include "dense_kernels.h"

namespace {

#define LLMOPT_INLINE inline __attribute__((always_inline))

constexpr int PW = 16;       // panel width (output rows per panel)
constexpr int MAX_R = 6;     // activation rows per register tile
constexpr int64_t kParallelMinWork = 1 << 16;  // N*K*max(M,4) below this: single thread

// Software prefetch distance in bytes ahead of the weight stream (0 = off) and its hint
// (0: T0, 1: NTA). Tunable through _set_prefetch() for experiments (benchmarks/bench_sgemm.py).
// Measured (1 thread, DRAM-cold 3072x576, GB/s of weights): M=1 30-31 at every distance 0..16K;
// M=4 17 (off) / 24 (1K) / 31.5 (8K); M=16 8.7 / 10.4 / 12.2, + next-panel prefetch 13.2. The
// NTA hint measured equal to T0 (it would also hurt the re-read tiles), so T0.
int64_t PREFETCH_BYTES = 8192;
int PREFETCH_HINT = 0;
// Scheduling (see gemm()): STEAL = 1 static ranges with stealing, 0 plain static split.
int STEAL = 1;
// M > 6 (several tiles per panel): the second tile prefetches the next panel (one line per k) so
// its DRAM transfer overlaps the compute of the re-read tiles.
int NEXT_PANEL_PF = 1;
int64_t CHUNK_PANELS = 4;

inline int num_threads() { return std::max(1, at::get_num_threads()); }

// One register tile: R activation rows (x rows at stride ldx) x one 16-wide panel over all K.
// out[r * ldo + j] = sum_k x[r][k] * w[k][j]  (+ bias[j] if bias)  for j < ncols.
template <int R, int U, int PF>
LLMOPT_INLINE void tile(const float* __restrict w, const float* __restrict x, int64_t ldx, int64_t K,
                        float* __restrict out, int64_t ldo, const float* __restrict bias, int ncols) {
  __m256 acc[U][R][2];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[u][r][0] = acc[u][r][1] = _mm256_setzero_ps();

  const int64_t pf = PREFETCH_BYTES / (int64_t)sizeof(float);
  int64_t k = 0;
  for (; k + U <= K; k += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const float* wk = w + (k + u) * PW;
      if constexpr (PF == 1) _mm_prefetch((const char*)(wk + pf), _MM_HINT_T0);
      if constexpr (PF == 2) _mm_prefetch((const char*)(wk + pf), _MM_HINT_NTA);
      if constexpr (PF == 3) _mm_prefetch((const char*)(wk + K * PW), _MM_HINT_T0);  // next panel, same k
      const __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k + u);
        acc[u][r][0] = _mm256_fmadd_ps(xb, w0, acc[u][r][0]);
        acc[u][r][1] = _mm256_fmadd_ps(xb, w1, acc[u][r][1]);
      }
    }
  }
  for (; k < K; ++k) {
    const float* wk = w + k * PW;
    const __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
      acc[0][r][0] = _mm256_fmadd_ps(xb, w0, acc[0][r][0]);
      acc[0][r][1] = _mm256_fmadd_ps(xb, w1, acc[0][r][1]);
    }
  }
#pragma GCC unroll 8
  for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      acc[0][r][0] = _mm256_add_ps(acc[0][r][0], acc[u][r][0]);
      acc[0][r][1] = _mm256_add_ps(acc[0][r][1], acc[u][r][1]);
    }
  if (bias) {
    if (ncols == PW) {
      const __m256 b0 = _mm256_loadu_ps(bias), b1 = _mm256_loadu_ps(bias + 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        acc[0][r][0] = _mm256_add_ps(acc[0][r][0], b0);
        acc[0][r][1] = _mm256_add_ps(acc[0][r][1], b1);
      }
    } else {
      alignas(32) float b[PW] = {0};
      std::memcpy(b, bias, sizeof(float) * ncols);
      const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        acc[0][r][0] = _mm256_add_ps(acc[0][r][0], b0);
        acc[0][r][1] = _mm256_add_ps(acc[0][r][1], b1);
      }
    }
  }
  if (ncols == PW) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(out + r * ldo, acc[0][r][0]);
      _mm256_storeu_ps(out + r * ldo + 8, acc[0][r][1]);
    }
  } else {
    alignas(32) float tmp[PW];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(tmp, acc[0][r][0]);
      _mm256_store_ps(tmp + 8, acc[0][r][1]);
      std::memcpy(out + r * ldo, tmp, sizeof(float) * ncols);
    }
  }
}

template <int PF>
LLMOPT_INLINE void tile_r(int R, const float* w, const float* x, int64_t ldx, int64_t K, float* out, int64_t ldo,
                          const float* bias, int ncols) {
  switch (R) {
    case 1: tile<1, 4, PF>(w, x, ldx, K, out, ldo, bias, ncols); break;
    case 2: tile<2, 2, PF>(w, x, ldx, K, out, ldo, bias, ncols); break;
    case 3: tile<3, 2, PF>(w, x, ldx, K, out, ldo, bias, ncols); break;
    case 4: tile<4, 1, PF>(w, x, ldx, K, out, ldo, bias, ncols); break;
    case 5: tile<5, 1, PF>(w, x, ldx, K, out, ldo, bias, ncols); break;
    default: tile<6, 1, PF>(w, x, ldx, K, out, ldo, bias, ncols); break;
  }
}

// M tiles for M rows: as equal as possible, each <= MAX_R (e.g. M=16 -> 5,5,6; M=8 -> 4,4),
// so no tile is a tiny, FMA-latency-bound remainder.
// Panels [p0, p1) of the P = ceil(N/16) panels.
void run_panels(const float* x, const float* packed, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                int64_t p0, int64_t p1) {
  const int64_t P = (N + PW - 1) / PW;
  const int64_t ntiles = (M + MAX_R - 1) / MAX_R;
  const int pf_kind = PREFETCH_BYTES > 0 ? 1 + PREFETCH_HINT : 0;
  for (int64_t p = p0; p < p1; ++p) {
    const float* w = packed + p * K * PW;
    const int64_t n0 = p * PW;
    const int ncols = (int)std::min<int64_t>(PW, N - n0);
    const float* b = bias ? bias + n0 : nullptr;
    int64_t m0 = 0;
    for (int64_t t = 0; t < ntiles; ++t) {
      const int R = (int)((M - m0) / (ntiles - t));  // balanced split of the remaining rows
      const float* xt = x + m0 * K;
      float* out = y + m0 * N + n0;
      if (t == 0 && pf_kind == 1) tile_r<1>(R, w, xt, K, K, out, N, b, ncols);
      else if (t == 0 && pf_kind == 2) tile_r<2>(R, w, xt, K, K, out, N, b, ncols);
      else if (t == 1 && NEXT_PANEL_PF && p + 1 < P) tile_r<3>(R, w, xt, K, K, out, N, b, ncols);
      else tile_r<0>(R, w, xt, K, K, out, N, b, ncols);
      m0 += R;
    }
  }
}

at::Tensor gemm(const at::Tensor& x, const at::Tensor& packed, int64_t N, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "sgemm.gemm: x must be a 2-D float32 CPU tensor [M, K] (reshape/cast it first)");
  TORCH_CHECK(x.is_contiguous(), "sgemm.gemm: x must be contiguous (call .contiguous())");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == PW && packed.scalar_type() == at::kFloat &&
                  packed.is_contiguous() && packed.device().is_cpu(),
              "sgemm.gemm: packed must be the contiguous float32 [ceil(N/16), K, 16] tensor made by pack()");
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
  TORCH_CHECK(packed.size(1) == K, "sgemm.gemm: x has ", K, " features but the packed weight has K = ",
              packed.size(1));
  TORCH_CHECK(N >= 1 && (N + PW - 1) / PW == P, "sgemm.gemm: N = ", N, " does not match the packed weight (",
              P, " panels of ", PW, " rows)");
  const float* bp = nullptr;
  at::Tensor bb;
  if (bias.has_value() && bias->defined()) {
    bb = bias->contiguous();
    TORCH_CHECK(bb.scalar_type() == at::kFloat && bb.numel() == N && bb.device().is_cpu(),
                "sgemm.gemm: bias must be a float32 CPU tensor with N = ", N, " elements");
    bp = bb.data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  float* yp = y.data_ptr<float>();
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) yp[m * N + n] = bp ? bp[n] : 0.f;
    return y;
  }
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  const int nthr = num_threads();
  if (nthr <= 1 || N * K * std::max<int64_t>(M, 4) < kParallelMinWork || omp_in_parallel() ||
      at::in_parallel_region()) {
    run_panels(xp, wp, bp, yp, M, N, K, 0, P);
    return y;
  }
  if (P < 2 * nthr && M >= 2 * MAX_R * nthr) {
    // few panels, many rows (narrow layer at prefill): split the rows instead (multiples of 6)
    const int64_t tiles = (M + MAX_R - 1) / MAX_R;
    const int ntm = (int)std::min<int64_t>(nthr, tiles);
#pragma omp parallel num_threads(ntm)
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      const int64_t m0 = std::min(M, tiles * t / T * MAX_R), m1 = std::min(M, tiles * (t + 1) / T * MAX_R);
      if (m1 > m0) run_panels(xp + m0 * K, wp, bp, yp + m0 * N, m1 - m0, N, K, 0, P);
    }
    return y;
  }
  const int nt = (int)std::min<int64_t>(nthr, P);
  if (nt <= 1) {
    run_panels(xp, wp, bp, yp, M, N, K, 0, P);
    return y;
  }
  if (!STEAL) {
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      run_panels(xp, wp, bp, yp, M, N, K, P * t / T, P * (t + 1) / T);
    }
    return y;
  }
  // Static ranges + stealing: thread t walks its own contiguous range [P t / nt, P (t+1) / nt) in
  // chunks of CHUNK panels through an atomic cursor, then helps the other ranges through theirs.
  // With equally fast threads this is the static split (one contiguous stream per thread); a
  // thread that is slowed down (shared machine) gets its range finished by the others. (One that
  // is not scheduled at all still delays the call: the region's closing barrier waits for it.)
  struct alignas(64) Cursor { std::atomic<int64_t> next; int64_t end; };
  std::vector<Cursor> cur(nt);
  for (int t = 0; t < nt; ++t) {
    cur[t].next.store(P * t / nt, std::memory_order_relaxed);
    cur[t].end = P * (t + 1) / nt;
  }
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(CHUNK_PANELS, P / (4 * nt)));
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    for (int i = 0; i < nt; ++i) {
      // with fewer threads than asked (OpenMP may give less), the spare ranges get stolen too
      Cursor& c = cur[(t + i) % nt];
      for (;;) {
        const int64_t p = c.next.fetch_add(chunk, std::memory_order_relaxed);
        if (p >= c.end) break;
        run_panels(xp, wp, bp, yp, M, N, K, p, std::min(c.end, p + chunk));
      }
      (void)T;
    }
  }
  return y;
}

at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "sgemm.pack: weight must be a 2-D float32 CPU tensor [N, K]");
  const at::Tensor W = weight.contiguous();
  const int64_t N = W.size(0), K = W.size(1);
  TORCH_CHECK(N >= 1, "sgemm.pack: weight has no rows");
  const int64_t P = (N + PW - 1) / PW;
  at::Tensor out = at::empty({P, K, PW}, W.options());
  const float* src = W.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int nt = (int)std::min<int64_t>(num_threads(), P);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && N * K >= kParallelMinWork)
  for (int64_t p = 0; p < P; ++p) {
    float* d = dst + p * K * PW;
    const int rows = (int)std::min<int64_t>(PW, N - p * PW);
    const float* s = src + p * PW * K;
    for (int64_t k = 0; k < K; ++k) {
      for (int j = 0; j < rows; ++j) d[k * PW + j] = s[j * K + k];
      for (int j = rows; j < PW; ++j) d[k * PW + j] = 0.f;
    }
  }
  return out;
}

// the panel-level kernel for the fused decode step (dense_kernels.h: KernelTable)
const llmopt_dense::KernelTable kTable = {llmopt_dense::kTableAbi, (int32_t)sizeof(llmopt_dense::KernelTable), PW,
                                          &run_panels};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.doc() = "llmopt fp32 small-M GEMM on a pre-packed [ceil(N/16), K, 16] weight (AVX2/FMA + OpenMP)";
  m.def("pack", &pack, "W [N, K] float32 -> packed [ceil(N/16), K, 16] (zero padded)", py::arg("weight"), nogil());
  m.def("gemm", &gemm, "y [M, N] = x [M, K] @ W.T + bias from the packed W", py::arg("x"), py::arg("packed"),
        py::arg("N"), py::arg("bias") = py::none(), nogil());
  m.def("kernel_table", []() { return py::capsule((void*)&kTable, llmopt_dense::kTableName); },
        "run_panels as a capsule (dense_kernels.h: KernelTable), for the fused decode step");
  m.def("_set_prefetch", [](int64_t bytes, int hint) { PREFETCH_BYTES = bytes; PREFETCH_HINT = hint; },
        "software prefetch distance in bytes (0: off) and hint (0: T0, 1: NTA); for experiments",
        py::arg("bytes"), py::arg("hint") = 0);
  m.def("_set_next_panel_prefetch", [](int on) { NEXT_PANEL_PF = on; }, "for experiments", py::arg("on"));
  m.def("_set_schedule", [](int steal, int64_t chunk) { STEAL = steal; CHUNK_PANELS = std::max<int64_t>(1, chunk); },
        "1: static ranges + stealing in chunks of `chunk` panels, 0: plain static split; for experiments",
        py::arg("steal"), py::arg("chunk") = 4);
}
