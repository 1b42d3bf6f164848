// Native GGUF block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) on a
// lossless repacked layout: y[M, N] = x[M, K] @ W.T (+ bias), fp32 activations.
//
// One source, compiled once per instruction set (gguf_linear.cpp with -mavx2 or -mavx512*): the
// 16-lane vector type V below is two ymm on AVX2 and one zmm on AVX-512. Python (gguf_linear.py)
// loads the build the CPU can run.
//
// Packed layout (made by gguf_linear.pack_gguf; every section is for 16 output columns, "lanes")
// ----------------------------------------------------------------------------------------------
//   data : uint8 [P, nblk, BB]   P = ceil(N / 16) panels of 16 columns (zero padded), nblk = K / QB
//   one 16-column block (the GGUF block of QB weights of each of the 16 columns), BB bytes:
//     D    fp16 [16]          d (legacy types, K-quants' super-block d)
//     M2   fp16 [16]          m (Q4_1, Q5_1) or dmin (Q2_K, Q4_K, Q5_K)           if T::M2
//     SC   u8/s8 [NS][16]     per sub-block scale (K-quants: 6-bit unpacked; Q3_K: minus 32;
//                             Q6_K: int8; Q2_K: the raw byte, scale | min << 4)    if T::SCK
//     MN   u8 [NS][16]        per sub-block 6-bit min (Q4_K, Q5_K)                 if T::MN
//     LOW  [QB / (8/L)][16]   low L bits of the codes: byte (g, c) = sum_j lo(q[c][g*(8/L)+j]) << L*j
//     HIGH [QB / (8/H)][16]   the H bits above them, same packing                  if T::H
//   Lane-major types (T::LM: a 4-bit low plane, i.e. Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K): the
//   int8 dot products want the 4 code bytes (8 k) of one column in one 32-bit lane, so these
//   store them that way instead of transposing 4 rows of 16 bytes per 8 k at run time:
//     LOW  [QB / 8][16][4]    byte (g, c, i) = lo(q[c][8g + 2i]) | lo(q[c][8g + 2i + 1]) << 4
//     HIGH [QB / KH][16][4]   (if T::H) one 32-bit lane per column and KH = 32 / H k (32 for Q5, 16 for Q6_K):
//                             bits 8 i + H (2 gg + h) .. + H - 1 of lane c = the high bits of
//                             q[c][KH b + 8 gg + 2 i + h] (where one shift by a constant moves them
//                             to bit 4 of the byte that holds the code's low nibble)
//   The codes q are the GGUF ones, unsigned (Q8_0: the int8 itself), in natural k order.
//   Same bytes as the GGUF data except the K-quants' 6-bit scales stored one per byte
//   (Q4_K / Q5_K / Q3_K: +64 bytes per 16 blocks, +2-3.5%).
//
// Exactness: every weight is decoded to the fp32 value gguf.quants.dequantize gives, bit for bit:
//   w = fma(float(q), A, B)  with A, B per sub-block and 16 lanes:
//     legacy: A = d, B = m (Q4_1/Q5_1) or -OFF * d (Q4_0: 8, Q5_0: 16) or 0 (Q8_0)
//     K:      A = d * sc,  B = -(dmin * min) (Q2_K/Q4_K/Q5_K) or -OFF * A (Q3_K: 4, Q6_K: 32)
//   A and B are exact in fp32 (an fp16 times a <= 8-bit integer, times a power of two), and the
//   reference's own product A * q is exact wherever it adds a B (<= 22 significant bits), so the one
//   rounding of the fma is the reference's one rounding (Q6_K: round(A * (q - 32)) either way).
//
// Summation order (batch invariance): every output y[m, n] is ONE chain of fmas over k = 0..K-1 in
// order, starting from +0, then "+ bias[n]" if there is a bias. All paths (register tiles for
// small M, dequantized panel + micro-kernel for large M, any thread count, any row tile, AVX2 or
// AVX-512) keep that order, so row i of an M-row call is bit-identical to the same row alone, and
// both ISA builds give the same bits. The cost: no split accumulators along k (the latency of the
// fma chain is hidden by tiles of several panels x rows instead), no per-block factoring of the
// scale (one more fma per 16 decoded weights than a "scale the partial sum" kernel).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define GGUF_INLINE inline __attribute__((always_inline))

namespace llmopt_gguf {

// ------------------------------------------------------------------------------------------
// 16-lane vectors
// ------------------------------------------------------------------------------------------
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#if defined(__AVX512VNNI__) && defined(__AMX_INT8__) && defined(__AMX_TILE__)
constexpr const char* kIsa = "avx512_amx";  // the int8 mode's 16-row tiles on AMX (gguf_amx.h)
#elif defined(__AVX512VNNI__)
constexpr const char* kIsa = "avx512_vnni";
#else
constexpr const char* kIsa = "avx512";
#endif
struct V {
  using F = __m512;
  using I = __m512i;
  static GGUF_INLINE F zero() { return _mm512_setzero_ps(); }
  static GGUF_INLINE F set1(float v) { return _mm512_set1_ps(v); }
  static GGUF_INLINE F bcast(const float* p) { return _mm512_set1_ps(*p); }
  static GGUF_INLINE F load(const float* p) { return _mm512_loadu_ps(p); }
  static GGUF_INLINE void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static GGUF_INLINE I u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
  static GGUF_INLINE I s8(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
  static GGUF_INLINE F h16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static GGUF_INLINE I andi(I a, int m) { return _mm512_and_si512(a, _mm512_set1_epi32(m)); }
  static GGUF_INLINE I or_(I a, I b) { return _mm512_or_si512(a, b); }
  template <int S> static GGUF_INLINE I shl(I a) { return _mm512_slli_epi32(a, S); }
  template <int S> static GGUF_INLINE I shr(I a) { return _mm512_srli_epi32(a, S); }
  static GGUF_INLINE F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static GGUF_INLINE F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static GGUF_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static GGUF_INLINE F neg(F a) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(int(0x80000000u)))); }
  // --- int8 activations ---
  static GGUF_INLINE I izero() { return _mm512_setzero_si512(); }
  static GGUF_INLINE I ld(const uint8_t* p) { return _mm512_loadu_si512((const void*)p); }
  static GGUF_INLINE I srl(I a, int n) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(n)); }
  // codes (< 16) | (bits H S .. H S + H - 1 of each byte of h, moved to bits 4 ..)
  template <int H, int S> static GGUF_INLINE I or_hbits(I codes, I h) {
    if constexpr (H == 1) {
      const __mmask64 k = _mm512_test_epi8_mask(h, _mm512_set1_epi8((char)(1 << S)));
      return _mm512_mask_add_epi8(codes, k, codes, _mm512_set1_epi8(0x10));
    } else {
      constexpr int b = H * S;
      I t = h;
      if constexpr (b < 4) t = _mm512_slli_epi32(h, 4 - b);
      else if constexpr (b > 4) t = _mm512_srli_epi32(h, b - 4);
      return _mm512_ternarylogic_epi32(codes, t, _mm512_set1_epi8((char)(((1 << H) - 1) << 4)), 0xF8);  // a | (b & c)
    }
  }
  static GGUF_INLINE I iset1(int32_t v) { return _mm512_set1_epi32(v); }
  static GGUF_INLINE I isub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static GGUF_INLINE I srl16_4(I a) { return _mm512_srli_epi16(a, 4); }
  static GGUF_INLINE I and8(I a, int m) { return _mm512_and_si512(a, _mm512_set1_epi8((char)m)); }
  // 4 rows of 16 bytes at p (row i, column c = p[16 i + c]) -> lane c = bytes (r0[c], r1[c], r2[c], r3[c])
  static GGUF_INLINE I t4x16(const uint8_t* p) {
    const __m512i v = _mm512_loadu_si512((const void*)p);
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i sh = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    return _mm512_shuffle_epi8(_mm512_permutexvar_epi32(idx, v), sh);
  }
  // acc += per-lane dot of 4 unsigned codes (u, < 128) with 4 signed activations (x)
  static GGUF_INLINE I dot_u(I acc, I u, I x) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, u, x);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, x), _mm512_set1_epi16(1)));
#endif
  }
  // acc += per-lane dot of 4 signed codes (w, int8) with 4 signed activations (x, |x| <= 127);
  // VNNI: of (w + 128) with x; the caller subtracts 128 * sum(x) (kQ8Bias)
  static GGUF_INLINE I dot_s(I acc, I w, I x) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80)), x);
#else
    const __m512i xs = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(w), xs), _mm512_set1_epi16(1)));
#endif
  }
  static GGUF_INLINE F cvti(I a) { return _mm512_cvtepi32_ps(a); }
  static GGUF_INLINE void pin(I&) {}  // see the AVX2 struct's
  // --- int16 activations ---
  // bytes 2 SEL, 2 SEL + 1 of each 32-bit lane as two int16 (zero- or, SIGNED, sign-extended)
  template <int SEL, bool SIGNED> static GGUF_INLINE I pairs16(I a) {
    constexpr char z = (char)0x80, b0 = 2 * SEL, b1 = 2 * SEL + 1;
    if constexpr (SIGNED) {
      const __m512i c = _mm512_broadcast_i32x4(_mm_setr_epi8(z, b0, z, b1, z, b0 + 4, z, b1 + 4, z, b0 + 8, z, b1 + 8,
                                                             z, b0 + 12, z, b1 + 12));
      return _mm512_srai_epi16(_mm512_shuffle_epi8(a, c), 8);
    } else {
      const __m512i c = _mm512_broadcast_i32x4(_mm_setr_epi8(b0, z, b1, z, b0 + 4, z, b1 + 4, z, b0 + 8, z, b1 + 8, z,
                                                             b0 + 12, z, b1 + 12, z));
      return _mm512_shuffle_epi8(a, c);
    }
  }
  static GGUF_INLINE I isub16(I a, int v) { return _mm512_sub_epi16(a, _mm512_set1_epi16((short)v)); }
  // acc += per-lane dot of two int16 pairs (exact in int32 for the operands used here)
  static GGUF_INLINE I dot16(I acc, I w, I x) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, w, x);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
  }
};
#if defined(__AVX512VNNI__)
constexpr int32_t kQ8Bias = 128;
#else
constexpr int32_t kQ8Bias = 0;
#endif
#else
constexpr const char* kIsa = "avx2";
struct V {
  struct F { __m256 a, b; };
  struct I { __m256i a, b; };
  static GGUF_INLINE F zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static GGUF_INLINE F set1(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
  static GGUF_INLINE F bcast(const float* p) { const __m256 v = _mm256_broadcast_ss(p); return {v, v}; }
  static GGUF_INLINE F load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static GGUF_INLINE void store(float* p, F v) { _mm256_storeu_ps(p, v.a); _mm256_storeu_ps(p + 8, v.b); }
  static GGUF_INLINE I u8(const uint8_t* p) {
    return {_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)), _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)))};
  }
  static GGUF_INLINE I s8(const uint8_t* p) {
    return {_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)), _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)))};
  }
  static GGUF_INLINE F h16(const uint8_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 16)))};
  }
  static GGUF_INLINE I andi(I x, int m) { const __m256i v = _mm256_set1_epi32(m); return {_mm256_and_si256(x.a, v), _mm256_and_si256(x.b, v)}; }
  static GGUF_INLINE I or_(I x, I y) { return {_mm256_or_si256(x.a, y.a), _mm256_or_si256(x.b, y.b)}; }
  template <int S> static GGUF_INLINE I shl(I x) { return {_mm256_slli_epi32(x.a, S), _mm256_slli_epi32(x.b, S)}; }
  template <int S> static GGUF_INLINE I shr(I x) { return {_mm256_srli_epi32(x.a, S), _mm256_srli_epi32(x.b, S)}; }
  static GGUF_INLINE F cvt(I x) { return {_mm256_cvtepi32_ps(x.a), _mm256_cvtepi32_ps(x.b)}; }
  static GGUF_INLINE F fma(F x, F y, F z) { return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }
  static GGUF_INLINE F mul(F x, F y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
  static GGUF_INLINE F neg(F x) {
    const __m256 s = _mm256_castsi256_ps(_mm256_set1_epi32(int(0x80000000u)));
    return {_mm256_xor_ps(x.a, s), _mm256_xor_ps(x.b, s)};
  }
  // --- int8 activations ---
  static GGUF_INLINE I izero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
  static GGUF_INLINE I ld(const uint8_t* p) {
    return {_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)(p + 32))};
  }
  static GGUF_INLINE I srl(I x, int n) {
    const __m128i c = _mm_cvtsi32_si128(n);
    return {_mm256_srl_epi32(x.a, c), _mm256_srl_epi32(x.b, c)};
  }
  template <int H, int S> static GGUF_INLINE __m256i hbits_1(__m256i h) {
    constexpr int b = H * S;
    if constexpr (b < 4) h = _mm256_slli_epi32(h, 4 - b);
    else if constexpr (b > 4) h = _mm256_srli_epi32(h, b - 4);
    return _mm256_and_si256(h, _mm256_set1_epi8((char)(((1 << H) - 1) << 4)));
  }
  // codes (< 16) | (bits H S .. H S + H - 1 of each byte of h, moved to bits 4 ..)
  template <int H, int S> static GGUF_INLINE I or_hbits(I codes, I h) {
    return {_mm256_or_si256(codes.a, hbits_1<H, S>(h.a)), _mm256_or_si256(codes.b, hbits_1<H, S>(h.b))};
  }
  static GGUF_INLINE I iset1(int32_t v) { return {_mm256_set1_epi32(v), _mm256_set1_epi32(v)}; }
  static GGUF_INLINE I isub(I x, I y) { return {_mm256_sub_epi32(x.a, y.a), _mm256_sub_epi32(x.b, y.b)}; }
  static GGUF_INLINE I srl16_4(I x) { return {_mm256_srli_epi16(x.a, 4), _mm256_srli_epi16(x.b, 4)}; }
  static GGUF_INLINE I and8(I x, int m) { const __m256i v = _mm256_set1_epi8((char)m); return {_mm256_and_si256(x.a, v), _mm256_and_si256(x.b, v)}; }
  // 4 rows of 16 bytes at p (row i, column c = p[16 i + c]) -> lane c = bytes (r0[c], r1[c], r2[c], r3[c])
  static GGUF_INLINE I t4x16(const uint8_t* p) {
    const __m128i r0 = _mm_loadu_si128((const __m128i*)p), r1 = _mm_loadu_si128((const __m128i*)(p + 16));
    const __m128i r2 = _mm_loadu_si128((const __m128i*)(p + 32)), r3 = _mm_loadu_si128((const __m128i*)(p + 48));
    // [r0 c0-7, r1 c0-7 | r2 c0-7, r3 c0-7] and the same for c8-15
    const __m256i lo = _mm256_set_m128i(_mm_unpacklo_epi64(r2, r3), _mm_unpacklo_epi64(r0, r1));
    const __m256i hi = _mm256_set_m128i(_mm_unpackhi_epi64(r2, r3), _mm_unpackhi_epi64(r0, r1));
    const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256i sh = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return {_mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(lo, idx), sh),
            _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(hi, idx), sh)};
  }
  static GGUF_INLINE __m256i dot_u1(__m256i acc, __m256i u, __m256i x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
  }
  // acc += per-lane dot of 4 unsigned codes (u, < 128) with 4 signed activations (x)
  static GGUF_INLINE I dot_u(I acc, I u, I x) { return {dot_u1(acc.a, u.a, x.a), dot_u1(acc.b, u.b, x.b)}; }
  // acc += per-lane dot of 4 signed codes (w) with 4 signed activations (|x| <= 127): |w| * sign(x, w)
  static GGUF_INLINE I dot_s(I acc, I w, I x) {
    return {dot_u1(acc.a, _mm256_abs_epi8(w.a), _mm256_sign_epi8(x.a, w.a)),
            dot_u1(acc.b, _mm256_abs_epi8(w.b), _mm256_sign_epi8(x.b, w.b))};
  }
  static GGUF_INLINE F cvti(I x) { return cvt(x); }
  // An empty asm that "writes" an integer accumulator: GCC otherwise reassociates a chain of integer
  // adds (the dot products of a sub-block) into a tree, keeps every product live and spills them to the
  // stack (a 4-row int8 tile stored ~57 ymm per sub-block). Integer sums are exact: no bits change.
  static GGUF_INLINE void pin(I& x) { __asm__("" : "+x"(x.a), "+x"(x.b)); }
  // --- int16 activations (see the AVX-512 struct) ---
  template <int SEL, bool SIGNED> static GGUF_INLINE I pairs16(I v) {
    constexpr char z = (char)0x80, b0 = 2 * SEL, b1 = 2 * SEL + 1;
    if constexpr (SIGNED) {
      const __m256i c = _mm256_setr_epi8(z, b0, z, b1, z, b0 + 4, z, b1 + 4, z, b0 + 8, z, b1 + 8, z, b0 + 12, z, b1 + 12,
                                         z, b0, z, b1, z, b0 + 4, z, b1 + 4, z, b0 + 8, z, b1 + 8, z, b0 + 12, z, b1 + 12);
      return {_mm256_srai_epi16(_mm256_shuffle_epi8(v.a, c), 8), _mm256_srai_epi16(_mm256_shuffle_epi8(v.b, c), 8)};
    } else {
      const __m256i c = _mm256_setr_epi8(b0, z, b1, z, b0 + 4, z, b1 + 4, z, b0 + 8, z, b1 + 8, z, b0 + 12, z, b1 + 12, z,
                                         b0, z, b1, z, b0 + 4, z, b1 + 4, z, b0 + 8, z, b1 + 8, z, b0 + 12, z, b1 + 12, z);
      return {_mm256_shuffle_epi8(v.a, c), _mm256_shuffle_epi8(v.b, c)};
    }
  }
  static GGUF_INLINE I isub16(I x, int v) {
    const __m256i c = _mm256_set1_epi16((short)v);
    return {_mm256_sub_epi16(x.a, c), _mm256_sub_epi16(x.b, c)};
  }
  static GGUF_INLINE I dot16(I acc, I w, I x) {
    return {_mm256_add_epi32(acc.a, _mm256_madd_epi16(w.a, x.a)), _mm256_add_epi32(acc.b, _mm256_madd_epi16(w.b, x.b))};
  }
};
constexpr int32_t kQ8Bias = 0;
#endif
using F = V::F;
using I = V::I;
constexpr int LANES = 16;

template <int A, int B, class Fn>
GGUF_INLINE void static_for(Fn&& f) {
  if constexpr (A < B) {
    f(std::integral_constant<int, A>{});
    static_for<A + 1, B>(f);
  }
}

// ------------------------------------------------------------------------------------------
// type descriptors (mirrored by gguf_linear._TYPES in Python)
// ------------------------------------------------------------------------------------------
enum ScKind { SC_NONE = 0, SC_U8 = 1, SC_S8 = 2, SC_NIB = 3 };

template <int QB_, int S_, int L_, int H_, bool M2_, int SCK_, bool MN_, int OFF_, bool SIGNED_>
struct TypeDesc {
  static constexpr int QB = QB_, S = S_, NS = QB_ / S_, L = L_, H = H_, SCK = SCK_, OFF = OFF_;
  static_assert(QB_ % S_ == 0, "whole sub-blocks per block: sub-block j starts at k = j * S");
  static constexpr bool M2 = M2_, MN = MN_, SIGNED = SIGNED_;
  static constexpr int PER = 8 / L;                 // codes per byte of the LOW plane
  static constexpr int HPER = H ? 8 / H : 1;        // codes per byte of the HIGH plane
  static constexpr bool LM = L == 4;               // lane-major planes (see the header comment)
  static constexpr int G = LM ? 8 : PER > HPER ? PER : HPER; // k per decode group (one load of each plane)
  static constexpr bool HAS_B = M2 || MN || OFF != 0;
  static constexpr int OFF_M2 = 32;
  static constexpr int OFF_SC = 32 + (M2 ? 32 : 0);
  static constexpr int OFF_MN = OFF_SC + (SCK != SC_NONE ? NS * 16 : 0);
  static constexpr int OFF_LOW = OFF_MN + (MN ? NS * 16 : 0);
  static constexpr int OFF_HIGH = OFF_LOW + QB * 16 * L / 8;
  static constexpr int BB = OFF_HIGH + QB * 16 * H / 8;
  static_assert(S % G == 0, "a decode group must not straddle sub-blocks");
};

//                     QB   S  L  H  M2     SCK     MN     OFF SIGNED
using TQ4_0 = TypeDesc<32, 32, 4, 0, false, SC_NONE, false, 8, false>;
using TQ4_1 = TypeDesc<32, 32, 4, 0, true, SC_NONE, false, 0, false>;
using TQ5_0 = TypeDesc<32, 32, 4, 1, false, SC_NONE, false, 16, false>;
using TQ5_1 = TypeDesc<32, 32, 4, 1, true, SC_NONE, false, 0, false>;
using TQ8_0 = TypeDesc<32, 32, 8, 0, false, SC_NONE, false, 0, true>;
using TQ2_K = TypeDesc<256, 16, 2, 0, true, SC_NIB, false, 0, false>;
using TQ3_K = TypeDesc<256, 16, 2, 1, false, SC_S8, false, 4, false>;
using TQ4_K = TypeDesc<256, 32, 4, 0, true, SC_U8, true, 0, false>;
using TQ5_K = TypeDesc<256, 32, 4, 1, true, SC_U8, true, 0, false>;
using TQ6_K = TypeDesc<256, 16, 4, 2, false, SC_S8, false, 32, false>;

// ggml type ids (gguf.GGMLQuantizationType)
enum GgmlType : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

template <class Fn>
inline bool with_type(int64_t t, Fn&& f) {
  switch (t) {
    case Q4_0: f(TQ4_0{}); return true;
    case Q4_1: f(TQ4_1{}); return true;
    case Q5_0: f(TQ5_0{}); return true;
    case Q5_1: f(TQ5_1{}); return true;
    case Q8_0: f(TQ8_0{}); return true;
    case Q2_K: f(TQ2_K{}); return true;
    case Q3_K: f(TQ3_K{}); return true;
    case Q4_K: f(TQ4_K{}); return true;
    case Q5_K: f(TQ5_K{}); return true;
    case Q6_K: f(TQ6_K{}); return true;
    default: return false;
  }
}

// ------------------------------------------------------------------------------------------
// decoding
// ------------------------------------------------------------------------------------------

// A, B of sub-block s of a 16-column block (see the header comment)
template <class T>
GGUF_INLINE void params(const uint8_t* blk, int s, F& A, F& B) {
  const F d = V::h16(blk);
  if constexpr (T::SCK == SC_NONE) {
    A = d;
    if constexpr (T::M2) B = V::h16(blk + T::OFF_M2);
    else if constexpr (T::OFF != 0) B = V::mul(d, V::set1(-float(T::OFF)));
    else B = V::zero();
  } else {
    const uint8_t* sc = blk + T::OFF_SC + 16 * s;
    I si;
    if constexpr (T::SCK == SC_S8) si = V::s8(sc);
    else if constexpr (T::SCK == SC_NIB) si = V::andi(V::u8(sc), 15);
    else si = V::u8(sc);
    A = V::mul(d, V::cvt(si));
    if constexpr (T::MN) B = V::neg(V::mul(V::h16(blk + T::OFF_M2), V::cvt(V::u8(blk + T::OFF_MN + 16 * s))));
    else if constexpr (T::SCK == SC_NIB) B = V::neg(V::mul(V::h16(blk + T::OFF_M2), V::cvt(V::shr<4>(V::u8(sc)))));
    else if constexpr (T::OFF != 0) B = V::mul(A, V::set1(-float(T::OFF)));
    else B = V::zero();
  }
}

// weight vector (16 columns) at k = k0 + j of a block (k0: start of a decode group, multiple of
// T::G); lo / hi hold the plane vectors loaded at j % PER == 0 / j % HPER == 0
template <class T, int j>
GGUF_INLINE F weight(const uint8_t* blk, int k0, I& lo, I& hi, const F& A, const F& B) {
  I q;
  if constexpr (T::LM && T::H == 0) {  // lane c of lo = the column's 4 code bytes of k0 .. k0 + 7
    static_assert(T::G == 8);
    if constexpr (j == 0) lo = V::ld(blk + T::OFF_LOW + 8 * k0);
    constexpr int sh = 4 * j;  // byte j / 2, nibble j % 2
    if constexpr (sh == 28) q = V::template shr<28>(lo);
    else if constexpr (sh == 0) q = V::andi(lo, 15);
    else q = V::andi(V::template shr<sh>(lo), 15);
  } else if constexpr (T::LM) {
    // at j = 0: the column's 8 codes (k0 .. k0 + 7, k0 % 8 == 0) as bytes, lo = k0 + (0, 2, 4, 6),
    // hi = k0 + (1, 3, 5, 7), from the low plane's lane and the high lane of the 32 / H k holding
    // them, shifted so that bits H h .. H h + H - 1 of byte i are those of k0 + 2 i + h
    static_assert(T::G == 8);
    if constexpr (j == 0) {
      constexpr int KH = 32 / T::H;  // k per high lane
      const I t = V::ld(blk + T::OFF_LOW + 8 * k0);
      const I h = V::srl(V::ld(blk + T::OFF_HIGH + 64 * (k0 / KH)), 2 * T::H * ((k0 % KH) / 8));
      lo = V::template or_hbits<T::H, 0>(V::and8(t, 0x0F), h);
      hi = V::template or_hbits<T::H, 1>(V::and8(V::srl16_4(t), 0x0F), h);
    }
    const I& c = j % 2 ? hi : lo;
    constexpr int sh = 8 * (j / 2);
    if constexpr (sh == 24) q = V::template shr<24>(c);
    else if constexpr (sh == 0) q = V::andi(c, 0xFF);
    else q = V::andi(V::template shr<sh>(c), 0xFF);
  } else {
    if constexpr (j % T::PER == 0) {
      const uint8_t* p = blk + T::OFF_LOW + 16 * ((k0 + j) / T::PER);
      lo = T::SIGNED ? V::s8(p) : V::u8(p);
    }
    constexpr int sh = T::L * (j % T::PER);
    if constexpr (T::L == 8) q = lo;
    else if constexpr (sh + T::L == 8) q = V::template shr<sh>(lo);
    else if constexpr (sh == 0) q = V::andi(lo, (1 << T::L) - 1);
    else q = V::andi(V::template shr<sh>(lo), (1 << T::L) - 1);
  }
  if constexpr (T::H > 0 && !T::LM) {  // (lane-major: merged above)
    if constexpr (j % T::HPER == 0) hi = V::u8(blk + T::OFF_HIGH + 16 * ((k0 + j) / T::HPER));
    constexpr int hs = T::H * (j % T::HPER);  // position of this code's high bits in the byte
    I h = V::andi(hi, ((1 << T::H) - 1) << hs);
    if constexpr (T::L > hs) h = V::template shl<T::L - hs>(h);
    else if constexpr (T::L < hs) h = V::template shr<hs - T::L>(h);
    q = V::or_(q, h);
  }
  const F qf = V::cvt(q);
  if constexpr (T::HAS_B) return V::fma(qf, A, B);
  else return V::mul(qf, A);
}

// g_prefetch's value for prefetching one group ahead instead of a distance: while a tile walks block b
// of its NP panels, block b of the next NP panels (the tile after it: panels lie one after another)
// goes to L2/L3 (hint T2). With K = 576 a Q4_1 panel is 18 blocks (5.8 KB): streams that short end
// before the hardware prefetcher is up to speed, and this keeps the next group's streams in flight.
// Zen 4, Q4_1, int8 tiles, one row, 1 thread: 576 x 1536 weights 14.5 -> 20.5 GB/s, 1536 x 24576
// 20.5 -> 23.7 (2 threads 23.6 -> 29.4 and 33.3 -> 38.4); a distance of 1024 bytes: 12.5 / 16.9.
constexpr int64_t kPrefetchGroup = -1;

// software prefetch distance in the weight stream (bytes; 0: off; kPrefetchGroup: the next group of
// panels, above), per type and kernel family
// ([0]: the fp32-activation register tiles, [1]: the int8-activation tiles). The best distance
// depends on the CPU and the type's layout: on a Zen 4 core none at all streamed Q4_1 / Q8_0 / Q4_K
// 15-50% faster than 1024 bytes, while Q5_0 wanted 128 and an AVX2 build's Q4_1 1024. The
// defaults are overwritten at load by the per-CPU table llmopt.kernels.tune measures once. Without a
// table (a build the tuner has not measured, e.g. the AVX2 build forced by LLMOPT_CPU_PATH) the next
// group: the Zen 4 tuner chose it for every type and family of both builds but Q4_K fp32; an untuned
// AVX2 build's decode step on a Q4_K_M file (mostly Q5_0), 2 threads: 7.4 ms at 1024 bytes, 5.2 ms.
template <class T>
inline int64_t g_prefetch[2] = {kPrefetchGroup, kPrefetchGroup};

// block b of each of NP panels (of nblk blocks each), with the weight stream prefetched: pf > 0 bytes
// ahead in each panel, kPrefetchGroup block b of the next NP panels, else none
template <class T, int NP>
GGUF_INLINE void block_ptrs(const uint8_t* const* pan, int64_t b, int64_t nblk, int64_t pf, const uint8_t* (&blk)[NP]) {
  for (int p = 0; p < NP; ++p) {
    blk[p] = pan[p] + b * T::BB;
    if (pf > 0)
      for (int o = 0; o < T::BB; o += 64) _mm_prefetch((const char*)(blk[p] + o + pf), _MM_HINT_T0);
    else if (pf == kPrefetchGroup)
      for (int o = 0; o < T::BB; o += 64) _mm_prefetch((const char*)(blk[p] + NP * nblk * T::BB + o), _MM_HINT_T2);
  }
}

// ------------------------------------------------------------------------------------------
// register tiles: NP panels x R activation rows over all K, weights decoded in registers
//   acc[p][r] (16 columns of panel p, row r) = sum_k w[p][k] * x[r][k], one fma chain in k order
// ------------------------------------------------------------------------------------------
template <class T, int NP, int R>
GGUF_INLINE void tile_reg(const uint8_t* const* pan, const float* const* xr, int64_t nblk, float* out /*[NP][R][16]*/) {
  F acc[NP][R];
  for (int p = 0; p < NP; ++p)
    for (int r = 0; r < R; ++r) acc[p][r] = V::zero();
  const int64_t pf = g_prefetch<T>[0];
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* blk[NP];
    block_ptrs<T, NP>(pan, b, nblk, pf, blk);
    const float* xb[R];
    for (int r = 0; r < R; ++r) xb[r] = xr[r] + b * T::QB;
    for (int s = 0; s < T::NS; ++s) {
      F A[NP], B[NP];
      for (int p = 0; p < NP; ++p) params<T>(blk[p], s, A[p], B[p]);
      for (int g = s * T::S; g < (s + 1) * T::S; g += T::G) {
        I lo[NP], hi[NP];
        static_for<0, T::G>([&](auto jc) {
          constexpr int j = decltype(jc)::value;
          F xv[R];
          for (int r = 0; r < R; ++r) xv[r] = V::bcast(xb[r] + g + j);
          for (int p = 0; p < NP; ++p) {
            const F w = weight<T, j>(blk[p], g, lo[p], hi[p], A[p], B[p]);
            for (int r = 0; r < R; ++r) acc[p][r] = V::fma(w, xv[r], acc[p][r]);
          }
        });
      }
    }
  }
  for (int p = 0; p < NP; ++p)
    for (int r = 0; r < R; ++r) V::store(out + (p * R + r) * LANES, acc[p][r]);
}

// dequantize blocks [b0, b1) of one panel to buf[k - b0 * QB][16]
template <class T>
inline void dequant_panel(const uint8_t* pan, int64_t b0, int64_t b1, float* buf) {
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* blk = pan + b * T::BB;
    float* o = buf + (b - b0) * T::QB * LANES;
    for (int s = 0; s < T::NS; ++s) {
      F A, B;
      params<T>(blk, s, A, B);
      for (int g = s * T::S; g < (s + 1) * T::S; g += T::G) {
        I lo, hi;
        static_for<0, T::G>([&](auto jc) {
          constexpr int j = decltype(jc)::value;
          V::store(o + (g + j) * LANES, weight<T, j>(blk, g, lo, hi, A, B));
        });
      }
    }
  }
}

// fp32 micro-kernel on dequantized panels: R rows x PP panels, k in [0, kn) of the chunk; xp: the
// tile's rows packed k-major (xp[k * R + r] = x[row r][k0 + k]: one sequential stream, one pointer);
// acc continues from yt (first == false) so the chain over k is unbroken across chunks; kn > 0 (a
// chunk holds at least one block). The k loop is a do-while: with a for loop (a path that skips it)
// GCC 12 kept the AVX2 build's 6 x 1 tile (12 ymm accumulators) in registers but also stored every
// one of them to the stack on every k step: 0.74x of the unpacked tile's speed, 1.02-1.09x without
// the stores (geomean, M = 128-1024; the AVX-512 loops compile the same either way).
template <int R, int PP>
GGUF_INLINE void tile_buf(const float* const* buf, const float* xp, int64_t kn, float* yt, int64_t ldy, bool first) {
  F acc[R][PP];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < PP; ++p) acc[r][p] = first ? V::zero() : V::load(yt + r * ldy + p * LANES);
  const float* b[PP];
  for (int p = 0; p < PP; ++p) b[p] = buf[p];
  int64_t k = 0;
  do {
    F w[PP];
    for (int p = 0; p < PP; ++p) w[p] = V::load(b[p] + k * LANES);
    for (int r = 0; r < R; ++r) {
      const F xv = V::bcast(xp + k * R + r);
      for (int p = 0; p < PP; ++p) acc[r][p] = V::fma(w[p], xv, acc[r][p]);
    }
  } while (++k < kn);
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < PP; ++p) V::store(yt + r * ldy + p * LANES, acc[r][p]);
}

// ------------------------------------------------------------------------------------------
// int8 activations (the separate "int8" mode; decode): x quantized per row and per 32 k like
// llama.cpp's Q8_0 (dx = amax / 127, xq = round-half-even(x / dx)), integer dot products per
// sub-block (32 k; Q6_K: 16 k), then per sub-block and column, in k order:
//   acc = fma(float(isum - OFF * xs), A * dx, acc);  acc = fma(Bm, dx * xs, acc)  (types with mins)
// isum = sum q * xq, xs = sum xq over the sub-block (exact integers; dx of the 32 k holding it).
// Types: 32-wide sub-blocks of 4- or 8-bit codes (Q4_0, Q4_1, Q4_K, Q8_0), of 5-bit codes = low
// nibble + high-bit plane (Q5_0, Q5_1, Q5_K), and Q6_K (16-wide sub-blocks of 6-bit codes = low
// nibble + 2-bit plane, int8 scales, OFF 32). The high bits are merged into the nibbles as bit 4
// (5-bit) or bits 4-5 (6-bit) before the byte dot products (codes < 64: no pair sum saturates
// maddubs' int16). Per-row order fixed: batch-invariant, like the fp32 path; the integer sums are
// exact, so every ISA build gives the same bits too.
// Activation layout (per row): xq [K] int8, for 4-bit low planes each group of 8 k permuted to
// (0, 2, 4, 6, 1, 3, 5, 7) (the low / high nibbles of 4 consecutive code bytes), dx / xs [K / 32].
// ------------------------------------------------------------------------------------------
template <class T>
constexpr bool kA8 = (T::S == 32 && T::H == 0 && (T::L == 4 || T::L == 8)) ||  // Q4_0, Q4_1, Q4_K, Q8_0
                     (T::S == 32 && T::L == 4 && T::H == 1) ||                  // Q5_0, Q5_1, Q5_K
                     (T::S == 16 && T::L == 4 && T::H == 2 && T::SCK == SC_S8 && !T::M2);  // Q6_K

// A and the mins term Bm (0 if none) of sub-block s, for the int8 mode
template <class T>
GGUF_INLINE void params_a8(const uint8_t* blk, int s, F& A, F& Bm) {
  const F d = V::h16(blk);
  if constexpr (T::SCK == SC_NONE) {
    A = d;
    Bm = T::M2 ? V::h16(blk + T::OFF_M2) : V::zero();
  } else if constexpr (T::SCK == SC_S8) {
    A = V::mul(d, V::cvt(V::s8(blk + T::OFF_SC + 16 * s)));
    Bm = V::zero();
  } else {
    A = V::mul(d, V::cvt(V::u8(blk + T::OFF_SC + 16 * s)));
    Bm = V::neg(V::mul(V::h16(blk + T::OFF_M2), V::cvt(V::u8(blk + T::OFF_MN + 16 * s))));
  }
}

// sum of 16 int8 at p
GGUF_INLINE int32_t sum16(const int8_t* p) {
  const __m128i v = _mm_xor_si128(_mm_loadu_si128((const __m128i*)p), _mm_set1_epi8((char)0x80));
  const __m128i s = _mm_sad_epu8(v, _mm_setzero_si128());  // two sums of 8 (x + 128)
  return _mm_cvtsi128_si32(s) + _mm_extract_epi16(s, 4) - 16 * 128;
}

// One projection call: y[m, n] (row stride ldy) = sum_k x[m, k] w[n, k] (+ bias[n]), x [M, K]
// contiguous, w the packed layout of P = ceil(N / 16) panels of nblk blocks.
struct Job {
  const float* x;
  const uint8_t* w;
  const float* bias;
  float* y;
  int64_t M, N, K, P, nblk, ldy;
};

// int8 activations of one row (see tile_a8): xq [K], dx / xs [K / 32]
struct A8Row {
  const int8_t* xq;
  const float* dx;
  const int32_t* xs;
};

// The int8 mode's weight operands, as tile_a8's dot products take them and gguf_amx.h's B tiles
// store them (one lane = 4 code bytes of one column):
// a lane-major type's high lanes of sub-block s (32 / H k = T::S: one 32-bit lane per column)
template <class T>
GGUF_INLINE I a8_high(const uint8_t* blk, int s) {
  static_assert(T::LM && T::H > 0 && T::S == 32 / T::H);
  return V::ld(blk + T::OFF_HIGH + 64 * s);
}

// a lane-major type's codes of k = 8 gg .. 8 gg + 7 of sub-block s (gg < S / 8): lane c of lo = the
// column's codes of k = 0, 2, 4, 6 of the group, of hi k = 1, 3, 5, 7 (the activations' per-8
// permutation), with the high bits of hv (a8_high; unread if T::H == 0) merged: bits H (2 gg + h) ..
// of byte i of hv are the high bits of k = 8 gg + 2 i + h
template <class T, int gg>
GGUF_INLINE void a8_codes4(const uint8_t* blk, int s, const I& hv, I& lo, I& hi) {
  static_assert(T::LM);
  const I t = V::ld(blk + T::OFF_LOW + 8 * (s * T::S + 8 * gg));  // lane c: the column's 4 code bytes
  lo = V::and8(t, 0x0F);
  hi = V::and8(V::srl16_4(t), 0x0F);
  if constexpr (T::H > 0) {
    lo = V::template or_hbits<T::H, 2 * gg>(lo, hv);
    hi = V::template or_hbits<T::H, 2 * gg + 1>(hi, hv);
  }
}

// Q8_0's codes of k = g .. g + 3 of sub-block s (g % 4 == 0): lane c = the column's 4 int8 codes
template <class T>
GGUF_INLINE I a8_codes8(const uint8_t* blk, int s, int g) {
  static_assert(T::L == 8 && T::S == 32);
  return V::t4x16(blk + T::OFF_LOW + 16 * (s * 32 + g));
}

// sum of 16 int16 at p
GGUF_INLINE int32_t sum16(const int16_t* p) {
  int32_t s = 0;
  for (int i = 0; i < 16; ++i) s += p[i];
  return s;
}

// sum of one row's activations (A8Row or A16Row) over the sub-block at k0 (16-wide sub-blocks: the first
// or second half of the 32 of xs; the halves' sums do not depend on the per-8 permutation)
template <class T, class Row>
GGUF_INLINE int32_t a8_xs(const Row& row, int64_t k0) {
  const int64_t sb = k0 / 32;
  if constexpr (T::S == 16) {
    const int32_t first = sum16(row.xq + sb * 32);
    return (k0 % 32 == 0) ? first : row.xs[sb] - first;
  } else {
    return row.xs[sb];
  }
}

// The int8 / int16 modes' fold of one sub-block's integer sums `it` of one row and 16 columns (sub-block
// at 32-wide activation block sb; xs its activations' sum, off the type's code offset) into acc, in k order
template <class T, int32_t off, class Row>
GGUF_INLINE F a8_fold(F acc, I it, const F& A, const F& Bm, const Row& row, int64_t sb, int32_t xs) {
  const float dx = row.dx[sb];
  if constexpr (off != 0) it = V::isub(it, V::iset1(off * xs));
  acc = V::fma(V::cvti(it), V::mul(A, V::set1(dx)), acc);
  if constexpr (T::M2) acc = V::fma(Bm, V::set1(dx * float(xs)), acc);
  return acc;
}

template <class T, int NP, int R>
GGUF_INLINE void tile_a8(const uint8_t* const* pan, const A8Row* rows, int64_t nblk, float* out) {
  static_assert(kA8<T>, "no int8-activation kernel for this type");
  constexpr int32_t off = T::L == 8 ? kQ8Bias : T::OFF;
  F acc[NP][R];
  for (int p = 0; p < NP; ++p)
    for (int r = 0; r < R; ++r) acc[p][r] = V::zero();
  const int64_t pf = g_prefetch<T>[1];
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* blk[NP];
    block_ptrs<T, NP>(pan, b, nblk, pf, blk);
    for (int s = 0; s < T::NS; ++s) {
      const int64_t k0 = b * T::QB + s * T::S;  // first k of the sub-block
      const int64_t sb = k0 / 32;                // its 32-wide activation block
      I is[NP][R];
      for (int p = 0; p < NP; ++p)
        for (int r = 0; r < R; ++r) is[p][r] = V::izero();
      if constexpr (T::L == 4) {
        static_assert(T::LM);
        I hv[NP];  // the sub-block's high lanes
        if constexpr (T::H > 0)
          for (int p = 0; p < NP; ++p) hv[p] = a8_high<T>(blk[p], s);
        static_for<0, T::S / 8>([&](auto gc) {  // 8 k = 4 code bytes per column
          constexpr int gg = decltype(gc)::value;
          const int kb = s * T::S + 8 * gg;  // k in the block
          I lo[NP], hi[NP];
          for (int p = 0; p < NP; ++p) a8_codes4<T, gg>(blk[p], s, hv[p], lo[p], hi[p]);
          for (int r = 0; r < R; ++r) {
            const int8_t* xg = rows[r].xq + b * T::QB + kb;
            int32_t x0, x1;
            std::memcpy(&x0, xg, 4);
            std::memcpy(&x1, xg + 4, 4);
            const I xv0 = V::iset1(x0), xv1 = V::iset1(x1);
            for (int p = 0; p < NP; ++p) {
              is[p][r] = V::dot_u(V::dot_u(is[p][r], lo[p], xv0), hi[p], xv1);
              if constexpr (T::H == 0) V::pin(is[p][r]);  // (measured: the 5-bit types ran 0.9x with it at 1-2 rows)
            }
          }
        });
      } else {
        for (int g = 0; g < 32; g += 4) {  // 4 k = 4 code bytes per column
          I w[NP];
          for (int p = 0; p < NP; ++p) w[p] = a8_codes8<T>(blk[p], s, g);
          for (int r = 0; r < R; ++r) {
            int32_t x0;
            std::memcpy(&x0, rows[r].xq + sb * 32 + g, 4);
            const I xv = V::iset1(x0);
            for (int p = 0; p < NP; ++p) {
              is[p][r] = V::dot_s(is[p][r], w[p], xv);
              V::pin(is[p][r]);
            }
          }
        }
      }
      int32_t xs[R];  // sum of the sub-block's activations
      for (int r = 0; r < R; ++r) xs[r] = a8_xs<T>(rows[r], k0);
      for (int p = 0; p < NP; ++p) {
        F A, Bm;
        params_a8<T>(blk[p], s, A, Bm);
        for (int r = 0; r < R; ++r) acc[p][r] = a8_fold<T, off>(acc[p][r], is[p][r], A, Bm, rows[r], sb, xs[r]);
      }
    }
  }
  for (int p = 0; p < NP; ++p)
    for (int r = 0; r < R; ++r) V::store(out + (p * R + r) * LANES, acc[p][r]);
}

// ------------------------------------------------------------------------------------------
// int16 activations (the "int16" mode; prompt rows): x quantized per row and per 32 k to int16
// (dx = amax / 32767, xq = round-half-even(x / dx): relative error <= 2^-16 of the 32 k's largest
// |x|), the int8 mode's code operands (a8_codes4 / a8_codes8) widened to int16 pairs, one integer
// dot product per sub-block (pmaddwd / vpdpwssd: two multiply-adds per 32-bit lane, exact in int32:
// |code| <= 127, |xq| <= 32767, 32 k), then the int8 mode's fold per sub-block and column in k order.
// Activation layout per row as the int8 mode's (4-bit low planes: groups of 8 permuted to
// (0, 2, 4, 6, 1, 3, 5, 7)), int16. Integer sums exact, fold order fixed: batch-invariant, and the
// same bits on every ISA build (tests pin both).
// ------------------------------------------------------------------------------------------
struct A16Row {
  const int16_t* xq;
  const float* dx;
  const int32_t* xs;
};

GGUF_INLINE I bcast_pair(const int16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return V::iset1(v);
}

template <class T, int NP, int R>
GGUF_INLINE void tile_a16(const uint8_t* const* pan, const A16Row* rows, int64_t nblk, float* out) {
  static_assert(kA8<T>, "no int16-activation kernel for this type");
  constexpr int32_t off = T::L == 8 ? 0 : T::OFF;  // signed x signed products: Q8_0 needs no bias
  F acc[NP][R];
  for (int p = 0; p < NP; ++p)
    for (int r = 0; r < R; ++r) acc[p][r] = V::zero();
  const int64_t pf = g_prefetch<T>[1];
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* blk[NP];
    block_ptrs<T, NP>(pan, b, nblk, pf, blk);
    for (int s = 0; s < T::NS; ++s) {
      const int64_t k0 = b * T::QB + s * T::S;
      const int64_t sb = k0 / 32;
      I is[NP][R];
      for (int p = 0; p < NP; ++p)
        for (int r = 0; r < R; ++r) is[p][r] = V::izero();
      if constexpr (T::L == 4) {
        I hv[NP];
        if constexpr (T::H > 0)
          for (int p = 0; p < NP; ++p) hv[p] = a8_high<T>(blk[p], s);
        static_for<0, T::S / 8>([&](auto gc) {
          constexpr int gg = decltype(gc)::value;
          const int kb = s * T::S + 8 * gg;
          I w[NP][4];  // codes of k (0, 2), (4, 6), (1, 3), (5, 7) of the group: the activations' order
          for (int p = 0; p < NP; ++p) {
            I lo, hi;
            a8_codes4<T, gg>(blk[p], s, hv[p], lo, hi);
            w[p][0] = V::template pairs16<0, false>(lo);
            w[p][1] = V::template pairs16<1, false>(lo);
            w[p][2] = V::template pairs16<0, false>(hi);
            w[p][3] = V::template pairs16<1, false>(hi);
          }
          for (int r = 0; r < R; ++r) {
            const int16_t* xg = rows[r].xq + b * T::QB + kb;
            const I x0 = bcast_pair(xg), x1 = bcast_pair(xg + 2), x2 = bcast_pair(xg + 4), x3 = bcast_pair(xg + 6);
            for (int p = 0; p < NP; ++p) {
              is[p][r] = V::dot16(V::dot16(V::dot16(V::dot16(is[p][r], w[p][0], x0), w[p][1], x1), w[p][2], x2),
                                  w[p][3], x3);
              V::pin(is[p][r]);
            }
          }
        });
      } else {
        for (int g = 0; g < 32; g += 4) {  // 4 k = 4 signed code bytes per column
          I w0[NP], w1[NP];
          for (int p = 0; p < NP; ++p) {
            const I c = a8_codes8<T>(blk[p], s, g);
            w0[p] = V::template pairs16<0, true>(c);
            w1[p] = V::template pairs16<1, true>(c);
          }
          for (int r = 0; r < R; ++r) {
            const int16_t* xg = rows[r].xq + sb * 32 + g;
            const I x0 = bcast_pair(xg), x1 = bcast_pair(xg + 2);
            for (int p = 0; p < NP; ++p) {
              is[p][r] = V::dot16(V::dot16(is[p][r], w0[p], x0), w1[p], x1);
              V::pin(is[p][r]);
            }
          }
        }
      }
      int32_t xs[R];
      for (int r = 0; r < R; ++r) xs[r] = a8_xs<T>(rows[r], k0);
      for (int p = 0; p < NP; ++p) {
        F A, Bm;
        params_a8<T>(blk[p], s, A, Bm);
        for (int r = 0; r < R; ++r) acc[p][r] = a8_fold<T, off>(acc[p][r], is[p][r], A, Bm, rows[r], sb, xs[r]);
      }
    }
  }
  for (int p = 0; p < NP; ++p)
    for (int r = 0; r < R; ++r) V::store(out + (p * R + r) * LANES, acc[p][r]);
}

// The int16 mode for many rows: one panel's code operands decoded once (a16_decode_panel: per 8 k the four
// int16-pair vectors tile_a16 builds, minus the type's code offset, w[j] pairing with the activations'
// stored pairs 2 j, 2 j + 1, then
// per sub-block A and Bm) and read by every row tile (tile_a16_buf). Same integer sums, same fold: the
// register tiles' bits.
template <class T>
constexpr int64_t kA16SubVecs = T::S / 8 * 4 + 2;  // vectors per sub-block in the decoded panel

template <class T>
inline void a16_decode_panel(const uint8_t* pan, int64_t nblk, I* out) {
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* blk = pan + b * T::BB;
    for (int s = 0; s < T::NS; ++s) {
      I* o = out + (b * T::NS + s) * kA16SubVecs<T>;
      if constexpr (T::L == 4) {
        I hv{};
        if constexpr (T::H > 0) hv = a8_high<T>(blk, s);
        static_for<0, T::S / 8>([&](auto gc) {
          constexpr int gg = decltype(gc)::value;
          I lo, hi;
          a8_codes4<T, gg>(blk, s, hv, lo, hi);
          o[4 * gg + 0] = V::template pairs16<0, false>(lo);
          o[4 * gg + 1] = V::template pairs16<1, false>(lo);
          o[4 * gg + 2] = V::template pairs16<0, false>(hi);
          o[4 * gg + 3] = V::template pairs16<1, false>(hi);
          if constexpr (T::OFF != 0)  // codes minus the offset: the dot products then need no correction
            for (int j = 0; j < 4; ++j) o[4 * gg + j] = V::isub16(o[4 * gg + j], T::OFF);
        });
      } else {
        for (int g = 0; g < 32; g += 4) {
          const I c = a8_codes8<T>(blk, s, g);
          o[g / 2 + 0] = V::template pairs16<0, true>(c);
          o[g / 2 + 1] = V::template pairs16<1, true>(c);
        }
      }
      F A, Bm;
      params_a8<T>(blk, s, A, Bm);
      std::memcpy(&o[T::S / 8 * 4], &A, sizeof(F));
      std::memcpy(&o[T::S / 8 * 4 + 1], &Bm, sizeof(F));
    }
  }
}

template <class T, int R>
GGUF_INLINE void tile_a16_buf(const I* dec, const A16Row* rows, int64_t nblk, float* out) {
  // the decoded codes carry the offset already: sum (q - OFF) x = sum q x - OFF sum x, the same integer
  constexpr int32_t off = 0;
  F acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V::zero();
  for (int64_t b = 0; b < nblk; ++b) {
    for (int s = 0; s < T::NS; ++s) {
      const int64_t k0 = b * T::QB + s * T::S;
      const int64_t sb = k0 / 32;
      const I* o = dec + (b * T::NS + s) * kA16SubVecs<T>;
      I is[R];
      for (int r = 0; r < R; ++r) is[r] = V::izero();
      static_for<0, T::S / 8>([&](auto gc) {
        constexpr int gg = decltype(gc)::value;
        const I w0 = o[4 * gg], w1 = o[4 * gg + 1], w2 = o[4 * gg + 2], w3 = o[4 * gg + 3];
        for (int r = 0; r < R; ++r) {
          const int16_t* xg = rows[r].xq + k0 + 8 * gg;
          is[r] = V::dot16(V::dot16(V::dot16(V::dot16(is[r], w0, bcast_pair(xg)), w1, bcast_pair(xg + 2)), w2,
                                    bcast_pair(xg + 4)), w3, bcast_pair(xg + 6));
        }
      });
      F A, Bm;
      std::memcpy(&A, &o[T::S / 8 * 4], sizeof(F));
      std::memcpy(&Bm, &o[T::S / 8 * 4 + 1], sizeof(F));
      for (int r = 0; r < R; ++r) acc[r] = a8_fold<T, off>(acc[r], is[r], A, Bm, rows[r], sb, a8_xs<T>(rows[r], k0));
    }
  }
  for (int r = 0; r < R; ++r) V::store(out + r * LANES, acc[r]);
}

#if !defined(__AVX512F__)
// tile_a16_buf for AVX2, where a 16-lane vector is two of only 16 ymm registers: tile_a16_buf's
// fp32 accumulators, integer sums and four code vectors need 4 R + 8 ymm, so it ran 2-row tiles (0.7-0.8x
// the fp32 chain's speed). Here the fp32 accumulators wait in `out` (L1) between sub-blocks and the codes
// are read one vector pair (2 k, 16 columns) at a time: 2 R + 3 ymm, 6-row tiles. The same integer sums
// (exact, any order) and the same fold per sub-block in k order: tile_a16_buf's bits.
template <class T, int R>
GGUF_INLINE void tile_a16_buf_ymm(const I* dec, const A16Row* rows, int64_t nblk, float* out) {
  constexpr int NV = T::S / 2;  // code vectors (2 k each) per sub-block
  for (int r = 0; r < R; ++r) V::store(out + r * LANES, V::zero());
  for (int64_t b = 0; b < nblk; ++b) {
    for (int s = 0; s < T::NS; ++s) {
      const int64_t k0 = b * T::QB + s * T::S;
      const I* o = dec + (b * T::NS + s) * kA16SubVecs<T>;
      I is[R];
      for (int r = 0; r < R; ++r) is[r] = V::izero();
      static_for<0, NV>([&](auto vc) {
        constexpr int v = decltype(vc)::value;
        const I w = o[v];
        for (int r = 0; r < R; ++r) {
          is[r] = V::dot16(is[r], w, bcast_pair(rows[r].xq + k0 + 2 * v));
          V::pin(is[r]);  // without it: all 2 R * NV products live and spilled, 1.6-1.8x slower than fp32
        }
      });
      F A, Bm;
      std::memcpy(&A, &o[NV], sizeof(F));
      std::memcpy(&Bm, &o[NV + 1], sizeof(F));
      const int64_t sbk = k0 / 32;
      for (int r = 0; r < R; ++r) {
        const F acc = a8_fold<T, 0>(V::load(out + r * LANES), is[r], A, Bm, rows[r], sbk, a8_xs<T>(rows[r], k0));
        V::store(out + r * LANES, acc);
      }
    }
  }
}
#endif

// ------------------------------------------------------------------------------------------
// The kernel table: the panel-level entry points of one ISA build (gguf_linear.cpp exports its
// table as a capsule, gguf.kernel_table()), for a caller that runs its own threads: the fused
// decode step (decode.cpp) calls exactly the compiled kernels the standalone gemm / gemm_a8 run,
// so every projection gives the same bits in both, and takes the ISA build chosen at load.
// ------------------------------------------------------------------------------------------

constexpr int32_t kTableAbi = 1;  // bump on any change to Job, A8Row or KernelTable
constexpr const char* kTableName = "llmopt_gguf.KernelTable";

struct KernelTable {
  int32_t abi;   // kTableAbi of the build
  int32_t size;  // sizeof(KernelTable) of the build
  const char* isa;
  // bytes of one 16-column block / weights per block of a ggml type; 0 if no kernel
  int64_t (*block_bytes)(int64_t type);
  int64_t (*block_size)(int64_t type);
  // int8-activation kind of a type: -1 none, 0 codes in k order (8-bit), 1 groups of 8 permuted (4-bit low plane)
  int (*a8_kind)(int64_t type);
  // panels [p0, p1) of J, every row, fp32 activations: register tiles if J.M <= small_m, else the
  // dequantized-panel micro-kernel (gguf.gemm's two paths)
  void (*gemm_panels)(const Job* J, int64_t type, int64_t p0, int64_t p1, int64_t small_m);
  // one row quantized for the int8 mode (perm8: a8_kind 1)
  void (*quant_row_a8)(const float* x, int64_t K, bool perm8, int8_t* xq, float* dx, int32_t* xs);
  // panels [p0, p1) of J with int8 activations rows[0 .. J.M) (gguf.gemm_a8)
  void (*gemm_a8_panels)(const Job* J, int64_t type, const A8Row* rows, int64_t p0, int64_t p1);
};

}  // namespace llmopt_gguf
