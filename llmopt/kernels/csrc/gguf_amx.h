// AMX-INT8 tiles for the int8-activation mode (gguf_kernels.h: tile_a8), in the avx512_amx build
// (gguf_linear.cpp compiled with -mamx-tile -mamx-int8 on top of AVX-512 VNNI).
//
// tile_a8 computes, per row r, column c and sub-block (32 k; Q6_K 16), the exact integer
//   isum[r][c] = sum_k q[c][k] * xq[r][k]
// with VNNI dot products, one row broadcast at a time, then folds it into the float accumulator:
//   acc = fma(float(isum - OFF * xs), A * dx, acc)  (+ fma(Bm, dx * xs, acc) for types with mins).
// Here one TDPBSUD (codes unsigned, activations signed) or TDPBSSD (signed codes: Q8_0's, and
// q - OFF for Q4_0 / Q5_0 / Q6_K, which puts the "- OFF * xs" into the integer sum) computes that
// integer for 16 rows x 16 columns at once, and the same float steps follow, in the same order.
// Integer sums are exact either way, so every row gets tile_a8's bits: the AMX and VNNI paths, any
// row count and any mix of the two (full 16-row tiles here, the rest on tile_a8) agree bit for bit.
//
// B tiles (the weights): the "VNNI layout" AMX wants (S / 4 rows of 64 bytes, lane c of row kk = 4
// codes of column c) is what tile_a8 builds in registers, by the same helpers (gguf_kernels.h
// a8_codes4 / a8_codes8): a lane-major type's low nibbles (with the high bits merged) for
// k = 8 g + (0, 2, 4, 6) and 8 g + (1, 3, 5, 7), matching the activations' per-8 permutation
// (gguf_linear.cpp: quant_row_a8), or Q8_0's 4 consecutive codes.
// They are unpacked once per call and group of up to 4 panels into a per-thread buffer (16 bytes
// per weight: L2-resident for K up to ~16k), then every 16-row tile reuses them. Per row tile the
// accumulators stay in registers over all of K, and the tile unit computes sub-block j while the
// vector units fold sub-block j - 2 (a store and reload of the C tile sits between them).
//
// Linux requires a process to ask for the tile state first (arch_prctl ARCH_REQ_XCOMP_PERM):
// amx_request() does that once; the module reports it (gguf.amx_ready()) and Python does not
// choose this build where it fails. The tile configuration is per thread and other libraries
// (oneDNN) set their own, so every call loads ours and releases the tiles on return.
#pragma once

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
#define LLMOPT_GGUF_AMX 1

#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

#include "gguf_kernels.h"

namespace llmopt_gguf {

constexpr int AMX_M = 16;   // activation rows per tile
constexpr int AMX_NP = 4;   // panels unpacked per group (their B tiles stay in L2 for every row tile)

// the tile state may be used by this process (asked once; false on kernels before 5.16 or if refused)
inline bool amx_request() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tmm0, 1: C (16 x 16 int32); tmm4, 7: A (16 rows x S bytes); tmm5, 6: B (S / 4 rows x 64 bytes)
template <class T>
inline void amx_configure() {
  TileConfig c{};
  c.palette = 1;
  for (int i = 0; i < 4; ++i) {
    c.rows[i] = 16;
    c.colsb[i] = 64;
  }
  c.rows[4] = c.rows[7] = 16;
  c.colsb[4] = c.colsb[7] = T::S;
  c.rows[5] = c.rows[6] = T::S / 4;
  c.colsb[5] = c.colsb[6] = 64;
  // (not _tile_loadconfig: GCC 12 declares its memory operand as 8 bytes, so the optimizer may drop
  // the stores of the rest of the 64-byte configuration and ldtilecfg faults)
  __asm__ volatile("ldtilecfg %0" ::"m"(*reinterpret_cast<const unsigned char(*)[64]>(&c)));
}

// B holds signed bytes (TDPBSSD) for Q8_0's codes and for codes with an offset (q - OFF), else the
// unsigned codes (TDPBSUD)
template <class T>
constexpr bool kAmxSignedB = T::SIGNED || T::OFF != 0;

// bytes of one sub-block's B tile
template <class T>
constexpr int64_t kAmxSubBytes = 16 * T::S;

// the B tiles of one panel for blocks [0, nblk): sub-block (b, s) at out + (b * NS + s) * 16 S
template <class T>
inline void amx_unpack_panel(const uint8_t* pan, int64_t nblk, uint8_t* out) {
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* blk = pan + b * T::BB;
    for (int s = 0; s < T::NS; ++s) {
      uint8_t* o = out + (b * T::NS + s) * kAmxSubBytes<T>;
      if constexpr (T::L == 4) {
        I hv = V::izero();
        if constexpr (T::H > 0) hv = a8_high<T>(blk, s);
        static_for<0, T::S / 8>([&](auto gc) {
          constexpr int gg = decltype(gc)::value;
          I lo, hi;
          a8_codes4<T, gg>(blk, s, hv, lo, hi);
          if constexpr (T::OFF != 0) {  // q - OFF as signed bytes: the tile sums isum - OFF * xs directly
            lo = _mm512_sub_epi8(lo, _mm512_set1_epi8((char)T::OFF));
            hi = _mm512_sub_epi8(hi, _mm512_set1_epi8((char)T::OFF));
          }
          _mm512_storeu_si512((void*)(o + 128 * gg), lo);
          _mm512_storeu_si512((void*)(o + 128 * gg + 64), hi);
        });
      } else {
        static_assert(T::L == 8 && T::S == 32);
        for (int g = 0; g < 32; g += 4) _mm512_storeu_si512((void*)(o + 16 * g), a8_codes8<T>(blk, s, g));
      }
    }
  }
}

// C tile C_ = A . B with A (tile A_) loaded from pa (row stride lda) and B (tile B_) from pb
// (gcc's tile intrinsics take literal tile numbers, hence a macro)
#define LLMOPT_AMX_DOT(C_, A_, B_, pa, lda, pb)          \
  do {                                                      \
    _tile_loadd(A_, (pa), (lda));                           \
    _tile_zero(C_);                                         \
    _tile_loadd(B_, (pb), 64);                              \
    if constexpr (kAmxSignedB<T>) _tile_dpbssd(C_, A_, B_); \
    else _tile_dpbsud(C_, A_, B_);                          \
  } while (0)

// Per 16-row tile and sub-block j, the row constants of tile_a8's float steps (the same scalars
// it computes): dx, and dx * float(xs) for types with mins (xs: the sub-block's activation sum)
struct AmxRowConst {
  float dx[AMX_M];
  float dxs[AMX_M];
};

template <class T>
inline void amx_row_consts(const A8Row* rows, int64_t nblk, AmxRowConst* rc) {
  for (int64_t j = 0; j < nblk * T::NS; ++j) {
    const int64_t k0 = j * T::S;  // sub-block j = (j / NS, j % NS) starts at k = j S
    for (int r = 0; r < AMX_M; ++r) {
      const float dx = rows[r].dx[k0 / 32];
      rc[j].dx[r] = dx;
      rc[j].dxs[r] = dx * float(a8_xs<T>(rows[r], k0));
    }
  }
}

// tile_a8's float steps for sub-block j = (b, s) of one panel and 16 rows, from the exact integer
// sums c [16][16] (row, column; the offset already in them): acc[r] = fma(float(c[r]), A * dx, acc[r])
// (+ fma(Bm, dx * xs, acc[r]))
template <class T>
GGUF_INLINE void amx_fold(const uint8_t* pan, int64_t b, int s, const AmxRowConst& rc, const int32_t* c, F (&acc)[AMX_M]) {
  F A, Bm;
  params_a8<T>(pan + b * T::BB, s, A, Bm);
  for (int r = 0; r < AMX_M; ++r) {
    const I it = V::ld((const uint8_t*)(c + r * LANES));
    acc[r] = V::fma(V::cvti(it), V::mul(A, V::bcast(rc.dx + r)), acc[r]);
    if constexpr (T::M2) acc[r] = V::fma(Bm, V::bcast(rc.dxs + r), acc[r]);
  }
}

// 16 rows (activations a, row stride lda; their constants rc[sub-block]) x one panel (pan: its packed
// blocks, for the scales; bt: its B tiles, amx_unpack_panel): out [16][16] = tile_a8's accumulators,
// same steps in the same order. The accumulators stay in registers over all of K; cbuf [2][16][16]
// receives the C tiles in turn.
template <class T>
inline void amx_rows(const uint8_t* pan, const uint8_t* bt, const int8_t* a, int64_t lda, const AmxRowConst* rc,
                     int64_t nblk, float* out, int32_t* cbuf) {
  F acc[AMX_M];
  for (int r = 0; r < AMX_M; ++r) acc[r] = V::zero();
  const int64_t nsub = nblk * T::NS;
  int32_t* c0 = cbuf;
  int32_t* c1 = cbuf + AMX_M * LANES;
  // Software pipeline, two sub-blocks deep: step j issues sub-block j's tile loads and dot product
  // (tiles C / A / B = 0 / 4 / 5 or 1 / 7 / 6 by parity), folds sub-block j - 2 (whose sums were
  // stored in step j - 1), then stores j - 1's sums. The store waits for its dot product, issued a
  // step earlier; a store ahead of the fold's loads would hold them back (loads cannot pass a store
  // whose addresses are not known yet), serializing the tile unit and the vector units.
  for (int64_t j = 0; j < nsub + 2; ++j) {
    if (j < nsub) {  // integer sums of sub-block j
      const int8_t* pa = a + j * T::S;
      const uint8_t* pb = bt + j * kAmxSubBytes<T>;
      if (j & 1) LLMOPT_AMX_DOT(1, 7, 6, pa, lda, pb);
      else LLMOPT_AMX_DOT(0, 4, 5, pa, lda, pb);
    }
    if (j >= 2) {  // fold sub-block j - 2
      const int64_t jp = j - 2;
      amx_fold<T>(pan, jp / T::NS, (int)(jp % T::NS), rc[jp], (jp & 1) ? c1 : c0, acc);
    }
    if (j >= 1 && j <= nsub) {  // store sub-block j - 1's sums
      if ((j - 1) & 1) _tile_stored(1, c1, 64);
      else _tile_stored(0, c0, 64);
    }
  }
  for (int r = 0; r < AMX_M; ++r) V::store(out + r * LANES, acc[r]);
}

#undef LLMOPT_AMX_DOT

// ---- fp32 activations on AMX-BF16 tiles ("bf16x3") -------------------------------------------
// Each activation is split exactly into three bf16 parts, x = h + m + l (8 + 8 + 8 significant bits:
// fp32's 24; truncation, so the two subtractions are exact), and the weight codes (integers of at
// most 8 bits, with the offset of Q4_0 / Q5_0 / Q6_K) are exact in bf16, so every product the tile
// unit forms is exact in fp32. Per 16 rows, 16 columns and sub-block (32 k; Q6_K 16) the tile
// computes c = sum_k x_k q_k with fp32 accumulation (TDPBF16PS, the parts l, m, h in turn into one C
// tile), then the vector units fold it as tile_a8 does, with dx = 1:
//   acc = fma(c, A, acc)  (+ fma(Bm, X, acc) for types with mins; X = sum of x over the sub-block).
// The result is x @ W.T up to fp32 rounding (not the fp32 path's fma chain: other bits, same model).
// Each row's bits depend only on that row (a tile row's dot products do not mix rows; padding rows
// are zeros), so any row count and any batch give the same bits for a row.
// B tiles: the int8 mode's unpacked codes (amx_unpack_panel: lane c of row kk = 4 codes of column c,
// in the activations' per-8 order) widened to bf16 pairs: int8 row kk -> bf16 rows 2 kk (codes 0, 1)
// and 2 kk + 1 (codes 2, 3). The activations are split in the same per-8 order (quant_row_a8's perm8).
#if defined(__AMX_BF16__)
#define LLMOPT_GGUF_AMX_BF16 1

// bytes of one sub-block's bf16 B tile (S / 2 rows of 64 bytes)
template <class T>
constexpr int64_t kBf3SubBytes = 32 * T::S;

// one row x [K] -> its three bf16 parts h, m, l [K] (perm8: each group of 8 k in the order 0, 2, 4, 6,
// 1, 3, 5, 7) and s16 [K / 16] = the sum of x over each 16 k (one fixed reduction order)
inline void bf3_split_row(const float* x, int64_t K, bool perm8, uint16_t* h, uint16_t* m, uint16_t* l, float* s16) {
  const __m512i perm = _mm512_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  const __m512i hi16 = _mm512_set1_epi32((int)0xffff0000u);
  for (int64_t k = 0; k < K; k += 16) {
    __m512 v = _mm512_loadu_ps(x + k);
    s16[k / 16] = _mm512_reduce_add_ps(v);
    if (perm8) v = _mm512_permutexvar_ps(perm, v);
    const __m512i vh = _mm512_and_si512(_mm512_castps_si512(v), hi16);
    const __m512 r1 = _mm512_sub_ps(v, _mm512_castsi512_ps(vh));
    const __m512i vm = _mm512_and_si512(_mm512_castps_si512(r1), hi16);
    const __m512 r2 = _mm512_sub_ps(r1, _mm512_castsi512_ps(vm));  // <= 8 significant bits: exact in bf16
    _mm256_storeu_si256((__m256i*)(h + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(vh, 16)));
    _mm256_storeu_si256((__m256i*)(m + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(vm, 16)));
    _mm256_storeu_si256((__m256i*)(l + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(r2), 16)));
  }
}

// the int8 B tiles of a panel (amx_unpack_panel, nbytes) -> bf16 B tiles: each 64-byte row (16 lanes of
// 4 codes) -> two 64-byte rows of bf16 pairs
template <class T>
inline void bf3_widen(const uint8_t* src, int64_t nbytes, uint8_t* dst) {
  const __m512i ff = _mm512_set1_epi32(0xff), hi16 = _mm512_set1_epi32((int)0xffff0000u);
  auto bf = [](__m512i q) { return _mm512_castps_si512(_mm512_cvtepi32_ps(q)); };  // small integers: exact
  for (int64_t i = 0; i < nbytes; i += 64) {
    const __m512i v = _mm512_loadu_si512((const void*)(src + i));
    __m512i b0, b1, b2, b3;
    if constexpr (kAmxSignedB<T>) {
      b0 = _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24);
      b1 = _mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24);
      b2 = _mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24);
      b3 = _mm512_srai_epi32(v, 24);
    } else {
      b0 = _mm512_and_si512(v, ff);
      b1 = _mm512_and_si512(_mm512_srli_epi32(v, 8), ff);
      b2 = _mm512_and_si512(_mm512_srli_epi32(v, 16), ff);
      b3 = _mm512_srli_epi32(v, 24);
    }
    _mm512_storeu_si512((void*)(dst + 2 * i), _mm512_or_si512(_mm512_srli_epi32(bf(b0), 16), _mm512_and_si512(bf(b1), hi16)));
    _mm512_storeu_si512((void*)(dst + 2 * i + 64), _mm512_or_si512(_mm512_srli_epi32(bf(b2), 16), _mm512_and_si512(bf(b3), hi16)));
  }
}

// One step: the dot products of BF3_G = 3 panels' C tiles (0, 1, 2) from their B tiles (3, 4, 5) and the
// A parts l, m, h in turn (tiles 6, 7, 6), the three chains interleaved: a C tile's three dot products
// depend on one another, so the tile unit overlaps the chains of the three panels, not the products of
// one (one panel per step: 1.0-1.1x the fp32 chain; three: 1.6-1.9x). All 8 tiles are in use.
constexpr int BF3_G = 3;

// tile configuration: C tiles 0 .. 2 (16 x 16 fp32), B tiles 3 .. 5 (S / 2 rows x 64 bytes), A tiles 6, 7
// (16 rows x 2 S bytes)
template <class T>
inline void amx_bf3_configure() {
  TileConfig c{};
  c.palette = 1;
  for (int i = 0; i < 8; ++i) {
    const bool cc = i < BF3_G, bb = i >= BF3_G && i < 2 * BF3_G;
    c.rows[i] = bb ? T::S / 2 : 16;
    c.colsb[i] = cc || bb ? 64 : 2 * T::S;
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(*reinterpret_cast<const unsigned char(*)[64]>(&c)));
}

GGUF_INLINE void bf3_step(const uint16_t* const* a, int64_t k0, int64_t lda, const uint8_t* const* pb) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_loadd(3, pb[0], 64);
  _tile_loadd(4, pb[1], 64);
  _tile_loadd(5, pb[2], 64);
  _tile_loadd(6, a[2] + k0, lda);
  _tile_dpbf16ps(0, 6, 3);
  _tile_dpbf16ps(1, 6, 4);
  _tile_dpbf16ps(2, 6, 5);
  _tile_loadd(7, a[1] + k0, lda);
  _tile_dpbf16ps(0, 7, 3);
  _tile_dpbf16ps(1, 7, 4);
  _tile_dpbf16ps(2, 7, 5);
  _tile_loadd(6, a[0] + k0, lda);
  _tile_dpbf16ps(0, 6, 3);
  _tile_dpbf16ps(1, 6, 4);
  _tile_dpbf16ps(2, 6, 5);
}

GGUF_INLINE void bf3_store(float* c) {
  _tile_stored(0, c, 64);
  _tile_stored(1, c + AMX_M * LANES, 64);
  _tile_stored(2, c + 2 * AMX_M * LANES, 64);
}

// 16 rows (parts a[0..2]: h, m, l of the tile's first row, row stride lda bytes; xs [nsub][16]: their
// sums per sub-block) x np panels, np a multiple of BF3_G (pan[i]: the packed blocks, for the scales;
// bt[i]: the bf16 B tiles): acc [np][16][16] (row, column). Steps s = (sub-block, group of G panels):
// the dot products of step s, the fold of step s - 1 (vector units, from memory), the stores of step s;
// the accumulators in memory (L1). cbuf: 2 x G C tiles.
template <class T>
inline void amx_bf3_rows(const uint8_t* const* pan, const uint8_t* const* bt, int np, const uint16_t* const* a,
                         int64_t lda, const float* xs, int64_t nblk, float* acc, float* cbuf) {
  std::memset(acc, 0, sizeof(float) * np * AMX_M * LANES);
  const int64_t nsub = nblk * T::NS, ng = np / BF3_G, steps = nsub * ng;
  for (int64_t s = 0, j = 0, q = 0; s < steps + 1; ++s) {
    if (s < steps) {
      const int64_t k0 = j * T::S;
      const uint8_t* pb[BF3_G];
      for (int g = 0; g < BF3_G; ++g) pb[g] = bt[q * BF3_G + g] + j * kBf3SubBytes<T>;
      bf3_step(a, k0, lda, pb);
    }
    if (s >= 1) {  // fold step s - 1
      const int64_t sp = s - 1, jp = sp / ng, qp = sp % ng;
      const float* x = xs + jp * AMX_M;
      for (int g = 0; g < BF3_G; ++g) {
        const int ip = (int)(qp * BF3_G + g);
        F A, Bm;
        params_a8<T>(pan[ip] + (jp / T::NS) * T::BB, (int)(jp % T::NS), A, Bm);
        const float* c = cbuf + ((sp & 1) * BF3_G + g) * AMX_M * LANES;
        float* o = acc + ip * AMX_M * LANES;
        for (int r = 0; r < AMX_M; ++r) {
          F v = V::fma(V::load(c + r * LANES), A, V::load(o + r * LANES));
          if constexpr (T::M2) v = V::fma(Bm, V::bcast(x + r), v);
          V::store(o + r * LANES, v);
        }
      }
    }
    if (s < steps) {
      bf3_store(cbuf + (s & 1) * BF3_G * AMX_M * LANES);
      if (++q == ng) {
        q = 0;
        ++j;
      }
    }
  }
}

#endif  // __AMX_BF16__

}  // namespace llmopt_gguf

#endif  // __AMX_INT8__ && __AMX_TILE__
