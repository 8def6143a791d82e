// Inference kernel for pre-defined (periodic) sparse 3x3 convolution (pSConv),
// fp32, channels_last, padding 1, stride 1 or 2, optional fused bias and ReLU.
//
// Data layout (built once per layer by leancnn/kernels/psconv.py: pack()):
//   filters are grouped by their support row (the taps each input channel
//   uses; periodic pSConv gives P groups), and each group is cut into blocks
//   of FB filters (16 or 32; a short last block has empty lanes).
//   Per block, the (tap, input channel) pairs that any of its filters uses are
//   listed tap by tap: block_begin[block] .. [block + 1] index into
//   channels[], taps[] and weights[] (FB floats per pair, zero where a filter
//   skips the tap). Per call the pairs become offsets into the zero-padded
//   input, counted from each output pixel's window corner.
//   position[f] is filter f's place in block order (block * FB + lane), and
//   packed_bias the bias in block order.
// A block on a tile of output pixels therefore does, per listed pair, one
// weight load per vector, one broadcast per pixel and NV FMAs per pixel: only
// the kept taps are computed. The ceiling for PS4 is 9/4 = 2.25x over dense.
//
// Instruction sets: AVX-512F, AVX2+FMA, and a plain loop, picked at run time
// (LEANCNN_PSCONV_ISA=avx512|avx2|generic forces one, for tests). Threads come
// from ATen's parallel_for, so torch.set_num_threads governs the kernel.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define LEANCNN_X86 1
#include <immintrin.h>
#endif

namespace {

struct Problem {
  const float* input;       // [N, H + 2, W + 2, C_in], zero-padded
  const float* weights;     // [pairs, FB]
  const int32_t* offsets;   // [pairs]: (dy * (W + 2) + dx) * C_in + channel, floats from the window corner
  const int32_t* block_begin;    // [blocks + 1]: each block's first pair
  const float* packed_bias; // [blocks, FB], block order (zeros without bias)
  const int32_t* position;  // [C_out]: where filter f sits in block order
  float* output;            // [N, OH, OW, C_out]
  const float* residual;    // [N, OH, OW, C_out] added before the ReLU, or nullptr
  int64_t in_h, in_w, in_channels, out_h, out_w, out_channels, pixels, blocks;  // in_h, in_w: padded
  int stride;
  bool relu;
  bool relu_in_tile;        // relu and no residual: applied with the bias, in registers
  bool pitched;  // stride 1, C_in in {16, ..., 512}, maps >= 16 wide: run_pitched
};

constexpr int kMaxTile = 24;  // the most pixels any tile has

bool pitched_applies(int64_t stride, int64_t c_in, int64_t width) {
  return stride == 1 && width >= 16 && (c_in == 16 || c_in == 32 || c_in == 64 || c_in == 128 || c_in == 256 || c_in == 512);
}

namespace generic {
// Pixels per tile for blocks of 16 and 32 filters (the dispatcher sizes the work with them).
constexpr int kTile16 = 4, kTile32 = 2;
// Portable path: one "vector" is one float; the compiler may vectorise it.
#define VEC float
#define VW 1
#define VZERO() 0.0f
#define VLOAD(ptr) (*(ptr))
#define VBCAST(ptr) (*(ptr))
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VSTORE(ptr, v) (*(ptr) = (v))
#define VADD(a, b) ((a) + (b))
#define VRELU(a) ((a) > 0.0f ? (a) : 0.0f)
#include "psconv_body.inc"  // and #undef of the macros at its end

void run(const Problem& p, int64_t fb, int64_t begin, int64_t end, int64_t) {
  if (fb == 16) return run_range<16, kTile16>(p, begin, end);
  return run_range<32, kTile32>(p, begin, end);
}
}  // namespace generic

#ifdef LEANCNN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int kTile16 = 6, kTile32 = 3;  // 2 x 6 and 4 x 3 = 12 accumulators
#define VEC __m256
#define VW 8
#define VZERO() _mm256_setzero_ps()
#define VLOAD(ptr) _mm256_loadu_ps(ptr)
#define VBCAST(ptr) _mm256_broadcast_ss(ptr)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VSTORE(ptr, v) _mm256_storeu_ps(ptr, v)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VRELU(a) _mm256_max_ps(a, _mm256_setzero_ps())
#include "psconv_body.inc"  // and #undef of the macros at its end

// 16 filters: 2 vectors x 6 pixels = 12 accumulators; 32 filters: 4 x 3.
void run(const Problem& p, int64_t fb, int64_t begin, int64_t end, int64_t) {
  if (fb == 16) {
    if (!(p.pitched && try_pitched<2, kTile16>(p, begin, end))) run_range<2, kTile16>(p, begin, end);
    return;
  }
  if (!(p.pitched && try_pitched<4, kTile32>(p, begin, end))) run_range<4, kTile32>(p, begin, end);
}

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
constexpr int kTile16 = 24, kTile32 = 12;  // 1 x 24 and 2 x 12 = 24 accumulators
#define VEC __m512
#define VW 16
#define VZERO() _mm512_setzero_ps()
#define VLOAD(ptr) _mm512_loadu_ps(ptr)
#define VBCAST(ptr) _mm512_set1_ps(*(ptr))
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSTORE(ptr, v) _mm512_storeu_ps(ptr, v)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VRELU(a) _mm512_max_ps(a, _mm512_setzero_ps())
#include "psconv_body.inc"  // and #undef of the macros at its end

// 16 filters: 1 vector x 24 pixels; 32 filters: 2 vectors x 12 pixels (24 of the 32 registers hold
// accumulators either way: each weight vector loaded serves 24 FMAs; with 12, the 128-512 channel
// layers ran 1.1-1.4x slower).
void run(const Problem& p, int64_t fb, int64_t begin, int64_t end, int64_t) {
  if (fb == 16) {
    if (!(p.pitched && try_pitched<1, kTile16>(p, begin, end))) run_range<1, kTile16>(p, begin, end);
    return;
  }
  if (!(p.pitched && try_pitched<2, kTile32>(p, begin, end))) run_range<2, kTile32>(p, begin, end);
}

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

int tile_pixels(Isa isa, int64_t fb) {
  switch (isa) {
#ifdef LEANCNN_X86
    case Isa::avx512: return fb == 16 ? avx512::kTile16 : avx512::kTile32;
    case Isa::avx2: return fb == 16 ? avx2::kTile16 : avx2::kTile32;
#endif
    default: return fb == 16 ? generic::kTile16 : generic::kTile32;
  }
}

// The input with one zero row and column on each side (and `extra_rows` more zero rows at the bottom),
// channels_last, written once in parallel: each padded row is zeros or one copy of an input row.
// torch::constant_pad_nd zero-filled the whole buffer and then copied into it, single-threaded in
// effect: about 12% of a deployed resnet18's time at batch 64.
torch::Tensor pad_channels_last(const torch::Tensor& x, int64_t extra_rows) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t padded_h = h + 2 + extra_rows, padded_w = w + 2;
  auto padded = torch::empty({n, c, padded_h, padded_w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* source = x.data_ptr<float>();
  float* target = padded.data_ptr<float>();
  const int64_t row_floats = padded_w * c;
  at::parallel_for(0, n * padded_h, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t image = r / padded_h, y = r % padded_h;
      float* row = target + r * row_floats;
      if (y == 0 || y > h) {
        std::fill(row, row + row_floats, 0.0f);
        continue;
      }
      std::fill(row, row + c, 0.0f);
      std::memcpy(row + c, source + (image * h + y - 1) * w * c, sizeof(float) * w * c);
      std::fill(row + (w + 1) * c, row + row_floats, 0.0f);
    }
  });
  return padded;
}

torch::Tensor forward(torch::Tensor input, torch::Tensor weights, torch::Tensor channels, torch::Tensor taps,
                      torch::Tensor block_begin, torch::Tensor packed_bias, torch::Tensor position, int64_t stride,
                      bool relu, const c10::optional<torch::Tensor>& residual) {
  TORCH_CHECK(input.dim() == 4 && input.scalar_type() == torch::kFloat && input.device().is_cpu(),
              "pSConv kernel: input must be a 4-d float32 CPU tensor");
  TORCH_CHECK(stride == 1 || stride == 2, "pSConv kernel: stride must be 1 or 2");
  const int64_t fb = weights.size(1);
  TORCH_CHECK(fb == 16 || fb == 32, "pSConv kernel: block width must be 16 or 32");
  TORCH_CHECK(weights.is_contiguous() && channels.is_contiguous() && taps.is_contiguous() &&
              block_begin.is_contiguous() && packed_bias.is_contiguous() && position.is_contiguous(),
              "pSConv kernel: packed tensors must be contiguous");
  TORCH_CHECK(channels.numel() == taps.numel() && weights.size(0) == taps.numel(),
              "pSConv kernel: one channel, tap and weight row per pair");
  const int64_t out_channels = position.size(0);
  const int64_t blocks = block_begin.numel() - 1;
  TORCH_CHECK(packed_bias.numel() == blocks * fb, "pSConv kernel: packed bias must hold blocks x block width");
  auto x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t out_h = (h - 1) / stride + 1, out_w = (w - 1) / stride + 1;  // padding 1, kernel 3
  auto output = torch::empty({n, out_channels, out_h, out_w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  // Zero padding once, so the inner loop needs no bounds checks: one offset per (tap, channel).
  // Extra rows at the bottom: a pitched tile's last pixels may read past the image's
  // own padded grid (their results are dropped), never past the buffer.
  const Isa isa = detect();
  const bool pitched = pitched_applies(stride, c_in, w);
  const int64_t extra_rows = pitched ? (kMaxTile + w + 1) / (w + 2) + 1 : 0;
  auto padded = pad_channels_last(x, extra_rows);
  const int32_t* tap = taps.data_ptr<int32_t>();
  const int32_t* channel = channels.data_ptr<int32_t>();
  std::vector<int32_t> offsets(static_cast<size_t>(channels.numel()));
  for (size_t e = 0; e < offsets.size(); ++e)
    offsets[e] = static_cast<int32_t>(((tap[e] / 3) * (w + 2) + tap[e] % 3) * c_in + channel[e]);
  torch::Tensor added;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == output.sizes() && residual->scalar_type() == torch::kFloat &&
                    residual->device().is_cpu(),
                "pSConv kernel: the residual must be a float32 CPU tensor shaped like the output");
    added = residual->contiguous(at::MemoryFormat::ChannelsLast);
  }
  Problem p{padded.data_ptr<float>(), weights.data_ptr<float>(), offsets.data(), block_begin.data_ptr<int32_t>(),
            packed_bias.data_ptr<float>(), position.data_ptr<int32_t>(), output.data_ptr<float>(),
            added.defined() ? added.data_ptr<float>() : nullptr,
            h + 2 + extra_rows, w + 2, c_in, out_h, out_w, out_channels, n * out_h * out_w, blocks,
            static_cast<int>(stride), relu, relu && !added.defined(), pitched && isa != Isa::generic};
  if (p.pixels == 0) return output;
  if (p.blocks == 0) return output;  // no filters
  const int64_t tp = tile_pixels(isa, fb);
  const int64_t tiles = p.pitched ? n * ((out_h * (w + 2) + tp - 1) / tp) : (p.pixels + tp - 1) / tp;
  // A tile is every filter on TP pixels; a few per task keep the scheduling overhead small.
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    switch (isa) {
#ifdef LEANCNN_X86
      case Isa::avx512: avx512::run(p, fb, begin, end, 0); break;
      case Isa::avx2: avx2::run(p, fb, begin, end, 0); break;
#endif
      default: generic::run(p, fb, begin, end, 0);
    }
  });
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
  m.def("forward", &forward, "pSConv 3x3 inference (channels_last, padding 1; optional residual added before the ReLU)");
  m.def("isa", &isa, "the instruction set the kernel runs with on this CPU");
  m.def("peak_gflops", &peak_gflops, "measured FMA throughput (GFLOP/s) of that instruction set");
}
