// The kernel table of the packed fp32 GEMM (sgemm.cpp; Python: kernels.dense.kernel_table()): its
// panel-level entry point, for a caller that runs its own threads. The fused decode step
// (decode.cpp) calls exactly the compiled kernel PackedLinear runs, so a dense projection gives the
// same bits in both (each 16-column panel is computed whole by one thread in either: the sums do not
// depend on the split).
#pragma once

#include <cstdint>

namespace llmopt_dense {

constexpr int32_t kTableAbi = 1;  // bump on any change to KernelTable
constexpr const char* kTableName = "llmopt_dense.KernelTable";

struct KernelTable {
  int32_t abi;    // kTableAbi of the build
  int32_t size;   // sizeof(KernelTable) of the build
  int32_t panel;  // output rows per packed panel (16)
  // panels [p0, p1) of y [M, N] (row stride N) = x [M, K] (row stride K) @ W.T + bias (nullptr: none),
  // W packed float32 [ceil(N / panel), K, panel]; on the calling thread
  void (*gemm_panels)(const float* x, const float* packed, const float* bias, float* y, int64_t M, int64_t N,
                      int64_t K, int64_t p0, int64_t p1);
};

}  // namespace llmopt_dense
