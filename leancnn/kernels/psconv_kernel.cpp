// Inference kernel for sparse 3x3 convolution (and 1x1, as its centre tap): pre-defined supports
// (pSConv) and irregular masks (pruning) alike; fp32, channels_last input and output, padding 1,
// stride 1 or 2, optional fused bias, residual and ReLU.
//
// Plan: vectorise over output pixels, not filters. The filters of a layer are
// grouped by support (the taps each input channel uses; periodic pSConv gives P
// groups); a group lists the (tap, channel) pairs its filters use, and is cut into
// chunks of at most 6 filters with their weights per pair
// (leancnn/kernels/sparse.py: pack()). The input is rearranged once per call
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
// (LEANCNN_PSCONV_ISA=avx512|avx2|generic forces one, for tests). The loops are written once
// (kernel_body.h, templates over an instruction set's traits) and instantiated in one file per
// instruction set (kernel_generic.cpp, kernel_avx2.cpp, kernel_avx512.cpp). Threads come
// from ATen's parallel_for, so torch.set_num_threads governs the kernel.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kernel_common.h"
#include "kernel_ops.h"

#include <cstdlib>
#include <string>

namespace leancnn {
namespace {

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

// How one call runs here: planes (rows or taps), tile width, image batches and the work split,
// the channel blocks per pass, and the pair offsets; from the inputs, the instruction set's tile
// width rule and the call's options (pass_blocks: chosen by a measured deploy plan, 0 = the rule
// below; serial: the calling thread only).
Plan make_plan(const Inputs& in, const Steps& steps, int64_t pass_blocks, bool serial) {
  Plan plan;
  // Rows of planes where, at stride 2, every output row is whole pixel vectors and the input row
  // splits into even and odd pixels (W a multiple of 32); at stride 1 also where a row's last vector
  // is at most a quarter padding (W = 12..16, 24..32, ...: three planes and no shifted copies, where
  // tap planes would write nine times the input).
  const int64_t padded_w = (in.in_w + kPixelVector - 1) / kPixelVector * kPixelVector;
  plan.by_row = in.stride == 2 ? in.in_w % (2 * kPixelVector) == 0 : 4 * (padded_w - in.in_w) <= padded_w;
  plan.row_vectors = (in.out_w + kPixelVector - 1) / kPixelVector;
  plan.planes = plan.by_row ? 3 : 9;
  plan.threads = serial ? 1 : at::get_num_threads();
  const int64_t image_pixels = in.out_h * in.out_w;
  const int64_t w16 = plan.row_vectors;
  int widest_chunk = 1;
  for (int64_t k = 0; k < in.chunks; ++k) widest_chunk = std::max(widest_chunk, in.chunk_slot[k + 1] - in.chunk_slot[k]);
  const int max_q = steps.tile_vectors(widest_chunk);
  int64_t batch = plan.by_row ? 1 : std::min<int64_t>(in.images, std::max<int64_t>(1, (4 * max_q * kPixelVector) / image_pixels));
  plan.per_batch = (in.images + batch - 1) / batch >= 2 * plan.threads;
  if (!plan.per_batch) batch = in.images;
  plan.batch = batch;
  const int64_t batch_pixels = plan.by_row ? image_pixels : batch * image_pixels;
  int q = max_q;  // pixel vectors per tile: no more than the pixels need
  while (q > 1 && (q / 2) * kPixelVector >= batch_pixels) q /= 2;
  // At stride 2 a tile's vectors must be a constant distance apart in the planes: one per output
  // row (each two padded rows on) when a row is one vector, else within one output row.
  if (plan.by_row && in.stride == 2 && w16 > 1)
    while (q > 1 && w16 % q != 0) q /= 2;
  plan.q = q;
  // Vectors per plane: the batch's own, then slack that a batch's last tile may read past its
  // end (q vectors; at stride 1 on padded rows also into the next image's rows, harmlessly).
  Problem shape;  // the geometry so far, for the tile count
  static_cast<Inputs&>(shape) = in;
  static_cast<Geometry&>(shape) = plan;
  plan.tiles = tiles_in_batch(shape, batch, q);
  plan.plane_vectors = plan.by_row ? batch * (in.in_h + 2) * w16 + 2 * q : plan.tiles * q;
  plan.vector_stride = (in.in_channels + 1) * kPixelVector;
  plan.plane_stride = plan.plane_vectors * plan.vector_stride + 7 * kPixelVector;
  plan.tile_step = plan.by_row && in.stride == 2 && w16 == 1 ? 2 * plan.vector_stride : plan.vector_stride;
  plan.plane_floats = plan.planes * plan.plane_stride;
  TORCH_CHECK(plan.plane_floats < (int64_t(1) << 31), "pSConv kernel: the input is too large for 32-bit offsets");
  int32_t tap_offset[9];  // where each tap's vectors start, from a tile's first vector
  for (int t = 0; t < 9; ++t)
    tap_offset[t] = static_cast<int32_t>(plan.by_row ? (t % 3) * plan.plane_stride + (t / 3) * w16 * plan.vector_stride
                                                     : t * plan.plane_stride);
  plan.offsets.resize(static_cast<size_t>(in.pairs));
  plan.used_taps = 0;
  for (int64_t e = 0; e < in.pairs; ++e) {
    plan.offsets[e] = tap_offset[in.taps[e]] + in.channels[e] * kPixelVector;
    plan.used_taps |= 1u << in.taps[e];
  }
  plan.segment_weight.resize(static_cast<size_t>(in.blocks * in.chunks));
  for (int64_t b = 0, at = 0; b < in.blocks; ++b)
    for (int64_t k = 0; k < in.chunks; ++k) {
      plan.segment_weight[b * in.chunks + k] = at;
      const int64_t s = b * in.groups + in.chunk_group[k];
      at += int64_t(in.segment_pair[s + 1] - in.segment_pair[s]) * (in.chunk_slot[k + 1] - in.chunk_slot[k]);
    }
  const int64_t blocks = in.blocks;
  // Channel blocks per pass: a tile's plane vectors for those channels (64 bytes each, for every
  // plane and row shift a tile reads) within 32 KB of L1, or more blocks where a chunk has few pairs
  // per block (1-tap supports), so that a pass holds ~128 pairs and reloading the sums stays cheap.
  const int64_t vectors_per_channel = !plan.by_row ? 9 * q : in.stride == 1 ? 3 * (q + 2 * w16) : 3 * (2 * q + 1);
  const int64_t fit = std::max<int64_t>(1, (32 * 1024) / (kChannelBlock * vectors_per_channel * 64));
  const double pairs_per_block = blocks ? double(in.pairs) / double(in.groups * blocks) : 1.0;
  const int64_t enough = static_cast<int64_t>(std::ceil(128.0 / std::max(pairs_per_block, 1.0)));
  plan.blocks_per_pass = std::max<int64_t>(1, std::min({blocks, std::max(fit, enough), int64_t(kMaxBlocksPerPass)}));
  if (pass_blocks > 0)  // chosen by a measured plan (leancnn.plans) instead of the rule above
    plan.blocks_per_pass = std::min<int64_t>({blocks, pass_blocks, int64_t(kMaxBlocksPerPass)});
  plan.stage_floats = int64_t(in.chunk_slot[in.chunks]) * q * kPixelVector;
  return plan;
}

// Runs a planned call: with enough batches, each thread builds its batch's planes in its own
// buffer (they stay in cache) and runs its tiles; with few images (batch 1), planes are built for
// all of them in parallel and then the tiles are split between threads.
void run_problem(const Inputs& in, const Plan& plan, bool serial, const Steps& steps) {
  Problem p;
  static_cast<Inputs&>(p) = in;
  static_cast<Geometry&>(p) = plan;
  p.offsets = plan.offsets.data();
  p.segment_weight = plan.segment_weight.data();
  const int q = plan.q;
  const int64_t batch = plan.batch, threads = plan.threads, tiles = plan.tiles;
  const int64_t plane_floats = plan.plane_floats, stage_floats = plan.stage_floats;
  const bool per_batch = plan.per_batch;
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
  // The calling thread's buffers, kept from call to call like the per-batch path's (the workers
  // only write into them during the call), rather than a fresh block per layer and call.
  static thread_local Buffer plane_buffer;
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
  static thread_local Buffer shared_stage_buffer;
  float* stages = shared_stage_buffer.get(tiles * stage_floats);
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

// The loops of one instruction set, made once.
const Steps& steps_for(Isa isa) {
  static const Steps generic = generic_steps();
#ifdef LEANCNN_X86
  static const Steps avx2 = avx2_steps();
  static const Steps avx512 = avx512_steps();
  if (isa == Isa::avx512) return avx512;
  if (isa == Isa::avx2) return avx2;
#endif
  return generic;
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
  const Inputs in{.input = x.data_ptr<float>(),
                  .weights = weights.data_ptr<float>(),
                  .channels = channels.data_ptr<int32_t>(),
                  .taps = taps.data_ptr<int32_t>(),
                  .pairs = channels.numel(),
                  .chunk_slot = slot,
                  .chunk_group = group,
                  .segment_pair = pair,
                  .position = position.data_ptr<int32_t>(),
                  .bias = bias.data_ptr<float>(),
                  .residual = added.defined() ? added.data_ptr<float>() : nullptr,
                  .output = output.data_ptr<float>(),
                  .images = n, .in_h = h, .in_w = w, .in_channels = c_in,
                  .out_h = out_h, .out_w = out_w, .out_channels = out_channels,
                  .chunks = chunks, .groups = groups, .blocks = blocks, .stride = stride,
                  .relu = relu};
  const Steps& steps = steps_for(detect());
  run_problem(in, make_plan(in, steps, pass_blocks, serial), serial, steps);
  return output;
}

// The plan a call with these shapes would run on this machine, for Python to print
// (SparseConvInference.kernel_plan): the same make_plan as forward, on the layer's tables.
py::dict plan(int64_t images, int64_t in_channels, int64_t in_h, int64_t in_w, torch::Tensor channels,
              torch::Tensor taps, torch::Tensor chunk_slot, torch::Tensor chunk_group, torch::Tensor segment_pair,
              int64_t stride, int64_t pass_blocks, bool serial) {
  TORCH_CHECK(stride == 1 || stride == 2, "pSConv kernel: stride must be 1 or 2");
  const int64_t chunks = chunk_slot.numel() - 1;
  const int32_t* group = chunk_group.data_ptr<int32_t>();
  int64_t groups = 0;
  for (int64_t k = 0; k < chunks; ++k) groups = std::max<int64_t>(groups, group[k] + 1);
  const Inputs in{.channels = channels.data_ptr<int32_t>(), .taps = taps.data_ptr<int32_t>(), .pairs = channels.numel(),
                  .chunk_slot = chunk_slot.data_ptr<int32_t>(), .chunk_group = group,
                  .segment_pair = segment_pair.data_ptr<int32_t>(),
                  .images = images, .in_h = in_h, .in_w = in_w, .in_channels = in_channels,
                  .out_h = (in_h - 1) / stride + 1, .out_w = (in_w - 1) / stride + 1,
                  .chunks = chunks, .groups = groups, .blocks = (in_channels + kChannelBlock - 1) / kChannelBlock,
                  .stride = stride};
  const Isa isa = detect();
  const Plan chosen = make_plan(in, steps_for(isa), pass_blocks, serial);
  py::dict out;
  out["isa"] = isa_name(isa);
  out["planes"] = chosen.by_row ? "rows" : "taps";
  out["plane_count"] = chosen.planes;
  out["tile_vectors"] = chosen.q;
  out["tile_pixels"] = chosen.q * kPixelVector;
  out["batch_images"] = chosen.batch;
  out["split"] = chosen.per_batch ? "batches" : chosen.tiles >= 2 * chosen.threads ? "tiles" : "chunks";
  out["threads"] = chosen.threads;
  out["tiles_per_batch"] = chosen.tiles;
  out["blocks_per_pass"] = chosen.blocks_per_pass;
  out["used_taps"] = chosen.used_taps;
  out["plane_bytes"] = chosen.plane_floats * int64_t(sizeof(float));
  return out;
}

std::string isa() { return isa_name(detect()); }

}  // namespace

// The operator's entry for other translation units (aoti_shims.cpp): the same forward.
torch::Tensor sparse_conv(torch::Tensor input, torch::Tensor weights, torch::Tensor channels, torch::Tensor taps,
                          torch::Tensor chunk_slot, torch::Tensor chunk_group, torch::Tensor segment_pair,
                          torch::Tensor bias, torch::Tensor position, int64_t stride, bool relu,
                          const c10::optional<torch::Tensor>& residual, int64_t pass_blocks, bool serial) {
  return forward(input, weights, channels, taps, chunk_slot, chunk_group, segment_pair, bias, position, stride, relu,
                 residual, pass_blocks, serial);
}

}  // namespace leancnn

// The same kernel as a PyTorch operator, so that graph tools (torch.compile, torch.export,
// TorchScript) see it as one opaque node; its shape function (fake implementation) is
// registered from Python (leancnn/kernels/ops.py). Loading this library with
// torch.ops.load_library is all an exported program needs to run it.
TORCH_LIBRARY(leancnn, m) {
  m.def("sparse_conv(Tensor input, Tensor weights, Tensor channels, Tensor taps, Tensor chunk_slot, "
        "Tensor chunk_group, Tensor segment_pair, Tensor bias, Tensor position, int stride, bool relu, "
        "Tensor? residual, int pass_blocks, bool serial) -> Tensor");
}

TORCH_LIBRARY_IMPL(leancnn, CPU, m) { m.impl("sparse_conv", &leancnn::forward); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &leancnn::forward,
        "sparse 3x3 inference (channels_last, padding 1; optional residual added before the ReLU; pass_blocks: "
        "input-channel blocks of 16 per pass, 0 = chosen by the kernel; serial: in the calling thread only)");
  m.def("plan", &leancnn::plan, "how a call of these shapes runs on this machine (a dict)");
  m.def("isa", &leancnn::isa, "the instruction set the kernel runs with on this CPU");
}
