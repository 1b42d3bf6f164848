// One native call for the whole decoder stack of a decode step (every sequence adds one token, or a
// few: "chained" rows, see run)
// of a model whose layer linears are int4 with int8 activations (the engine's int4 decode path),
// GGUF blocks (the "gguf" linear method: gguf_kernels.h, fp32 or int8 activations per part) or
// packed fp32 weights (PackedLinear: the fp32-packed method, GRPO rollouts; dense_kernels.h).
//
// Why: a decode step of a small model is ~150 short kernels (SmolLM2-135M: 30 layers x (2 norms,
// 4 GEMVs, rope, attention, silu)). Called one by one from Python each pays the interpreter, the
// torch dispatcher, an output allocation and an OpenMP fork/join, which together cost about as
// much as the arithmetic. Here one OpenMP parallel region runs the whole stack: the threads split
// each op (rows, heads, or output columns taken from an atomic counter) and meet at a barrier
// between dependent ops, the way llama.cpp's graph executor does.
//
// Per layer, for M decode rows (all buffers preallocated, reused across steps):
//   h = rmsnorm(x) / add+rmsnorm        rows split
//   xq = int8(h) per weight group       rows split            (w4a8.h)
//   qkv = W_qkv xq (+ bias)             columns, atomic chunks (w4a8.h)
//   q/k rmsnorm (qwen3), rope, k/v -> paged cache        (row, head) split (or in step 4's items)
//   attn = softmax(q k^T) v             (row, kv head[, token split]) items   (fused_kernels.h)
//   o = W_o int8(attn)                  quantize rows, then columns
//   h = add+rmsnorm(o)                  rows
//   gu = W_gu int8(h)                   quantize rows, then columns
//   a = silu(g) * u, int8(a)            rows
//   y = W_down a                        columns
// The same row / column kernels as the standalone ops are used, so the result equals the op-by-op
// forward (tests/kernels/test_decode_step.py holds them equal). GGUF projections run through the
// kernel table of the GGUF build the standalone linear uses (gguf_kernels.h: KernelTable): the same
// compiled kernels, for the instruction set chosen at load, threads split over 16-column panels
// (int8 mode: rows quantized first, rows split). Their sums do not depend on the split. Packed fp32
// projections run the packed GEMM's own panel kernel (dense_kernels.h: KernelTable of the sgemm
// build PackedLinear calls), threads split over 16-column panels, fp32 activations.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "dense_kernels.h"
#include "fused_kernels.h"
#include "gguf_kernels.h"
#include "kv_int8.h"
#include "quest.h"
#include "w4a8.h"

namespace {

namespace D = llmopt_dense;
namespace F = llmopt_f;
namespace G = llmopt_gguf;
namespace Q = llmopt_q;

constexpr int64_t kColsPerTask = 32;  // output columns of a GEMV work item: a multiple of this
// Work items per thread and GEMV: few and contiguous (see gemv in run). SmolLM2-135M int4 decode
// step, 2 threads, M=1: 32-column items 5.2 ms, 2 items per thread 2.3 ms (1 thread: 4.2 ms). GGUF
// Q4_1 step (Zen 4, 2 threads, next-group prefetch; one process, settings alternated, 6 runs, best
// mean step): 1 run per thread 2.55 ms, 2 runs 2.81, 4 runs 3.08 (each run starts its weight streams
// cold); 4 and 16 rows the same order (3.93 / 4.32 / 4.36 and 12.0 / 12.8 / 13.1 ms).
constexpr int64_t kChunksPerThread = 1;

// Rows r0, r0 + step, ... of x [M, K] quantized into the activation buffers of A (xq / sx / xsum,
// laid out as w4a8_act_shape gives), lane-permuted for the int4 lane layout.
void quant_rows(const float* x, int64_t K, int64_t gs, const Q::W4A8Act& A, int8_t* xq, float* sx, float* xsum,
                bool lanes, int64_t r0, int64_t step) {
  for (int64_t r = r0; r < A.M; r += step) {
    Q::quant_row_group_i8(x + r * K, K, A.Kp, gs, xq + r * A.Kp, sx + r * A.Gp, xsum + r * A.G, A.Gp);
    if (lanes) Q::permute_row_to_lanes(xq + r * A.Kp, A.Kp);
  }
}

// Columns [0, N) as a few long contiguous runs per thread (kChunksPerThread, multiples of
// kColsPerTask) taken from counter c: f(n0, n1) for each run this thread gets.
template <class Fn>
void for_column_runs(int64_t N, int nth, std::atomic<int64_t>& c, const Fn& f) {
  const int64_t per = (N + nth * kChunksPerThread - 1) / (nth * kChunksPerThread);
  const int64_t csz = std::max<int64_t>(kColsPerTask, (per + kColsPerTask - 1) / kColsPerTask * kColsPerTask);
  const int64_t nchunks = (N + csz - 1) / csz;
  for (;;) {
    const int64_t k = c.fetch_add(1, std::memory_order_relaxed);
    if (k >= nchunks) break;
    f(k * csz, std::min(N, (k + 1) * csz));
  }
}

// Units [0, n) (GGUF: pairs of 16-column panels) as nth * kChunksPerThread balanced contiguous runs
// taken from counter c: f(u0, u1) for each run this thread gets.
template <class Fn>
void for_balanced_runs(int64_t n, int nth, std::atomic<int64_t>& c, const Fn& f) {
  const int64_t nchunks = std::min<int64_t>(n, nth * kChunksPerThread);
  for (;;) {
    const int64_t k = c.fetch_add(1, std::memory_order_relaxed);
    if (k >= nchunks) break;
    f(k * n / nchunks, (k + 1) * n / nchunks);
  }
}

bool defined(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

const float* fptr(const at::Tensor& t) { return defined(t) ? t.data_ptr<float>() : nullptr; }

int scale_kind(const at::Tensor& t, const char* what) {
  if (t.scalar_type() == at::kFloat) return Q::SK_F32;
  TORCH_CHECK(t.scalar_type() == at::kHalf, what, " must be float16 or float32");
  return Q::SK_F16;
}

void check_vec(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, what,
              " must be a contiguous CPU float32 tensor of ", n, " elements");
}

// A kernel table another build hands over as a capsule (gguf_kernels.h, dense_kernels.h): its name
// and the ABI of the header this file was compiled with are checked. ``who`` names the setter,
// ``source`` where the capsule comes from, ``built`` what the table is ("the GGUF kernels were").
template <class Table>
const Table* table_of(const py::object& cap, const char* name, int32_t abi, const char* who, const char* source,
                      const char* built, const char* header) {
  TORCH_CHECK(PyCapsule_IsValid(cap.ptr(), name), who, ": expected a ", name, " capsule (", source, ")");
  const auto* t = static_cast<const Table*>(PyCapsule_GetPointer(cap.ptr(), name));
  TORCH_CHECK(t && t->abi == abi && t->size == (int32_t)sizeof(Table), who, ": ", built,
              " built from another version of ", header, " (rebuild both: python -m llmopt.kernels.build)");
  return t;
}

// An int4 linear in the lane layout read with int8 activations (qlinear: int4 + INT4_ACT=int8).
struct QLin {
  at::Tensor qw, sc, mn, bias;  // kept alive
  at::Tensor sc4, mn4;          // scales / mins interleaved by 4 columns for the tiles, else empty
  int64_t N = 0, K = 0, gs = 0;
  int sk = 0, mk = 0;

  QLin() = default;
  // scales4 / mins4: fp16 copies of scales / mins interleaved by 4 columns (interleave4_f16; in
  // Python qlinear.interleaved_scales) for the 4-column tiles from kW4TileMinRows rows, or empty
  QLin(at::Tensor qweight, at::Tensor scales, at::Tensor mins, at::Tensor scales4, at::Tensor mins4, at::Tensor b,
       int64_t n, int64_t k, int64_t group, const char* what)
      : qw(std::move(qweight)), sc(std::move(scales)), mn(std::move(mins)), bias(std::move(b)), sc4(std::move(scales4)),
        mn4(std::move(mins4)), N(n), K(k), gs(group) {
    TORCH_CHECK(gs == 64 || gs == 128 || gs == 256, what, ": group size must be 64, 128 or 256, got ", gs);
    TORCH_CHECK(K % gs == 0, what, ": in_features ", K, " not a multiple of the group size ", gs);
    TORCH_CHECK(qw.device().is_cpu() && qw.scalar_type() == at::kByte && qw.is_contiguous() && qw.dim() == 2 &&
                    qw.size(0) == N && qw.size(1) == (K + 63) / 64 * 32,
                what, ": qweight must be contiguous uint8 [", N, ", ", (K + 63) / 64 * 32, "]");
    TORCH_CHECK(sc.is_contiguous() && sc.numel() == N * (K / gs), what, ": scales must be [N, K / group]");
    TORCH_CHECK(mn.is_contiguous() && mn.numel() == N * (K / gs), what, ": mins must be [N, K / group]");
    sk = scale_kind(sc, what);
    mk = scale_kind(mn, what);
    if (defined(bias)) check_vec(bias, N, "bias");
    TORCH_CHECK(defined(sc4) == defined(mn4), what, ": scales4 and mins4 come together");
    if (defined(sc4)) {
      TORCH_CHECK(N % 4 == 0, what, ": 4-column tiles need out_features % 4 == 0");
      for (const at::Tensor* t : {&sc4, &mn4})
        TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kHalf && t->is_contiguous() &&
                        t->numel() == N * (K / gs),
                    what, ": scales4 / mins4 must be contiguous float16 [N/4, K/group, 4]");
    } else {
      sc4 = mn4 = at::Tensor();  // cols() tests defined()
    }
  }

  // columns [n0, n1) of y [A.M, N] (row stride ldy)
  void cols(const Q::W4A8Act& A, float* y, int64_t ldy, int64_t n0, int64_t n1, Q::W4A8Scratch& s) const {
    Q::with_group(gs, [&](auto g) {
      constexpr int GS = decltype(g)::value;
      if (sc4.defined() && A.M >= Q::kW4TileMinRows)
        Q::w4a8_cols4<GS>(A, qw.data_ptr<uint8_t>(), (const uint16_t*)sc4.data_ptr(), (const uint16_t*)mn4.data_ptr(),
                          fptr(bias), y, ldy, n0, n1);
      else
        Q::w4a8_cols<GS>(A, qw.data_ptr<uint8_t>(), sc.data_ptr(), sk, mn.data_ptr(), mk, fptr(bias), y, ldy, n0, n1, s);
    });
  }
};

// One row range of a GGUF projection: rows [n0, n0 + N) in the packed layout of one ggml type.
struct GPart {
  at::Tensor data;  // kept alive
  int64_t type = 0, N = 0, n0 = 0, P = 0, nblk = 0;
  int64_t p0 = 0;  // first panel in the projection's panel numbering (parts' panels consecutive)
  int a8 = -1;     // -1: fp32 activations; else int8 activations of kind a8 (KernelTable::a8_kind)
};

// A GGUF projection (the "gguf" linear method's GGUFLinear): one kernel call per part, like the
// op-by-op forward; the bias adds to each part's columns as the standalone kernel adds it.
struct GLin {
  std::vector<GPart> parts;
  at::Tensor bias;
  int64_t N = 0, K = 0, P = 0;  // P: panels over all parts
  bool a8[2] = {false, false};  // int8 rows of kind 0 / 1 needed
};

// A packed fp32 projection (PackedLinear): weight float32 [P, K, 16], P = ceil(N / 16)
struct DLin {
  at::Tensor packed, bias;  // kept alive
  int64_t N = 0, K = 0, P = 0;
};

// A projection of the step: int4 (QLin), GGUF (GLin) or packed fp32 (DLin)
struct Lin {
  enum Kind { kNone, kInt4, kGGUF, kDense } kind = kNone;
  QLin q;
  GLin g;
  DLin d;
};

constexpr const char* kSlotNames[4] = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"};

struct Layer {
  at::Tensor ln1, ln2, qn, kn, kc, vc;
  at::Tensor ks, vs;  // int8 cache: float32 scales [num_blocks, block_size, num_kv_heads]; float cache: empty
  Lin lin[4];         // qkv, o, gate_up, down
  int64_t window = -1;
  bool int8 = false;  // kc / vc are an 8-bit cache (kv_int8.h layout), else float32
  bool fp8 = false;   // ... whose codes are e4m3fn (kv_int8.h quant_row_fp8), else int8
  bool f16 = false;   // kc / vc are a float16 cache (fused_kernels.h PagedKV16), else float32 (when not int8)

  int8_t* kbytes() const { return static_cast<int8_t*>(kc.data_ptr()); }
  int8_t* vbytes() const { return static_cast<int8_t*>(vc.data_ptr()); }
};

// Per-thread scratch.
struct ThreadScratch {
  Q::W4A8Scratch w;
  std::vector<float> qs, acc, sc, m, l;
  std::vector<const float*> krow, vrow;
  std::vector<float> kf, vf;                // int8 cache: one tile's dequantized K / V rows
  std::vector<const float*> kfrow, vfrow;   // ... and pointers to them
  llmopt_quest::Scratch quest;              // Quest: block selection and its own tile buffers
  std::vector<float> qrow;                  // Quest, int8 cache: the new key row dequantized
  std::vector<float> mass_s;                // H2O: one row's scores [G, context] between the mass passes
};

class DecodeStep {
 public:
  // tensors: per layer input_layernorm, post_attention_layernorm, q_norm, k_norm (empty: none),
  // k_cache, v_cache, k_scale, v_scale (float32 caches: empty scales; int8 caches: their float32
  // scales, kv_int8.h); windows: per layer the sliding window (-1: none). The projections are set
  // afterwards (set_int4 / set_gguf / set_dense), every one before the first run.
  DecodeStep(int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t intermediate,
             double eps, double scale, const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& windows,
             at::Tensor final_norm, at::Tensor cos_sin)
      : H_(hidden), Hq_(num_heads), Hk_(num_kv_heads), D_(head_dim), I_(intermediate), eps_((float)eps),
        scale_((float)scale), final_norm_(std::move(final_norm)), cos_sin_(std::move(cos_sin)) {
    TORCH_CHECK(Hk_ > 0 && Hq_ % Hk_ == 0, "num_heads must be a multiple of num_kv_heads");
    TORCH_CHECK(D_ % 2 == 0, "head_dim must be even");
    TORCH_CHECK(tensors.size() % kTensorsPerLayer == 0 && windows.size() == tensors.size() / kTensorsPerLayer,
                "decode step: expected ", kTensorsPerLayer, " tensors and one window per layer");
    check_vec(final_norm_, H_, "final norm weight");
    TORCH_CHECK(cos_sin_.device().is_cpu() && cos_sin_.scalar_type() == at::kFloat && cos_sin_.is_contiguous() &&
                    cos_sin_.dim() == 2 && cos_sin_.size(1) == D_,
                "cos_sin must be a contiguous float32 [max_pos, head_dim] table");
    const int64_t nl = (int64_t)tensors.size() / kTensorsPerLayer;
    for (int64_t i = 0; i < nl; ++i) {
      const at::Tensor* t = &tensors[i * kTensorsPerLayer];
      Layer L;
      L.ln1 = t[0];
      check_vec(L.ln1, H_, "input_layernorm weight");
      L.ln2 = t[1];
      check_vec(L.ln2, H_, "post_attention_layernorm weight");
      L.qn = t[2];
      L.kn = t[3];
      TORCH_CHECK(defined(L.qn) == defined(L.kn), "q_norm and k_norm come together");
      if (defined(L.qn)) {
        check_vec(L.qn, D_, "q_norm weight");
        check_vec(L.kn, D_, "k_norm weight");
      }
      L.kc = t[4];
      L.vc = t[5];
      L.ks = t[6];
      L.vs = t[7];
      L.fp8 = L.kc.scalar_type() == at::kFloat8_e4m3fn;
      L.int8 = L.fp8 || L.kc.scalar_type() == at::kChar;
      L.f16 = L.kc.scalar_type() == at::kHalf;
      for (const at::Tensor* c : {&L.kc, &L.vc}) {
        TORCH_CHECK(c->device().is_cpu() &&
                        c->scalar_type() == (L.int8 || L.f16 ? L.kc.scalar_type() : at::kFloat) &&
                        c->is_contiguous() && c->dim() == 4 && c->size(2) == Hk_ && c->size(3) == D_,
                    "k/v cache must be a contiguous float32, float16, int8 or float8_e4m3fn [num_blocks, block_size, "
                    "num_kv_heads, head_dim] tensor (k and v of one type)");
      }
      TORCH_CHECK(L.kc.sizes() == L.vc.sizes(), "k and v caches must have one shape");
      TORCH_CHECK(layers_.empty() ||
                      (L.kc.sizes() == layers_[0].kc.sizes() && L.kc.scalar_type() == layers_[0].kc.scalar_type()),
                  "all layers' caches must have one shape and element type");
      if (L.int8) {
        for (const at::Tensor* c : {&L.ks, &L.vs})
          TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == at::kFloat && c->is_contiguous() && c->dim() == 3 &&
                          c->size(0) == L.kc.size(0) && c->size(1) == L.kc.size(1) && c->size(2) == Hk_,
                      "an 8-bit k/v cache needs contiguous float32 [num_blocks, block_size, num_kv_heads] scales");
      } else {
        TORCH_CHECK(!defined(L.ks) && !defined(L.vs), "a float32 or float16 k/v cache takes no scales (pass empty tensors)");
      }
      L.window = windows[i];
      layers_.push_back(std::move(L));
    }
    TORCH_CHECK(!layers_.empty(), "decode step: no layers");
  }

  // [N, K] of projection slot (0 qkv, 1 o, 2 gate_up, 3 down)
  std::pair<int64_t, int64_t> slot_shape(int64_t slot) const {
    switch (slot) {
      case 0: return {(Hq_ + 2 * Hk_) * D_, H_};
      case 1: return {H_, Hq_ * D_};
      case 2: return {2 * I_, H_};
      default: return {H_, I_};
    }
  }

  Lin& slot_of(int64_t layer, int64_t slot) {
    TORCH_CHECK(layer >= 0 && layer < num_layers(), "decode step: layer ", layer, " out of range [0, ", num_layers(), ")");
    TORCH_CHECK(slot >= 0 && slot < 4, "decode step: projection slot ", slot, " out of range [0, 4)");
    return layers_[layer].lin[slot];
  }

  // projection slot of a layer: int4 in the lane layout, int8 activations (see QLin)
  void set_int4(int64_t layer, int64_t slot, at::Tensor qweight, at::Tensor scales, at::Tensor mins,
                at::Tensor scales4, at::Tensor mins4, at::Tensor bias, int64_t group_size) {
    Lin& l = slot_of(layer, slot);
    const auto [N, K] = slot_shape(slot);
    l.q = QLin(std::move(qweight), std::move(scales), std::move(mins), std::move(scales4), std::move(mins4),
               std::move(bias), N, K, group_size, kSlotNames[slot]);
    l.kind = Lin::kInt4;
  }

  // the GGUF kernels every GGUF projection runs: a KernelTable capsule (gguf module's kernel_table())
  // and the rows up to which its register tiles run (gguf_linear.SMALL_M of that build's path)
  void set_gguf_kernels(const py::object& table, int64_t small_m) {
    table_ = table_of<G::KernelTable>(table, G::kTableName, G::kTableAbi, "set_gguf_kernels",
                                      "the GGUF module's kernel_table()", "the GGUF kernels were", "gguf_kernels.h");
    table_ref_ = table;  // the capsule (and its module) stays alive with the step
    small_m_ = small_m;
  }

  // projection slot of a layer: GGUF blocks, one packed tensor per part (rows[i] output rows of
  // ggml type types[i], consecutive), int8 activations for part i if int8[i] (its type must have
  // the int8 kernel), bias (empty: none) over all rows
  void set_gguf(int64_t layer, int64_t slot, const std::vector<at::Tensor>& parts, const std::vector<int64_t>& types,
                const std::vector<int64_t>& rows, const std::vector<bool>& int8, at::Tensor bias) {
    TORCH_CHECK(table_ != nullptr, "set_gguf: call set_gguf_kernels first");
    Lin& l = slot_of(layer, slot);
    const char* what = kSlotNames[slot];
    const auto [N, K] = slot_shape(slot);
    TORCH_CHECK(!parts.empty() && parts.size() == types.size() && parts.size() == rows.size() &&
                    parts.size() == int8.size(),
                what, ": parts, types, rows and int8 must be non-empty lists of one length");
    GLin g;
    g.N = N;
    g.K = K;
    int64_t n0 = 0;
    for (size_t i = 0; i < parts.size(); ++i) {
      GPart p;
      p.data = parts[i];
      p.type = types[i];
      p.N = rows[i];
      const int64_t qb = table_->block_size(p.type), bb = table_->block_bytes(p.type);
      TORCH_CHECK(qb > 0 && bb > 0, what, ": no GGUF kernel for ggml type id ", p.type);
      TORCH_CHECK(K % qb == 0, what, ": in_features ", K, " not a multiple of the block size ", qb);
      TORCH_CHECK(p.N > 0, what, ": a part must have rows");
      p.n0 = n0;
      p.P = (p.N + G::LANES - 1) / G::LANES;
      p.nblk = K / qb;
      TORCH_CHECK(p.data.device().is_cpu() && p.data.scalar_type() == at::kByte && p.data.is_contiguous() &&
                      p.data.numel() == p.P * p.nblk * bb,
                  what, ": part ", i, " must be the contiguous uint8 packed layout of ", p.P * p.nblk * bb, " bytes");
      if (int8[i]) {
        p.a8 = table_->a8_kind(p.type);
        TORCH_CHECK(p.a8 >= 0, what, ": no int8-activation kernel for ggml type id ", p.type);
        TORCH_CHECK(K % 32 == 0, what, ": int8 activations need in_features % 32 == 0");
        g.a8[p.a8] = true;
      }
      p.p0 = g.P;
      g.P += p.P;
      n0 += p.N;
      g.parts.push_back(std::move(p));
    }
    TORCH_CHECK(n0 == N, what, ": parts have ", n0, " rows, the projection ", N);
    if (defined(bias)) {
      check_vec(bias, N, "bias");
      g.bias = bias;
    }
    l.g = std::move(g);
    l.kind = Lin::kGGUF;
  }

  // the packed fp32 GEMM every dense projection runs: a KernelTable capsule (dense module's kernel_table())
  void set_dense_kernels(const py::object& table) {
    dense_ = table_of<D::KernelTable>(table, D::kTableName, D::kTableAbi, "set_dense_kernels",
                                      "the sgemm module's kernel_table()", "the packed GEMM was", "dense_kernels.h");
    dense_ref_ = table;  // the capsule (and its module) stays alive with the step
  }

  // projection slot of a layer: a packed fp32 weight [ceil(N / 16), K, 16] (PackedLinear.packed), bias
  // (empty: none)
  void set_dense(int64_t layer, int64_t slot, at::Tensor packed, at::Tensor bias) {
    TORCH_CHECK(dense_ != nullptr, "set_dense: call set_dense_kernels first");
    Lin& l = slot_of(layer, slot);
    const char* what = kSlotNames[slot];
    const auto [N, K] = slot_shape(slot);
    const int64_t pw = dense_->panel, P = (N + pw - 1) / pw;
    TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
                    packed.dim() == 3 && packed.size(0) == P && packed.size(1) == K && packed.size(2) == pw,
                what, ": the packed weight must be a contiguous float32 [", P, ", ", K, ", ", pw, "] tensor");
    DLin d;
    d.packed = std::move(packed);
    d.N = N;
    d.K = K;
    d.P = P;
    if (defined(bias)) {
      check_vec(bias, N, "bias");
      d.bias = std::move(bias);
    }
    l.d = std::move(d);
    l.kind = Lin::kDense;
  }

  int64_t num_layers() const { return (int64_t)layers_.size(); }

  // Quest (quest.h, kernels/quest.py): the per-block key summaries kmin / kmax float32 [layers,
  // num_blocks, Hk, D] the step folds every new K row into (as attention reads it), and that rows
  // given a topk in run() choose their blocks with, in layers from dense_layers on.
  void set_quest(at::Tensor kmin, at::Tensor kmax, int64_t dense_layers) {
    for (const at::Tensor* t : {&kmin, &kmax})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 4 &&
                      t->size(0) == num_layers() && t->size(1) == layers_[0].kc.size(0) && t->size(2) == Hk_ &&
                      t->size(3) == D_,
                  "Quest summaries must be contiguous float32 [layers, num_blocks, num_kv_heads, head_dim] tensors");
    TORCH_CHECK(dense_layers >= 0, "dense_layers must be >= 0");
    qmin_ = std::move(kmin);
    qmax_ = std::move(kmax);
    quest_dense_ = dense_layers;
  }

  // x [M, H]: the embeddings of the M new tokens; positions int64 [M]; slots int64 [M] (cache slot
  // = block * block_size + offset of each new token); block_tables int32 [M, max_blocks];
  // context_lens int32 [M] (the new token included). chained: rows may be consecutive tokens of one
  // sequence (a short prompt or forced chunk), a row reading the K / V of rows before it: every new
  // K / V row is written before any attention reads (one barrier more per layer); the same bits as
  // running the rows one step at a time. Returns the final-normed hidden states [M, H].
  // topk: int32 [M] Quest blocks per row (0: every block), or empty: no row is sparse.
  // pins (Quest, kv_quest_pin): uint8 [M, layers, Hk, max_blocks], nonzero where a row's block (index
  // into its block table) is pinned for that layer and kv head (quest.h select_blocks), or empty: none.
  // mass (H2O, engine/kv_policy.py): float32 [M, layers, Hk, W], zeros, filled for the rows whose
  // mass_rows (int32 [M]) entry is nonzero with fused_kernels.h attention_mass_row (the op-by-op
  // forward's kv_select.attention_mass: the same scores and bits) over their context (<= W).
  at::Tensor run(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& slots,
                 const at::Tensor& block_tables, const at::Tensor& context_lens, bool chained,
                 const c10::optional<at::Tensor>& topk_opt, const c10::optional<at::Tensor>& mass_opt,
                 const c10::optional<at::Tensor>& mass_rows_opt, const c10::optional<at::Tensor>& pins_opt) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 &&
                    x.size(1) == H_,
                "x must be a contiguous float32 [M, ", H_, "] tensor");
    const int64_t M = x.size(0);
    auto idx_ok = [&](const at::Tensor& t, at::ScalarType st, int64_t dim) {
      return t.device().is_cpu() && t.scalar_type() == st && t.is_contiguous() && t.dim() == dim && t.size(0) == M;
    };
    TORCH_CHECK(idx_ok(positions, at::kLong, 1), "positions must be a contiguous int64 [M] tensor");
    TORCH_CHECK(idx_ok(slots, at::kLong, 1), "slots must be a contiguous int64 [M] tensor");
    TORCH_CHECK(idx_ok(block_tables, at::kInt, 2), "block_tables must be a contiguous int32 [M, max_blocks] tensor");
    TORCH_CHECK(idx_ok(context_lens, at::kInt, 1), "context_lens must be a contiguous int32 [M] tensor");
    const at::Tensor topk = topk_opt.has_value() ? *topk_opt : at::Tensor();
    const bool sparse = topk.defined() && topk.numel() > 0;
    TORCH_CHECK(!sparse || (idx_ok(topk, at::kInt, 1) && topk.size(0) == x.size(0) && defined(qmin_)),
                "topk must be a contiguous int32 [M] tensor, given after set_quest");
    const int32_t* tk = sparse ? topk.data_ptr<int32_t>() : nullptr;
    const uint8_t* pins = nullptr;
    if (pins_opt.has_value() && pins_opt->defined() && pins_opt->numel() > 0) {
      const at::Tensor& pt = *pins_opt;
      TORCH_CHECK(sparse && pt.device().is_cpu() && pt.scalar_type() == at::kByte && pt.is_contiguous() &&
                      pt.dim() == 4 && pt.size(0) == M && pt.size(1) == num_layers() && pt.size(2) == Hk_ &&
                      pt.size(3) == block_tables.size(1),
                  "pins must be a contiguous uint8 [M, layers, Hk, max_blocks] tensor, given with topk");
      pins = pt.data_ptr<uint8_t>();
    }
    float* mw = nullptr;
    const int32_t* mrow = nullptr;
    int64_t mlen = 0;
    if (mass_opt.has_value() && mass_opt->defined()) {
      const at::Tensor& mt = *mass_opt;
      TORCH_CHECK(mass_rows_opt.has_value() && idx_ok(*mass_rows_opt, at::kInt, 1),
                  "mass needs mass_rows, a contiguous int32 [M] tensor");
      TORCH_CHECK(mt.device().is_cpu() && mt.scalar_type() == at::kFloat && mt.is_contiguous() && mt.dim() == 4 &&
                      mt.size(0) == M && mt.size(1) == num_layers() && mt.size(2) == Hk_,
                  "mass must be a contiguous float32 [M, layers, Hk, W] tensor");
      TORCH_CHECK(tk == nullptr, "mass and topk (Quest) rows cannot share a step");
      mw = mt.data_ptr<float>();
      mrow = mass_rows_opt->data_ptr<int32_t>();
      mlen = mt.size(3);
      for (int64_t b = 0; b < M; ++b)
        TORCH_CHECK(!mrow[b] || context_lens.data_ptr<int32_t>()[b] <= mlen, "mass: row ", b, "'s context exceeds W");
      for (int64_t li = 0; li < num_layers(); ++li)
        TORCH_CHECK(layers_[li].window <= 0, "mass needs full-attention layers");
    }
    TORCH_CHECK(!layers_[0].f16 || (tk == nullptr && mw == nullptr),
                "a float16 KV cache has no Quest (topk) or H2O (mass) rows in the decode step");
    bool a8[2] = {false, false};
    for (int64_t li = 0; li < num_layers(); ++li)
      for (int64_t s = 0; s < 4; ++s) {
        const Lin& l = layers_[li].lin[s];
        TORCH_CHECK(l.kind != Lin::kNone, "decode step: layer ", li, " ", kSlotNames[s], " was never set");
        if (l.kind == Lin::kGGUF) {
          a8[0] |= l.g.a8[0];
          a8[1] |= l.g.a8[1];
        }
      }
    auto out = at::empty({M, H_}, x.options());
    if (M == 0) return out;
    std::lock_guard<std::mutex> guard(mu_);  // the step's buffers are shared: one call at a time
    qpin_ = pins;  // read by quest_attend during this call only
    qpin_mb_ = block_tables.size(1);
    const int64_t NB = layers_[0].kc.size(0), BS = layers_[0].kc.size(1), MB = block_tables.size(1);
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    const int32_t* bt = block_tables.data_ptr<int32_t>();
    const int32_t* cl = context_lens.data_ptr<int32_t>();
    // validate everything the threads will touch (no exception may leave the parallel region)
    for (int64_t b = 0; b < M; ++b) {
      TORCH_CHECK(pos[b] >= 0 && pos[b] < cos_sin_.size(0), "position ", pos[b], " out of range [0, ",
                  cos_sin_.size(0), ")");
      TORCH_CHECK(slot[b] >= 0 && slot[b] < NB * BS, "slot ", slot[b], " out of range [0, ", NB * BS, ")");
      const int64_t L = cl[b];
      TORCH_CHECK(L >= 1 && L <= MB * BS, "context_lens[", b, "] = ", L, " out of range [1, ", MB * BS, "]");
      for (int64_t j = 0; j * BS < L; ++j) {
        const int64_t blk = bt[b * MB + j];
        TORCH_CHECK(blk >= 0 && blk < NB, "block_tables[", b, "][", j, "] = ", blk, " out of range [0, ", NB, ")");
      }
    }

    const int nt = std::max(1, at::get_num_threads());
    const int64_t QKV = (Hq_ + 2 * Hk_) * D_, G = Hq_ / Hk_, half = D_ / 2;
    // attention token chunks per layer and row (windows differ by layer): the batch-invariant rule of the
    // standalone paged_decode_attention (fused_kernels.h token_chunks), so both give the same sums. Float
    // caches without Quest only (the int8 kernel, kv_int8.cpp, and Quest have one item per (row, kv
    // head), and so has the step). Layer li: row b has rs[li * M + b] chunks, its items (kv head, chunk)
    // from ib[li * (M + 1) + b]; a layer with any split row has lsplit[li].
    std::vector<int64_t> rs(num_layers() * M, 1), ib(num_layers() * (M + 1), 0);
    std::vector<char> lsplit(num_layers(), 0);
    int64_t max_items = M * Hk_;
    for (int64_t li = 0; li < num_layers(); ++li) {
      for (int64_t b = 0; b < M; ++b) {
        int64_t c = 1;
        if (!layers_[li].int8 && tk == nullptr) c = F::token_chunks(cl[b], layers_[li].window, Hk_, nt);
        rs[li * M + b] = c;
        ib[li * (M + 1) + b + 1] = ib[li * (M + 1) + b] + Hk_ * c;
        if (c > 1) lsplit[li] = 1;
      }
      max_items = std::max(max_items, ib[li * (M + 1) + M]);
    }

    const int64_t kmax = std::max({H_, Hq_ * D_, I_});
    const int64_t Kp = (kmax + 63) / 64 * 64;
    resid_.resize(M * H_);
    h_.resize(M * H_);
    qkv_.resize(M * QKV);
    att_.resize(M * Hq_ * D_);
    gu_.resize(M * 2 * I_);
    act_.resize(M * I_);
    y_.resize(M * H_);
    xq_.resize(M * Kp);
    sx_.resize(M * Kp / 32 + 8);
    xsum_.resize(M * Kp / 32 + 8);
    if (max_items > M * Hk_) {
      part_m_.resize(max_items * G);
      part_l_.resize(max_items * G);
      part_acc_.resize(max_items * G * D_);
    }
    if ((int64_t)scratch_.size() < nt) scratch_.resize(nt);
    for (int kind = 0; kind < 2; ++kind) {
      if (!a8[kind]) continue;
      gxq_[kind].resize(M * kmax);
      gdx_[kind].resize(M * (kmax / 32));
      gxs_[kind].resize(M * (kmax / 32));
      grows_[kind].resize(M);
    }
    const int64_t nops = num_layers() * 5;
    std::unique_ptr<std::atomic<int64_t>[]> counters(new std::atomic<int64_t>[nops]);
    for (int64_t i = 0; i < nops; ++i) counters[i].store(0, std::memory_order_relaxed);

    const float* xp = x.data_ptr<float>();
    const float* cs = cos_sin_.data_ptr<float>();
    float* op = out.data_ptr<float>();
    float *resid = resid_.data(), *h = h_.data(), *qkv = qkv_.data(), *att = att_.data(), *gu = gu_.data(),
          *act = act_.data(), *y = y_.data();
    const float eps = eps_;

#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
      ThreadScratch& ts = scratch_[tid];
      ts.qs.resize(Hq_ * D_);  // G heads per item, or all Hq (attend_range_heads)
      ts.acc.resize(Hq_ * D_);
      ts.sc.resize(G * F::kTile);
      ts.m.resize(Hq_);
      ts.l.resize(Hq_);
      ts.krow.resize(Hk_ * F::kTile);
      ts.vrow.resize(Hk_ * F::kTile);
      if (layers_[0].int8 && (int64_t)ts.kf.size() != F::kTile * D_) {
        ts.kf.resize(F::kTile * D_);
        ts.vf.resize(F::kTile * D_);
        ts.kfrow.resize(F::kTile);
        ts.vfrow.resize(F::kTile);
        for (int64_t i = 0; i < F::kTile; ++i) {
          ts.kfrow[i] = ts.kf.data() + i * D_;
          ts.vfrow[i] = ts.vf.data() + i * D_;
        }
      }
      Q::W4A8Act A{};

      // a GGUF projection: rows quantized for its int8 parts (rows split), then every thread takes
      // runs of panel pairs from counter c, each cut at the parts' boundaries
      auto gguf_gemv = [&](const GLin& g, const float* src, float* dst, std::atomic<int64_t>& c, bool synced) {
        if (!g.a8[0] && !g.a8[1]) {
          if (!synced) {
#pragma omp barrier
          }
        } else {
          const int64_t nsb = g.K / 32;
          for (int64_t r = tid; r < M; r += nth)
            for (int kind = 0; kind < 2; ++kind) {
              if (!g.a8[kind]) continue;
              int8_t* xq = gxq_[kind].data() + r * g.K;
              float* dx = gdx_[kind].data() + r * nsb;
              int32_t* xs = gxs_[kind].data() + r * nsb;
              table_->quant_row_a8(src + r * g.K, g.K, kind == 1, xq, dx, xs);
              grows_[kind][r] = G::A8Row{xq, dx, xs};
            }
#pragma omp barrier
        }
        const float* bias = fptr(g.bias);
        for_balanced_runs((g.P + 1) / 2, nth, c, [&](int64_t u0, int64_t u1) {
          const int64_t q0 = 2 * u0, q1 = std::min(g.P, 2 * u1);
          for (const GPart& p : g.parts) {
            const int64_t a = std::max(q0, p.p0), b = std::min(q1, p.p0 + p.P);
            if (a >= b) continue;
            const G::Job J{src, p.data.data_ptr<uint8_t>(), bias ? bias + p.n0 : nullptr, dst + p.n0,
                           M, p.N, g.K, p.P, p.nblk, g.N};
            if (p.a8 < 0) table_->gemm_panels(&J, p.type, a - p.p0, b - p.p0, small_m_);
            else table_->gemm_a8_panels(&J, p.type, grows_[p.a8].data(), a - p.p0, b - p.p0);
          }
        });
#pragma omp barrier
      };

      // quantize rows of src [M, K] for lin, then every thread takes column chunks from counter c.
      // synced: src is complete (a barrier after it); else this thread wrote src's rows tid,
      // tid + nth, ... (the row loops' split), which are the rows it quantizes: one barrier after
      // the quantization then suffices
      auto gemv = [&](const Lin& l, const float* src, float* dst, std::atomic<int64_t>& c, bool synced) {
        if (l.kind == Lin::kDense) {  // fp32 activations: src whole, then runs of panels
          const DLin& d = l.d;
          if (!synced) {
#pragma omp barrier
          }
          const float* w = d.packed.data_ptr<float>();
          const float* bias = fptr(d.bias);
          for_balanced_runs(d.P, nth, c, [&](int64_t p0, int64_t p1) {
            dense_->gemm_panels(src, w, bias, dst, M, d.N, d.K, p0, p1);
          });
#pragma omp barrier
          return;
        }
        if (l.kind == Lin::kGGUF) {
          gguf_gemv(l.g, src, dst, c, synced);
          return;
        }
        const QLin& lin = l.q;
        A = Q::w4a8_act_shape(M, lin.K, lin.gs);
        A.xq = xq_.data();
        A.sx = sx_.data();
        A.xsum = xsum_.data();
        quant_rows(src, lin.K, lin.gs, A, xq_.data(), sx_.data(), xsum_.data(), true, tid, nth);
#pragma omp barrier
        // a few large contiguous chunks: each thread streams long runs of weight rows (small
        // interleaved chunks defeat the hardware prefetcher: 2 threads were slower than 1 at M=1)
        for_column_runs(lin.N, nth, c, [&](int64_t n0, int64_t n1) { lin.cols(A, dst, lin.N, n0, n1, ts.w); });
#pragma omp barrier
      };

      for (int64_t li = 0; li < num_layers(); ++li) {
        const Layer& L = layers_[li];
        std::atomic<int64_t>* ctr = &counters[li * 5];
        // 1. (residual add +) input RMSNorm
        for (int64_t r = tid; r < M; r += nth) {
          if (li == 0) {
            std::copy(xp + r * H_, xp + (r + 1) * H_, resid + r * H_);
            F::rms_norm_row(resid + r * H_, L.ln1.data_ptr<float>(), h + r * H_, H_, eps);
          } else {
            F::add_rms_norm_row(y + r * H_, resid + r * H_, L.ln1.data_ptr<float>(), h + r * H_, H_, eps);
          }
        }
        // 2. qkv projection
        gemv(L.lin[0], h, qkv, ctr[0], false);
        const int64_t* ibl = ib.data() + li * (M + 1);
        const int64_t* rsl = rs.data() + li * M;
        // 3. q/k norm, rope, new k/v into the cache: here, before every attention item, when the
        // attention is split over tokens or rows are chained (a row reads the rows before it); else
        // inside the attention item of their kv head (its only reader)
        const bool prewrite = lsplit[li] || chained;
        if (prewrite) {
          write_new_kv(L, M, QKV, half, pos, slot, qkv, cs, eps, tid, nth);
          if (defined(qmin_)) {  // rows of one block come from different threads: fold them in after a barrier
#pragma omp barrier
            summarize_new_keys(L, li, M, slot, BS, tid, nth, ts);
          }
#pragma omp barrier
        }
        // 4. attention over the paged cache
        if (L.int8) {
          attend_int8(L, li, tk, M, G, QKV, half, pos, slot, bt, cl, MB, BS, qkv, att, cs, eps, !prewrite, ctr[1],
                      ts, mw, mrow, mlen);
        } else {
          // a float32 cache, or a float16 one (E = uint16_t: rows converted per tile, fused_kernels.h PagedKV16;
          // no Quest / H2O there, checked at the call)
          auto attend_float = [&](auto* kc, auto* vc) {
            using E = std::remove_pointer_t<decltype(kc)>;
            using KV = std::conditional_t<std::is_same_v<E, float>, F::PagedKV, F::PagedKV16>;
            auto store_row = [&](const float* src, E* dst) {  // a new K / V row into the cache
              if constexpr (std::is_same_v<E, float>)
                std::copy(src, src + D_, dst);
              else
                F::float_to_half(src, dst, D_);
            };
            const int64_t ks0 = BS * Hk_ * D_, ks1 = Hk_ * D_;
            // decode rows enough for the threads, no Quest / H2O: one item per row walks all its kv heads
            // (fused_kernels.h attend_range_heads: every head's bits as below, the cache read front to back)
            const bool whole = !lsplit[li] && tk == nullptr && mw == nullptr && F::walk_rows_whole(M, Hk_, nth);
            // step 3 for kv head kvh of row b, inside the item that is its only reader (unless prewrite)
            auto new_kv = [&](int64_t b, int64_t kvh) {
              const float* k = norm_rope_group(qkv, QKV, b, kvh, G, half, fptr(L.qn), fptr(L.kn), cs + pos[b] * D_, eps);
              store_row(k, kc + (slot[b] * Hk_ + kvh) * D_);
              quest_summarize(li, slot[b], BS, kvh, k);
              const float* vv = qkv + b * QKV + (Hq_ + Hk_ + kvh) * D_;
              store_row(vv, vc + (slot[b] * Hk_ + kvh) * D_);
            };
            while (whole) {
              const int64_t b = ctr[1].fetch_add(1, std::memory_order_relaxed);
              if (b >= M) break;
              if (!prewrite)
                for (int64_t kvh = 0; kvh < Hk_; ++kvh) new_kv(b, kvh);
              for (int64_t kvh = 0; kvh < Hk_; ++kvh) scale_queries(qkv, QKV, b, kvh, G, ts.qs.data() + kvh * G * D_);
              const int64_t Lc = cl[b];
              const int64_t start = F::window_start(Lc, L.window);
              const KV kv{kc, vc, ks0, ks1, ks0, ks1, bt + b * MB, BS};
              F::attend_range_heads(ts.qs.data(), Hk_, G, D_, kv, D_, start, Lc, ts.m.data(), ts.l.data(),
                                    ts.acc.data(), ts.sc.data(), ts.krow.data(), ts.vrow.data());
              for (int64_t kvh = 0; kvh < Hk_; ++kvh) store_att(att, b, kvh, G, ts, kvh * G);
            }
            const int64_t items = whole ? 0 : ibl[M];
            for (;;) {
              const int64_t item = ctr[1].fetch_add(1, std::memory_order_relaxed);
              if (item >= items) break;
              const int64_t b = std::upper_bound(ibl, ibl + M + 1, item) - ibl - 1;
              const int64_t S = rsl[b], kvh = (item - ibl[b]) / S, split = (item - ibl[b]) % S;
              if (!prewrite) new_kv(b, kvh);
              const int64_t Lc = cl[b];
              const int64_t start = F::window_start(Lc, L.window);
              // chunk split of kSplitTokens tokens from the window start, or the whole window
              const int64_t t0 = start + split * F::kSplitTokens, t1 = S == 1 ? Lc : std::min(Lc, t0 + F::kSplitTokens);
              scale_queries(qkv, QKV, b, kvh, G, ts.qs.data());
              const KV kv{kc + kvh * D_, vc + kvh * D_, ks0, ks1, ks0, ks1, bt + b * MB, BS};
              bool quest_done = false;  // Quest reads float32 caches only
              if constexpr (std::is_same_v<E, float>)
                quest_done = quest_attend(L, li, tk, b, kvh, G, bt + b * MB, BS, Lc, &kv, nullptr, ts);
              if (!quest_done)
                F::attend_range(ts.qs.data(), G, D_, kv, t0, std::max(t0, t1), ts.m.data(), ts.l.data(), ts.acc.data(),
                                ts.sc.data(), ts.krow.data(), ts.vrow.data());
              if constexpr (std::is_same_v<E, float>) {  // H2O reads float32 caches only
                if (mw != nullptr && mrow[b] && split == 0) {  // H2O: the row's probabilities (its whole context)
                  if ((int64_t)ts.mass_s.size() < G * Lc) ts.mass_s.resize(G * Lc);
                  const int32_t* tb = bt + b * MB;
                  const float* kb = kc + kvh * D_;
                  F::attention_mass_row(ts.qs.data(), G, D_, Lc, mw + ((b * num_layers() + li) * Hk_ + kvh) * mlen,
                                        ts.mass_s.data(), ts.sc.data(), ts.krow.data(),
                                        [&](int64_t i, int64_t t) { ts.krow[i] = kb + tb[t / BS] * ks0 + (t % BS) * ks1; });
                }
              }
              if (S == 1) {
                store_att(att, b, kvh, G, ts);
              } else {
                // the item's G heads only: ts holds room for every head (attend_range_heads)
                std::copy(ts.m.begin(), ts.m.begin() + G, part_m_.begin() + item * G);
                std::copy(ts.l.begin(), ts.l.begin() + G, part_l_.begin() + item * G);
                std::copy(ts.acc.begin(), ts.acc.begin() + G * D_, part_acc_.begin() + item * G * D_);
              }
            }
            if (lsplit[li]) {
#pragma omp barrier
              merge_splits(M, ibl, rsl, G, att, tid, nth);
            }
          };
          if (L.f16)
            attend_float(static_cast<uint16_t*>(L.kc.data_ptr()), static_cast<uint16_t*>(L.vc.data_ptr()));
          else
            attend_float(L.kc.data_ptr<float>(), L.vc.data_ptr<float>());
        }
#pragma omp barrier
        // 5. output projection, residual add + post-attention RMSNorm
        gemv(L.lin[1], att, y, ctr[2], true);
        for (int64_t r = tid; r < M; r += nth)
          F::add_rms_norm_row(y + r * H_, resid + r * H_, L.ln2.data_ptr<float>(), h + r * H_, H_, eps);
        // 6. MLP: gate/up, silu * up, down
        gemv(L.lin[2], h, gu, ctr[3], false);
        for (int64_t r = tid; r < M; r += nth) F::silu_mul_range(gu + r * 2 * I_, gu + r * 2 * I_ + I_, act + r * I_, 0, I_);
        gemv(L.lin[3], act, y, ctr[4], false);
      }
      // final residual add + norm
      for (int64_t r = tid; r < M; r += nth)
        F::add_rms_norm_row(y + r * H_, resid + r * H_, final_norm_.data_ptr<float>(), op + r * H_, H_, eps);
    }
    return out;
  }

 private:
  static constexpr size_t kTensorsPerLayer = 8;

  // Step 3's math for row b and kv head kvh, in place in qkv: q/k RMSNorm (if any) and rope of the
  // head's G query heads and of its key; returns the key row (the fp32 and int8 caches store it)
  float* norm_rope_group(float* qkv, int64_t QKV, int64_t b, int64_t kvh, int64_t G, int64_t half,
                         const float* qn, const float* kn, const float* rot, float eps) const {
    for (int64_t g = 0; g < G; ++g) {
      float* v = qkv + b * QKV + (kvh * G + g) * D_;
      if (qn) F::rms_norm_row(v, qn, v, D_, eps);
      F::rope_head(v, rot, half);
    }
    float* k = qkv + b * QKV + (Hq_ + kvh) * D_;
    if (kn) F::rms_norm_row(k, kn, k, D_, eps);
    F::rope_head(k, rot, half);
    return k;
  }

  // Step 3 and 4 of a layer with an int8 cache, one item per (row, kv head) from counter c (the items
  // of kv_int8.cpp): q/k norm and rope of the item's heads, its new K / V rows quantized into the
  // cache (kv_int8.h quant_row: the bytes and scale kv_quant.write_kv_int8 writes), then the int8
  // attention (kv_int8.h attend_range, the standalone kernel's) over the row's context. write false:
  // step 3 ran before (write_new_kv, chained rows), the items only read.
  void attend_int8(const Layer& L, int64_t li, const int32_t* tk, int64_t M, int64_t G, int64_t QKV, int64_t half,
                   const int64_t* pos, const int64_t* slot, const int32_t* bt, const int32_t* cl, int64_t MB, int64_t BS, float* qkv,
                   float* att, const float* cs, float eps, bool write, std::atomic<int64_t>& c, ThreadScratch& ts,
                   float* mw, const int32_t* mrow, int64_t mlen) {
    int8_t* kc = L.kbytes();
    int8_t* vc = L.vbytes();
    float* ks = L.ks.data_ptr<float>();
    float* vs = L.vs.data_ptr<float>();
    const float* qn = fptr(L.qn);
    const float* kn = fptr(L.kn);
    const int64_t items = M * Hk_;
    for (;;) {
      const int64_t item = c.fetch_add(1, std::memory_order_relaxed);
      if (item >= items) break;
      const int64_t b = item / Hk_, kvh = item % Hk_;
      if (write) {
        const float* k = norm_rope_group(qkv, QKV, b, kvh, G, half, qn, kn, cs + pos[b] * D_, eps);
        const int64_t row = slot[b] * Hk_ + kvh;
        llmopt_kv8::quant_row_as(L.fp8, k, D_, kc + row * D_, ks + row);
        llmopt_kv8::quant_row_as(L.fp8, qkv + b * QKV + (Hq_ + Hk_ + kvh) * D_, D_, vc + row * D_, vs + row);
        summarize_key_row(L, li, slot[b], BS, kvh, ts);  // Quest: the row as attention reads it back
      }
      const int64_t Lc = cl[b];
      const int64_t start = F::window_start(Lc, L.window);
      scale_queries(qkv, QKV, b, kvh, G, ts.qs.data());
      const llmopt_kv8::PagedKV8 kv{kc + kvh * D_, vc + kvh * D_, ks + kvh, vs + kvh, bt + b * MB, BS, Hk_, L.fp8};
      if (!quest_attend(L, li, tk, b, kvh, G, bt + b * MB, BS, Lc, nullptr, &kv, ts))
        llmopt_kv8::attend_range(ts.qs.data(), G, D_, kv, start, Lc, ts.m.data(), ts.l.data(), ts.acc.data(),
                                 ts.sc.data(), ts.kf.data(), ts.vf.data(), ts.kfrow.data(), ts.vfrow.data());
      store_att(att, b, kvh, G, ts);
      if (mw != nullptr && mrow[b]) {  // H2O: the row's probabilities (kv_int8.cpp attention_mass_int8's)
        if ((int64_t)ts.mass_s.size() < G * Lc) ts.mass_s.resize(G * Lc);
        const int32_t* tb = bt + b * MB;
        F::attention_mass_row(ts.qs.data(), G, D_, Lc, mw + ((b * num_layers() + li) * Hk_ + kvh) * mlen,
                              ts.mass_s.data(), ts.sc.data(), ts.kfrow.data(), [&](int64_t i, int64_t t) {
                                const int64_t row = (static_cast<int64_t>(tb[t / BS]) * BS + t % BS) * Hk_ + kvh;
                                llmopt_kv8::dequant_row_as(L.fp8, ts.kf.data() + i * D_, kc + row * D_, ks[row], D_);
                              });
      }
    }
  }

  // Step 3 for every new row before the attention (token splits, chained rows), jobs (row, q or k
  // head) split over the threads: q/k norm and rope in place in qkv, the row's K / V into the cache
  // (an int8 cache: kv_int8.h quant_row, as attend_int8 writes them)
  void write_new_kv(const Layer& L, int64_t M, int64_t QKV, int64_t half, const int64_t* pos, const int64_t* slot,
                    float* qkv, const float* cs, float eps, int tid, int nth) const {
    const float* qn = fptr(L.qn);
    const float* kn = fptr(L.kn);
    const int64_t heads = Hq_ + Hk_;
    for (int64_t job = tid; job < M * heads; job += nth) {
      const int64_t r = job / heads, hh = job % heads;
      float* v = qkv + r * QKV + hh * D_;  // q heads then k heads
      if (qn) F::rms_norm_row(v, hh < Hq_ ? qn : kn, v, D_, eps);
      F::rope_head(v, cs + pos[r] * D_, half);
      if (hh < Hq_) continue;
      const int64_t kvh = hh - Hq_, row = slot[r] * Hk_ + kvh;
      const float* vv = qkv + r * QKV + (Hq_ + Hk_ + kvh) * D_;
      if (L.int8) {
        llmopt_kv8::quant_row_as(L.fp8, v, D_, L.kbytes() + row * D_, L.ks.data_ptr<float>() + row);
        llmopt_kv8::quant_row_as(L.fp8, vv, D_, L.vbytes() + row * D_, L.vs.data_ptr<float>() + row);
      } else if (L.f16) {
        F::float_to_half(v, static_cast<uint16_t*>(L.kc.data_ptr()) + row * D_, D_);
        F::float_to_half(vv, static_cast<uint16_t*>(L.vc.data_ptr()) + row * D_, D_);
      } else {
        std::copy(v, v + D_, L.kc.data_ptr<float>() + row * D_);
        std::copy(vv, vv + D_, L.vc.data_ptr<float>() + row * D_);
      }
    }
  }

  // the G query heads of kv head kvh of row b, times the softmax scale, into qs [G, D]
  void scale_queries(const float* qkv, int64_t QKV, int64_t b, int64_t kvh, int64_t G, float* qs) const {
    for (int64_t g = 0; g < G; ++g) {
      const float* src = qkv + b * QKV + (kvh * G + g) * D_;
      for (int64_t d = 0; d < D_; ++d) qs[g * D_ + d] = src[d] * scale_;
    }
  }

  // acc / l of an unsplit attention item (row b, kv head kvh) into att (zeros for an empty context)
  // (h0: where the item's G heads start in ts.m / l / acc, nonzero when an item held every kv head)
  void store_att(float* att, int64_t b, int64_t kvh, int64_t G, const ThreadScratch& ts, int64_t h0 = 0) const {
    for (int64_t g = 0; g < G; ++g) {
      float* dst = att + b * Hq_ * D_ + (kvh * G + g) * D_;
      if (ts.l[h0 + g] > 0.0f) {
        std::copy(ts.acc.begin() + (h0 + g) * D_, ts.acc.begin() + (h0 + g + 1) * D_, dst);
        F::scale_inplace(dst, D_, 1.0f / ts.l[h0 + g]);
      } else {
        std::fill(dst, dst + D_, 0.0f);
      }
    }
  }

  // Quest: fold the new key row of kv head kvh at cache slot s into its block's summary (offset 0 resets it)
  void quest_summarize(int64_t li, int64_t s, int64_t BS, int64_t kvh, const float* krow) {
    if (!defined(qmin_)) return;
    const int64_t off = ((li * qmin_.size(1) + s / BS) * Hk_ + kvh) * D_;
    llmopt_quest::update_summary(qmin_.data_ptr<float>() + off, qmax_.data_ptr<float>() + off, krow, D_, s % BS == 0);
  }

  // Quest: fold the key row of kv head kvh at cache slot s, as attention reads it back from the
  // cache (an int8 cache's dequantized into ts.qrow), into its block's summary
  void summarize_key_row(const Layer& L, int64_t li, int64_t s, int64_t BS, int64_t kvh, ThreadScratch& ts) {
    if (!defined(qmin_)) return;
    const int64_t row = s * Hk_ + kvh;
    if (L.int8) {
      ts.qrow.resize(D_);
      llmopt_kv8::dequant_row_as(L.fp8, ts.qrow.data(), L.kbytes() + row * D_, L.ks.data_ptr<float>()[row], D_);
      quest_summarize(li, s, BS, kvh, ts.qrow.data());
    } else {
      quest_summarize(li, s, BS, kvh, L.kc.data_ptr<float>() + row * D_);
    }
  }

  // Quest summaries of the key rows write_new_kv wrote, one kv head per thread and its rows in row
  // order: chained rows share blocks, and a block's first row must reset its summary before the next
  // rows fold in
  void summarize_new_keys(const Layer& L, int64_t li, int64_t M, const int64_t* slot, int64_t BS, int tid, int nth,
                          ThreadScratch& ts) {
    for (int64_t kvh = tid; kvh < Hk_; kvh += nth)
      for (int64_t r = 0; r < M; ++r) summarize_key_row(L, li, slot[r], BS, kvh, ts);
  }

  // Quest attention of item (row b, kv head kvh) into ts.m / ts.l / ts.acc over the blocks quest.h
  // chooses (the standalone kernel's walk, quest.cpp); false when the row reads every block here
  // (no topk, a dense layer, topk 0, a window): the caller's dense walk, which that would equal.
  bool quest_attend(const Layer& L, int64_t li, const int32_t* tk, int64_t b, int64_t kvh, int64_t G,
                    const int32_t* btb, int64_t BS, int64_t Lc, const F::PagedKV* kv,
                    const llmopt_kv8::PagedKV8* kv8, ThreadScratch& ts) {
    if (tk == nullptr || tk[b] <= 0 || li < quest_dense_ || L.window > 0) return false;
    const int64_t off = li * qmin_.size(1) * Hk_ * D_;
    const uint8_t* pin = qpin_ == nullptr ? nullptr : qpin_ + ((b * num_layers() + li) * Hk_ + kvh) * qpin_mb_;
    llmopt_quest::attend_item(ts.qs.data(), G, D_, kv, kv8, btb, BS, Hk_, kvh, Lc, tk[b], qmin_.data_ptr<float>() + off,
                              qmax_.data_ptr<float>() + off, ts.quest, ts.m.data(), ts.l.data(), ts.acc.data(),
                              ts.sc.data(), pin);
    return true;
  }

  // flash-decoding merge of the split rows' token chunks (their items' partials, from ibl[b] on; pairs
  // split across the threads)
  void merge_splits(int64_t M, const int64_t* ibl, const int64_t* rsl, int64_t G, float* att, int tid, int nth) {
    for (int64_t bh = tid; bh < M * Hk_; bh += nth) {
      const int64_t b = bh / Hk_, kvh = bh % Hk_;
      if (rsl[b] == 1) continue;
      for (int64_t g = 0; g < G; ++g)
        F::merge_splits(part_m_.data() + ibl[b] * G, part_l_.data() + ibl[b] * G, part_acc_.data() + ibl[b] * G * D_,
                        rsl[b], G, D_, kvh, g, att + b * Hq_ * D_ + (kvh * G + g) * D_);
    }
  }

  int64_t H_, Hq_, Hk_, D_, I_;
  float eps_, scale_;
  at::Tensor final_norm_, cos_sin_;
  std::vector<Layer> layers_;
  at::Tensor qmin_, qmax_;  // Quest summaries (set_quest), undefined: none
  int64_t quest_dense_ = 0;
  const uint8_t* qpin_ = nullptr;  // Quest pins of the running call (run's pins), null: none
  int64_t qpin_mb_ = 0;
  std::vector<float> resid_, h_, qkv_, att_, gu_, act_, y_, sx_, xsum_, part_m_, part_l_, part_acc_;
  std::vector<int8_t> xq_;
  std::vector<ThreadScratch> scratch_;
  // GGUF projections: the kernels (a KernelTable of a GGUF build), int8 rows of kind 0 / 1
  const G::KernelTable* table_ = nullptr;
  py::object table_ref_;
  int64_t small_m_ = 4;
  // dense projections: the packed GEMM's kernel table
  const D::KernelTable* dense_ = nullptr;
  py::object dense_ref_;
  std::vector<int8_t> gxq_[2];
  std::vector<float> gdx_[2];
  std::vector<int32_t> gxs_[2];
  std::vector<G::A8Row> grows_[2];
  std::mutex mu_;
};

// int8 grouped weights (format "int8", fp16 scales) x per-group int8 activations, 4-column tiles:
// the decode-time lm_head (qlinear.INT4_ACT == "int8" decodes with int8 activations throughout).
class I8Linear {
 public:
  I8Linear(at::Tensor qweight, at::Tensor scales, int64_t in_features, int64_t group_size, c10::optional<at::Tensor> bias)
      : qw_(std::move(qweight)), K_(in_features), gs_(group_size) {
    TORCH_CHECK(gs_ == 32 || gs_ == 64 || gs_ == 128 || gs_ == 256, "I8Linear: group size must be 32/64/128/256");
    TORCH_CHECK(K_ % gs_ == 0, "I8Linear: in_features must be a multiple of the group size");
    TORCH_CHECK(qw_.device().is_cpu() && qw_.scalar_type() == at::kChar && qw_.is_contiguous() && qw_.dim() == 2 &&
                    qw_.size(1) >= K_,
                "I8Linear: qweight must be contiguous int8 [N, >= K]");
    N_ = qw_.size(0);
    TORCH_CHECK(N_ % 4 == 0, "I8Linear: out_features must be a multiple of 4");
    TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.numel() == N_ * (K_ / gs_),
                "I8Linear: scales must be contiguous float16 [N, K / group]");
    sc4_ = at::empty({scales.numel()}, scales.options());
    Q::interleave4_f16((const uint16_t*)scales.data_ptr(), N_, K_ / gs_, (uint16_t*)sc4_.data_ptr());
    if (bias.has_value() && bias->defined()) {
      bias_ = bias->contiguous();
      check_vec(bias_, N_, "bias");
    }
  }

  at::Tensor forward(const at::Tensor& x) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == K_,
                "I8Linear: x must be contiguous float32 [M, ", K_, "]");
    const int64_t M = x.size(0);
    auto y = at::empty({M, N_}, x.options());
    if (M == 0) return y;
    std::lock_guard<std::mutex> guard(mu_);  // shared activation buffers: one call at a time
    Q::W4A8Act A = Q::w4a8_act_shape(M, K_, gs_);
    xq_.resize(M * A.Kp);
    sx_.resize(M * A.Gp);
    xsum_.resize(M * A.G);
    A.xq = xq_.data();
    A.sx = sx_.data();
    A.xsum = xsum_.data();
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const int nt = std::max(1, at::get_num_threads());
    const int64_t Kp = qw_.size(1);
    const int8_t* W = qw_.data_ptr<int8_t>();
    const uint16_t* sc4 = (const uint16_t*)sc4_.data_ptr();
    const float* bp = fptr(bias_);
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
      quant_rows(xp, K_, gs_, A, xq_.data(), sx_.data(), xsum_.data(), false, tid, nth);
#pragma omp barrier
      for_column_runs(N_, nth, next, [&](int64_t n0, int64_t n1) {
        Q::with_group(gs_, [&](auto g) { Q::i8_cols4<decltype(g)::value>(A, W, Kp, sc4, bp, yp, N_, n0, n1); });
      });
    }
    return y;
  }

 private:
  at::Tensor qw_, sc4_, bias_;
  int64_t K_, gs_, N_ = 0;
  std::vector<int8_t> xq_;
  std::vector<float> sx_, xsum_;
  std::mutex mu_;
};

// One int4 linear through the decode step's GEMV kernels (tests: tiles, given scales4 / mins4,
// against the reference).
at::Tensor linear_a8(const at::Tensor& x, at::Tensor qweight, at::Tensor scales, at::Tensor mins, int64_t gs,
                     c10::optional<at::Tensor> bias, c10::optional<at::Tensor> scales4,
                     c10::optional<at::Tensor> mins4) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  auto opt = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); };
  const QLin lin(qweight, scales, mins, opt(scales4), opt(mins4), opt(bias), N, K, gs, "linear");
  Q::W4A8Act A = Q::w4a8_act_shape(M, K, gs);
  std::vector<int8_t> xq(M * A.Kp);
  std::vector<float> sx(M * A.Gp), xsum(M * A.G);
  quant_rows(x.data_ptr<float>(), K, gs, A, xq.data(), sx.data(), xsum.data(), true, 0, 1);
  A.xq = xq.data();
  A.sx = sx.data();
  A.xsum = xsum.data();
  auto y = at::empty({M, N}, x.options());
  Q::W4A8Scratch scratch;
  lin.cols(A, y.data_ptr<float>(), N, 0, N, scratch);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llmopt: the decoder stack of an int4 / GGUF / packed fp32 decode step in one native call";
  py::class_<DecodeStep>(m, "DecodeStep")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, const std::vector<at::Tensor>&,
                    const std::vector<int64_t>&, at::Tensor, at::Tensor>(),
           py::arg("hidden"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
           py::arg("intermediate"), py::arg("eps"), py::arg("scale"), py::arg("tensors"), py::arg("windows"),
           py::arg("final_norm"), py::arg("cos_sin"))
      .def("set_int4", &DecodeStep::set_int4, py::arg("layer"), py::arg("slot"), py::arg("qweight"),
           py::arg("scales"), py::arg("mins"), py::arg("scales4"), py::arg("mins4"), py::arg("bias"),
           py::arg("group_size"))
      .def("set_gguf_kernels", &DecodeStep::set_gguf_kernels, py::arg("table"), py::arg("small_m"))
      .def("set_gguf", &DecodeStep::set_gguf, py::arg("layer"), py::arg("slot"), py::arg("parts"), py::arg("types"),
           py::arg("rows"), py::arg("int8"), py::arg("bias"))
      .def("set_dense_kernels", &DecodeStep::set_dense_kernels, py::arg("table"))
      .def("set_dense", &DecodeStep::set_dense, py::arg("layer"), py::arg("slot"), py::arg("packed"), py::arg("bias"))
      .def("set_quest", &DecodeStep::set_quest, py::arg("kmin"), py::arg("kmax"), py::arg("dense_layers"))
      .def("run", &DecodeStep::run, py::arg("x"), py::arg("positions"), py::arg("slots"), py::arg("block_tables"),
           py::arg("context_lens"), py::arg("chained") = false, py::arg("topk") = py::none(),
           py::arg("mass") = py::none(), py::arg("mass_rows") = py::none(), py::arg("pins") = py::none(),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_layers", &DecodeStep::num_layers);
  py::class_<I8Linear>(m, "I8Linear")
      .def(py::init<at::Tensor, at::Tensor, int64_t, int64_t, c10::optional<at::Tensor>>(), py::arg("qweight"),
           py::arg("scales"), py::arg("in_features"), py::arg("group_size"), py::arg("bias") = py::none())
      .def("__call__", &I8Linear::forward, py::arg("x"), py::call_guard<py::gil_scoped_release>());
  LLMOPT_F_ATTN_AVX512_DEF(m);
  m.def("linear_a8", &linear_a8, "one int4 (lane layout) linear with int8 activations through the step's kernels",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("mins"), py::arg("group_size"),
        py::arg("bias") = py::none(), py::arg("scales4") = py::none(), py::arg("mins4") = py::none());
  m.def("_set_w4_prefetch", [](int64_t bytes) { Q::w4_prefetch_bytes = bytes; },
        "set the software prefetch distance (bytes, 0 = off) of the int4 x int8 kernels");
}
