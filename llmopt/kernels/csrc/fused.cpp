// Fused CPU kernels for llmopt: AVX2/FMA intrinsics + OpenMP.
//
// All kernels take float32 tensors whose innermost dimension is contiguous (the Python wrappers in
// llmopt/kernels/ops.py check this and fall back to the plain-torch reference otherwise).
// Every loop has a scalar tail so sizes need not be multiples of 8.
// Thread count follows torch (at::get_num_threads(), i.e. torch.set_num_threads); small problems
// run single-threaded because an OpenMP fork/join costs more than the work.

// Narrow includes instead of <torch/extension.h>: the full C++ frontend header makes the first
// build ~4x slower (about 50 s vs 13 s here) and none of it is needed.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "fused_kernels.h"
#include "paged_args.h"

namespace {

using namespace llmopt_f;

// Below this many float elements a kernel runs on one thread.
constexpr int64_t kParallelMinElems = 1 << 15;

inline int num_threads() { return std::max(1, at::get_num_threads()); }

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
}

void check_f32_contig(const at::Tensor& t, const char* name) {
  check_f32(t, name);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// ---------------------------------------------------------------------------------------------
// 1. RMSNorm
//    x: [..., H] contiguous, weight: [H]  ->  out[r, :] = x[r, :] * rsqrt(mean(x[r]^2) + eps) * weight
//    One pass for the sum of squares, one for the scaled write; OpenMP over rows.
// ---------------------------------------------------------------------------------------------

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_f32_contig(x, "x");
  check_f32_contig(weight, "weight");
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension");
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.numel() == H, "weight must have ", H, " elements");
  const int64_t N = H == 0 ? 0 : x.numel() / H;
  auto out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);

#pragma omp parallel for num_threads(num_threads()) if (N > 1 && N * H >= kParallelMinElems) schedule(static)
  for (int64_t r = 0; r < N; ++r) {
    rms_norm_row(xp + r * H, wp, op + r * H, H, feps);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// 2. Residual add + RMSNorm
//    x, residual: [..., H] contiguous, weight: [H].
//    residual[r, :] += x[r, :]  (IN PLACE: residual becomes the sum), out = rms_norm(residual).
//    Pass 1 adds, stores the sum and accumulates its squares; pass 2 re-reads the (L1-resident)
//    sum row and writes the normalized output. Returns out; the sum is `residual`.
// ---------------------------------------------------------------------------------------------

at::Tensor add_rms_norm_(const at::Tensor& x, at::Tensor residual, const at::Tensor& weight, double eps) {
  check_f32_contig(x, "x");
  check_f32_contig(residual, "residual");
  check_f32_contig(weight, "weight");
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual must have the same shape");
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension");
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.numel() == H, "weight must have ", H, " elements");
  const int64_t N = H == 0 ? 0 : x.numel() / H;
  auto out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);

#pragma omp parallel for num_threads(num_threads()) if (N > 1 && N * H >= kParallelMinElems) schedule(static)
  for (int64_t r = 0; r < N; ++r) add_rms_norm_row(xp + r * H, rp + r * H, wp, op + r * H, H, feps);
  return out;
}

// ---------------------------------------------------------------------------------------------
// 3. SiLU-and-multiply (SwiGLU activation)
//    gate_up: [..., 2I] contiguous (gate = [..., :I], up = [..., I:])  ->  out: [..., I]
//    out = gate / (1 + exp(-gate)) * up. OpenMP over (row, 1024-column block) so a single
//    decode row with a large I still splits across threads.
// ---------------------------------------------------------------------------------------------

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_f32_contig(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, "last dimension of gate_up must be even");
  const int64_t I = gate_up.size(-1) / 2;
  auto out_sizes = gate_up.sizes().vec();
  out_sizes.back() = I;
  auto out = at::empty(out_sizes, gate_up.options());
  if (I == 0 || gate_up.numel() == 0) return out;
  const int64_t N = gate_up.numel() / (2 * I);
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kBlock = 1024;
  const int64_t nblk = (I + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(num_threads()) if (N * I >= kParallelMinElems / 2) schedule(static)
  for (int64_t job = 0; job < N * nblk; ++job) {
    const int64_t r = job / nblk;
    const int64_t c0 = (job % nblk) * kBlock;
    const int64_t c1 = std::min(I, c0 + kBlock);
    const float* g = gp + r * 2 * I;
    silu_mul_range(g, g + I, op + r * I, c0, c1);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// 4. Rotary embedding, NeoX / HF rotate_half style, in place
//    q: [T, Hq, D], k: [T, Hk, D] with stride(-1) == 1 and any token / head strides (so they can
//    be views into one fused qkv projection [T, (Hq + 2 Hk) * D]).
//    positions: [T] int64, cos_sin_cache: [max_pos, D] contiguous, cos in [:D/2], sin in [D/2:].
//    x1 = x[:D/2], x2 = x[D/2:]:  x1' = x1 cos - x2 sin,  x2' = x2 cos + x1 sin.
//    OpenMP over (token, head) pairs.
// ---------------------------------------------------------------------------------------------

void rope_(at::Tensor q, at::Tensor k, const at::Tensor& positions, const at::Tensor& cos_sin_cache) {
  check_f32(q, "q");
  check_f32(k, "k");
  check_f32_contig(cos_sin_cache, "cos_sin_cache");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "q and k must be [T, H, D]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "q and k must have a contiguous last dimension");
  TORCH_CHECK(positions.device().is_cpu() && positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "positions must be a contiguous CPU int64 tensor");
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), Hk = k.size(1);
  TORCH_CHECK(k.size(0) == T && k.size(2) == D, "q and k must agree on T and D");
  TORCH_CHECK(positions.numel() == T, "positions must have T elements");
  TORCH_CHECK(D % 2 == 0, "head_dim must be even");
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == D, "cos_sin_cache must be [max_pos, D]");
  const int64_t max_pos = cos_sin_cache.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "position ", pos[t], " out of range [0, ", max_pos, ")");

  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  const float* cp = cos_sin_cache.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t H = Hq + Hk, half = D / 2;

#pragma omp parallel for num_threads(num_threads()) if (T * H * D >= kParallelMinElems) schedule(static)
  for (int64_t job = 0; job < T * H; ++job) {
    const int64_t t = job / H, h = job % H;
    float* x = h < Hq ? qp + t * qs0 + h * qs1 : kp + t * ks0 + (h - Hq) * ks1;
    rope_head(x, cp + pos[t] * D, half);
  }
}

// ---------------------------------------------------------------------------------------------
// 5. Paged decode attention (one query token per sequence), flash-decoding style
//    q: [B, Hq, D] contiguous; k_cache, v_cache: [num_blocks, block_size, Hk, D] with stride(-1)==1
//    block_tables: [B, max_blocks] int32 contiguous; context_lens: [B] int32 (tokens in the cache,
//    the current one included).  Token t of sequence b lives in block block_tables[b][t / bs],
//    slot t % bs.  Query head h reads kv head h / (Hq / Hk).  Output: [B, Hq, D].
//
//    Work item = (sequence, kv head, split). The G = Hq / Hk query heads sharing a kv head are
//    processed together so each K/V row is read from memory once. Tokens are walked in tiles of
//    kTile: scores for the tile, one online-softmax rescale per tile, then P @ V with the
//    accumulator held in registers 64 floats at a time. When the model has fewer kv heads than
//    threads, rows with long contexts are cut into token chunks (token_chunks: by the row's context
//    alone, never by the batch, so a row's bits are the same alone or in any batch) and the chunks'
//    partial (max, sum, acc) triples are merged afterwards (flash-decoding). num_splits > 0 instead
//    cuts every row into that many equal parts (tests).
//
//    Prefill rows (one row per prompt token, the same block table, context lengths L, L+1, ..) are
//    grouped: up to group_rows consecutive rows whose context lengths grow by 1, with the same window
//    start and the same blocks, form one work item per kv head (and token chunk) that walks the K/V
//    tiles once for all of them (attend_tiles_rows): each K/V row is loaded once per group instead of
//    once per row, and every row's output keeps the bits it gets alone. group_rows 1: no grouping.
// ---------------------------------------------------------------------------------------------

// E: the cache's element (float, or uint16_t for a float16 cache: fused_kernels.h PagedKV16)
template <class E>
at::Tensor paged_attention_impl(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                int64_t sliding_window, int64_t num_splits, int64_t group_rows) {
  using KV = std::conditional_t<std::is_same_v<E, float>, PagedKV, PagedKV16>;
  TORCH_CHECK(q_in.dim() == 3, "q must be [B, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "k_cache / v_cache must be [num_blocks, block_size, Hk, D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "k_cache / v_cache need a contiguous last dimension");
  const PagedShape ps = check_paged(q_in, k_cache, block_tables, context_lens, sliding_window);
  const int64_t B = ps.B, Hq = ps.Hq, D = ps.D, BS = ps.BS, Hk = ps.Hk, MB = ps.MB, G = ps.G, max_len = ps.max_len;
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();

  auto out = at::zeros({B, Hq, D}, q_in.options());
  if (B == 0 || Hq == 0 || D == 0 || max_len == 0) return out;

  const int nt = num_threads();
  TORCH_CHECK(group_rows >= 1, "group_rows must be >= 1");
  // token chunks per row: num_splits > 0 cuts every row into that many equal parts, rows alone (tests);
  // else token_chunks (fixed chunks from the window start whatever the batch: batch-invariant)
  const bool even = num_splits > 0;
  const int64_t Se = even ? std::max<int64_t>(1, std::min<int64_t>(num_splits, max_len)) : 1;
  std::vector<int64_t> rs(B);
  for (int64_t b = 0; b < B; ++b) rs[b] = even ? Se : token_chunks(cl[b], sliding_window, Hk, nt);
  const bool split = *std::max_element(rs.begin(), rs.end()) > 1;
  const int64_t R = even && Se > 1 ? 1 : group_rows;
  const std::vector<int64_t> first = group_rows_of(bt, cl, B, MB, BS, sliding_window, R);
  const int64_t ngroups = static_cast<int64_t>(first.size()) - 1;  // == B when R == 1
  // Items: a one-row group (decode rows, every row of an even split) has one per (kv head, chunk), so a
  // long row alone spreads over the threads, and its partials go to the shared slots from pbase[row]
  // ([Hk, rs[row]] of them), merged after; a prefill group has one per kv head that walks the group's
  // chunks (its longest row's) in turn and merges its rows itself. Group j's items from ibase[j].
  std::vector<int64_t> ibase(ngroups + 1, 0), pbase(B + 1, 0);
  int64_t smax = 1;  // the most chunks of a prefill group
  for (int64_t j = 0; j < ngroups; ++j) {
    const int64_t rows = first[j + 1] - first[j], S = rs[first[j + 1] - 1];
    ibase[j + 1] = ibase[j] + Hk * (rows == 1 ? S : 1);
    if (rows > 1) smax = std::max(smax, S);
  }
  for (int64_t j = 0; j < ngroups; ++j)
    for (int64_t b = first[j]; b < first[j + 1]; ++b)
      pbase[b + 1] = pbase[b] + (first[j + 1] - first[j] == 1 && rs[b] > 1 ? Hk * rs[b] : 0);
  const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), ks2 = k_cache.stride(2);
  const int64_t vs0 = v_cache.stride(0), vs1 = v_cache.stride(1), vs2 = v_cache.stride(2);
  // decode rows only (no prefill groups), enough of them for the threads: one item per row walks all
  // its kv heads (attend_range_heads: the same bits, the cache read front to back)
  const bool heads = !split && ngroups == B && walk_rows_whole(B, Hk, nt) && ks2 == vs2;
  const int64_t items = heads ? B : ibase[ngroups];

  // Shared partials of the one-row groups' split rows: m, l: [pbase[B], G]; acc: [pbase[B], G, D],
  // every slot written by its item. Kept per calling thread (no fresh pages to fault in on every call);
  // the parallel region reaches them through pm / pl / pacc (its threads' own thread_locals are others).
  thread_local std::vector<float> part_m, part_l, part_acc;
  auto grow = [](std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
  };
  const bool shared = pbase[B] > 0;
  float* const pm = shared ? grow(part_m, pbase[B] * G) : nullptr;
  float* const pl = shared ? grow(part_l, pbase[B] * G) : nullptr;
  float* const pacc = shared ? grow(part_acc, pbase[B] * G * D) : nullptr;

  const float* qp = q_in.data_ptr<float>();
  const E* kp = static_cast<const E*>(k_cache.data_ptr());
  const E* vp = static_cast<const E*>(v_cache.data_ptr());
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

#pragma omp parallel num_threads(nt) if (items > 1)
  {
    const int64_t RH = heads ? Hk : R;  // query-head groups held at once
    std::vector<float> qs(RH * G * D), acc(RH * G * D), sc(R * G * kTile), m(RH * G), l(RH * G);
    std::vector<const float*> krow(RH * kTile), vrow(RH * kTile);
    std::vector<int64_t> ends(R);
    // a prefill group's partials, row r's chunk k at r * smax + k (merged by the item)
    std::vector<float> gm, gl, gacc;
    if (split && R > 1) {
      gm.resize(R * smax * G);
      gl.resize(R * smax * G);
      gacc.resize(R * smax * G * D);
    }
    // query head src (D floats) times the softmax scale into held head h; held head h's output to dst
    // (normalized; left zero for an empty context)
    auto load_q = [&](int64_t h, const float* src) {
      for (int64_t d = 0; d < D; ++d) qs[h * D + d] = src[d] * fscale;
    };
    auto store_out = [&](int64_t h, float* dst) {
      if (l[h] > 0.0f) {
        std::copy(acc.begin() + h * D, acc.begin() + (h + 1) * D, dst);
        scale_inplace(dst, D, 1.0f / l[h]);
      }
    };
    // held row r's partial (m, l, acc of its G heads) to slot `slot` of (m, l, acc) buffers
    auto keep = [&](int64_t r, int64_t slot, float* dm, float* dl, float* dacc) {
      std::copy(m.begin() + r * G, m.begin() + (r + 1) * G, dm + slot * G);
      std::copy(l.begin() + r * G, l.begin() + (r + 1) * G, dl + slot * G);
      std::copy(acc.begin() + r * G * D, acc.begin() + (r + 1) * G * D, dacc + slot * G * D);
    };

#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t item = items - 1 - it;  // the last groups first: a prompt's later rows read the most
      if (heads) {
        const int64_t b = item;
        for (int64_t h = 0; h < Hq; ++h) load_q(h, qp + (b * Hq + h) * D);
        const int64_t L = cl[b];
        const KV kv{kp, vp, ks0, ks1, vs0, vs1, bt + b * MB, BS};
        attend_range_heads(qs.data(), Hk, G, D, kv, ks2, window_start(L, sliding_window), L, m.data(), l.data(), acc.data(), sc.data(),
                           krow.data(), vrow.data());
        for (int64_t h = 0; h < Hq; ++h) store_out(h, op + (b * Hq + h) * D);
        continue;
      }
      const int64_t grp = std::upper_bound(ibase.begin(), ibase.end(), item) - ibase.begin() - 1;
      const int64_t b = first[grp], rows = first[grp + 1] - b;
      const int64_t S = rs[b + rows - 1];
      const int64_t per = rows == 1 ? S : 1;  // items per kv head
      const int64_t kvh = (item - ibase[grp]) / per;
      const int64_t k_lo = rows == 1 ? (item - ibase[grp]) % per : 0, k_hi = rows == 1 ? k_lo + 1 : S;
      // the kv head's G query heads of the rows, scaled
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < G; ++g) load_q(r * G + g, qp + ((b + r) * Hq + kvh * G + g) * D);
      // chunk k of the group's rows (one window start): tokens [t0, t0 + clen) of every row that reaches
      // past t0 (all rows on chunk 0; a suffix of the group, context lengths grow), walked together
      const int64_t start = window_start(cl[b], sliding_window);
      const int64_t span = cl[b + rows - 1] - start;  // the longest row's
      const int64_t clen = S == 1 ? span : even ? (span + S - 1) / S : kSplitTokens;
      const KV kv{kp + kvh * ks2, vp + kvh * vs2, ks0, ks1, vs0, vs1, bt + (b + rows - 1) * MB, BS};
      for (int64_t k = k_lo; k < k_hi; ++k) {
        const int64_t t0 = start + k * clen;
        int64_t r0 = 0;
        if (k > 0)
          while (r0 < rows && cl[b + r0] <= t0) ++r0;
        if (r0 == rows) {  // an even split past the row's context (rows == 1): an empty partial
          std::fill_n(pm + (pbase[b] + kvh * S + k) * G, G, -std::numeric_limits<float>::infinity());
          std::fill_n(pl + (pbase[b] + kvh * S + k) * G, G, 0.0f);
          continue;
        }
        for (int64_t r = r0; r < rows; ++r) ends[r - r0] = std::min<int64_t>(cl[b + r], t0 + clen);
        attend_range_rows(qs.data() + r0 * G * D, rows - r0, G, D, kv, t0, ends.data(), m.data() + r0 * G,
                          l.data() + r0 * G, acc.data() + r0 * G * D, sc.data(), krow.data(), vrow.data());
        for (int64_t r = r0; r < rows; ++r) {
          const int64_t row = b + r;
          if (rs[row] == 1) {  // the whole context in one walk (chunk 0): the output
            for (int64_t g = 0; g < G; ++g) store_out(r * G + g, op + (row * Hq + kvh * G + g) * D);
          } else if (rows == 1) {
            keep(r, pbase[row] + kvh * rs[row] + k, pm, pl, pacc);
          } else {
            keep(r, r * smax + k, gm.data(), gl.data(), gacc.data());
          }
        }
      }
      if (rows > 1 && S > 1)  // the group's split rows: their chunks merged in order
        for (int64_t r = 0; r < rows; ++r)
          if (rs[b + r] > 1)
            for (int64_t g = 0; g < G; ++g)
              merge_splits(gm.data() + r * smax * G, gl.data() + r * smax * G, gacc.data() + r * smax * G * D,
                           rs[b + r], G, D, 0, g, op + ((b + r) * Hq + kvh * G + g) * D);
    }
  }

  if (shared) {
    // Merge each one-row group's split row's chunks in order: out = sum_s e^(m_s - M) acc_s / sum_s
    // e^(m_s - M) l_s (merge_splits, as the prefill groups do).
#pragma omp parallel for num_threads(nt) if (pbase[B] * G * D >= kParallelMinElems) schedule(static)
    for (int64_t bh = 0; bh < B * Hk; ++bh) {
      const int64_t b = bh / Hk, kvh = bh % Hk;
      if (pbase[b + 1] == pbase[b]) continue;
      for (int64_t g = 0; g < G; ++g)
        merge_splits(pm + pbase[b] * G, pl + pbase[b] * G, pacc + pbase[b] * G * D, rs[b], G, D, kvh, g,
                     op + (b * Hq + kvh * G + g) * D);
    }
  }
  return out;
}

// float32 caches, or float16 ones (EngineConfig(kv_dtype="float16"): halves converted per tile)
at::Tensor paged_decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                     int64_t sliding_window, int64_t num_splits, int64_t group_rows) {
  check_f32_contig(q_in, "q");
  TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu(), "k_cache / v_cache must be CPU tensors");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache must have one dtype");
  if (k_cache.scalar_type() == at::kHalf)
    return paged_attention_impl<uint16_t>(q_in, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
                                          num_splits, group_rows);
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "k_cache / v_cache must be float32 or float16");
  return paged_attention_impl<float>(q_in, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
                                     num_splits, group_rows);
}

// ---------------------------------------------------------------------------------------------
// 6. H2O attention mass (engine/kv_policy.py): for each row b and kv head, the softmax probabilities
//    of its G query heads over the row's context_lens[b] cached tokens, summed over the group
//    (fused_kernels.h attention_mass_row). q, caches, tables as paged_decode_attention (no window).
//    Output: [B, Hk, max context] float32, zeros past each row's context. Items = (row, kv head).
// ---------------------------------------------------------------------------------------------

at::Tensor attention_mass(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& block_tables,
                          const at::Tensor& context_lens, double scale) {
  check_f32_contig(q_in, "q");
  check_f32(k_cache, "k_cache");
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 4, "q must be [B, Hq, D], k_cache [num_blocks, block_size, Hk, D]");
  TORCH_CHECK(k_cache.stride(3) == 1, "k_cache needs a contiguous last dimension");
  const PagedShape ps = check_paged(q_in, k_cache, block_tables, context_lens, -1);
  const int64_t B = ps.B, D = ps.D, BS = ps.BS, Hk = ps.Hk, MB = ps.MB, G = ps.G, max_len = ps.max_len;
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  auto out = at::zeros({B, Hk, max_len}, q_in.options());
  if (B == 0 || Hk == 0 || max_len == 0) return out;
  const float* kp = k_cache.data_ptr<float>();
  const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), ks2 = k_cache.stride(2);
  attention_mass_items(q_in.data_ptr<float>(), B, Hk, G, D, cl, max_len, static_cast<float>(scale), num_threads(),
                       false, out.data_ptr<float>(), [&](int64_t b, int64_t h, const float** krow, float*) {
                         const float* kbase = kp + h * ks2;
                         const int32_t* tb = bt + b * MB;
                         return [=](int64_t i, int64_t t) { krow[i] = kbase + tb[t / BS] * ks0 + (t % BS) * ks1; };
                       });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while a kernel runs (arguments are converted before), so other Python
  // threads of a server keep going during a long attention call.
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.doc() = "llmopt fused CPU kernels (AVX2/FMA + OpenMP)";
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim", py::arg("x"), py::arg("weight"), py::arg("eps"), nogil());
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x (in place); return rms_norm(residual)", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"), nogil());
  m.def("silu_mul", &silu_mul, "silu(gate) * up for gate_up = [gate | up]", py::arg("gate_up"), nogil());
  m.def("rope_", &rope_, "NeoX-style rotary embedding applied in place to q and k", py::arg("q"), py::arg("k"),
        py::arg("positions"), py::arg("cos_sin_cache"), nogil());
  LLMOPT_F_ATTN_AVX512_DEF(m);
  m.def("paged_decode_attention", &paged_decode_attention,
        "single-token paged attention with GQA; sliding_window <= 0: none; num_splits 0: token chunks by context "
        "(batch-invariant), N > 0: every row in N equal parts; group_rows: "
        "consecutive prefill rows walked together (1: none)", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("sliding_window") = -1, py::arg("num_splits") = 0, py::arg("group_rows") = 16, nogil());
  m.def("attention_mass", &attention_mass,
        "H2O: per row and kv head, the softmax probabilities over the row's cached tokens summed over the "
        "query heads of the group: [B, Hk, max context]", py::arg("q"), py::arg("k_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("scale"), nogil());
}
