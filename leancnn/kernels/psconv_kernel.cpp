// Inference kernel for pre-defined (periodic) sparse 3x3 convolution (pSConv),
// fp32, channels_last, padding 1, stride 1 or 2, optional fused bias and ReLU.
//
// Data layout (built once per layer by leancnn/kernels/__init__.py: pack()):
//   filters are grouped by their support row (the taps each input channel
//   uses; periodic pSConv gives P groups), and each group is cut into blocks
//   of FB filters (16 or 32; a short last block is padded with -1 filters).
//   Per block, the (tap, input channel) pairs that any of its filters uses are
//   listed tap by tap: tap_offsets[block][t] .. [t + 1] index into channels[]
//   and into weights[] (FB floats per pair, zero where a filter skips the tap).
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
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define LEANCNN_X86 1
#include <immintrin.h>
#endif

namespace {

struct Problem {
  const float* input;       // [N, H, W, C_in]
  const float* zeros;       // C_in zeros, read for padding taps
  const float* weights;     // [pairs, FB]
  const int32_t* channels;  // [pairs]
  const int32_t* tap_offsets;    // [blocks, 10]
  const float* packed_bias; // [blocks, FB], block order (zeros without bias)
  const int32_t* position;  // [C_out]: where filter f sits in block order
  float* output;            // [N, OH, OW, C_out]
  int64_t in_h, in_w, in_channels, out_h, out_w, out_channels, pixels, blocks;
  int stride;
  bool relu;
};

namespace generic {
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
  if (fb == 16) return run_range<16, 4>(p, begin, end);
  return run_range<32, 2>(p, begin, end);
}
constexpr int tile_pixels(int64_t fb) { return fb == 16 ? 4 : 2; }
}  // namespace generic

#ifdef LEANCNN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
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
  if (fb == 16) return run_range<2, 6>(p, begin, end);
  return run_range<4, 3>(p, begin, end);
}
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace avx512 {
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

// 16 filters: 1 vector x 12 pixels; 32 filters: 2 vectors x 6 pixels (12 accumulators either way).
void run(const Problem& p, int64_t fb, int64_t begin, int64_t end, int64_t) {
  if (fb == 16) return run_range<1, 12>(p, begin, end);
  return run_range<2, 6>(p, begin, end);
}
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
    case Isa::avx512: return fb == 16 ? 12 : 6;
    case Isa::avx2: return fb == 16 ? 6 : 3;
    default: return generic::tile_pixels(fb);
  }
}

torch::Tensor forward(torch::Tensor input, torch::Tensor weights, torch::Tensor channels, torch::Tensor tap_offsets,
                      torch::Tensor packed_bias, torch::Tensor position, int64_t stride, bool relu) {
  TORCH_CHECK(input.dim() == 4 && input.scalar_type() == torch::kFloat && input.device().is_cpu(),
              "pSConv kernel: input must be a 4-d float32 CPU tensor");
  TORCH_CHECK(stride == 1 || stride == 2, "pSConv kernel: stride must be 1 or 2");
  const int64_t fb = weights.size(1);
  TORCH_CHECK(fb == 16 || fb == 32, "pSConv kernel: block width must be 16 or 32");
  TORCH_CHECK(weights.is_contiguous() && channels.is_contiguous() && tap_offsets.is_contiguous() &&
              packed_bias.is_contiguous() && position.is_contiguous(), "pSConv kernel: packed tensors must be contiguous");
  const int64_t out_channels = position.size(0);
  const int64_t blocks = tap_offsets.size(0);
  TORCH_CHECK(packed_bias.numel() == blocks * fb, "pSConv kernel: packed bias must hold blocks x block width");
  auto x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t out_h = (h - 1) / stride + 1, out_w = (w - 1) / stride + 1;  // padding 1, kernel 3
  auto output = torch::empty({n, out_channels, out_h, out_w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  std::vector<float> zeros(static_cast<size_t>(std::max<int64_t>(c_in, 1)), 0.0f);
  Problem p{x.data_ptr<float>(), zeros.data(), weights.data_ptr<float>(), channels.data_ptr<int32_t>(),
            tap_offsets.data_ptr<int32_t>(), packed_bias.data_ptr<float>(), position.data_ptr<int32_t>(),
            output.data_ptr<float>(), h, w, c_in, out_h, out_w, out_channels, n * out_h * out_w, blocks,
            static_cast<int>(stride), relu};
  if (p.pixels == 0) return output;
  if (p.blocks == 0) return output;  // no filters
  const Isa isa = detect();
  const int64_t tiles = (p.pixels + tile_pixels(isa, fb) - 1) / tile_pixels(isa, fb);
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "pSConv 3x3 inference (channels_last, padding 1)");
  m.def("isa", &isa, "the instruction set the kernel runs with on this CPU");
}
