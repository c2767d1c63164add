// Input-sparse GEMV over transposed weights, CPU:
//   y[n] = sum over i with |x[i]| >= tau of x[i] * wt[i, n]
// wt is (K, N) with unit column stride, so each input channel's weights are
// one contiguous row and a skipped channel costs no memory traffic at all.
//
// Work split: the active channels are gathered once into (index, value) lists;
// then each thread owns a contiguous block of OUTPUT columns and streams only
// the active rows over its block. Nothing is reduced across threads.
//
// Why the row grouping: a GEMV at batch 1 is memory-bound, and an earlier
// split-K version that updated one accumulator row per weight row spent its
// bandwidth re-reading/re-writing the accumulator. Here a 32-column tile of
// the accumulator sits in registers while kGroup weight rows are applied to
// it, and the accumulator chunk (kChunk columns) stays in L1/L2 for the whole
// pass over the active rows, so DRAM traffic is essentially the active weight
// rows only, read as kGroup long sequential streams.
//
// Registered as the op clada_cpu::sparse_gemv_t_cpu; the public op
// clada::sparse_gemv_t (kernels/__init__.py) validates inputs and calls it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// Active rows applied per pass over an accumulator tile. 8 rows + 4
// accumulator vectors + 8 broadcast scalars fit the 16 AVX2 registers, and 8
// concurrent row streams keep enough loads in flight to saturate DRAM.
constexpr int kGroup = 8;
// Accumulator columns per pass: 8192 fp32 = 32 KiB, L1/L2 resident, while
// keeping each row segment long (up to 32 KiB contiguous) for the prefetchers.
constexpr int64_t kChunk = 8192;
// Row segments up to this long are software-prefetched whole, one group ahead,
// into L2. Short segments (small layers, or N split over many threads) end
// before the hardware prefetcher has ramped up; long ones it handles well, and
// there extra prefetch instructions measured slower.
#ifndef CLADA_PREFETCH_MAX_SEGMENT
#define CLADA_PREFETCH_MAX_SEGMENT 4096
#endif
constexpr int64_t kPrefetchMaxSegment = CLADA_PREFETCH_MAX_SEGMENT;
// Column granularity of the thread split: 32 fp32 = two cache lines of output,
// so threads never write to the same output cache line.
constexpr int64_t kBlock = 32;
// Below this many multiply-adds per thread a parallel region costs more than
// it saves (OpenMP fork/join is a few microseconds).
constexpr int64_t kMinWorkPerThread = 1 << 15;

// GCC/Clang vector extensions instead of intrinsics: portable across ISAs and
// compiled to AVX2/AVX-512 FMAs with -march=native (checked in the assembly:
// the fp32 inner loop is one vfmadd...ps ymm with a memory operand per 8 floats).
typedef float vf __attribute__((vector_size(32)));
constexpr int64_t kVec = 8;

inline vf load_vec(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vf load_vec(const c10::BFloat16* p) {
#if defined(__AVX2__)
  // GCC 12 splits the generic widening below into two 128-bit halves; the
  // intrinsic is a single vpmovzxwd + vpslld.
  __m256i u = _mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  vf v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
#else
  typedef uint16_t vh __attribute__((vector_size(16)));
  typedef uint32_t vu __attribute__((vector_size(32)));
  vh h;
  std::memcpy(&h, p, sizeof(h));
  vu u = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
#endif
}

inline void store_vec(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf splat(float a) { return vf{a, a, a, a, a, a, a, a}; }
inline float load_scalar(const float* p) { return *p; }
inline float load_scalar(const c10::BFloat16* p) { return static_cast<float>(*p); }

// acc[0:n] += sum_g vals[g] * rows[g][0:n], with G a compile-time constant so
// the row loop is fully unrolled and the broadcasts stay in registers.
template <int G, typename W>
inline void accumulate_rows(float* __restrict acc, int64_t n, const W* const* rows,
                            const float* vals) {
  vf v[G];
  const W* r[G];
  for (int g = 0; g < G; ++g) {
    v[g] = splat(vals[g]);
    r[g] = rows[g];
  }
  int64_t c = 0;
  for (; c + 4 * kVec <= n; c += 4 * kVec) {
    vf a0 = load_vec(acc + c);
    vf a1 = load_vec(acc + c + kVec);
    vf a2 = load_vec(acc + c + 2 * kVec);
    vf a3 = load_vec(acc + c + 3 * kVec);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      a0 += v[g] * load_vec(r[g] + c);
      a1 += v[g] * load_vec(r[g] + c + kVec);
      a2 += v[g] * load_vec(r[g] + c + 2 * kVec);
      a3 += v[g] * load_vec(r[g] + c + 3 * kVec);
    }
    store_vec(acc + c, a0);
    store_vec(acc + c + kVec, a1);
    store_vec(acc + c + 2 * kVec, a2);
    store_vec(acc + c + 3 * kVec, a3);
  }
  for (; c + kVec <= n; c += kVec) {
    vf a0 = load_vec(acc + c);
    for (int g = 0; g < G; ++g) a0 += v[g] * load_vec(r[g] + c);
    store_vec(acc + c, a0);
  }
  for (; c < n; ++c) {
    float a = acc[c];
    for (int g = 0; g < G; ++g) a += vals[g] * load_scalar(r[g] + c);
    acc[c] = a;
  }
}

inline void store_output(float* out, const float* acc, int64_t n) {
  std::memcpy(out, acc, n * sizeof(float));
}

inline void store_output(c10::BFloat16* out, const float* acc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = c10::BFloat16(acc[c]);  // round to nearest even
}

// Prefetch a group of row segments of `bytes` each into L2 (locality 2).
template <typename T>
inline void prefetch_rows(const T* wt, int64_t ld, const int32_t* idx, int64_t cs, int64_t bytes) {
  for (int g = 0; g < kGroup; ++g) {
    const char* p = reinterpret_cast<const char*>(wt + static_cast<int64_t>(idx[g]) * ld + cs);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
  }
}

// One thread's share: output columns [c0, c1), in chunks of kChunk columns.
template <typename T>
void gemv_column_block(const T* wt, int64_t ld, const int32_t* idx, const float* val,
                       int64_t nact, T* out, int64_t c0, int64_t c1) {
  std::vector<float> acc_buf(std::min(kChunk, c1 - c0));
  float* acc = acc_buf.data();
  const T* rows[kGroup];
  for (int64_t cs = c0; cs < c1; cs += kChunk) {
    const int64_t n = std::min(kChunk, c1 - cs);
    const int64_t segment_bytes = n * static_cast<int64_t>(sizeof(T));
    const bool prefetch = segment_bytes <= kPrefetchMaxSegment;
    std::memset(acc, 0, n * sizeof(float));
    int64_t a = 0;
    for (; a + kGroup <= nact; a += kGroup) {
      if (prefetch && a + 2 * kGroup <= nact) prefetch_rows(wt, ld, idx + a + kGroup, cs, segment_bytes);
      for (int g = 0; g < kGroup; ++g) rows[g] = wt + static_cast<int64_t>(idx[a + g]) * ld + cs;
      accumulate_rows<kGroup>(acc, n, rows, val + a);
    }
    // Leftover rows (< kGroup): in groups of 4, 2, 1 so they stay unrolled.
    if (a + 4 <= nact) {
      for (int g = 0; g < 4; ++g) rows[g] = wt + static_cast<int64_t>(idx[a + g]) * ld + cs;
      accumulate_rows<4>(acc, n, rows, val + a);
      a += 4;
    }
    if (a + 2 <= nact) {
      for (int g = 0; g < 2; ++g) rows[g] = wt + static_cast<int64_t>(idx[a + g]) * ld + cs;
      accumulate_rows<2>(acc, n, rows, val + a);
      a += 2;
    }
    if (a < nact) {
      rows[0] = wt + static_cast<int64_t>(idx[a]) * ld + cs;
      accumulate_rows<1>(acc, n, rows, val + a);
    }
    store_output(out + cs, acc, n);
  }
}

// y (N,) for x (K,) contiguous and wt (K, N) row-major (see is_row_major).
template <typename T>
void sparse_gemv_t_typed(const at::Tensor& x, const at::Tensor& wt, float tau, at::Tensor& y) {
  const int64_t K = wt.size(0);
  const int64_t N = wt.size(1);
  const int64_t ld = wt.stride(0);
  const T* xp = x.const_data_ptr<T>();
  const T* wp = wt.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();

  // Gather on one thread: K is at most a few ten thousand, far cheaper than a
  // fork/join. Branch-free so a ~50% keep rate costs no mispredictions.
  std::vector<int32_t> idx(K);
  std::vector<float> val(K);
  int64_t nact = 0;
  for (int64_t i = 0; i < K; ++i) {
    const float xi = load_scalar(xp + i);
    idx[nact] = static_cast<int32_t>(i);
    val[nact] = xi;
    nact += (std::fabs(xi) >= tau) ? 1 : 0;
  }
  if (nact == 0) {
    y.zero_();
    return;
  }
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  const int64_t grain =
      std::max<int64_t>(1, (kMinWorkPerThread + nact * kBlock - 1) / (nact * kBlock));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    gemv_column_block<T>(wp, ld, idx.data(), val.data(), nact, yp, b0 * kBlock,
                         std::min(N, b1 * kBlock));
  });
}

// Strides of size-1 dims are never used for addressing, so they may be anything.
bool is_row_major(const at::Tensor& wt) {
  return (wt.stride(1) == 1 || wt.size(1) <= 1) && (wt.stride(0) >= wt.size(1) || wt.size(0) <= 1);
}

// x (..., K) holding one row; returns (..., N) in x's dtype.
at::Tensor sparse_gemv_t_cpu(const at::Tensor& x_in, const at::Tensor& wt_in, const at::Tensor& tau) {
  // The Python op validates user input with readable errors; these checks only
  // guard the raw pointer arithmetic against direct misuse of this op.
  TORCH_CHECK(x_in.device().is_cpu() && wt_in.device().is_cpu() && tau.device().is_cpu(),
              "sparse_gemv_t_cpu: CPU tensors only");
  TORCH_CHECK(wt_in.dim() == 2, "sparse_gemv_t_cpu: wt must be 2-D (K, N)");
  const int64_t K = wt_in.size(0);
  const int64_t N = wt_in.size(1);
  TORCH_CHECK(K <= INT32_MAX, "sparse_gemv_t_cpu: K must fit in int32");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K, "sparse_gemv_t_cpu: x must be (..., K)");
  std::vector<int64_t> out_sizes = x_in.sizes().vec();
  out_sizes.back() = 1;
  TORCH_CHECK(c10::multiply_integers(out_sizes) == 1, "sparse_gemv_t_cpu: x must hold one row");
  TORCH_CHECK(x_in.scalar_type() == wt_in.scalar_type(), "sparse_gemv_t_cpu: x and wt dtypes differ");
  TORCH_CHECK(tau.numel() == 1 && tau.scalar_type() == at::kFloat,
              "sparse_gemv_t_cpu: tau must be a 1-element float32 tensor");
  out_sizes.back() = N;
  at::Tensor y = at::empty(out_sizes, x_in.options());
  if (N == 0) return y;
  // One row: contiguous() is free unless x is a strided view. A non-row-major
  // wt costs a full copy; callers should store wt row-major.
  const at::Tensor x = x_in.contiguous();
  const at::Tensor wt = is_row_major(wt_in) ? wt_in : wt_in.contiguous();
  const float t = tau.item<float>();
  switch (x.scalar_type()) {
    case at::kFloat:
      sparse_gemv_t_typed<float>(x, wt, t, y);
      break;
    case at::kBFloat16:
      sparse_gemv_t_typed<c10::BFloat16>(x, wt, t, y);
      break;
    default:
      TORCH_CHECK(false, "sparse_gemv_t_cpu: only float32 and bfloat16, got ", x.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(clada_cpu, m) {
  m.def("sparse_gemv_t_cpu(Tensor x, Tensor wt, Tensor tau) -> Tensor", &sparse_gemv_t_cpu);
}
