// The int8 KV cache's row kernels, shared by the standalone int8 paged attention (kv_int8.cpp) and
// the one-call decode step (decode.cpp), so that both write the same cache bytes and read them
// back with the same sums: the fused step equals the op-by-op forward bit for bit.
//
// Layout (llmopt/kernels/kv_quant.py): K, V int8 [num_blocks, block_size, Hk, D]; scales float32
// [num_blocks, block_size, Hk]; x ~= q * scale, symmetric, scale = max|x| / 127 per (token, kv head).
// The fp8 cache has the same layout with e4m3fn codes (torch.float8_e4m3fn) in place of the int8
// ones: x ~= e4m3(q) * scale, scale = max|x| / 448 (448: e4m3fn's largest finite value).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fused_kernels.h"

namespace llmopt_kv8 {

using llmopt_f::kTile;

// q[0:D], *scale = the row x[0:D] quantized exactly as kv_quant.quantize_kv does it in torch:
// scale = max|x| / 127 (a true division: the extensions build with -ffast-math, whose reciprocal
// math would turn a division by a constant into a multiplication by its rounded reciprocal, so the
// divisor is hidden from the optimizer), inv = 1 / scale (0 when scale is 0),
// q = clamp(round_half_even(x * inv), -127, 127).
inline void quant_row(const float* x, int64_t D, int8_t* q, float* scale) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + d)));
  float amax = llmopt_f::hmax(vmax);
  for (; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
  float div = 127.0f;
  asm("" : "+x"(div));  // opaque: a real divss, not a multiply by 1/127
  const float s = amax / div;
  float one = 1.0f;
  asm("" : "+x"(one));
  const float inv = s > 0.0f ? one / s : 0.0f;
  *scale = s;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  d = 0;
  for (; d + 8 <= D; d += 8) {
    __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + d), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
    const __m256i i32 = _mm256_cvtps_epi32(r);
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + d), _mm_packs_epi16(i16, i16));
  }
  for (; d < D; ++d) {
    const float r = std::nearbyint(x[d] * inv);
    q[d] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
  }
}

// dst[d] = src[d] * s (src int8), AVX2 8 at a time with a scalar tail
inline void dequant_row(float* dst, const int8_t* src, float s, int64_t D) {
  const __m256 vs = _mm256_set1_ps(s);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    __m128i x8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + d));
    _mm256_storeu_ps(dst + d, _mm256_mul_ps(vs, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x8))));
  }
  for (; d < D; ++d) dst[d] = static_cast<float>(src[d]) * s;
}

// The e4m3fn byte of f (|f| <= 448, finite): c10's float -> Float8_e4m3fn conversion (round to nearest
// even; below 2^-6 through the float adder into the subnormal codes), so the native writes give the
// bytes torch's .to(torch.float8_e4m3fn) gives.
inline uint8_t e4m3_of(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  uint8_t r;
  if (bits >= (1087u << 20)) {  // >= 480: no finite code (callers clamp to 448 first)
    r = 0x7e;
  } else if (bits < (121u << 23)) {  // below 2^-6: a subnormal code, rounded by the float adder
    float t;
    std::memcpy(&t, &bits, 4);
    const uint32_t mask = 141u << 23;
    float fm;
    std::memcpy(&fm, &mask, 4);
    asm("" : "+x"(fm));  // opaque (as in quant_row): the add must run in float, as c10's does
    t = t + fm;
    uint32_t tb;
    std::memcpy(&tb, &t, 4);
    r = static_cast<uint8_t>(tb - mask);
  } else {
    const uint32_t odd = (bits >> 20) & 1u;
    bits += (static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFFu + odd;
    r = static_cast<uint8_t>(bits >> 20);
  }
  return static_cast<uint8_t>(r | (sign >> 24));
}

// q[0:D], *scale = the row x[0:D] as kv_quant.quantize_kv(x, torch.float8_e4m3fn) writes it:
// scale = max|x| / 448 (a true division, as quant_row), inv = 1 / scale (0 when scale is 0),
// q = e4m3(clamp(x * inv, -448, 448)).
inline void quant_row_fp8(const float* x, int64_t D, uint8_t* q, float* scale) {
  float amax = 0.0f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
  float div = 448.0f;
  asm("" : "+x"(div));
  const float s = amax / div;
  float one = 1.0f;
  asm("" : "+x"(one));
  const float inv = s > 0.0f ? one / s : 0.0f;
  *scale = s;
  for (int64_t d = 0; d < D; ++d) q[d] = e4m3_of(std::min(448.0f, std::max(-448.0f, x[d] * inv)));
}

// dst[d] = e4m3(src[d]) * s. Each code becomes the half-precision number with the same sign, exponent
// and mantissa bits (e4m3's exponent bias is 7, half's 15: the half is 2^-8 times the value, exactly,
// subnormal codes included), widened by F16C and multiplied by 256 * s. The half's bits: the code in
// the high byte of a 16-bit lane (code << 8), shifted right arithmetically by one (the sign lands in
// bits 15 and 14, exponent and mantissa in 13..7), bit 14 and the low bits cleared.
inline __m128i e4m3_halves(__m128i code_hi) {
  return _mm_and_si128(_mm_srai_epi16(code_hi, 1), _mm_set1_epi16(static_cast<int16_t>(0xBF80)));
}

inline void dequant_row_fp8(float* dst, const uint8_t* src, float s, int64_t D) {
  const __m256 vs = _mm256_set1_ps(256.0f * s);
  const __m128i zero = _mm_setzero_si128();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d));
    _mm256_storeu_ps(dst + d, _mm256_mul_ps(vs, _mm256_cvtph_ps(e4m3_halves(_mm_unpacklo_epi8(zero, b)))));
    _mm256_storeu_ps(dst + d + 8, _mm256_mul_ps(vs, _mm256_cvtph_ps(e4m3_halves(_mm_unpackhi_epi8(zero, b)))));
  }
  for (; d + 8 <= D; d += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + d));
    _mm256_storeu_ps(dst + d, _mm256_mul_ps(vs, _mm256_cvtph_ps(e4m3_halves(_mm_unpacklo_epi8(zero, b)))));
  }
  for (; d < D; ++d) {
    const uint16_t h = static_cast<uint16_t>(((src[d] & 0x80) << 8) | ((src[d] & 0x7F) << 7));
    dst[d] = _cvtsh_ss(h) * (256.0f * s);
  }
}

// An 8-bit paged cache (int8 or e4m3fn codes) seen by one (sequence, kv head): token t's K row is
// k + row * D and its scale ks[row], row = (bt[t / BS] * BS + t % BS) * Hk (k, v, ks, vs already
// offset to the kv head).
struct PagedKV8 {
  const int8_t* k;
  const int8_t* v;
  const float* ks;
  const float* vs;
  const int32_t* bt;  // this sequence's block table
  int64_t BS, Hk;
  bool fp8 = false;  // the bytes are e4m3fn codes (scale = max|x| / 448), else int8

  // token t's K and V rows, dequantized into kdst / vdst [D], for the format known at compile time
  // (FP8 == fp8; callers pick it once per call, not per row)
  template <bool FP8>
  void fetch_as(int64_t t, float* kdst, float* vdst, int64_t D) const;

  // the first n rows of block j (its index in bt), codes and scales, into the cache (as
  // fused_kernels.h PagedKV::prefetch_block)
  void prefetch_block(int64_t j, int64_t n, int64_t D) const {
    const int64_t row = static_cast<int64_t>(bt[j]) * BS * Hk;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t d = 0; d < D; d += 64) {
        llmopt_f::prefetch_line(k + (row + r * Hk) * D + d);
        llmopt_f::prefetch_line(v + (row + r * Hk) * D + d);
      }
    for (int64_t r = 0; r < n * Hk; r += 16) {
      llmopt_f::prefetch_line(ks + row + r);
      llmopt_f::prefetch_line(vs + row + r);
    }
  }
};

// The row x [D] into the cache bytes q / *scale in the cache's format (int8, or e4m3fn if fp8)
inline void quant_row_as(bool fp8, const float* x, int64_t D, int8_t* q, float* scale) {
  if (fp8)
    quant_row_fp8(x, D, reinterpret_cast<uint8_t*>(q), scale);
  else
    quant_row(x, D, q, scale);
}

// The cache bytes src [D] with scale s back to floats, in the cache's format
inline void dequant_row_as(bool fp8, float* dst, const int8_t* src, float s, int64_t D) {
  if (fp8)
    dequant_row_fp8(dst, reinterpret_cast<const uint8_t*>(src), s, D);
  else
    dequant_row(dst, src, s, D);
}

template <bool FP8>
inline void PagedKV8::fetch_as(int64_t t, float* kdst, float* vdst, int64_t D) const {
  const int64_t row = (static_cast<int64_t>(bt[t / BS]) * BS + t % BS) * Hk;
  dequant_row_as(FP8, kdst, k + row * D, ks[row], D);
  dequant_row_as(FP8, vdst, v + row * D, vs[row], D);
}

// Online-softmax attention of R rows of one sequence over an 8-bit cache (llmopt_f::attend_tiles_rows,
// the float attend_range_rows' tile loop) with each tile's K and V rows dequantized once into kf / vf
// [kTile, D] (L1-sized, shared by every row and head). kv.bt: a block table valid up to t1[R-1].
// Scratch: sc [R * G * kTile], kf / vf [kTile * D], krow / vrow [kTile] pointing at kf / vf's rows
// (set by the caller once).
inline void attend_range_rows(const float* qs, int64_t R, int64_t G, int64_t D, const PagedKV8& kv, int64_t t0,
                              const int64_t* t1, float* m, float* l, float* acc, float* sc, float* kf, float* vf,
                              const float* const* krow, const float* const* vrow) {
  // the format is picked once per call: a branch on it per fetched row (the tile loop's fill) made a
  // decode row 3-5% slower (16% on a 40-token context)
  const int64_t end = t1[R - 1];
  const auto walk = [&](auto fp8) {
    llmopt_f::attend_tiles_rows(qs, R, G, D, t0, t1, m, l, acc, sc, krow, vrow, [&](int64_t i, int64_t t) {
      llmopt_f::prefetch_next_block(kv, t / kv.BS, t % kv.BS, end, D);
      kv.fetch_as<decltype(fp8)::value>(t, kf + i * D, vf + i * D, D);
    });
  };
  if (kv.fp8)
    walk(std::true_type{});
  else
    walk(std::false_type{});
}

// attend_range_rows for one row over tokens [t0, t1) (qs [G, D], m / l [G], acc [G, D]).
inline void attend_range(const float* qs, int64_t G, int64_t D, const PagedKV8& kv, int64_t t0, int64_t t1,
                         float* m, float* l, float* acc, float* sc, float* kf, float* vf, const float* const* krow,
                         const float* const* vrow) {
  attend_range_rows(qs, 1, G, D, kv, t0, &t1, m, l, acc, sc, kf, vf, krow, vrow);
}

}  // namespace llmopt_kv8
