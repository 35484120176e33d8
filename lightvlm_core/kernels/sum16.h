// sum16: the lane sums of 16 AVX-512 vectors as one vector, shared by the kernels of
// cpu_kernels.py (decode_attention.cpp's scores, row_linear.cpp's tiles).
#pragma once
#include <immintrin.h>

namespace {

// lane i = the sum of v[i]'s 16 lanes, for i = 0..15: 15 adds and 30 shuffles for all 16 sums, where
// 16 separate reductions take ~8 dependent steps each (at 256-wide rows and 2-4 rows of x these
// reductions cost about as much as the multiply-adds: summing them together measured 13-20% faster)
inline __m512 sum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // u[i]'s 128-bit lane l holds lane l's partial sums of v[4i .. 4i+3]: add the four lanes
  const __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
  const __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x88), _mm512_shuffle_f32x4(x0, x1, 0xDD));
}

}  // namespace
