// Paged decode attention over an 8-bit KV cache, int8 or fp8 e4m3fn codes (AVX2/FMA/F16C + OpenMP).
//
// Cache layout (llmopt/kernels/kv_quant.py): k, v int8 [num_blocks, block_size, Hk, D]; k_scale, v_scale
// float32 [num_blocks, block_size, Hk] (symmetric, one scale per token and kv head: x ~= q * scale).
// Rows are dequantized tile by tile into small buffers: no float copy of the cache is made.
// One OpenMP item per (sequence, kv head); the G query heads of a GQA group share every K/V read, and
// consecutive prefill rows of one sequence (group_rows of them) share every dequantized tile.
// Online softmax in float32 over 32-token tiles: each tile's rows are dequantized once into L1-sized
// buffers, then the float kernel's tile step (fused_kernels.h attend_tile: 4-token x 2-head score
// blocks, vectorized exp, register-blocked P @ V) runs on them; the same math as the torch reference
// (paged_decode_attention_int8_ref), which the tests hold it to.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "kv_int8.h"
#include "paged_args.h"

namespace {

inline int num_threads() { return std::max(1, at::get_num_threads()); }

using llmopt_kv8::kTile;  // tokens scored before one online-softmax update

at::Tensor paged_decode_attention_int8(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& k_scale, const at::Tensor& v_scale,
                                       const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                       int64_t sliding_window, int64_t group_rows) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 3 && q.is_contiguous(),
              "q must be a contiguous CPU float32 [B, Hq, D] tensor");
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  for (const at::Tensor* t : {&k_cache, &v_cache})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == (fp8 ? at::kFloat8_e4m3fn : at::kChar) && t->dim() == 4 &&
                    t->is_contiguous(),
                "k_cache / v_cache must be contiguous CPU int8 or float8_e4m3fn [num_blocks, block_size, Hk, D] "
                "tensors of one dtype");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape");
  check_kv_scales(k_scale, v_scale, k_cache);
  const PagedShape ps = check_paged(q, k_cache, block_tables, context_lens, sliding_window);
  const int64_t B = ps.B, Hq = ps.Hq, D = ps.D, BS = ps.BS, Hk = ps.Hk, MB = ps.MB, G = ps.G;
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  auto out = at::zeros({B, Hq, D}, q.options());
  if (B == 0 || Hq == 0 || D == 0) return out;
  const float* qp = q.data_ptr<float>();
  const int8_t* kp = static_cast<const int8_t*>(k_cache.data_ptr());  // int8 or e4m3fn bytes
  const int8_t* vp = static_cast<const int8_t*>(v_cache.data_ptr());
  const float* ksp = k_scale.data_ptr<float>();
  const float* vsp = v_scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  TORCH_CHECK(group_rows >= 1, "group_rows must be >= 1");
  // prefill rows of one sequence (context lengths L, L+1, ..) walk the tiles together: fused.cpp
  const int64_t R = group_rows;
  const std::vector<int64_t> first = llmopt_f::group_rows_of(bt, cl, B, MB, BS, sliding_window, R);
  const int64_t items = (static_cast<int64_t>(first.size()) - 1) * Hk;
  const int nt = num_threads();

#pragma omp parallel num_threads(nt) if (items > 1)
  {
    std::vector<float> qs(R * G * D), acc(R * G * D), m(R * G), l(R * G), kf(kTile * D), vf(kTile * D),
        sc(R * G * kTile);
    std::vector<int64_t> ends(R);
    std::vector<const float*> krow(kTile), vrow(kTile);
    for (int64_t i = 0; i < kTile; ++i) {
      krow[i] = kf.data() + i * D;
      vrow[i] = vf.data() + i * D;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t item = items - 1 - it;  // the last groups first: a prompt's later rows read the most
      const int64_t grp = item / Hk, h = item % Hk;
      const int64_t b = first[grp], rows = first[grp + 1] - b;
      const int64_t L = cl[b];
      const int64_t start = llmopt_f::window_start(L, sliding_window);
      for (int64_t r = 0; r < rows; ++r) {  // rows b .. b + rows - 1 (a prefill group, or one row)
        ends[r] = cl[b + r];
        for (int64_t g = 0; g < G; ++g) {
          const float* src = qp + ((b + r) * Hq + h * G + g) * D;
          for (int64_t d = 0; d < D; ++d) qs[(r * G + g) * D + d] = src[d] * fscale;
        }
      }
      const llmopt_kv8::PagedKV8 kv{kp + h * D, vp + h * D, ksp + h, vsp + h, bt + (b + rows - 1) * MB, BS, Hk, fp8};
      llmopt_kv8::attend_range_rows(qs.data(), rows, G, D, kv, start, ends.data(), m.data(), l.data(), acc.data(),
                                    sc.data(), kf.data(), vf.data(), krow.data(), vrow.data());
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t hh = r * G + g;
          if (l[hh] <= 0.0f) continue;
          float* dst = op + ((b + r) * Hq + h * G + g) * D;
          const float inv = 1.0f / l[hh];
          for (int64_t d = 0; d < D; ++d) dst[d] = acc[hh * D + d] * inv;
        }
    }
  }
  return out;
}

// H2O attention mass over an 8-bit cache: fused.cpp attention_mass with each K row dequantized (the
// attention's own rows) into a tile buffer. [B, Hk, max context] float32.
at::Tensor attention_mass_int8(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& k_scale,
                               const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 3 && q.is_contiguous(),
              "q must be a contiguous CPU float32 [B, Hq, D] tensor");
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(k_cache.device().is_cpu() && (fp8 || k_cache.scalar_type() == at::kChar) && k_cache.dim() == 4 &&
                  k_cache.is_contiguous(),
              "k_cache must be a contiguous CPU int8 or float8_e4m3fn [num_blocks, block_size, Hk, D] tensor");
  check_kv_scales(k_scale, k_scale, k_cache);
  const PagedShape ps = check_paged(q, k_cache, block_tables, context_lens, -1);
  const int64_t B = ps.B, D = ps.D, BS = ps.BS, Hk = ps.Hk, MB = ps.MB, G = ps.G, max_len = ps.max_len;
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  auto out = at::zeros({B, Hk, max_len}, q.options());
  if (B == 0 || Hk == 0 || max_len == 0) return out;
  const int8_t* kp = static_cast<const int8_t*>(k_cache.data_ptr());
  const float* ksp = k_scale.data_ptr<float>();
  const auto run = [&](auto is_fp8) {  // the code format picked once per call
    llmopt_f::attention_mass_items(
        q.data_ptr<float>(), B, Hk, G, D, cl, max_len, static_cast<float>(scale), num_threads(), true,
        out.data_ptr<float>(), [&](int64_t b, int64_t h, const float**, float* kf) {
          const int32_t* tb = bt + b * MB;
          return [=](int64_t i, int64_t t) {
            const int64_t row = (static_cast<int64_t>(tb[t / BS]) * BS + t % BS) * Hk + h;
            llmopt_kv8::dequant_row_as(decltype(is_fp8)::value, kf + i * D, kp + row * D, ksp[row], D);
          };
        });
  };
  if (fp8)
    run(std::true_type{});
  else
    run(std::false_type{});
  return out;
}

// x [T, D] float32 -> (int8 or float8_e4m3fn [T, D], float32 scales [T]) with the cache's row
// quantization (kv_int8.h quant_row / quant_row_fp8, what the fused decode step writes; tests hold it
// to kv_quant.quantize_kv)
std::tuple<at::Tensor, at::Tensor> quantize_kv_rows(const at::Tensor& x, bool fp8) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous CPU float32 [rows, head_dim] tensor");
  const int64_t T = x.size(0), D = x.size(1);
  auto q = at::empty({T, D}, x.options().dtype(fp8 ? at::kFloat8_e4m3fn : at::kChar));
  auto s = at::empty({T}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = static_cast<int8_t*>(q.data_ptr());
  float* sp = s.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) llmopt_kv8::quant_row_as(fp8, xp + t * D, D, qp + t * D, sp + t);
  return {q, s};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  LLMOPT_F_ATTN_AVX512_DEF(m);
  m.def("paged_decode_attention_int8", &paged_decode_attention_int8,
        "single-token paged attention over an int8 KV cache with per-(token, kv head) scales; "
        "sliding_window <= 0: none; group_rows: consecutive prefill rows walked together (1: none)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("k_scale"), py::arg("v_scale"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"), py::arg("sliding_window") = -1,
        py::arg("group_rows") = 16, py::call_guard<py::gil_scoped_release>());
  m.def("attention_mass_int8", &attention_mass_int8,
        "H2O: per row and kv head, the softmax probabilities over the row's cached tokens (8-bit cache) summed "
        "over the query heads of the group: [B, Hk, max context]", py::arg("q"), py::arg("k_cache"),
        py::arg("k_scale"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>());
  m.def("quantize_kv_rows", &quantize_kv_rows,
        "rows [T, D] -> (int8 or float8_e4m3fn [T, D], scales [T]): the 8-bit cache's quantization as the fused "
        "decode step writes it",
        py::arg("x"), py::arg("fp8") = false, py::call_guard<py::gil_scoped_release>());
}
