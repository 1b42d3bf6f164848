// Argument checks shared by the paged decode attention kernels (fused.cpp: float32 cache,
// kv_int8.cpp: int8 cache with scales, quest.cpp: either). Each kernel checks its own q and cache
// element types first.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

// q [B, Hq, D]; caches [NB, BS, Hk, D]; block_tables [B, MB]; G = Hq / Hk query heads per kv head;
// max_len = the longest span a sequence attends to (its window when sliding_window > 0).
struct PagedShape {
  int64_t B, Hq, D, NB, BS, Hk, MB, G, max_len;
};

// Checks block_tables and context_lens against q and the cache, and that every block a sequence's
// window touches exists (no exception may escape the OpenMP region that follows the checks).
inline PagedShape check_paged(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_tables,
                              const at::Tensor& context_lens, int64_t sliding_window) {
  TORCH_CHECK(block_tables.device().is_cpu() && block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.is_contiguous(),
              "block_tables must be a contiguous CPU int32 [B, max_blocks] tensor");
  TORCH_CHECK(context_lens.device().is_cpu() && context_lens.scalar_type() == at::kInt && context_lens.dim() == 1 &&
                  context_lens.is_contiguous(),
              "context_lens must be a contiguous CPU int32 [B] tensor");
  PagedShape s{};
  s.B = q.size(0), s.Hq = q.size(1), s.D = q.size(2);
  s.NB = k_cache.size(0), s.BS = k_cache.size(1), s.Hk = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == s.D, "cache head_dim must match q");
  TORCH_CHECK(s.Hk > 0 && s.Hq % s.Hk == 0, "Hq must be a multiple of Hk");
  TORCH_CHECK(block_tables.size(0) == s.B && context_lens.size(0) == s.B,
              "block_tables / context_lens must have B rows");
  s.MB = block_tables.size(1);
  s.G = s.Hq / s.Hk;
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t L = cl[b];
    TORCH_CHECK(L >= 0 && L <= s.MB * s.BS, "context_lens[", b, "] = ", L, " out of range [0, ", s.MB * s.BS, "]");
    const int64_t start = sliding_window > 0 ? std::max<int64_t>(0, L - sliding_window) : 0;
    s.max_len = std::max(s.max_len, L - start);
    for (int64_t j = start / s.BS; j * s.BS < L; ++j) {
      const int64_t blk = bt[b * s.MB + j];
      TORCH_CHECK(blk >= 0 && blk < s.NB, "block_tables[", b, "][", j, "] = ", blk, " out of range [0, ", s.NB, ")");
    }
  }
  return s;
}

// Checks an int8 cache's scales: k_scale / v_scale float32 [num_blocks, block_size, Hk], one per
// (token, kv head) of k_cache [num_blocks, block_size, Hk, D] (kv_int8.h layout).
inline void check_kv_scales(const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& k_cache) {
  for (const at::Tensor* t : {&k_scale, &v_scale})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 && t->is_contiguous() &&
                    t->size(0) == k_cache.size(0) && t->size(1) == k_cache.size(1) && t->size(2) == k_cache.size(2),
                "k_scale / v_scale must be contiguous CPU float32 [num_blocks, block_size, Hk] tensors");
}
