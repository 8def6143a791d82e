// Inference kernel for pre-defined (periodic) sparse 3x3 convolution (pSConv),
// fp32, channels_last input and output, padding 1, stride 1 or 2, optional fused
// bias, residual and ReLU.
//
// Plan: vectorise over output pixels, not filters. The filters of a layer are
// grouped by support (the taps each input channel uses; periodic pSConv gives P
// groups); a group lists the (tap, channel) pairs its filters use, and is cut into
// chunks of at most 6 filters with their weights per pair
// (leancnn/kernels/psconv.py: pack()). The input is rearranged once per call
// (per image batch, in cache) into "planes" of pixel vectors: 16 consecutive
// output pixels' values of one input channel for one tap, so that a pair is one
// offset and its 16 inputs one aligned load:
//   - maps whose output rows are whole pixel vectors (W a multiple of 16 at stride
//     1, of 32 at stride 2): 3 planes, one per column tap dx, over the zero-padded
//     input rows (a row tap dy is a shift of dy rows; at stride 2 a plane holds
//     every other input column, the even ones or the odd ones);
//   - otherwise: 9 planes, one per tap, at output resolution, across images (at
//     stride 1 only the centre one is rearranged; the other eight are lane
//     shifts of it, zero where the tap falls in the padding).
// Plane layout: [plane][vector][channel][16 floats]. A chunk of R filters on a tile
// of Q pixel vectors does, per pair, Q loads, R broadcasts and R x Q FMAs in
// registers (AVX-512: 6 x 4 = 24 accumulators); no lane is ever a filter that
// skips the tap, whatever the group sizes (PSD and PS1 groups hold 4-8 filters in
// 64-channel layers). Pairs come in segments of 16 input channels; a chunk runs
// through a few segments per pass (as many as keep the tile's inputs for them in
// L1) before its sums go back to the stage. The tile's results are transposed
// back to channels_last with bias, residual and ReLU. Why not vectorise over filters (the first
// version): there each broadcast input feeds one FMA per 16 filters, and an FMA
// with a broadcast memory operand ran at half the FMA rate on this project's
// AVX-512 machine (83 vs 155 GFLOP/s, measured); 4-filter groups also left 12 of
// 16 lanes empty.
//
// Instruction sets: AVX-512F, AVX2+FMA, and a plain loop, picked at run time
// (LEANCNN_PSCONV_ISA=avx512|avx2|generic forces one, for tests). Threads come
// from ATen's parallel_for, so torch.set_num_threads governs the kernel.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define LEANCNN_X86 1
#include <immintrin.h>
#endif

namespace {

constexpr int kPixelVector = 16;  // output pixels per plane vector
constexpr int kMaxChunk = 6;      // filters per chunk (pack() cuts groups to this)
constexpr int kChannelBlock = 16; // input channels per segment (pack()'s CHANNEL_BLOCK)
constexpr int kMaxBlocksPerPass = 64;  // channel blocks one pass may run through (1024 channels)

// A run of pairs of one chunk: its offsets, weights ([pairs][R]) and count.
struct Segment {
  const int32_t* offsets;
  const float* weight;
  int32_t pairs;
};

struct Problem {
  const float* input;          // [N, H, W, C_in] channels_last
  const float* weights;        // per chunk: [pairs][R]
  const int32_t* offsets;      // [pairs]: floats from a tile's first plane vector
  const int32_t* chunk_slot;   // [chunks + 1]: first stage row (slot) of each chunk
  const int32_t* chunk_group;  // [chunks]: the support group whose pairs the chunk uses
  const int32_t* segment_pair; // [blocks * groups + 1]: first pair of group g in channel block b (b * groups + g)
  const int64_t* segment_weight;  // [blocks * chunks]: first weight of chunk k in channel block b (b * chunks + k)
  const int32_t* position;     // [C_out]: slot of filter f
  const float* bias;           // [C_out]
  const float* residual;       // [N, OH, OW, C_out] added before the ReLU, or nullptr
  float* output;               // [N, OH, OW, C_out]
  int64_t images, in_h, in_w, in_channels, out_h, out_w, out_channels, chunks, groups, blocks, stride;
  int64_t blocks_per_pass;     // channel blocks a chunk runs through between reloads of its sums
  bool relu;
  bool by_row;                 // 3 planes over padded rows (W a multiple of 16 x stride), else 9 tap planes
  int64_t row_vectors;         // by_row: pixel vectors per padded row (output columns / 16)
  int64_t tile_step;           // floats between a tile's pixel vectors in the planes
  // Plane geometry in floats. Both strides are padded past a power of two: with C_in = 64 a
  // pixel vector would be 4 KB, and every load of a pair (Q vectors, 3 or 9 planes) would map
  // to one L1 set.
  int64_t planes, plane_vectors, vector_stride, plane_stride;
  uint32_t used_taps;          // bit t: some pair reads tap t (planes no pair reads are not built)
};

namespace scalar {
// dst[c][l] = lane l's channel c (zero for a null lane): 16 pixels into pixel vectors.
void lanes_to_vectors(const float* const* src, int64_t channels, float* dst) {
  for (int64_t c = 0; c < channels; ++c)
    for (int l = 0; l < kPixelVector; ++l) dst[c * kPixelVector + l] = src[l] ? src[l][c] : 0.0f;
}

// One padded row of plane dx = 1 (`centre`: w16 pixel vectors of `channels`, `vector_floats`
// apart) shifted by one pixel into planes dx = 0 (`left`: x - 1) and dx = 2 (`right`: x + 1,
// unless null), zeros coming in at the ends.
void shift_row(const float* centre, float* left, float* right, int64_t w16, int64_t channels, int64_t vector_floats) {
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
void shifted_vectors(const float* low, const float* high, int shift, uint32_t valid, int64_t channels, float* dst) {
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
void finish_block(const Problem& p, const float* const* rows, int count, int64_t at, int64_t out_pixel, int pixels,
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
}  // namespace scalar

struct Tile;

// The steps each instruction set implements (psconv_body.inc).
struct Steps {
  void (*build)(const Problem&, float* planes, int64_t first_image, int64_t images, int64_t begin, int64_t end,
                int phase);
  void (*compute)(const Problem&, const float* base, int q, float* stage, int64_t k_begin, int64_t k_end);
  void (*finish)(const Problem&, const float* stage, int q, const Tile& tile, int64_t f_begin, int64_t f_end);
  int (*tile_vectors)(int filters);  // pixel vectors per tile for chunks of up to `filters` filters
};

// Tile t (of q pixel vectors) of a batch of images whose planes are built: its first plane vector;
// with tap planes its first output pixel and how many of its pixels are real (they run on across
// rows and images); with row planes its image's first output pixel and its first vector in the image
// (output row oy, vector u is vector oy * row_vectors + u; a row's last vector may be partly padding).
struct Tile {
  const float* base;
  int64_t first_pixel, valid;
  int64_t image_pixel, first_vector;
};

int64_t tiles_in_batch(const Problem& p, int64_t images, int q) {
  const int64_t tile_pixels = int64_t(q) * kPixelVector, image_pixels = p.out_h * p.out_w;
  return p.by_row ? images * ((p.out_h * p.row_vectors + q - 1) / q)
                  : (images * image_pixels + tile_pixels - 1) / tile_pixels;
}

Tile tile_at(const Problem& p, const float* planes, int64_t first_image, int64_t images, int q, int64_t t) {
  const int64_t tile_pixels = int64_t(q) * kPixelVector, image_pixels = p.out_h * p.out_w;
  if (p.by_row) {  // tiles within each image; an image's plane rows start at its top padding row
    const int64_t per_image = (p.out_h * p.row_vectors + q - 1) / q;
    const int64_t image = t / per_image, first = (t % per_image) * q;
    // Output row oy reads padded rows from stride * oy on.
    const int64_t oy = first / p.row_vectors, u = first % p.row_vectors;
    const int64_t vector = (image * (p.in_h + 2) + p.stride * oy) * p.row_vectors + u;
    return {planes + vector * p.vector_stride, 0, 0, (first_image + image) * image_pixels, first};
  }
  const int64_t first = t * tile_pixels;  // one plane per tap: tiles run across images
  return {planes + (first / kPixelVector) * p.vector_stride, first_image * image_pixels + first,
          std::min(tile_pixels, images * image_pixels - first), 0, 0};
}

// Pixel vector v of a tile: its first output pixel and how many of its lanes are real pixels (0 for
// a vector past the tile's pixels or its image's last row).
inline int vector_span(const Problem& p, const Tile& tile, int64_t v, int64_t* out_pixel) {
  if (!p.by_row) {
    *out_pixel = tile.first_pixel + v * kPixelVector;
    return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kPixelVector, tile.valid - v * kPixelVector)));
  }
  const int64_t vector = tile.first_vector + v, oy = vector / p.row_vectors, u = vector % p.row_vectors;
  if (oy >= p.out_h) return 0;
  *out_pixel = tile.image_pixel + oy * p.out_w + u * kPixelVector;
  return static_cast<int>(std::min<int64_t>(kPixelVector, p.out_w - u * kPixelVector));
}

// Build units of a batch: padded rows (by_row) or pixel vectors; the vectors after them are slack
// that tiles may read past the batch's end (their results are dropped), kept zero.
int64_t build_units(const Problem& p, int64_t images) {
  return p.by_row ? images * (p.in_h + 2) : (images * p.out_h * p.out_w + kPixelVector - 1) / kPixelVector;
}

void zero_slack(const Problem& p, float* planes, int64_t images) {
  const int64_t used = p.by_row ? build_units(p, images) * p.row_vectors : build_units(p, images);
  for (int64_t k = 0; k < p.planes; ++k)
    std::fill(planes + k * p.plane_stride + used * p.vector_stride, planes + (k + 1) * p.plane_stride, 0.0f);
}

// A 64-byte aligned, uninitialised float buffer that keeps its memory for the next call.
struct Buffer {
  std::unique_ptr<float[]> memory;
  int64_t capacity = 0;
  float* get(int64_t floats) {
    if (floats + 16 > capacity) {
      memory.reset(new float[floats + 16]);  // not zero-filled: every float read is written first
      capacity = floats + 16;
    }
    const auto address = reinterpret_cast<uintptr_t>(memory.get());
    return memory.get() + ((64 - address % 64) % 64) / sizeof(float);
  }
};

// Sizes the planes for batches of `batch` images, computes the pair offsets, and runs: with
// enough batches, each thread builds its batch's planes in its own buffer (they stay in cache)
// and runs its tiles; with few images (batch 1), planes are built for all of them in parallel and
// then the tiles are split between threads.
// at::parallel_for, or the whole range in the calling thread when `serial`: a small layer at
// batch 1 can lose more to waking and joining threads (four times a call) than it gains.
template <typename F>
void parallel(bool serial, int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (serial) {
    if (begin < end) f(begin, end);
  } else {
    at::parallel_for(begin, end, grain, f);
  }
}

void run_problem(Problem p, const int32_t* channels, const int32_t* taps, int64_t pairs, int64_t pass_blocks,
                 bool serial, const Steps& steps) {
  const int64_t threads = serial ? 1 : at::get_num_threads();
  const int64_t image_pixels = p.out_h * p.out_w;
  const int64_t w16 = p.row_vectors;
  int widest_chunk = 1;
  for (int64_t k = 0; k < p.chunks; ++k) widest_chunk = std::max(widest_chunk, p.chunk_slot[k + 1] - p.chunk_slot[k]);
  const int max_q = steps.tile_vectors(widest_chunk);
  int64_t batch = p.by_row ? 1 : std::min<int64_t>(p.images, std::max<int64_t>(1, (4 * max_q * kPixelVector) / image_pixels));
  const bool per_batch = (p.images + batch - 1) / batch >= 2 * threads;
  if (!per_batch) batch = p.images;
  const int64_t batch_pixels = p.by_row ? image_pixels : batch * image_pixels;
  int q = max_q;  // pixel vectors per tile: no more than the pixels need
  while (q > 1 && (q / 2) * kPixelVector >= batch_pixels) q /= 2;
  // At stride 2 a tile's vectors must be a constant distance apart in the planes: one per output
  // row (each two padded rows on) when a row is one vector, else within one output row.
  if (p.by_row && p.stride == 2 && w16 > 1)
    while (q > 1 && w16 % q != 0) q /= 2;
  // Vectors per plane: the batch's own, then slack that a batch's last tile may read past its
  // end (q vectors; at stride 1 on padded rows also into the next image's rows, harmlessly).
  p.plane_vectors = p.by_row ? batch * (p.in_h + 2) * w16 + 2 * q : tiles_in_batch(p, batch, q) * q;
  p.vector_stride = (p.in_channels + 1) * kPixelVector;
  p.plane_stride = p.plane_vectors * p.vector_stride + 7 * kPixelVector;
  p.tile_step = p.by_row && p.stride == 2 && w16 == 1 ? 2 * p.vector_stride : p.vector_stride;
  const int64_t plane_floats = p.planes * p.plane_stride;
  TORCH_CHECK(plane_floats < (int64_t(1) << 31), "pSConv kernel: the input is too large for 32-bit offsets");
  int32_t tap_offset[9];  // where each tap's vectors start, from a tile's first vector
  for (int t = 0; t < 9; ++t)
    tap_offset[t] = static_cast<int32_t>(p.by_row ? (t % 3) * p.plane_stride + (t / 3) * w16 * p.vector_stride
                                                  : t * p.plane_stride);
  std::vector<int32_t> offsets(static_cast<size_t>(pairs));
  p.used_taps = 0;
  for (int64_t e = 0; e < pairs; ++e) {
    offsets[e] = tap_offset[taps[e]] + channels[e] * kPixelVector;
    p.used_taps |= 1u << taps[e];
  }
  p.offsets = offsets.data();
  std::vector<int64_t> segment_weight(static_cast<size_t>(p.blocks * p.chunks));
  for (int64_t b = 0, at = 0; b < p.blocks; ++b)
    for (int64_t k = 0; k < p.chunks; ++k) {
      segment_weight[b * p.chunks + k] = at;
      const int64_t s = b * p.groups + p.chunk_group[k];
      at += int64_t(p.segment_pair[s + 1] - p.segment_pair[s]) * (p.chunk_slot[k + 1] - p.chunk_slot[k]);
    }
  p.segment_weight = segment_weight.data();
  const int64_t blocks = p.blocks;
  // Channel blocks per pass: a tile's plane vectors for those channels (64 bytes each, for every
  // plane and row shift a tile reads) within 32 KB of L1, or more blocks where a chunk has few pairs
  // per block (1-tap supports), so that a pass holds ~128 pairs and reloading the sums stays cheap.
  const int64_t vectors_per_channel = !p.by_row ? 9 * q : p.stride == 1 ? 3 * (q + 2 * w16) : 3 * (2 * q + 1);
  const int64_t fit = std::max<int64_t>(1, (32 * 1024) / (kChannelBlock * vectors_per_channel * 64));
  const double pairs_per_block = blocks ? double(pairs) / double(p.groups * blocks) : 1.0;
  const int64_t enough = static_cast<int64_t>(std::ceil(128.0 / std::max(pairs_per_block, 1.0)));
  p.blocks_per_pass = std::max<int64_t>(1, std::min({blocks, std::max(fit, enough), int64_t(kMaxBlocksPerPass)}));
  if (pass_blocks > 0)  // chosen by a measured plan (leancnn.plans) instead of the rule above
    p.blocks_per_pass = std::min<int64_t>({blocks, pass_blocks, int64_t(kMaxBlocksPerPass)});
  const int64_t stage_floats = int64_t(p.chunk_slot[p.chunks]) * q * kPixelVector;
  const int64_t tiles = tiles_in_batch(p, batch, q);
  const auto run_tile = [&](const Tile& tile, float* stage) {  // every chunk, then the output
    steps.compute(p, tile.base, q, stage, 0, p.chunks);
    steps.finish(p, stage, q, tile, 0, p.out_channels);
  };
  if (per_batch) {
    const int64_t batches = (p.images + batch - 1) / batch;
    parallel(serial, 0, batches, 1, [&](int64_t begin, int64_t end) {
      static thread_local Buffer plane_buffer, stage_buffer;
      float* planes = plane_buffer.get(plane_floats);
      float* stage = stage_buffer.get(stage_floats);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t first = b * batch, images = std::min(batch, p.images - first);
        // Slack once per thread and call (the buffer may be new); a short last batch has more.
        if (b == begin || images < batch) zero_slack(p, planes, images);
        if (p.by_row) {
          // One image: its padded rows are built just before the first tile that reads them, so a
          // tile's planes are still in L2 when it runs (a whole 64-channel 32x32 image's three
          // planes are ~850 KB, past the L2 of the cores this runs on).
          const int64_t units = build_units(p, images), image_vectors = p.out_h * p.row_vectors;
          int64_t built = 0;
          for (int64_t t = 0; t < tiles_in_batch(p, images, q); ++t) {
            const int64_t last_vector = std::min(image_vectors, (t + 1) * q) - 1;
            const int64_t needed = std::min(units, p.stride * (last_vector / p.row_vectors) + 3);  // rows up to dy = 2
            if (needed > built) {
              steps.build(p, planes, first, images, built, needed, 0);
              built = needed;
            }
            run_tile(tile_at(p, planes, first, images, q, t), stage);
          }
          continue;
        }
        for (int phase = 0; phase < 2; ++phase) steps.build(p, planes, first, images, 0, build_units(p, images), phase);
        for (int64_t t = 0; t < tiles_in_batch(p, images, q); ++t) run_tile(tile_at(p, planes, first, images, q, t), stage);
      }
    });
    return;
  }
  Buffer plane_buffer;
  float* planes = plane_buffer.get(plane_floats);
  zero_slack(p, planes, p.images);
  for (int phase = 0; phase < 2; ++phase)  // phase 1 reads what all of phase 0 wrote
    parallel(serial, 0, build_units(p, p.images), 4, [&](int64_t begin, int64_t end) {
      steps.build(p, planes, 0, p.images, begin, end, phase);
    });
  if (tiles >= 2 * threads) {  // enough tiles to share
    parallel(serial, 0, tiles, 1, [&](int64_t begin, int64_t end) {
      static thread_local Buffer stage_buffer;
      float* stage = stage_buffer.get(stage_floats);
      for (int64_t t = begin; t < end; ++t) run_tile(tile_at(p, planes, 0, p.images, q, t), stage);
    });
    return;
  }
  // A few tiles (one small image): the threads share each tile's chunks, then its output channels.
  const int64_t parts = std::min<int64_t>(p.chunks, (4 * threads + tiles - 1) / tiles);
  const int64_t filter_blocks = (p.out_channels + kPixelVector - 1) / kPixelVector;
  Buffer stage_buffer;
  float* stages = stage_buffer.get(tiles * stage_floats);
  parallel(serial, 0, tiles * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / parts, part = item % parts;
      steps.compute(p, tile_at(p, planes, 0, p.images, q, t).base, q, stages + t * stage_floats,
                    part * p.chunks / parts, (part + 1) * p.chunks / parts);
    }
  });
  parallel(serial, 0, tiles * filter_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / filter_blocks, f0 = (item % filter_blocks) * kPixelVector;
      const Tile tile = tile_at(p, planes, 0, p.images, q, t);
      steps.finish(p, stages + t * stage_floats, q, tile, f0,
                   std::min(f0 + kPixelVector, p.out_channels));
    }
  });
}

namespace generic {
// Portable path: one "vector" is one float; the compiler may vectorise it.
constexpr int kMaxQ = 1;
constexpr int kAccumulators = kMaxChunk * kPixelVector;
constexpr int kRegisters = 1 << 20;  // plain floats: the compiler's business
using scalar::finish_block;
using scalar::lanes_to_vectors;
using scalar::shift_row;
using scalar::shifted_vectors;
#define VEC float
#define VW 1
#define VZERO() 0.0f
#define VLOAD(ptr) (*(ptr))
#define VLOADU(ptr) (*(ptr))
#define VBCAST(ptr) (*(ptr))
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VSTORE(ptr, v) (*(ptr) = (v))
#include "psconv_body.inc"  // and #undef of the macros at its end
}  // namespace generic

#ifdef LEANCNN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
// Accumulators in 12 of the 16 registers: 6 filters x 1 pixel vector (2 x 8 floats), or one
// filter (irregular sparsity) x 4 pixel vectors.
constexpr int kMaxQ = 4;
constexpr int kAccumulators = 12;
constexpr int kRegisters = 16;

// r[i] = row i in, r[j] = column j out (8 x 8 floats).
inline void transpose8(__m256 r[8]) {
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
inline __m256i first_lanes(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(count, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

void lanes_to_vectors(const float* const* src, int64_t channels, float* dst) {
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

// As scalar::shift_row. Within a pixel vector the shift is an unaligned load one float off; the
// lane that crosses into the neighbouring vector is blended in. The load one float before (or
// after) a vector stays inside the plane buffer (the previous plane's slack, the next channel or
// the vector's padding channel) and its stray lane is always replaced.
void shift_row(const float* centre, float* left, float* right, int64_t w16, int64_t channels, int64_t vector_floats) {
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

// As scalar::shifted_vectors: each 8-lane half of the result is two lane permutes of adjacent
// source halves, blended, then the lanes outside the map zeroed.
void shifted_vectors(const float* low, const float* high, int shift, uint32_t valid, int64_t channels, float* dst) {
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

void finish_block(const Problem& p, const float* const* rows, int count, int64_t at, int64_t out_pixel, int pixels,
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
#define VEC __m256
#define VW 8
#define VZERO() _mm256_setzero_ps()
#define VLOAD(ptr) _mm256_loadu_ps(ptr)
#define VLOADU(ptr) _mm256_loadu_ps(ptr)
#define VBCAST(ptr) _mm256_broadcast_ss(ptr)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VSTORE(ptr, v) _mm256_storeu_ps(ptr, v)
#include "psconv_body.inc"  // and #undef of the macros at its end

double fma_loop(int64_t iterations) {
  __m256 a[12];
  const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(static_cast<float>(i));
  for (int64_t it = 0; it < iterations; ++it)
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  alignas(32) float lanes[8];
  float sum = 0;
  for (int i = 0; i < 12; ++i) {
    _mm256_store_ps(lanes, a[i]);
    for (float v : lanes) sum += v;
  }
  return sum;
}
constexpr int peak_lanes = 8;
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace avx512 {
// Accumulators in 24 of the 32 registers: 6 filters x 4 pixel vectors, or up to 2 filters x 8.
constexpr int kMaxQ = 8;
constexpr int kAccumulators = 24;
constexpr int kRegisters = 32;

// r[i] = row i in, r[j] = column j out.
inline void transpose16(__m512 r[16]) {
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

inline __mmask16 first_lanes(int64_t count) { return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1); }

void lanes_to_vectors(const float* const* src, int64_t channels, float* dst) {
  __m512 r[16];
  for (int64_t c0 = 0; c0 < channels; c0 += 16) {
    const int64_t count = std::min<int64_t>(16, channels - c0);
    const __mmask16 mask = first_lanes(count);
    for (int l = 0; l < 16; ++l) r[l] = src[l] ? _mm512_maskz_loadu_ps(mask, src[l] + c0) : _mm512_setzero_ps();
    transpose16(r);
    for (int64_t j = 0; j < count; ++j) _mm512_store_ps(dst + (c0 + j) * 16, r[j]);
  }
}

void shift_row(const float* centre, float* left, float* right, int64_t w16, int64_t channels, int64_t vector_floats) {
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

void shifted_vectors(const float* low, const float* high, int shift, uint32_t valid, int64_t channels, float* dst) {
  const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(shift),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 mask = static_cast<__mmask16>(valid);
  for (int64_t c = 0; c < channels; ++c) {
    const __m512 a = low ? _mm512_load_ps(low + c * 16) : _mm512_setzero_ps();
    const __m512 b = high ? _mm512_load_ps(high + c * 16) : _mm512_setzero_ps();
    _mm512_store_ps(dst + c * 16, _mm512_maskz_permutex2var_ps(mask, a, index, b));
  }
}

void finish_block(const Problem& p, const float* const* rows, int count, int64_t at, int64_t out_pixel, int pixels,
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

#define VEC __m512
#define VW 16
#define VZERO() _mm512_setzero_ps()
#define VLOAD(ptr) _mm512_load_ps(ptr)
#define VLOADU(ptr) _mm512_loadu_ps(ptr)
#define VBCAST(ptr) _mm512_set1_ps(*(ptr))
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSTORE(ptr, v) _mm512_storeu_ps(ptr, v)
#include "psconv_body.inc"  // and #undef of the macros at its end

// Twelve independent FMA chains: the core's FMA throughput, for the benchmark's peak figure.
double fma_loop(int64_t iterations) {
  __m512 a[12];
  const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
  for (int64_t it = 0; it < iterations; ++it)
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
  float sum = 0;
  for (int i = 0; i < 12; ++i) sum += _mm512_reduce_add_ps(a[i]);
  return sum;
}
constexpr int peak_lanes = 16;
}  // namespace avx512
#pragma GCC pop_options
#endif

enum class Isa { generic, avx2, avx512 };

Isa detect() {
  const char* forced = std::getenv("LEANCNN_PSCONV_ISA");
  std::string want = forced ? forced : "";
#ifdef LEANCNN_X86
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (want == "generic") return Isa::generic;
  if (want == "avx2") return has2 ? Isa::avx2 : Isa::generic;  // never run what the CPU lacks
  if (has512 && (want.empty() || want == "avx512")) return Isa::avx512;
  if (has2) return Isa::avx2;
#endif
  return Isa::generic;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

torch::Tensor forward(torch::Tensor input, torch::Tensor weights, torch::Tensor channels, torch::Tensor taps,
                      torch::Tensor chunk_slot, torch::Tensor chunk_group, torch::Tensor segment_pair, torch::Tensor bias,
                      torch::Tensor position, int64_t stride, bool relu, const c10::optional<torch::Tensor>& residual,
                      int64_t pass_blocks, bool serial) {
  TORCH_CHECK(input.dim() == 4 && input.scalar_type() == torch::kFloat && input.device().is_cpu(),
              "pSConv kernel: input must be a 4-d float32 CPU tensor");
  TORCH_CHECK(stride == 1 || stride == 2, "pSConv kernel: stride must be 1 or 2");
  TORCH_CHECK(weights.is_contiguous() && channels.is_contiguous() && taps.is_contiguous() && chunk_slot.is_contiguous() &&
                  chunk_group.is_contiguous() && segment_pair.is_contiguous() && bias.is_contiguous() &&
                  position.is_contiguous(),
              "pSConv kernel: packed tensors must be contiguous");
  TORCH_CHECK(channels.numel() == taps.numel(), "pSConv kernel: one channel and one tap per pair");
  const int64_t chunks = chunk_slot.numel() - 1;
  TORCH_CHECK(chunks >= 0 && chunk_group.numel() == chunks, "pSConv kernel: one group per chunk");
  const int32_t* slot = chunk_slot.data_ptr<int32_t>();
  const int32_t* group = chunk_group.data_ptr<int32_t>();
  const int32_t* pair = segment_pair.data_ptr<int32_t>();
  int64_t groups = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    TORCH_CHECK(slot[k + 1] - slot[k] >= 1 && slot[k + 1] - slot[k] <= kMaxChunk, "pSConv kernel: a chunk holds 1 to ",
                kMaxChunk, " filters");
    TORCH_CHECK(group[k] >= 0 && group[k] <= groups, "pSConv kernel: chunk groups must count up from 0");
    groups = std::max<int64_t>(groups, group[k] + 1);
  }
  const int64_t blocks = (input.size(1) + kChannelBlock - 1) / kChannelBlock;
  TORCH_CHECK(segment_pair.numel() == blocks * groups + 1,
              "pSConv kernel: segments must cover the input channels in blocks of ", kChannelBlock, " per group");
  int64_t weight_count = 0;
  for (int64_t b = 0; b < blocks && chunks; ++b)
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t s = b * groups + group[k];
      TORCH_CHECK(pair[s + 1] >= pair[s], "pSConv kernel: segment pairs must ascend");
      weight_count += int64_t(pair[s + 1] - pair[s]) * (slot[k + 1] - slot[k]);
    }
  TORCH_CHECK(chunks == 0 || (pair[0] == 0 && pair[blocks * groups] == channels.numel()),
              "pSConv kernel: segments do not cover the pairs");
  TORCH_CHECK(weights.numel() == weight_count, "pSConv kernel: weights must hold pairs x filters per chunk");
  const int64_t out_channels = position.size(0);
  TORCH_CHECK(bias.numel() == out_channels && (chunks == 0 ? out_channels == 0 : slot[chunks] == out_channels),
              "pSConv kernel: one bias and one slot per filter");
  auto x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t out_h = (h - 1) / stride + 1, out_w = (w - 1) / stride + 1;  // padding 1, kernel 3
  auto output = torch::empty({n, out_channels, out_h, out_w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  torch::Tensor added;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == output.sizes() && residual->scalar_type() == torch::kFloat &&
                    residual->device().is_cpu(),
                "pSConv kernel: the residual must be a float32 CPU tensor shaped like the output");
    added = residual->contiguous(at::MemoryFormat::ChannelsLast);
  }
  if (output.numel() == 0) return output;
  if (c_in == 0 || chunks == 0 || channels.numel() == 0) {  // nothing to add up: bias (+ residual), then the ReLU
    auto out = bias.view({1, out_channels, 1, 1}).expand_as(output).clone(at::MemoryFormat::ChannelsLast);
    if (added.defined()) out += added;
    return relu ? out.clamp_min_(0) : out;
  }
  // Rows of planes where, at stride 2, every output row is whole pixel vectors and the input row
  // splits into even and odd pixels (W a multiple of 32); at stride 1 also where a row's last vector
  // is at most a quarter padding (W = 12..16, 24..32, ...: three planes and no shifted copies, where
  // tap planes would write nine times the input).
  const int64_t padded_w = (w + kPixelVector - 1) / kPixelVector * kPixelVector;
  const bool by_row = stride == 2 ? w % (2 * kPixelVector) == 0 : 4 * (padded_w - w) <= padded_w;
  Problem p{x.data_ptr<float>(), weights.data_ptr<float>(), nullptr, slot, group, pair, nullptr,
            position.data_ptr<int32_t>(), bias.data_ptr<float>(), added.defined() ? added.data_ptr<float>() : nullptr,
            output.data_ptr<float>(), n, h, w, c_in, out_h, out_w, out_channels, chunks, groups, blocks, stride, 1, relu,
            by_row, (out_w + kPixelVector - 1) / kPixelVector, 0, by_row ? 3 : 9, 0, 0, 0, 0};
  const int32_t* channel = channels.data_ptr<int32_t>();
  const int32_t* tap = taps.data_ptr<int32_t>();
  const int64_t pairs = channels.numel();
  switch (detect()) {
#ifdef LEANCNN_X86
    case Isa::avx512: avx512::run(p, channel, tap, pairs, pass_blocks, serial); break;
    case Isa::avx2: avx2::run(p, channel, tap, pairs, pass_blocks, serial); break;
#endif
    default: generic::run(p, channel, tap, pairs, pass_blocks, serial);
  }
  return output;
}

std::string isa() { return isa_name(detect()); }

// Measured FMA throughput in GFLOP/s (2 flops per lane per FMA) of the vector unit the
// kernel uses, with `threads` threads each running independent chains.
double peak_gflops(int64_t threads, double seconds) {
  const Isa chosen = detect();
#ifdef LEANCNN_X86
  if (chosen == Isa::generic) return 0.0;
  const int lanes = chosen == Isa::avx512 ? avx512::peak_lanes : avx2::peak_lanes;
  auto run = [&](int64_t iterations) {
    return chosen == Isa::avx512 ? avx512::fma_loop(iterations) : avx2::fma_loop(iterations);
  };
  int64_t iterations = 1 << 20;
  for (;;) {  // grow until one pass takes long enough to time
    auto start = std::chrono::steady_clock::now();
    std::atomic<double> sink{0.0};
    at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) sink = sink + run(iterations);
    });
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (elapsed >= seconds || iterations > (int64_t(1) << 40))
      return 2.0 * 12 * lanes * static_cast<double>(iterations) * threads / elapsed / 1e9 + 0.0 * sink.load();
    iterations *= 2;
  }
#else
  return 0.0;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward,
        "sparse 3x3 inference (channels_last, padding 1; optional residual added before the ReLU; pass_blocks: "
        "input-channel blocks of 16 per pass, 0 = chosen by the kernel; serial: in the calling thread only)");
  m.def("isa", &isa, "the instruction set the kernel runs with on this CPU");
  m.def("peak_gflops", &peak_gflops, "measured FMA throughput (GFLOP/s) of that instruction set");
}
