// AVX2 + FMA: 8-float vectors, two per pixel vector. Compiled for that target (the pragma below,
// after the shared header, so nothing shared is built for it); run only where the CPU has it.
#include "kernel_common.h"
#ifdef LEANCNN_X86

#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "kernel_body.h"

namespace leancnn {
namespace {

struct Avx2 {
  using Vec = __m256;
  static constexpr int kWidth = 8;
  // Accumulators in 12 of the 16 registers: 6 filters x 1 pixel vector (2 x 8 floats), or one
  // filter (irregular sparsity) x 4 pixel vectors.
  static constexpr int kMaxQ = 4;
  static constexpr int kAccumulators = 12;
  static constexpr int kRegisters = 16;
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec loadu(const float* p) { return _mm256_loadu_ps(p); }
  static Vec broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }

  // r[i] = row i in, r[j] = column j out (8 x 8 floats).
  static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
      u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int m = 0; m < 4; ++m) {  // u[m]: rows 0-3 at columns m and 4 + m (128-bit halves); u[4 + m]: rows 4-7
      r[m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x20);
      r[4 + m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x31);
    }
  }

  // Lanes 0 .. count - 1 set (count <= 8), for maskload / maskstore.
  static inline __m256i first_lanes(int64_t count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(count, 8))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }

  static void lanes_to_vectors(const float* const* src, int64_t channels, float* dst) {
    __m256 r[8];
    for (int64_t c0 = 0; c0 < channels; c0 += 8) {
      const int64_t count = std::min<int64_t>(8, channels - c0);
      const __m256i mask = first_lanes(count);
      for (int half = 0; half < 2; ++half) {  // pixels 0-7, then 8-15
        for (int l = 0; l < 8; ++l) {
          const float* lane = src[half * 8 + l];
          // Masked loads only for a last partial block: they are slow on AMD cores.
          r[l] = !lane ? _mm256_setzero_ps() : count == 8 ? _mm256_loadu_ps(lane + c0) : _mm256_maskload_ps(lane + c0, mask);
        }
        transpose8(r);
        for (int64_t j = 0; j < count; ++j) _mm256_store_ps(dst + (c0 + j) * 16 + half * 8, r[j]);
      }
    }
  }

  // As Generic::shift_row. Within a pixel vector the shift is an unaligned load one float off; the
  // lane that crosses into the neighbouring vector is blended in. The load one float before (or
  // after) a vector stays inside the plane buffer (the previous plane's slack, the next channel or
  // the vector's padding channel) and its stray lane is always replaced.
  static void shift_row(const float* centre, float* left, float* right, int64_t w16, int64_t channels, int64_t vector_floats) {
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t u = 0; u < w16; ++u)
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t at = u * vector_floats + c * 16;
        const float* here = centre + at;
        const __m256 before = u > 0 ? _mm256_broadcast_ss(here - vector_floats + 15) : zero;
        _mm256_store_ps(left + at, _mm256_blend_ps(_mm256_loadu_ps(here - 1), before, 0x01));  // before[15], here[0..6]
        _mm256_store_ps(left + at + 8, _mm256_loadu_ps(here + 7));                             // here[7..14]
        if (!right) continue;
        const __m256 after = u + 1 < w16 ? _mm256_broadcast_ss(here + vector_floats) : zero;
        _mm256_store_ps(right + at, _mm256_loadu_ps(here + 1));                                // here[1..8]
        _mm256_store_ps(right + at + 8, _mm256_blend_ps(_mm256_loadu_ps(here + 9), after, 0x80));  // here[9..15], after[0]
      }
  }

  // As Generic::shifted_vectors: each 8-lane half of the result is two lane permutes of adjacent
  // source halves, blended, then the lanes outside the map zeroed.
  static void shifted_vectors(const float* low, const float* high, int shift, uint32_t valid, int64_t channels, float* dst) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i index[2];
    __m256 from_next[2], inside[2];
    int first[2];
    for (int h = 0; h < 2; ++h) {
      const int start = shift + 8 * h;  // source lane of result lane 8 h, in [0, 23]
      first[h] = start / 8;
      index[h] = _mm256_and_si256(_mm256_add_epi32(lane, _mm256_set1_epi32(start)), _mm256_set1_epi32(7));
      from_next[h] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32(start % 8)),
                                                            _mm256_set1_epi32(7)));
      const __m256i bits = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(valid >> (8 * h))), bit);
      inside[h] = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, bit));
    }
    for (int64_t c = 0; c < channels; ++c) {
      const __m256 zero = _mm256_setzero_ps();
      const __m256 source[4] = {low ? _mm256_load_ps(low + c * 16) : zero, low ? _mm256_load_ps(low + c * 16 + 8) : zero,
                                high ? _mm256_load_ps(high + c * 16) : zero, high ? _mm256_load_ps(high + c * 16 + 8) : zero};
      for (int h = 0; h < 2; ++h) {
        const __m256 a = _mm256_permutevar8x32_ps(source[first[h]], index[h]);
        const __m256 b = _mm256_permutevar8x32_ps(source[first[h] + 1], index[h]);
        _mm256_store_ps(dst + c * 16 + 8 * h, _mm256_and_ps(_mm256_blendv_ps(a, b, from_next[h]), inside[h]));
      }
    }
  }

  static void finish_block(const Problem& p, const float* const* rows, int count, int64_t at, int64_t out_pixel, int pixels,
                    int64_t f0) {
    __m256 r[8];
    for (int fh = 0; fh * 8 < count; ++fh) {  // filters f0 + 8 fh .. + 7
      const int filters = std::min(8, count - fh * 8);
      const __m256i mask = first_lanes(filters);
      const bool whole = filters == 8;  // masked stores cost ~10x a plain store on AMD cores: only for a tail
      const __m256 bias = whole ? _mm256_loadu_ps(p.bias + f0 + fh * 8) : _mm256_maskload_ps(p.bias + f0 + fh * 8, mask);
      for (int ph = 0; ph * 8 < pixels; ++ph) {  // pixels 8 ph .. + 7
        for (int j = 0; j < 8; ++j) r[j] = j < filters ? _mm256_loadu_ps(rows[fh * 8 + j] + at + ph * 8) : _mm256_setzero_ps();
        transpose8(r);  // r[l]: pixel 8 ph + l, those filters
        for (int l = 0; l < std::min(8, pixels - ph * 8); ++l) {
          const int64_t o = (out_pixel + ph * 8 + l) * p.out_channels + f0 + fh * 8;
          __m256 value = _mm256_add_ps(r[l], bias);
          if (p.residual)
            value = _mm256_add_ps(value, whole ? _mm256_loadu_ps(p.residual + o) : _mm256_maskload_ps(p.residual + o, mask));
          if (p.relu) value = _mm256_max_ps(value, _mm256_setzero_ps());
          if (whole) _mm256_storeu_ps(p.output + o, value);
          else _mm256_maskstore_ps(p.output + o, mask, value);
        }
      }
    }
  }
};

}  // namespace

Steps avx2_steps() { return body::steps<Avx2>(); }

}  // namespace leancnn
#pragma GCC pop_options
#endif
