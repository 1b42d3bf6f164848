// Quest-style sparse decode attention (query-aware block selection), shared by the standalone
// kernel (quest.cpp) and the one-call decode step (decode.cpp), so both choose the same blocks and
// attend with the same sums: the fused step equals the op-by-op forward bit for bit.
//
// Per-block key summaries (llmopt/kernels/quest.py): kmin / kmax float32 [num_blocks, Hk, D], the
// elementwise min and max of the K rows a cache block holds for each kv head (the dequantized rows
// for an int8 cache: what attention reads). A row written at offset 0 of its block resets the
// block's summary, later rows widen it; min and max do not depend on the order rows arrive in.
//
// Selection for one (decode row, kv head): block j's score is max over the G query heads of the
// group of sum_d (q_gd * c_jd + kRadius * |q_gd| * r_jd), c = (kmin + kmax) / 2 the block's centre,
// r = (kmax - kmin) / 2 its radius (kRadius 1 would be Quest's upper bound of the head's scores
// there; the bound is loose, it assumes one key sits at the favourable end of all D ranges at once,
// so wide blocks of unrelated text outranked a narrow block holding the key the head looks for; see
// docs/long_context.md 2b). The max ranks a block by its most interested head, so one copy head is
// not outvoted by the group. The first block (attention sinks) and the last
// (the current token's) are always read, plus the best k - 2 others (ties: the lower block index).
// k <= 0 or k >= the block count: every block, which is exactly the dense kernel's token walk.
// Pins (kv_quest_pin, engine/kv_policy.py): blocks the prompt's observation window voted for at the
// end of the prefill, per (layer, kv head); a pinned block ranks before every unpinned one (pinned
// blocks among themselves by score), so it is read whenever the k - 2 places can hold it, inside
// the same budget. No pins: the plain choice, bit for bit.
// Attention then walks the chosen blocks' tokens in ascending order in kTile-token tiles with the
// dense kernel's tile step (llmopt_f::attend_tile), so reading every block gives the dense bits.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "fused_kernels.h"
#include "kv_int8.h"

namespace llmopt_quest {

using llmopt_f::kTile;

// mn / mx [D] <- row (reset) or elementwise min / max with row.
inline void update_summary(float* mn, float* mx, const float* row, int64_t D, bool reset) {
  if (reset) {
    std::copy(row, row + D, mn);
    std::copy(row, row + D, mx);
    return;
  }
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 r = _mm256_loadu_ps(row + d);
    _mm256_storeu_ps(mn + d, _mm256_min_ps(_mm256_loadu_ps(mn + d), r));
    _mm256_storeu_ps(mx + d, _mm256_max_ps(_mm256_loadu_ps(mx + d), r));
  }
  for (; d < D; ++d) {
    mn[d] = std::min(mn[d], row[d]);
    mx[d] = std::max(mx[d], row[d]);
  }
}

// Memory reads ahead of use. The walks below go from block to block in the order of the block table
// or of the selection, not in memory order, and each (row, kv head) item reads only its head's slice
// of every cache row (D floats of each Hk * D), which the hardware prefetcher did not keep up with:
// perf put most of the time on the loads of the summaries and of the tile's K / V rows. Scoring
// prefetches the summaries kPrefetchBlocks blocks ahead, the walk the next chosen block's rows
// (as the dense walk does, fused_kernels.h attend_range_rows). Prefetching changes no result.
inline constexpr int64_t kPrefetchBlocks = 4;  // summaries this many blocks ahead of the scoring
using llmopt_f::prefetch_rows;

// Weight of the block radius in the score (0: the centre alone, 1: Quest's upper bound). 0.5 kept
// the most attention mass of the heads that read the key in retrieval prompts (docs/long_context.md).
inline constexpr float kRadius = 0.5f;

// max over g < G of sum over d < D of (q c + kRadius |q| r)[g, d], written as
// kHi * max(q mn, q mx) + kLo * min(q mn, q mx) (q c = (max + min) / 2, |q| r = (max - min) / 2):
// the highest of the G heads' scores of the block.
inline float block_score(const float* q, int64_t G, int64_t D, const float* mn, const float* mx) {
  constexpr float kHi = 0.5f * (1.0f + kRadius), kLo = 0.5f * (1.0f - kRadius);
  const __m256 hi_w = _mm256_set1_ps(kHi), lo_w = _mm256_set1_ps(kLo);
  const auto term = [&](__m256 vq, __m256 vmn, __m256 vmx) {
    const __m256 a = _mm256_mul_ps(vq, vmn), b = _mm256_mul_ps(vq, vmx);
    return _mm256_add_ps(_mm256_mul_ps(hi_w, _mm256_max_ps(a, b)), _mm256_mul_ps(lo_w, _mm256_min_ps(a, b)));
  };
  const auto tail = [&](const float* qg, int64_t d0) {
    float t = 0.0f;
    for (int64_t d = d0; d < D; ++d) {
      const float a = qg[d] * mn[d], b = qg[d] * mx[d];
      t += kHi * std::max(a, b) + kLo * std::min(a, b);
    }
    return t;
  };
  float best = -std::numeric_limits<float>::infinity();
  const int64_t D8 = D / 8 * 8;
  int64_t g = 0;
  // three heads at a time: the block's min / max chunks are loaded once for all three, and three
  // independent sums run side by side (each head's sum in the same order as alone: the same bits)
  for (; g + 3 <= G; g += 3) {
    const float *q0 = q + g * D, *q1 = q0 + D, *q2 = q1 + D;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8) {
      const __m256 vmn = _mm256_loadu_ps(mn + d), vmx = _mm256_loadu_ps(mx + d);
      acc0 = _mm256_add_ps(acc0, term(_mm256_loadu_ps(q0 + d), vmn, vmx));
      acc1 = _mm256_add_ps(acc1, term(_mm256_loadu_ps(q1 + d), vmn, vmx));
      acc2 = _mm256_add_ps(acc2, term(_mm256_loadu_ps(q2 + d), vmn, vmx));
    }
    best = std::max(best, llmopt_f::hsum(acc0) + tail(q0, D8));
    best = std::max(best, llmopt_f::hsum(acc1) + tail(q1, D8));
    best = std::max(best, llmopt_f::hsum(acc2) + tail(q2, D8));
  }
  for (; g < G; ++g) {
    const float* qg = q + g * D;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8)
      acc = _mm256_add_ps(acc, term(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(mn + d), _mm256_loadu_ps(mx + d)));
    best = std::max(best, llmopt_f::hsum(acc) + tail(qg, D8));
  }
  return best;
}

// Blocks one (row, kv head) attends to, ascending, into sel[0:return value]. q [G, D]; the
// summaries of the row's j-th block are kmin / kmax + (bt[j] * Hk + h) * D; nb blocks hold the
// context; k blocks are kept (k <= 0 or k >= nb: all). pin: null, or nonzero at the row's pinned
// block indices j (>= nb entries). Scratch: score [nb], order [nb].
inline int64_t select_blocks(const float* q, int64_t G, int64_t D, const float* kmin, const float* kmax,
                             const int32_t* bt, int64_t Hk, int64_t h, int64_t nb, int64_t k, float* score,
                             int64_t* order, int64_t* sel, const uint8_t* pin = nullptr) {
  if (k <= 0 || k >= nb) {
    for (int64_t j = 0; j < nb; ++j) sel[j] = j;
    return nb;
  }
  k = std::max<int64_t>(k, 2);  // the sink block and the current block
  const int64_t mid = nb - 2, pick = k - 2;
  for (int64_t j = 1; j + 1 < nb; ++j) {
    if (j + kPrefetchBlocks + 1 < nb) {  // the table scatters blocks: fetch a later block's summaries now
      const int64_t pf = (static_cast<int64_t>(bt[j + kPrefetchBlocks]) * Hk + h) * D;
      prefetch_rows(kmin + pf, 1, 0, D);
      prefetch_rows(kmax + pf, 1, 0, D);
    }
    const int64_t off = (static_cast<int64_t>(bt[j]) * Hk + h) * D;
    score[j] = block_score(q, G, D, kmin + off, kmax + off);
    order[j - 1] = j;
  }
  if (pin == nullptr) {
    std::nth_element(order, order + pick, order + mid, [score](int64_t a, int64_t b) {
      return score[a] > score[b] || (score[a] == score[b] && a < b);
    });
  } else {
    std::nth_element(order, order + pick, order + mid, [score, pin](int64_t a, int64_t b) {
      const bool pa = pin[a] != 0, pb = pin[b] != 0;
      if (pa != pb) return pa;
      return score[a] > score[b] || (score[a] == score[b] && a < b);
    });
  }
  sel[0] = 0;
  std::copy(order, order + pick, sel + 1);
  std::sort(sel + 1, sel + 1 + pick);
  sel[1 + pick] = nb - 1;
  return pick + 2;
}

// Online-softmax attention of qs [G, D] (scaled) over the tokens of blocks sel[0:ns] (ascending)
// of a context of L tokens, BS tokens a block: tiles of kTile tokens in that order. fill(i, t)
// points krow[i] / vrow[i] at token t's K / V rows (or dequantizes them there); prefetch(j, n)
// fetches the first n rows of block j ahead of the walk (the cache view's prefetch_block). m, l, acc as in
// llmopt_f::attend_range (which this equals when sel is every block).
template <class Fill, class Prefetch>
inline void attend_blocks(const float* qs, int64_t G, int64_t D, const int64_t* sel, int64_t ns, int64_t BS,
                          int64_t L, float* m, float* l, float* acc, float* sc, const float* const* krow,
                          const float* const* vrow, Fill&& fill, Prefetch&& prefetch) {
  std::fill(acc, acc + G * D, 0.0f);
  std::fill(m, m + G, -std::numeric_limits<float>::infinity());
  std::fill(l, l + G, 0.0f);
  int64_t n = 0;
  const auto ahead = [&](int64_t j) { prefetch(j, std::min(BS, L - j * BS)); };  // block j's rows
  if (ns > 0) ahead(sel[0]);
  for (int64_t s = 0; s < ns; ++s) {
    if (s + 1 < ns) ahead(sel[s + 1]);  // the next chosen block's rows, while this one is read
    const int64_t t1 = std::min(L, (sel[s] + 1) * BS);
    for (int64_t t = sel[s] * BS; t < t1; ++t) {
      fill(n, t);
      if (++n == kTile) {
        llmopt_f::attend_tile(qs, G, D, krow, vrow, n, m, l, acc, sc);
        n = 0;
      }
    }
  }
  if (n > 0) llmopt_f::attend_tile(qs, G, D, krow, vrow, n, m, l, acc, sc);
}

// Per-thread scratch of one (row, kv head) item: selection and the int8 tile buffers.
struct Scratch {
  std::vector<float> score, kf, vf;
  std::vector<int64_t> order, sel;
  std::vector<const float*> krow, vrow;
  void reserve(int64_t max_blocks, int64_t D, bool int8) {
    score.resize(max_blocks);
    order.resize(max_blocks);
    sel.resize(max_blocks);
    krow.resize(kTile);
    vrow.resize(kTile);
    if (int8) {
      kf.resize(kTile * D);
      vf.resize(kTile * D);
      for (int64_t i = 0; i < kTile; ++i) {
        krow[i] = kf.data() + i * D;
        vrow[i] = vf.data() + i * D;
      }
    }
  }
};

// One (row, kv head) item over a float cache (kv as the dense kernel sees it) or, when kv8 is
// non-null, an int8 one: select with q (qs, already scaled) and the item's pins (null: none), then
// attend. kmin / kmax null or k <= 0: dense.
inline void attend_item(const float* qs, int64_t G, int64_t D, const llmopt_f::PagedKV* kv,
                        const llmopt_kv8::PagedKV8* kv8, const int32_t* bt, int64_t BS, int64_t Hk, int64_t h,
                        int64_t L, int64_t k, const float* kmin, const float* kmax, Scratch& s, float* m, float* l,
                        float* acc, float* sc, const uint8_t* pin = nullptr) {
  const int64_t nb = (L + BS - 1) / BS;
  if (static_cast<int64_t>(s.sel.size()) < nb) s.reserve(nb, D, kv8 != nullptr);
  const int64_t ns = select_blocks(qs, G, D, kmin, kmax, bt, Hk, h, nb, kmin == nullptr ? 0 : k, s.score.data(),
                                   s.order.data(), s.sel.data(), pin);
  const float** kr = s.krow.data();
  const float** vr = s.vrow.data();
  if (kv8 == nullptr) {
    attend_blocks(
        qs, G, D, s.sel.data(), ns, BS, L, m, l, acc, sc, kr, vr,
        [&](int64_t i, int64_t t) {
          const int64_t blk = kv->bt[t / kv->BS], slot = t % kv->BS;
          kr[i] = kv->k + blk * kv->ks0 + slot * kv->ks1;
          vr[i] = kv->v + blk * kv->vs0 + slot * kv->vs1;
        },
        [&](int64_t j, int64_t n) { kv->prefetch_block(j, n, D); });
  } else {
    float* kf = s.kf.data();
    float* vf = s.vf.data();
    const auto walk = [&](auto fp8) {  // the code format picked once per call (kv_int8.h attend_range_rows)
      attend_blocks(
          qs, G, D, s.sel.data(), ns, BS, L, m, l, acc, sc, kr, vr,
          [&](int64_t i, int64_t t) { kv8->fetch_as<decltype(fp8)::value>(t, kf + i * D, vf + i * D, D); },
          [&](int64_t j, int64_t n) { kv8->prefetch_block(j, n, D); });
    };
    if (kv8->fp8)
      walk(std::true_type{});
    else
      walk(std::false_type{});
  }
}

}  // namespace llmopt_quest
