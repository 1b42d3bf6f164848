// Quest-style sparse paged decode attention (AVX2/FMA + OpenMP) and the per-block key summaries
// it selects with; the selection and tile walk are quest.h's (shared with the fused decode step).
//
// quest_update_: kmin / kmax [num_blocks, Hk, D] <- the rows [T, Hk, D] just written at flat cache
// slots [T] (block * block_size + offset), in order: offset 0 resets the block's summary.
// quest_decode_attention: one query per row [B, Hq, D] over a float32 cache, or an int8 cache with
// its scales, reading per row only the blocks quest.h chooses for topk[b] blocks (0: every block,
// then the result equals the dense kernel's with one split bit for bit). One OpenMP item per
// (row, kv head); the G query heads of a group share the block set, so K/V rows are read once.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "paged_args.h"
#include "quest.h"

namespace {

inline int num_threads() { return std::max(1, at::get_num_threads()); }

using llmopt_quest::kTile;

// pins: undefined / None, or a contiguous uint8 [B, Hk, MB] tensor (nonzero: the row's block index j is
// pinned for that kv head); the item (b, h)'s row of it, or null.
const uint8_t* check_pins(const std::optional<at::Tensor>& pins, int64_t B, int64_t Hk, int64_t MB) {
  if (!pins.has_value() || !pins->defined()) return nullptr;
  const at::Tensor& p = *pins;
  TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kByte && p.dim() == 3 && p.is_contiguous() &&
                  p.size(0) == B && p.size(1) == Hk && p.size(2) == MB,
              "pins must be a contiguous CPU uint8 [B, Hk, max_blocks] tensor matching block_tables");
  return p.data_ptr<uint8_t>();
}

inline const uint8_t* pin_of(const uint8_t* pins, int64_t b, int64_t Hk, int64_t h, int64_t MB) {
  return pins == nullptr ? nullptr : pins + (b * Hk + h) * MB;
}

void check_summaries(const at::Tensor& kmin, const at::Tensor& kmax, int64_t NB, int64_t Hk, int64_t D) {
  for (const at::Tensor* t : {&kmin, &kmax})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 && t->is_contiguous() &&
                    t->size(0) == NB && t->size(1) == Hk && t->size(2) == D,
                "kmin / kmax must be contiguous CPU float32 [num_blocks, Hk, D] tensors matching the cache");
}

void quest_update_(at::Tensor& kmin, at::Tensor& kmax, const at::Tensor& rows, const at::Tensor& slots,
                   int64_t block_size) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kFloat && rows.dim() == 3 && rows.is_contiguous(),
              "rows must be a contiguous CPU float32 [T, Hk, D] tensor");
  TORCH_CHECK(slots.device().is_cpu() && slots.scalar_type() == at::kLong && slots.dim() == 1 &&
                  slots.is_contiguous() && slots.size(0) == rows.size(0),
              "slots must be a contiguous CPU int64 [T] tensor");
  TORCH_CHECK(block_size > 0, "block_size must be positive");
  const int64_t T = rows.size(0), Hk = rows.size(1), D = rows.size(2), NB = kmin.size(0);
  check_summaries(kmin, kmax, NB, Hk, D);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < NB * block_size, "slot ", sp[t], " out of range [0, ", NB * block_size, ")");
  float* mn = kmin.data_ptr<float>();
  float* mx = kmax.data_ptr<float>();
  const float* rp = rows.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t blk = sp[t] / block_size;
    const bool reset = sp[t] % block_size == 0;
    for (int64_t h = 0; h < Hk; ++h)
      llmopt_quest::update_summary(mn + (blk * Hk + h) * D, mx + (blk * Hk + h) * D, rp + (t * Hk + h) * D, D, reset);
  }
}

at::Tensor quest_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                                  const at::Tensor& kmin, const at::Tensor& kmax, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, const at::Tensor& topk, double scale,
                                  const std::optional<at::Tensor>& pins) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 3 && q.is_contiguous(),
              "q must be a contiguous CPU float32 [B, Hq, D] tensor");
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  const bool int8 = fp8 || k_cache.scalar_type() == at::kChar;  // an 8-bit cache: int8 or e4m3fn codes
  for (const at::Tensor* t : {&k_cache, &v_cache})
    TORCH_CHECK(t->device().is_cpu() &&
                    (t->scalar_type() == at::kFloat || t->scalar_type() == at::kChar ||
                     t->scalar_type() == at::kFloat8_e4m3fn) &&
                    t->scalar_type() == k_cache.scalar_type() && t->dim() == 4 && t->is_contiguous(),
                "k_cache / v_cache must be contiguous CPU float32, int8 or float8_e4m3fn [num_blocks, block_size, Hk, "
                "D] tensors of one dtype");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape");
  TORCH_CHECK(int8 == (k_scale.has_value() && v_scale.has_value()), "an 8-bit cache needs k_scale and v_scale, a "
              "float cache takes none");
  if (int8) check_kv_scales(*k_scale, *v_scale, k_cache);
  const PagedShape ps = check_paged(q, k_cache, block_tables, context_lens, -1);
  const int64_t B = ps.B, Hq = ps.Hq, D = ps.D, BS = ps.BS, Hk = ps.Hk, MB = ps.MB, G = ps.G;
  check_summaries(kmin, kmax, ps.NB, Hk, D);
  TORCH_CHECK(topk.device().is_cpu() && topk.scalar_type() == at::kInt && topk.dim() == 1 && topk.is_contiguous() &&
                  topk.size(0) == B,
              "topk must be a contiguous CPU int32 [B] tensor (blocks per row, 0: all)");
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  const int32_t* kp = topk.data_ptr<int32_t>();
  const uint8_t* pp = check_pins(pins, B, Hk, MB);
  auto out = at::zeros({B, Hq, D}, q.options());
  if (B == 0 || Hq == 0 || D == 0) return out;
  const float* qp = q.data_ptr<float>();
  const float* mn = kmin.data_ptr<float>();
  const float* mx = kmax.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t items = B * Hk;
  const int nt = num_threads();

#pragma omp parallel num_threads(nt) if (items > 1)
  {
    std::vector<float> qs(G * D), acc(G * D), sc(G * kTile), m(G), l(G);
    llmopt_quest::Scratch scratch;
    scratch.reserve(MB, D, int8);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / Hk, h = item % Hk;
      const int64_t L = cl[b];
      if (L == 0) continue;
      for (int64_t g = 0; g < G; ++g) {
        const float* src = qp + (b * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qs[g * D + d] = src[d] * fscale;
      }
      if (int8) {
        const llmopt_kv8::PagedKV8 kv{static_cast<const int8_t*>(k_cache.data_ptr()) + h * D,
                                      static_cast<const int8_t*>(v_cache.data_ptr()) + h * D,
                                      k_scale->data_ptr<float>() + h, v_scale->data_ptr<float>() + h, bt + b * MB, BS,
                                      Hk, fp8};
        llmopt_quest::attend_item(qs.data(), G, D, nullptr, &kv, bt + b * MB, BS, Hk, h, L, kp[b], mn, mx, scratch,
                                  m.data(), l.data(), acc.data(), sc.data(), pin_of(pp, b, Hk, h, MB));
        for (int64_t g = 0; g < G; ++g) {  // kv_int8.cpp's store
          if (l[g] <= 0.0f) continue;
          float* dst = op + (b * Hq + h * G + g) * D;
          const float inv = 1.0f / l[g];
          for (int64_t d = 0; d < D; ++d) dst[d] = acc[g * D + d] * inv;
        }
      } else {
        const llmopt_f::PagedKV kv{k_cache.data_ptr<float>() + h * D, v_cache.data_ptr<float>() + h * D,
                                   k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
                                   bt + b * MB, BS};
        llmopt_quest::attend_item(qs.data(), G, D, &kv, nullptr, bt + b * MB, BS, Hk, h, L, kp[b], mn, mx, scratch,
                                  m.data(), l.data(), acc.data(), sc.data(), pin_of(pp, b, Hk, h, MB));
        for (int64_t g = 0; g < G; ++g) {  // fused.cpp's store (one split)
          float* dst = op + (b * Hq + h * G + g) * D;
          if (l[g] > 0.0f) {
            std::copy(acc.begin() + g * D, acc.begin() + (g + 1) * D, dst);
            llmopt_f::scale_inplace(dst, D, 1.0f / l[g]);
          }
        }
      }
    }
  }
  return out;
}

// The blocks quest.h chooses, for tests: [B, Hk, max_blocks] int32, chosen block indices ascending
// then -1.
at::Tensor quest_select(const at::Tensor& q, const at::Tensor& kmin, const at::Tensor& kmax,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor& topk,
                        int64_t block_size, double scale, const std::optional<at::Tensor>& pins) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 3 && q.is_contiguous(),
              "q must be a contiguous CPU float32 [B, Hq, D] tensor");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.is_contiguous() && block_tables.dim() == 2 &&
                  context_lens.scalar_type() == at::kInt && topk.scalar_type() == at::kInt,
              "block_tables [B, MB], context_lens [B] and topk [B] must be int32");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hk = kmin.size(1), MB = block_tables.size(1);
  check_summaries(kmin, kmax, kmin.size(0), Hk, D);
  TORCH_CHECK(Hq % Hk == 0, "Hq must be a multiple of Hk");
  const int64_t G = Hq / Hk;
  const uint8_t* pp = check_pins(pins, B, Hk, MB);
  auto out = at::full({B, Hk, MB}, -1, block_tables.options());
  int32_t* op = out.data_ptr<int32_t>();
  llmopt_quest::Scratch s;
  s.reserve(MB, D, false);
  std::vector<float> qs(G * D);  // scaled like the attention's queries: the same scores, the same choice
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = context_lens.data_ptr<int32_t>()[b];
    const int64_t nb = (L + block_size - 1) / block_size;
    TORCH_CHECK(nb <= MB, "context_lens[", b, "] needs more blocks than block_tables holds");
    for (int64_t h = 0; h < Hk; ++h) {
      const float* src = q.data_ptr<float>() + (b * Hq + h * G) * D;
      for (int64_t i = 0; i < G * D; ++i) qs[i] = src[i] * static_cast<float>(scale);
      const int64_t ns = llmopt_quest::select_blocks(
          qs.data(), G, D, kmin.data_ptr<float>(), kmax.data_ptr<float>(),
          block_tables.data_ptr<int32_t>() + b * MB, Hk, h, nb, topk.data_ptr<int32_t>()[b], s.score.data(),
          s.order.data(), s.sel.data(), pin_of(pp, b, Hk, h, MB));
      for (int64_t i = 0; i < ns; ++i) op[(b * Hk + h) * MB + i] = static_cast<int32_t>(s.sel[i]);
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  LLMOPT_F_ATTN_AVX512_DEF(m);
  m.def("quest_update_", &quest_update_, "per-block key min/max summaries updated with rows written at slots",
        py::arg("kmin"), py::arg("kmax"), py::arg("rows"), py::arg("slots"), py::arg("block_size"), nogil());
  m.def("quest_decode_attention", &quest_decode_attention,
        "single-token paged attention over the top-k blocks per (row, kv head) chosen from key summaries",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("k_scale"), py::arg("v_scale"), py::arg("kmin"),
        py::arg("kmax"), py::arg("block_tables"), py::arg("context_lens"), py::arg("topk"), py::arg("scale"),
        py::arg("pins") = py::none(), nogil());
  m.def("quest_select", &quest_select, "the blocks each (row, kv head) reads (tests)", py::arg("q"), py::arg("kmin"),
        py::arg("kmax"), py::arg("block_tables"), py::arg("context_lens"), py::arg("topk"), py::arg("block_size"),
        py::arg("scale"), py::arg("pins") = py::none(), nogil());
}
