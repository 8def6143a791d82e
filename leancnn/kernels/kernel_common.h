// The sparse 3x3 kernel's shared declarations: what a call is given (Inputs), how it runs
// here (Plan, made by make_plan), what the loops read (Problem: both), and the helpers every
// instruction set's loops use. Included by psconv_kernel.cpp (the dispatch and the Python
// entry points) and by one translation unit per instruction set (kernel_generic.cpp,
// kernel_avx2.cpp, kernel_avx512.cpp), each before its target pragma, so that nothing here is
// compiled for a vector unit the CPU may lack. The method: psconv_kernel.cpp.
#pragma once

// Only the standard library here: the instruction sets' files compile fast and stay free of
// torch's headers (the dispatch in psconv_kernel.cpp includes them).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define LEANCNN_X86 1
#endif

namespace leancnn {

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

// One call as the caller gives it: the input, the packed layer (sparse.py: pack()) and the output.
struct Inputs {
  const float* input = nullptr;          // [N, H, W, C_in] channels_last
  const float* weights = nullptr;        // per chunk: [pairs][R]
  const int32_t* channels = nullptr;     // [pairs]: input channel of each (channel, tap) pair
  const int32_t* taps = nullptr;         // [pairs]: its tap, 0..8 (row-major 3x3)
  int64_t pairs = 0;
  const int32_t* chunk_slot = nullptr;   // [chunks + 1]: first stage row (slot) of each chunk
  const int32_t* chunk_group = nullptr;  // [chunks]: the support group whose pairs the chunk uses
  const int32_t* segment_pair = nullptr; // [blocks * groups + 1]: first pair of group g in channel block b
  const int32_t* position = nullptr;     // [C_out]: slot of filter f
  const float* bias = nullptr;           // [C_out]
  const float* residual = nullptr;       // [N, OH, OW, C_out] added before the ReLU, or nullptr
  float* output = nullptr;               // [N, OH, OW, C_out]
  int64_t images = 0, in_h = 0, in_w = 0, in_channels = 0, out_h = 0, out_w = 0, out_channels = 0;
  int64_t chunks = 0, groups = 0, blocks = 0, stride = 1;
  bool relu = false;
};

// Where the planes' vectors are: set by make_plan, read by every loop.
struct Geometry {
  bool by_row = false;           // 3 planes over padded rows (W a multiple of 16 x stride), else 9 tap planes
  int64_t row_vectors = 0;       // by_row: pixel vectors per padded row (output columns / 16)
  int64_t planes = 0;            // 3 or 9
  int64_t tile_step = 0;         // floats between a tile's pixel vectors in the planes
  // Plane geometry in floats. Both strides are padded past a power of two: with C_in = 64 a
  // pixel vector would be 4 KB, and every load of a pair (Q vectors, 3 or 9 planes) would map
  // to one L1 set.
  int64_t plane_vectors = 0, vector_stride = 0, plane_stride = 0;
  uint32_t used_taps = 0;        // bit t: some pair reads tap t (planes no pair reads are not built)
  int64_t blocks_per_pass = 1;   // channel blocks a chunk runs through between reloads of its sums
};

// How one call runs on this machine: the geometry, the tiling and the work split, and the pair
// offsets and weight positions it implies. make_plan() makes it; psconv_kernel.cpp's plan()
// returns it to Python.
struct Plan : Geometry {
  int q = 1;                     // pixel vectors per tile
  int64_t batch = 1;             // images whose planes are built together
  bool per_batch = false;        // each thread builds its own batches' planes (else: all, then tiles shared)
  int64_t threads = 1;
  int64_t plane_floats = 0, stage_floats = 0, tiles = 0;  // tiles: per batch
  std::vector<int32_t> offsets;          // [pairs]: floats from a tile's first plane vector
  std::vector<int64_t> segment_weight;   // [blocks * chunks]: first weight of chunk k in channel block b
};

// What the loops read: the inputs and the plan's geometry, with the plan's tables.
struct Problem : Inputs, Geometry {
  const int32_t* offsets = nullptr;
  const int64_t* segment_weight = nullptr;
};

struct Tile;

// The steps each instruction set implements (kernel_body.h, instantiated per instruction set).
struct Steps {
  void (*build)(const Problem&, float* planes, int64_t first_image, int64_t images, int64_t begin, int64_t end,
                int phase);
  void (*compute)(const Problem&, const float* base, int q, float* stage, int64_t k_begin, int64_t k_end);
  void (*finish)(const Problem&, const float* stage, int q, const Tile& tile, int64_t f_begin, int64_t f_end);
  int (*tile_vectors)(int filters);  // pixel vectors per tile for chunks of up to `filters` filters
};

Steps generic_steps();
#ifdef LEANCNN_X86
Steps avx2_steps();
Steps avx512_steps();
#endif

// Tile t (of q pixel vectors) of a batch of images whose planes are built: its first plane vector;
// with tap planes its first output pixel and how many of its pixels are real (they run on across
// rows and images); with row planes its image's first output pixel and its first vector in the image
// (output row oy, vector u is vector oy * row_vectors + u; a row's last vector may be partly padding).
struct Tile {
  const float* base;
  int64_t first_pixel, valid;
  int64_t image_pixel, first_vector;
};

static inline int64_t tiles_in_batch(const Problem& p, int64_t images, int q) {
  const int64_t tile_pixels = int64_t(q) * kPixelVector, image_pixels = p.out_h * p.out_w;
  return p.by_row ? images * ((p.out_h * p.row_vectors + q - 1) / q)
                  : (images * image_pixels + tile_pixels - 1) / tile_pixels;
}

static inline Tile tile_at(const Problem& p, const float* planes, int64_t first_image, int64_t images, int q, int64_t t) {
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
static inline int vector_span(const Problem& p, const Tile& tile, int64_t v, int64_t* out_pixel) {
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
static inline int64_t build_units(const Problem& p, int64_t images) {
  return p.by_row ? images * (p.in_h + 2) : (images * p.out_h * p.out_w + kPixelVector - 1) / kPixelVector;
}

static inline void zero_slack(const Problem& p, float* planes, int64_t images) {
  const int64_t used = p.by_row ? build_units(p, images) * p.row_vectors : build_units(p, images);
  for (int64_t k = 0; k < p.planes; ++k)
    std::fill(planes + k * p.plane_stride + used * p.vector_stride, planes + (k + 1) * p.plane_stride, 0.0f);
}

}  // namespace leancnn
