// The portable instruction set: one "vector" is one float (the compiler may vectorise the
// loops), and the reference contracts of the layout steps every instruction set implements.
#include "kernel_common.h"
#include "kernel_body.h"

namespace leancnn {
namespace {

struct Generic {
  using Vec = float;
  static constexpr int kWidth = 1;
  static constexpr int kMaxQ = 1;
  static constexpr int kAccumulators = kMaxChunk * kPixelVector;
  static constexpr int kRegisters = 1 << 20;  // plain floats: the compiler's business
  static Vec zero() { return 0.0f; }
  static Vec load(const float* p) { return *p; }
  static Vec loadu(const float* p) { return *p; }
  static Vec broadcast(const float* p) { return *p; }
  static Vec fma(Vec a, Vec b, Vec c) { return a * b + c; }
  static void store(float* p, Vec v) { *p = v; }

  // dst[c][l] = lane l's channel c (zero for a null lane): 16 pixels into pixel vectors.
  static void lanes_to_vectors(const float* const* src, int64_t channels, float* dst) {
    for (int64_t c = 0; c < channels; ++c)
      for (int l = 0; l < kPixelVector; ++l) dst[c * kPixelVector + l] = src[l] ? src[l][c] : 0.0f;
  }

  // One padded row of plane dx = 1 (`centre`: w16 pixel vectors of `channels`, `vector_floats`
  // apart) shifted by one pixel into planes dx = 0 (`left`: x - 1) and dx = 2 (`right`: x + 1,
  // unless null), zeros coming in at the ends.
  static void shift_row(const float* centre, float* left, float* right, int64_t w16, int64_t channels, int64_t vector_floats) {
    const int64_t last = w16 * kPixelVector - 1;
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t x = 0; x <= last; ++x) {
        const int64_t at = (x / kPixelVector) * vector_floats + c * kPixelVector + x % kPixelVector;
        const int64_t before = ((x - 1) / kPixelVector) * vector_floats + c * kPixelVector + (x - 1) % kPixelVector;
        const int64_t after = ((x + 1) / kPixelVector) * vector_floats + c * kPixelVector + (x + 1) % kPixelVector;
        left[at] = x == 0 ? 0.0f : centre[before];
        if (right) right[at] = x == last ? 0.0f : centre[after];
      }
  }

  // dst[c][l] = source lane shift + l (lanes 0-15 of `low`, then of `high`; a null vector is zeros)
  // where bit l of `valid` is set, else 0: a plane derived from the centre one.
  static void shifted_vectors(const float* low, const float* high, int shift, uint32_t valid, int64_t channels, float* dst) {
    for (int64_t c = 0; c < channels; ++c)
      for (int l = 0; l < kPixelVector; ++l) {
        const int from = shift + l;
        const float* vector = from < kPixelVector ? low : high;
        dst[c * kPixelVector + l] =
            (valid >> l & 1u) && vector ? vector[c * kPixelVector + from % kPixelVector] : 0.0f;
      }
  }

  // Filters f0.. f0 + count - 1 (stage rows `rows`, from float `at`) on `pixels` pixels to the
  // output from pixel `out_pixel` on, with bias, residual and ReLU.
  static void finish_block(const Problem& p, const float* const* rows, int count, int64_t at, int64_t out_pixel, int pixels,
                    int64_t f0) {
    for (int l = 0; l < pixels; ++l) {
      const int64_t o = (out_pixel + l) * p.out_channels + f0;
      for (int j = 0; j < count; ++j) {
        float value = rows[j][at + l] + p.bias[f0 + j];
        if (p.residual) value += p.residual[o + j];
        p.output[o + j] = p.relu && value < 0.0f ? 0.0f : value;
      }
    }
  }
};

}  // namespace

Steps generic_steps() { return body::steps<Generic>(); }

}  // namespace leancnn
