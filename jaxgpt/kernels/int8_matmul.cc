// int8 weight-only matrix products for XLA:CPU, called through JAX's FFI (jaxgpt/kernels/int8.py).
//
//   y (O, B) float32 = scale (O, 1) * (q (O, I) int8 . x (B, I) float32)     y[o, b] = s[o] * sum_i q[o, i] x[b, i]
//
// Why a kernel: XLA:CPU has no int8 x float dot. It converts the int8 operand to float first,
// and its converts ran at <= 11 GB/s of int8 here in every form tried (README, "int8
// weight-only quantization"), so a one-row decode step read its weights no faster than float32
// weights at ~4x the bytes. This reads each int8 weight once, widens it in registers and
// multiplies it into every row of x while it is there.
//
// Layout: q is the (out, in) copy the cpu decode backend keeps (jaxgpt/kernels/cpu_decode.py),
// so each output is one contiguous int8 row dotted with each row of x. Work is split into
// blocks of output rows that the calling thread and XLA's intra-op thread pool claim from a
// shared counter; the caller returns once every block is done.
//
// Rounding: each output is a float32 sum in an order of this kernel's own (16 lanes, then a
// lane reduction), so it differs from XLA's dot in the last bits only; the tests compare the
// two within float32 accumulation error.
//
// Two implementations behind one entry point, chosen at run time: AVX-512 (x86-64 CPUs that
// have it) and portable C++ (everything else, and the `generic=1` attribute, which the tests
// use to run it on any machine).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JAXGPT_X86 1
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kMinBlockBytes = 64 << 10;
constexpr int64_t kMaxXRows = 8;    // rows of x per pass over a weight row (registers)

// One weight row o against NB rows of x starting at b0: U * NB float32 accumulators of 16 lanes.
// One row at a time keeps the weight reads one sequential stream per thread: four rows read
// side by side (four streams) ran at half the speed from memory, measured at one row of x.
template <int NB, int U>
void RowGeneric(const int8_t* q, const float* x, const float* s, float* y, int64_t o, int64_t b0,
                int64_t I, int64_t B) {
  float acc[U][NB][kLanes] = {};
  const int8_t* qr = q + o * I;
  int64_t i = 0;
  for (; i + U * kLanes <= I; i += U * kLanes)
    for (int u = 0; u < U; ++u) {
      float w[kLanes];
      for (int l = 0; l < kLanes; ++l) w[l] = static_cast<float>(qr[i + u * kLanes + l]);
      for (int b = 0; b < NB; ++b)
        for (int l = 0; l < kLanes; ++l) acc[u][b][l] += w[l] * x[(b0 + b) * I + i + u * kLanes + l];
    }
  for (int b = 0; b < NB; ++b) {
    float t = 0.f;
    for (int u = 0; u < U; ++u)
      for (int l = 0; l < kLanes; ++l) t += acc[u][b][l];
    for (int64_t j = i; j < I; ++j) t += static_cast<float>(qr[j]) * x[(b0 + b) * I + j];
    y[o * B + b0 + b] = t * s[o];
  }
}

#ifdef JAXGPT_X86
template <int NB, int U>
__attribute__((target("avx512f"))) void RowAvx512(const int8_t* q, const float* x, const float* s,
                                                  float* y, int64_t o, int64_t b0, int64_t I,
                                                  int64_t B) {
  __m512 acc[U][NB];
  for (int u = 0; u < U; ++u)
    for (int b = 0; b < NB; ++b) acc[u][b] = _mm512_setzero_ps();
  const int8_t* qr = q + o * I;
  int64_t i = 0;
  for (; i + U * kLanes <= I; i += U * kLanes)
    for (int u = 0; u < U; ++u) {
      // 16 int8 -> 16 int32 (sign-extended) -> 16 float32, all in registers.
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + i + u * kLanes));
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
      for (int b = 0; b < NB; ++b)
        acc[u][b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + (b0 + b) * I + i + u * kLanes), acc[u][b]);
    }
  for (int b = 0; b < NB; ++b) {
    __m512 sum = acc[0][b];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][b]);
    float t = _mm512_reduce_add_ps(sum);
    for (int64_t j = i; j < I; ++j) t += static_cast<float>(qr[j]) * x[(b0 + b) * I + j];
    y[o * B + b0 + b] = t * s[o];
  }
}

bool HasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
#endif

using RowFn = void (*)(const int8_t*, const float*, const float*, float*, int64_t, int64_t,
                       int64_t, int64_t);

template <bool kAvx512, int NB, int U>
RowFn Row() {
#ifdef JAXGPT_X86
  if constexpr (kAvx512) return &RowAvx512<NB, U>;
#endif
  return &RowGeneric<NB, U>;
}

// Unrolled so that each pass has >= 4 independent accumulator chains (the FMA latency), a
// 64-byte cache line of weights per step at one row of x.
template <bool kAvx512>
RowFn Pick(int64_t nb) {
  switch (nb) {
    case 1: return Row<kAvx512, 1, 4>();
    case 2: return Row<kAvx512, 2, 2>();
    case 3: return Row<kAvx512, 3, 2>();
    case 4: return Row<kAvx512, 4, 1>();
    case 5: return Row<kAvx512, 5, 1>();
    case 6: return Row<kAvx512, 6, 1>();
    case 7: return Row<kAvx512, 7, 1>();
    default: return Row<kAvx512, 8, 1>();
  }
}

template <bool kAvx512>
void RunBlock(const int8_t* q, const float* x, const float* s, float* y, int64_t o0, int64_t o1,
              int64_t I, int64_t B) {
  for (int64_t b0 = 0; b0 < B; b0 += kMaxXRows) {
    const RowFn row = Pick<kAvx512>(std::min(kMaxXRows, B - b0));
    for (int64_t o = o0; o < o1; ++o) row(q, x, s, y, o, b0, I, B);
  }
}

struct Work {
  const int8_t* q;
  const float* x;
  const float* s;
  float* y;
  int64_t O, I, B, block_rows, n_blocks;
  bool generic;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Claim blocks until none is left. Safe to call after the product is finished: a late task
  // claims nothing and touches no buffer.
  void Drain() {
    for (int64_t blk; (blk = next.fetch_add(1)) < n_blocks;) {
      const int64_t o0 = blk * block_rows, o1 = std::min(O, o0 + block_rows);
#ifdef JAXGPT_X86
      if (!generic && HasAvx512())
        RunBlock<true>(q, x, s, y, o0, o1, I, B);
      else
#endif
        RunBlock<false>(q, x, s, y, o0, o1, I, B);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                          ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y, int64_t generic) {
  const auto qd = q.dimensions(), xd = x.dimensions(), yd = y->dimensions();
  if (qd.size() != 2 || xd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("int8_matmul: q, x and y must be matrices");
  const int64_t O = qd[0], I = qd[1], B = xd[0];
  if (xd[1] != I || yd[0] != O || yd[1] != B || scale.element_count() != static_cast<size_t>(O))
    return ffi::Error::InvalidArgument("int8_matmul: shapes do not match (O, I), (O, 1), (B, I) -> (O, B)");
  if (O == 0 || B == 0) return ffi::Error::Success();

  auto work = std::make_shared<Work>();
  work->q = q.typed_data();
  work->x = x.typed_data();
  work->s = scale.typed_data();
  work->y = y->typed_data();
  work->O = O;
  work->I = I;
  work->B = B;
  // One contiguous range of rows per thread (each reads one sequential stream), but no
  // range under kMinBlockBytes of weights: below that, waking a helper costs more than it saves.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads() + 1);
  const int64_t min_rows = std::max<int64_t>(1, kMinBlockBytes / std::max<int64_t>(I, 1));
  work->block_rows = std::max(min_rows, (O + threads - 1) / threads);
  work->n_blocks = (O + work->block_rows - 1) / work->block_rows;
  work->generic = generic != 0;
  const int64_t helpers = work->n_blocks - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  // Blocks claimed by a helper may still be running: wait for them (well under a millisecond).
  while (work->done.load(std::memory_order_acquire) < work->n_blocks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

// The one exported symbol (the library is built with hidden visibility), looked up by ctypes.
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* JaxgptInt8Matmul(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgptInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("generic"));
