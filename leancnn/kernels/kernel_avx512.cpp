// AVX-512F: one 16-float vector per pixel vector. Compiled for that target (the pragma below,
// after the shared header); run only where the CPU has it.
#include "kernel_common.h"
#ifdef LEANCNN_X86

#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#include "kernel_body.h"

namespace leancnn {
namespace {

struct Avx512 {
  using Vec = __m512;
  static constexpr int kWidth = 16;
  // Accumulators in 24 of the 32 registers: 6 filters x 4 pixel vectors, or up to 2 filters x 8.
  static constexpr int kMaxQ = 8;
  static constexpr int kAccumulators = 24;
  static constexpr int kRegisters = 32;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_load_ps(p); }
  static Vec loadu(const float* p) { return _mm512_loadu_ps(p); }
  static Vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }

  // r[i] = row i in, r[j] = column j out.
  static inline void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
      u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
      u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    // u[4g + m], 128-bit lane L: rows 4g..4g+3 at column 4L + m.
    for (int m = 0; m < 4; ++m) {
      const __m512 a = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88), b = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xDD);
      const __m512 c = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88), d = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xDD);
      r[m] = _mm512_shuffle_f32x4(a, c, 0x88);
      r[8 + m] = _mm512_shuffle_f32x4(a, c, 0xDD);
      r[4 + m] = _mm512_shuffle_f32x4(b, d, 0x88);
      r[12 + m] = _mm512_shuffle_f32x4(b, d, 0xDD);
    }
  }

  static inline __mmask16 first_lanes(int64_t count) { return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1); }

  static void lanes_to_vectors(const float* const* src, int64_t channels, float* dst) {
    __m512 r[16];
    for (int64_t c0 = 0; c0 < channels; c0 += 16) {
      const int64_t count = std::min<int64_t>(16, channels - c0);
      const __mmask16 mask = first_lanes(count);
      for (int l = 0; l < 16; ++l) r[l] = src[l] ? _mm512_maskz_loadu_ps(mask, src[l] + c0) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t j = 0; j < count; ++j) _mm512_store_ps(dst + (c0 + j) * 16, r[j]);
    }
  }

  static void shift_row(const float* centre, float* left, float* right, int64_t w16, int64_t channels, int64_t vector_floats) {
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t u = 0; u < w16; ++u)
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t at = u * vector_floats + c * 16;
        const __m512i here = _mm512_castps_si512(_mm512_load_ps(centre + at));
        const __m512i before = u > 0 ? _mm512_castps_si512(_mm512_load_ps(centre + at - vector_floats)) : zero;
        const __m512i after = u + 1 < w16 ? _mm512_castps_si512(_mm512_load_ps(centre + at + vector_floats)) : zero;
        _mm512_store_ps(left + at, _mm512_castsi512_ps(_mm512_alignr_epi32(here, before, 15)));  // before[15], here[0..14]
        if (right) _mm512_store_ps(right + at, _mm512_castsi512_ps(_mm512_alignr_epi32(after, here, 1)));  // here[1..15], after[0]
      }
  }

  static void shifted_vectors(const float* low, const float* high, int shift, uint32_t valid, int64_t channels, float* dst) {
    const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(shift),
                                           _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __mmask16 mask = static_cast<__mmask16>(valid);
    for (int64_t c = 0; c < channels; ++c) {
      const __m512 a = low ? _mm512_load_ps(low + c * 16) : _mm512_setzero_ps();
      const __m512 b = high ? _mm512_load_ps(high + c * 16) : _mm512_setzero_ps();
      _mm512_store_ps(dst + c * 16, _mm512_maskz_permutex2var_ps(mask, a, index, b));
    }
  }

  static void finish_block(const Problem& p, const float* const* rows, int count, int64_t at, int64_t out_pixel, int pixels,
                    int64_t f0) {
    __m512 r[16];
    for (int j = 0; j < 16; ++j) r[j] = j < count ? _mm512_loadu_ps(rows[j] + at) : _mm512_setzero_ps();
    transpose16(r);  // r[l]: pixel l, filters f0..f0 + 15
    const __mmask16 mask = first_lanes(count);
    const __m512 bias = _mm512_maskz_loadu_ps(mask, p.bias + f0);
    for (int l = 0; l < pixels; ++l) {
      const int64_t o = (out_pixel + l) * p.out_channels + f0;
      __m512 value = _mm512_add_ps(r[l], bias);
      if (p.residual) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, p.residual + o));
      if (p.relu) value = _mm512_max_ps(value, _mm512_setzero_ps());
      _mm512_mask_storeu_ps(p.output + o, mask, value);
    }
  }
};

}  // namespace

Steps avx512_steps() { return body::steps<Avx512>(); }

}  // namespace leancnn
#pragma GCC pop_options
#endif
