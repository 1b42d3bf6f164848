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
    const int64_t k0 = (j / T::NS) * T::QB + (j % T::NS) * T::S;
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
      const int8_t* pa = a + (j / T::NS) * T::QB + (j % T::NS) * T::S;
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

}  // namespace llmopt_gguf

#endif  // __AMX_INT8__ && __AMX_TILE__
