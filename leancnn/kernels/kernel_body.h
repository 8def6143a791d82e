// The sparse kernel's loops, written once over an instruction set's traits V and instantiated
// by each instruction set's translation unit inside its target pragma (kernel_generic.cpp,
// kernel_avx2.cpp, kernel_avx512.cpp). V provides: Vec (the vector type), kWidth (floats per
// vector), zero(), load(p) (64-byte aligned), loadu(p), broadcast(p), fma(a, b, c) (a * b + c),
// store(p, v); kMaxQ (pixel vectors per tile at most), kAccumulators and kRegisters (vector
// registers for sums, and in all); and the layout steps lanes_to_vectors(), shift_row(),
// shifted_vectors() and finish_block() (their contracts: kernel_generic.cpp). Layout and plan:
// psconv_kernel.cpp.
#pragma once

#include "kernel_common.h"

namespace leancnn {
namespace body {

template <class V>
constexpr int PV = kPixelVector / V::kWidth;  // machine vectors per pixel vector
constexpr uint32_t kLeftTaps = 1u << 0 | 1u << 3 | 1u << 6;   // dx = 0
constexpr uint32_t kRightTaps = 1u << 2 | 1u << 5 | 1u << 8;  // dx = 2

// One chunk of R filters (one support) on one tile of Q pixel vectors: per listed
// (tap, channel) pair, Q pixel-vector loads, R weight broadcasts and R x Q FMAs;
// the R x Q accumulators stay in registers and end as R rows of `stage`.
template <class V, int R, int Q>
static void chunk_tile(bool first, const float* base, int64_t tile_step, const Segment* segments, int count,
                       float* stage) {
  constexpr int N = Q * PV<V>;
  typename V::Vec acc[R][N];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int k = 0; k < N; ++k) acc[r][k] = first ? V::zero() : V::loadu(stage + r * Q * kPixelVector + k * V::kWidth);
  for (int g = 0; g < count; ++g) {  // the sums stay in registers from segment to segment
    const int32_t* offsets = segments[g].offsets;
    const float* weight = segments[g].weight;
    for (int32_t e = 0, pairs = segments[g].pairs; e < pairs; ++e, weight += R) {
      const float* source = base + offsets[e];
      typename V::Vec x[N];
#pragma GCC unroll 4
      for (int q = 0; q < Q; ++q)
#pragma GCC unroll 16
        for (int v = 0; v < PV<V>; ++v) x[q * PV<V> + v] = V::load(source + q * tile_step + v * V::kWidth);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const typename V::Vec b = V::broadcast(weight + r);
#pragma GCC unroll 16
        for (int k = 0; k < N; ++k) acc[r][k] = V::fma(b, x[k], acc[r][k]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int k = 0; k < N; ++k) V::store(stage + r * Q * kPixelVector + k * V::kWidth, acc[r][k]);
}

// The most pixel vectors per tile (1, 2, 4 or 8, at most kMaxQ) whose accumulators for chunks of
// `filters` filters fit the registers: per-filter chunks (irregular sparsity) get wide tiles, so
// that each broadcast weight feeds enough independent FMA chains to hide the FMA latency.
template <class V>
static int tile_vectors(int filters) {
  // Registers a tile holds: its accumulators, its inputs when more than one filter reuses them (a
  // single filter takes each input as a memory operand), and the broadcast weight.
  const auto fits = [filters](int q) {
    return filters * q * PV<V> <= V::kAccumulators && filters * q * PV<V> + (filters > 1 ? q * PV<V> : 0) + 1 <= V::kRegisters;
  };
  int q = 1;
  while (q * 2 <= V::kMaxQ && fits(q * 2)) q *= 2;
  return q;
}

template <class V, int R, int Q>
static void chunk_tile_fitting(bool first, const float* base, int64_t tile_step, const Segment* segments, int count,
                               float* stage) {
  // Tiles too wide for R filters' accumulators are never chosen (tile_vectors): not instantiated.
  if constexpr (R * Q * PV<V> <= V::kAccumulators || Q == 1) chunk_tile<V, R, Q>(first, base, tile_step, segments, count, stage);
}

template <class V, int Q>
static void chunk_tile_r(int r, bool first, const float* base, int64_t tile_step, const Segment* segments,
                         int count, float* stage) {
  switch (r) {
    case 1: return chunk_tile_fitting<V, 1, Q>(first, base, tile_step, segments, count, stage);
    case 2: return chunk_tile_fitting<V, 2, Q>(first, base, tile_step, segments, count, stage);
    case 3: return chunk_tile_fitting<V, 3, Q>(first, base, tile_step, segments, count, stage);
    case 4: return chunk_tile_fitting<V, 4, Q>(first, base, tile_step, segments, count, stage);
    case 5: return chunk_tile_fitting<V, 5, Q>(first, base, tile_step, segments, count, stage);
    default: return chunk_tile_fitting<V, kMaxChunk, Q>(first, base, tile_step, segments, count, stage);
  }
}

// Chunks [k_begin, k_end) on one tile (Q pixel vectors from `base`): their stage rows.
template <class V>
static void compute_tile(const Problem& p, const float* base, int q, float* stage, int64_t k_begin, int64_t k_end) {
  const int64_t row = static_cast<int64_t>(q) * kPixelVector;  // stage floats per filter
  const int64_t blocks = p.blocks;
  Segment segments[kMaxBlocksPerPass];
  for (int64_t block = 0; block < blocks; block += p.blocks_per_pass) {  // a pass: a few channel blocks
    const int count = static_cast<int>(std::min(blocks, block + p.blocks_per_pass) - block);
    for (int64_t k = k_begin; k < k_end; ++k) {
      const int r = p.chunk_slot[k + 1] - p.chunk_slot[k];
      for (int g = 0; g < count; ++g) {  // the group's pairs, this chunk's weights for them
        const int64_t s = (block + g) * p.groups + p.chunk_group[k];
        segments[g] = {p.offsets + p.segment_pair[s], p.weights + p.segment_weight[(block + g) * p.chunks + k],
                       p.segment_pair[s + 1] - p.segment_pair[s]};
      }
      float* rows = stage + p.chunk_slot[k] * row;
      const bool first = block == 0;  // the first pass starts the sums
      if (q == 8 && V::kMaxQ >= 8) chunk_tile_r<V, (V::kMaxQ >= 8 ? 8 : 1)>(r, first, base, p.tile_step, segments, count, rows);
      else if (q == 4 && V::kMaxQ >= 4) chunk_tile_r<V, (V::kMaxQ >= 4 ? 4 : 1)>(r, first, base, p.tile_step, segments, count, rows);
      else if (q == 2 && V::kMaxQ >= 2) chunk_tile_r<V, (V::kMaxQ >= 2 ? 2 : 1)>(r, first, base, p.tile_step, segments, count, rows);
      else chunk_tile_r<V, 1>(r, first, base, p.tile_step, segments, count, rows);
    }
  }
}

// Output channels [f_begin, f_end) (multiples of 16, or the end) of a computed tile: its real
// pixels in channel order to the output, with bias, residual and ReLU.
template <class V>
static void finish_tile(const Problem& p, const float* stage, int q, const Tile& tile, int64_t f_begin,
                        int64_t f_end) {
  const int64_t row = static_cast<int64_t>(q) * kPixelVector;
  const float* filter_rows[kPixelVector];
  for (int64_t f0 = f_begin; f0 < f_end; f0 += kPixelVector) {
    const int count = static_cast<int>(std::min<int64_t>(kPixelVector, f_end - f0));
    for (int j = 0; j < count; ++j) filter_rows[j] = stage + p.position[f0 + j] * row;
    for (int64_t v = 0; v < q; ++v) {
      int64_t out_pixel = 0;
      const int pixels = vector_span(p, tile, v, &out_pixel);
      if (pixels > 0) V::finish_block(p, filter_rows, count, v * kPixelVector, out_pixel, pixels, f0);
    }
  }
}

// Build units [begin, end) of the planes for images [first_image, first_image + images): a unit
// is one padded row of one image (by_row) or one pixel vector (tap planes). Phase 0 rearranges the
// input; phase 1 (tap planes at stride 1, once phase 0 is done for the whole batch) derives the
// eight outer tap planes from the centre one: each is the centre shifted by
// (dy - 1) * W + (dx - 1) pixels, zero where the tap falls in the padding.
template <class V>
static void build_planes(const Problem& p, float* planes, int64_t first_image, int64_t images, int64_t begin,
                         int64_t end, int phase) {
  const float* lanes[kPixelVector];
  const int64_t c = p.in_channels, vector_floats = p.vector_stride, plane_floats = p.plane_stride;
  if (p.by_row) {
    if (phase == 1) return;
    const int64_t w16 = p.row_vectors, row_floats = w16 * vector_floats, step = p.stride;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t image = unit / (p.in_h + 2), y = unit % (p.in_h + 2) - 1;
      float* centre = planes + plane_floats + unit * row_floats;  // plane dx = 1
      if (y < 0 || y >= p.in_h) {  // a padding row, in all three planes
        for (int k = -1; k <= 1; ++k) std::fill(centre + k * plane_floats, centre + k * plane_floats + row_floats, 0.0f);
        continue;
      }
      const float* row = p.input + ((first_image + image) * p.in_h + y) * p.in_w * c;
      for (int64_t u = 0; u < w16; ++u) {  // lane l of vector u: input column step * (16 u + l) + dx - 1
        for (int l = 0; l < kPixelVector; ++l) {  // columns past the map (a row's padded last vector): zeros
          const int64_t x = step * (u * kPixelVector + l);
          lanes[l] = x < p.in_w ? row + x * c : nullptr;
        }
        V::lanes_to_vectors(lanes, c, centre + u * vector_floats);
        if (step == 2 && (p.used_taps & (kLeftTaps | kRightTaps))) {  // the odd columns: plane dx = 2 as is, and plane dx = 0 one lane later
          for (int l = 0; l < kPixelVector; ++l) lanes[l] = lanes[l] ? lanes[l] + c : nullptr;
          V::lanes_to_vectors(lanes, c, centre + plane_floats + u * vector_floats);
        }
      }
      // Side planes only where a pair reads them (a 1x1 layer as a centre-only 3x3 reads none).
      if (step == 1 && (p.used_taps & (kLeftTaps | kRightTaps)))
        V::shift_row(centre, centre - plane_floats, centre + plane_floats, w16, c, vector_floats);  // dx = 0, 2
      else if (step == 2 && (p.used_taps & kLeftTaps))
        V::shift_row(centre + plane_floats, centre - plane_floats, nullptr, w16, c, vector_floats);  // dx = 0
    }
    return;
  }
  const bool derive = p.stride == 1;  // only the centre tap is rearranged; phase 1 shifts it
  if (phase == 1 && !derive) return;
  const float* taps[9][kPixelVector];
  uint32_t valid[9];
  const int64_t image_pixels = p.out_h * p.out_w, vectors = build_units(p, images);
  for (int64_t v = begin; v < end; ++v) {
    std::fill(valid, valid + 9, 0u);
    for (int l = 0; l < kPixelVector; ++l) {  // each lane's window, once for the nine taps
      const int64_t index = v * kPixelVector + l, image = index / image_pixels, rest = index % image_pixels;
      const int64_t y0 = (rest / p.out_w) * p.stride - 1, x0 = (rest % p.out_w) * p.stride - 1;
      for (int k = 0; k < 9; ++k) {
        const int64_t y = y0 + k / 3, x = x0 + k % 3;
        const bool inside = image < images && y >= 0 && y < p.in_h && x >= 0 && x < p.in_w;
        taps[k][l] = inside ? p.input + (((first_image + image) * p.in_h + y) * p.in_w + x) * c : nullptr;
        valid[k] |= uint32_t(inside) << l;
      }
    }
    if (phase == 0) {
      for (int k = 0; k < 9; ++k)
        if ((!derive && (p.used_taps >> k & 1u)) || k == 4)
          V::lanes_to_vectors(taps[k], c, planes + k * plane_floats + v * vector_floats);
      continue;
    }
    const float* centre = planes + 4 * plane_floats;
    for (int k = 0; k < 9; ++k) {
      if (k == 4 || !(p.used_taps >> k & 1u)) continue;
      const int64_t from = v * kPixelVector + (k / 3 - 1) * p.in_w + (k % 3 - 1);  // first source lane
      const int64_t low = from >= 0 ? from / kPixelVector : -((-from + kPixelVector - 1) / kPixelVector);
      const int shift = static_cast<int>(from - low * kPixelVector);
      const float* low_vector = low >= 0 && low < vectors ? centre + low * vector_floats : nullptr;
      const float* high_vector = low + 1 >= 0 && low + 1 < vectors ? centre + (low + 1) * vector_floats : nullptr;
      V::shifted_vectors(low_vector, high_vector, shift, valid[k], c, planes + k * plane_floats + v * vector_floats);
    }
  }
}

// The instruction set's steps, for the dispatch in psconv_kernel.cpp.
template <class V>
Steps steps() {
  return Steps{build_planes<V>, compute_tile<V>, finish_tile<V>, tile_vectors<V>};
}

}  // namespace body
}  // namespace leancnn
