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
constexpr const char* kIsa = "avx512";
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
};
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
};
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
  static constexpr bool M2 = M2_, MN = MN_, SIGNED = SIGNED_;
  static constexpr int PER = 8 / L;                 // codes per byte of the LOW plane
  static constexpr int HPER = H ? 8 / H : 1;        // codes per byte of the HIGH plane
  static constexpr int G = PER > HPER ? PER : HPER; // k per decode group (one load of each plane)
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
  if constexpr (j % T::PER == 0) {
    const uint8_t* p = blk + T::OFF_LOW + 16 * ((k0 + j) / T::PER);
    lo = T::SIGNED ? V::s8(p) : V::u8(p);
  }
  I q;
  constexpr int sh = T::L * (j % T::PER);
  if constexpr (T::L == 8) q = lo;
  else if constexpr (sh + T::L == 8) q = V::template shr<sh>(lo);
  else if constexpr (sh == 0) q = V::andi(lo, (1 << T::L) - 1);
  else q = V::andi(V::template shr<sh>(lo), (1 << T::L) - 1);
  if constexpr (T::H > 0) {
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

// software prefetch distance in the weight stream (bytes)
inline int64_t g_prefetch = 1024;

// ------------------------------------------------------------------------------------------
// register tiles: NP panels x R activation rows over all K, weights decoded in registers
//   acc[p][r] (16 columns of panel p, row r) = sum_k w[p][k] * x[r][k], one fma chain in k order
// ------------------------------------------------------------------------------------------
template <class T, int NP, int R>
GGUF_INLINE void tile_reg(const uint8_t* const* pan, const float* const* xr, int64_t nblk, float* out /*[NP][R][16]*/) {
  F acc[NP][R];
  for (int p = 0; p < NP; ++p)
    for (int r = 0; r < R; ++r) acc[p][r] = V::zero();
  const int64_t pf = g_prefetch;
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* blk[NP];
    for (int p = 0; p < NP; ++p) {
      blk[p] = pan[p] + b * T::BB;
      if (pf > 0)
        for (int o = 0; o < T::BB; o += 64) _mm_prefetch((const char*)(blk[p] + o + pf), _MM_HINT_T0);
    }
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

// fp32 micro-kernel on dequantized panels: R rows x PP panels, k in [0, kn) of the chunk;
// acc continues from yt (first == false) so the chain over k is unbroken across chunks
template <int R, int PP>
GGUF_INLINE void tile_buf(const float* const* buf, const float* const* xr, int64_t kn, float* yt, int64_t ldy, bool first) {
  F acc[R][PP];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < PP; ++p) acc[r][p] = first ? V::zero() : V::load(yt + r * ldy + p * LANES);
  for (int64_t k = 0; k < kn; ++k) {
    F w[PP];
    for (int p = 0; p < PP; ++p) w[p] = V::load(buf[p] + k * LANES);
    for (int r = 0; r < R; ++r) {
      const F xv = V::bcast(xr[r] + k);
      for (int p = 0; p < PP; ++p) acc[r][p] = V::fma(w[p], xv, acc[r][p]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < PP; ++p) V::store(yt + r * ldy + p * LANES, acc[r][p]);
}

}  // namespace llmopt_gguf
