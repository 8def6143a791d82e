// The measured FMA throughput of this CPU's widest vector unit the sparse kernel uses
// (AVX-512F, else AVX2+FMA): twelve independent FMA chains per thread, enough to hide the
// FMA latency on the cores this project runs on. For the benchmarks' "share of the FMA
// peak" column; not part of the product.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

__attribute__((target("avx2,fma"))) static double fma_loop_avx2(int64_t iterations) {
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

__attribute__((target("avx512f,fma"))) static double fma_loop_avx512(int64_t iterations) {
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
#endif

// GFLOP/s (2 flops per lane per FMA) with `threads` threads, for the instruction set `isa`
// ("avx512" or "avx2", as the kernel reports it); 0 where the CPU has neither.
double peak_gflops(const std::string& isa, int64_t threads, double seconds) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool wide = isa == "avx512" && __builtin_cpu_supports("avx512f");
  if (!wide && !(isa == "avx2" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0.0;
  const int lanes = wide ? 16 : 8;
  int64_t iterations = 1 << 20;
  for (;;) {  // grow until one pass takes long enough to time
    const auto start = std::chrono::steady_clock::now();
    std::atomic<double> sink{0.0};
    at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) sink = sink + (wide ? fma_loop_avx512(iterations) : fma_loop_avx2(iterations));
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("peak_gflops", &peak_gflops, "measured FMA throughput (GFLOP/s) of an instruction set");
}
