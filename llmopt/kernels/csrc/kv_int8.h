// The int8 KV cache's row kernels, shared by the standalone int8 paged attention (kv_int8.cpp) and
// the one-call decode step (decode.cpp), so that both write the same cache bytes and read them
// back with the same sums: the fused step equals the op-by-op forward bit for bit.
//
// Layout (llmopt/kernels/kv_quant.py): K, V int8 [num_blocks, block_size, Hk, D]; scales float32
// [num_blocks, block_size, Hk]; x ~= q * scale, symmetric, scale = max|x| / 127 per (token, kv head).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

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

// An int8 paged cache seen by one (sequence, kv head): token t's K row is k + row * D and its scale
// ks[row], row = (bt[t / BS] * BS + t % BS) * Hk (k, v, ks, vs already offset to the kv head).
struct PagedKV8 {
  const int8_t* k;
  const int8_t* v;
  const float* ks;
  const float* vs;
  const int32_t* bt;  // this sequence's block table
  int64_t BS, Hk;
};

// Online-softmax attention of the G query heads qs [G, D] (already multiplied by the softmax scale)
// over tokens [t0, t1) of an int8 cache: llmopt_f::attend_tiles (the float attend_range's tile loop)
// with each tile's K and V rows dequantized once into kf / vf [kTile, D] (L1-sized, shared by the G
// heads). Scratch: sc [G * kTile], kf / vf [kTile * D], krow / vrow [kTile] pointing at kf / vf's
// rows (set by the caller once).
inline void attend_range(const float* qs, int64_t G, int64_t D, const PagedKV8& kv, int64_t t0, int64_t t1,
                         float* m, float* l, float* acc, float* sc, float* kf, float* vf, const float* const* krow,
                         const float* const* vrow) {
  llmopt_f::attend_tiles(qs, G, D, t0, t1, m, l, acc, sc, krow, vrow, [&](int64_t i, int64_t t) {
    const int64_t row = (static_cast<int64_t>(kv.bt[t / kv.BS]) * kv.BS + t % kv.BS) * kv.Hk;
    dequant_row(kf + i * D, kv.k + row * D, kv.ks[row], D);
    dequant_row(vf + i * D, kv.v + row * D, kv.vs[row], D);
  });
}

// attend_range for R rows of one sequence (llmopt_f::attend_tiles_rows): each tile's K and V rows
// are dequantized once for all of them. kv.bt: a block table valid up to t1[R-1]. Scratch as
// attend_range, with sc [R * G * kTile].
inline void attend_range_rows(const float* qs, int64_t R, int64_t G, int64_t D, const PagedKV8& kv, int64_t t0,
                              const int64_t* t1, float* m, float* l, float* acc, float* sc, float* kf, float* vf,
                              const float* const* krow, const float* const* vrow) {
  llmopt_f::attend_tiles_rows(qs, R, G, D, t0, t1, m, l, acc, sc, krow, vrow, [&](int64_t i, int64_t t) {
    const int64_t row = (static_cast<int64_t>(kv.bt[t / kv.BS]) * kv.BS + t % kv.BS) * kv.Hk;
    dequant_row(kf + i * D, kv.k + row * D, kv.ks[row], D);
    dequant_row(vf + i * D, kv.v + row * D, kv.vs[row], D);
  });
}

}  // namespace llmopt_kv8
