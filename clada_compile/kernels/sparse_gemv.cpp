// Input-sparse GEMV over transposed weights, CPU:
//   y[n] = sum over i with |x[i]| >= tau of x[i] * wt[i, n]
// wt is (K, N) with unit column stride, so each input channel's weights are
// one contiguous row and a skipped channel costs no memory traffic at all.
//
// Work split: the active channels are gathered once into (index, value) lists;
// each thread then streams a contiguous share of the active rows over all
// output columns into its own accumulator, and the per-thread partial outputs
// are summed at the end (see gemv_split_rows for why rows, not columns).
//
// Why the row grouping: a GEMV at batch 1 is memory-bound, and an earlier
// version that updated one accumulator row per weight row spent its bandwidth
// re-reading/re-writing the accumulator. Here a 32-column tile of the
// accumulator (bf16 with AVX-512: 64 columns, see accumulate_rows_bf16) sits
// in registers while kGroup weight rows are applied to it,
// and the accumulator piece (piece_width columns) stays in L1/L2 for the whole pass
// over the rows, so DRAM traffic is essentially the active weight rows only,
// read as kGroup sequential streams far apart in memory.
//
// Registers the internal op clada_cpu::sparse_gemv_t_cpu (single row, no user
// input validation) and, for the CPU dispatch key, an implementation of the
// public op clada::sparse_gemv_t defined in kernels/__init__.py.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>
#include <c10/util/BFloat16.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Active rows applied per pass over an accumulator tile. 8 rows + 4
// accumulator vectors + 8 broadcast scalars fit the 16 AVX2 registers, and 8
// concurrent row streams keep enough loads in flight to saturate DRAM.
constexpr int kGroup = 8;
// Columns per pass ("piece"): at most 32 KiB of each weight row (8192 fp32, 16384 bf16, 32768
// int8 columns), long contiguous row segments for the hardware prefetchers, while the piece's
// fp32 accumulator (32/64/128 KiB) stays in L1/L2. Pieces of one matrix are equal (multiples of
// 64 columns): Qwen2.5's N = 9728 gate|up is two pieces of 4864, not 8192 + a 1536-column
// remainder whose short segments stream badly. Measured against fixed 8192-column pieces for every
// dtype (one process, 25 rounds over one step's GEMVs, paired medians, 2 threads): Qwen2.5-0.5B
// int8 1.12x, bf16 1.07x, fp32 1.01x; SmolLM2 int8 1.02x, bf16 1.00x. (Software prefetch of the
// next group's rows was tried and measured slower, also on the small layers with 1-3 KiB segments.)
constexpr int64_t kPieceBytes = 32768;

template <typename T>
inline int64_t piece_width(int64_t N) {
  const int64_t most = kPieceBytes / static_cast<int64_t>(sizeof(T));
  if (N <= most) return most;
  const int64_t pieces = (N + most - 1) / most;
  return ((N + pieces - 1) / pieces + 63) / 64 * 64;  // <= most: most is a multiple of 64
}
// Below this many multiply-adds per thread a parallel region costs more than
// it saves (OpenMP fork/join is a few microseconds).
constexpr int64_t kMinWorkPerThread = 1 << 15;

// GCC/Clang vector extensions instead of intrinsics: portable across ISAs;
// with -march=native on an AVX2 machine they compile to 256-bit FMAs (checked
// in the assembly: the fp32 inner loop is one vfmadd...ps ymm with a memory
// operand per 8 floats). The fp32 loop is memory-bound, so 512-bit would not
// help it; bf16 has its own AVX-512 path below (accumulate_rows_bf16).
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

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define CLADA_BF16_SPLIT_TILES 1
// bf16 rows with AVX-512. One 64-byte load holds 32 bf16 weights; read as 16 fp32 bit patterns,
// `w << 16` is exactly the even-indexed weights widened to fp32 and `w & 0xFFFF0000` the
// odd-indexed ones. So 32 columns of one row cost a load, a shift, an AND and two FMAs (4 uops:
// the compiler folds the load into the shift and the AND), where the 256-bit widening above costs
// 4 vpmovzxwd + 4 shifts + 4 FMAs. Products and sums stay fp32 with the same FMAs per element,
// so the results contract is unchanged. The price is the accumulator layout: each full 32-column
// tile is kept as [16 even columns | 16 odd columns], and unsplit_tiles restores the column order
// once, after the per-thread partials are summed. Tiles start at every multiple of 32 of a
// piece (piece_width); the last n % 32 columns of a piece stay in natural order (generic path).
// Measured on SmolLM2/Qwen2.5-0.5B shapes (Zen 4 VM, >= 128 MB of weights cycled, old and new
// kernel alternated call by call in one process, median of paired ratios): 1 thread, dense
// +4-15%, 50% of rows kept +9-25% (most on the narrow o/down layers, whose short row segments
// are latency-bound and gain from fewer instructions per byte); 2 threads on a loaded machine
// +3-10% (A/A control 0.99-1.01). The fp32 code is unchanged (identical assembly).
constexpr int64_t kSplitTile = 32;
static_assert(kPieceBytes / 2 % 64 == 0, "pieces are multiples of 64 columns: split tiles never straddle them");

template <int G>
inline void accumulate_rows_bf16(float* __restrict acc, int64_t n, const c10::BFloat16* const* rows,
                                 const float* vals) {
  __m512 v[G];
  const c10::BFloat16* r[G];
  for (int g = 0; g < G; ++g) {
    v[g] = _mm512_set1_ps(vals[g]);
    r[g] = rows[g];
  }
  const __m512i odd = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  int64_t c = 0;
  for (; c + 2 * kSplitTile <= n; c += 2 * kSplitTile) {  // two tiles: 4 accumulators, like fp32
    __m512 e0 = _mm512_loadu_ps(acc + c);
    __m512 o0 = _mm512_loadu_ps(acc + c + 16);
    __m512 e1 = _mm512_loadu_ps(acc + c + 32);
    __m512 o1 = _mm512_loadu_ps(acc + c + 48);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const __m512i w0 = _mm512_loadu_si512(r[g] + c);
      const __m512i w1 = _mm512_loadu_si512(r[g] + c + kSplitTile);
      e0 = _mm512_fmadd_ps(v[g], _mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), e0);
      o0 = _mm512_fmadd_ps(v[g], _mm512_castsi512_ps(_mm512_and_si512(w0, odd)), o0);
      e1 = _mm512_fmadd_ps(v[g], _mm512_castsi512_ps(_mm512_slli_epi32(w1, 16)), e1);
      o1 = _mm512_fmadd_ps(v[g], _mm512_castsi512_ps(_mm512_and_si512(w1, odd)), o1);
    }
    _mm512_storeu_ps(acc + c, e0);
    _mm512_storeu_ps(acc + c + 16, o0);
    _mm512_storeu_ps(acc + c + 32, e1);
    _mm512_storeu_ps(acc + c + 48, o1);
  }
  if (c + kSplitTile <= n) {
    __m512 e0 = _mm512_loadu_ps(acc + c);
    __m512 o0 = _mm512_loadu_ps(acc + c + 16);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const __m512i w0 = _mm512_loadu_si512(r[g] + c);
      e0 = _mm512_fmadd_ps(v[g], _mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), e0);
      o0 = _mm512_fmadd_ps(v[g], _mm512_castsi512_ps(_mm512_and_si512(w0, odd)), o0);
    }
    _mm512_storeu_ps(acc + c, e0);
    _mm512_storeu_ps(acc + c + 16, o0);
    c += kSplitTile;
  }
  if (c < n) {  // < 32 columns, natural order
    const c10::BFloat16* tail[G];
    for (int g = 0; g < G; ++g) tail[g] = r[g] + c;
    accumulate_rows<G>(acc + c, n - c, tail, vals);
  }
}

// Undo the [even | odd] layout of every full 32-column tile of every piece of acc (N,).
inline void unsplit_tiles(float* acc, int64_t N) {
  const int64_t piece = piece_width<c10::BFloat16>(N);  // the pieces gemv_rows walked
  // permutex2var index j < 16 picks e[j], 16 + j picks o[j]: output column 2j <- e[j], 2j+1 <- o[j].
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int64_t cs = 0; cs < N; cs += piece) {
    const int64_t end = cs + std::min(piece, N - cs);
    for (int64_t c = cs; c + kSplitTile <= end; c += kSplitTile) {
      const __m512 e = _mm512_loadu_ps(acc + c);
      const __m512 o = _mm512_loadu_ps(acc + c + 16);
      _mm512_storeu_ps(acc + c, _mm512_permutex2var_ps(e, lo, o));
      _mm512_storeu_ps(acc + c + 16, _mm512_permutex2var_ps(e, hi, o));
    }
  }
}
#endif

// int8 rows (weight-only int8, per-output-channel scales applied once to the summed output in
// gemv_split_rows): each weight is sign-extended and converted to fp32 before its FMA, so the
// products and sums are fp32 exactly as for float weights, over a quarter of the fp32 bytes.
// AVX-512: 16 columns = one 16-byte load (vpmovsxbd) + vcvtdq2ps + one FMA; four accumulators
// per pass like the fp32 loop. Elsewhere the vector extensions' convert (same arithmetic).
template <int G>
inline void accumulate_rows_q8(float* __restrict acc, int64_t n, const int8_t* const* rows,
                               const float* vals) {
  const int8_t* r[G];
  for (int g = 0; g < G; ++g) r[g] = rows[g];
  int64_t c = 0;
#if defined(__AVX512F__)
  __m512 v[G];
  for (int g = 0; g < G; ++g) v[g] = _mm512_set1_ps(vals[g]);
  auto widen = [](const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  };
  for (; c + 64 <= n; c += 64) {
    __m512 a0 = _mm512_loadu_ps(acc + c);
    __m512 a1 = _mm512_loadu_ps(acc + c + 16);
    __m512 a2 = _mm512_loadu_ps(acc + c + 32);
    __m512 a3 = _mm512_loadu_ps(acc + c + 48);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      a0 = _mm512_fmadd_ps(v[g], widen(r[g] + c), a0);
      a1 = _mm512_fmadd_ps(v[g], widen(r[g] + c + 16), a1);
      a2 = _mm512_fmadd_ps(v[g], widen(r[g] + c + 32), a2);
      a3 = _mm512_fmadd_ps(v[g], widen(r[g] + c + 48), a3);
    }
    _mm512_storeu_ps(acc + c, a0);
    _mm512_storeu_ps(acc + c + 16, a1);
    _mm512_storeu_ps(acc + c + 32, a2);
    _mm512_storeu_ps(acc + c + 48, a3);
  }
  for (; c + 16 <= n; c += 16) {
    __m512 a0 = _mm512_loadu_ps(acc + c);
    for (int g = 0; g < G; ++g) a0 = _mm512_fmadd_ps(v[g], widen(r[g] + c), a0);
    _mm512_storeu_ps(acc + c, a0);
  }
#else
  typedef int8_t vb __attribute__((vector_size(kVec)));
  vf v[G];
  for (int g = 0; g < G; ++g) v[g] = splat(vals[g]);
  for (; c + kVec <= n; c += kVec) {
    vf a0 = load_vec(acc + c);
    for (int g = 0; g < G; ++g) {
      vb b;
      std::memcpy(&b, r[g] + c, sizeof(b));
      a0 += v[g] * __builtin_convertvector(b, vf);
    }
    store_vec(acc + c, a0);
  }
#endif
  for (; c < n; ++c) {
    float a = acc[c];
    for (int g = 0; g < G; ++g) a += vals[g] * static_cast<float>(r[g][c]);
    acc[c] = a;
  }
}

// acc[0:n] += sum_g vals[g] * rows[g][0:n] in the kernel's internal accumulator layout: bf16 rows
// take the split-tile path where it is compiled, everything else the generic one.
template <int G, typename T>
inline void accumulate(float* __restrict acc, int64_t n, const T* const* rows, const float* vals) {
#if defined(CLADA_BF16_SPLIT_TILES)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    accumulate_rows_bf16<G>(acc, n, rows, vals);
    return;
  }
#endif
  if constexpr (std::is_same_v<T, int8_t>) {
    accumulate_rows_q8<G>(acc, n, rows, vals);
  } else {
    accumulate_rows<G>(acc, n, rows, vals);
  }
}

// Puts the summed accumulator of sparse_gemv_t_typed<T> back in column order.
template <typename T>
inline void finish_layout(float* acc, int64_t N) {
#if defined(CLADA_BF16_SPLIT_TILES)
  if constexpr (std::is_same_v<T, c10::BFloat16>) unsplit_tiles(acc, N);
#endif
  (void)acc;
  (void)N;
}

inline void store_output(float* out, const float* acc, int64_t n) {
  std::memcpy(out, acc, n * sizeof(float));
}

inline void store_output(c10::BFloat16* out, const float* acc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = c10::BFloat16(acc[c]);  // round to nearest even
}

// Work split: each thread takes a contiguous share of the active ROWS over all N columns and
// accumulates into its own N-float buffer; the partials are summed at the end (N * threads
// floats, negligible next to the rows read). An earlier split of the output COLUMNS gave each
// thread a short segment of every row: strided streams the prefetchers serve badly (measured
// 14-15 GB/s on the N = 576 down projection vs 30-35 GB/s now, interleaved A/B, 160 MB working
// sets). Columns are walked in pieces (piece_width) so the accumulator piece stays in L1/L2.
template <typename T>
void gemv_rows(const T* wt, int64_t ld, const int32_t* idx, const float* val, int64_t a0, int64_t a1,
               float* acc, int64_t N) {
  std::memset(acc, 0, N * sizeof(float));
  // kGroup far-apart streams: the share is cut into kGroup runs and each group takes the next row
  // of every run, so each stream walks its run sequentially (one contiguous region when the rows
  // are dense). Adjacent rows as the group look like one stream to the prefetchers, and one
  // stream per core reads ~25% slower here than several.
  const int64_t len = (a1 - a0) / kGroup;
  const T* rows[kGroup];
  float vals[kGroup];
  const int64_t piece = piece_width<T>(N);
  for (int64_t cs = 0; cs < N; cs += piece) {
    const int64_t n = std::min(piece, N - cs);
    for (int64_t j = 0; j < len; ++j) {
      for (int g = 0; g < kGroup; ++g) {
        const int64_t a = a0 + g * len + j;
        rows[g] = wt + static_cast<int64_t>(idx[a]) * ld + cs;
        vals[g] = val[a];
      }
      accumulate<kGroup>(acc + cs, n, rows, vals);
    }
    for (int64_t a = a0 + kGroup * len; a < a1; ++a) {
      rows[0] = wt + static_cast<int64_t>(idx[a]) * ld + cs;
      accumulate<1>(acc + cs, n, rows, val + a);
    }
  }
}

// out[c] = scale[c] * (the summed partials)[c] when scale is given (int8 weights), else the sum.
template <typename T, typename O>
void gemv_split_rows(const T* wt, int64_t ld, const int32_t* idx, const float* val, int64_t nact,
                     O* out, int64_t N, int64_t parts, const float* scale = nullptr) {
  // not zero-initialized (a vector's would be): gemv_rows zeroes each part's accumulator itself,
  // and a step's calls would otherwise write ~1.6 MB (SmolLM2) twice on the serial path
  std::unique_ptr<float[]> buffer(new float[parts * N]);
  float* const acc0 = buffer.get();
  if (parts == 1) {  // no fork/join for small layers
    gemv_rows<T>(wt, ld, idx, val, 0, nact, acc0, N);
  } else {
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        gemv_rows<T>(wt, ld, idx, val, nact * p / parts, nact * (p + 1) / parts, acc0 + p * N, N);
    });
  }
  for (int64_t p = 1; p < parts; ++p) {
    const float* src = acc0 + p * N;
    for (int64_t c = 0; c < N; ++c) acc0[c] += src[c];
  }
  finish_layout<T>(acc0, N);  // the sum is elementwise, so one reorder after it suffices
  if (scale != nullptr) {
    for (int64_t c = 0; c < N; ++c) acc0[c] *= scale[c];
  }
  store_output(out, acc0, N);
}

// Weight bytes the single-row kernel read (active rows x N x element size), summed over calls:
// what a decode step actually streams once input thresholds drop rows (clada-bench reports it).
std::atomic<int64_t> g_weight_bytes{0};

// Gather on one thread: K is at most a few ten thousand, far cheaper than a fork/join.
// Branch-free so a ~50% keep rate costs no mispredictions. Returns the kept count.
template <typename X>
int64_t gather(const X* xp, int64_t K, float tau, int32_t* idx, float* val) {
  int64_t nact = 0;
  for (int64_t i = 0; i < K; ++i) {
    const float xi = load_scalar(xp + i);
    idx[nact] = static_cast<int32_t>(i);
    val[nact] = xi;
    nact += (std::fabs(xi) >= tau) ? 1 : 0;
  }
  return nact;
}

// Threads for nact kept rows of N columns: one per kGroup rows at least, and enough work each.
int64_t parts_for(int64_t nact, int64_t N) {
  return std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), nact / kGroup,
                                                 nact * N / kMinWorkPerThread}));
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

  std::vector<int32_t> idx(K);
  std::vector<float> val(K);
  const int64_t nact = gather(xp, K, tau, idx.data(), val.data());
  g_weight_bytes.fetch_add(nact * N * static_cast<int64_t>(sizeof(T)), std::memory_order_relaxed);
  if (nact == 0) {
    y.zero_();
    return;
  }
  gemv_split_rows<T>(wp, ld, idx.data(), val.data(), nact, yp, N, parts_for(nact, N));
}

// int8 weights: y (N,) float32 = scale * (sum over kept i of x[i] * float(wq[i, :])), x float32.
void sparse_gemv_t_q8_typed(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scale, float tau,
                            at::Tensor& y) {
  const int64_t K = wq.size(0);
  const int64_t N = wq.size(1);
  std::vector<int32_t> idx(K);
  std::vector<float> val(K);
  const int64_t nact = gather(x.const_data_ptr<float>(), K, tau, idx.data(), val.data());
  g_weight_bytes.fetch_add(nact * N + N * static_cast<int64_t>(sizeof(float)), std::memory_order_relaxed);
  if (nact == 0) {
    y.zero_();
    return;
  }
  gemv_split_rows<int8_t>(wq.const_data_ptr<int8_t>(), wq.stride(0), idx.data(), val.data(), nact,
                          y.mutable_data_ptr<float>(), N, parts_for(nact, N), scale.const_data_ptr<float>());
}

// Strides of size-1 dims are never used for addressing, so they may be anything.
bool is_row_major(const at::Tensor& wt) {
  return (wt.stride(1) == 1 || wt.size(1) <= 1) && (wt.stride(0) >= wt.size(1) || wt.size(0) <= 1);
}

// Calls of the single-row kernel, for tests and debugging of the dispatch.
std::atomic<int64_t> g_kernel_calls{0};

// x (..., K) holding one row; returns (..., N) in x's dtype.
at::Tensor sparse_gemv_t_cpu(const at::Tensor& x_in, const at::Tensor& wt_in, const at::Tensor& tau) {
  // User input is validated with readable errors by the op (check_inputs here,
  // _check_inputs in Python); these checks only guard the pointer arithmetic
  // against direct misuse of this internal op.
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
  g_kernel_calls.fetch_add(1, std::memory_order_relaxed);
  out_sizes.back() = N;
  at::Tensor y = at::empty(out_sizes, x_in.options());
  if (N == 0) return y;
  // One row: contiguous() is free unless x is a strided view. A non-row-major
  // wt costs a full copy; callers should store wt row-major.
  const at::Tensor x = x_in.contiguous();
  const at::Tensor wt = is_row_major(wt_in) ? wt_in : wt_in.contiguous();
  const float t = *tau.const_data_ptr<float>();  // item() would be another dispatcher round trip
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

// x (..., K) float32 holding one row, wq (K, N) int8, scale (N,) float32; returns (..., N) float32.
at::Tensor sparse_gemv_t_q8_cpu(const at::Tensor& x_in, const at::Tensor& wq_in, const at::Tensor& scale_in,
                                const at::Tensor& tau) {
  TORCH_CHECK(x_in.device().is_cpu() && wq_in.device().is_cpu() && scale_in.device().is_cpu() &&
                  tau.device().is_cpu(),
              "sparse_gemv_t_q8_cpu: CPU tensors only");
  TORCH_CHECK(wq_in.dim() == 2 && wq_in.scalar_type() == at::kChar, "sparse_gemv_t_q8_cpu: wq must be 2-D int8");
  const int64_t K = wq_in.size(0);
  const int64_t N = wq_in.size(1);
  TORCH_CHECK(K <= INT32_MAX, "sparse_gemv_t_q8_cpu: K must fit in int32");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K && x_in.scalar_type() == at::kFloat,
              "sparse_gemv_t_q8_cpu: x must be float32 (..., K)");
  TORCH_CHECK(scale_in.numel() == N && scale_in.scalar_type() == at::kFloat,
              "sparse_gemv_t_q8_cpu: scale must be float32 (N,)");
  std::vector<int64_t> out_sizes = x_in.sizes().vec();
  out_sizes.back() = 1;
  TORCH_CHECK(c10::multiply_integers(out_sizes) == 1, "sparse_gemv_t_q8_cpu: x must hold one row");
  TORCH_CHECK(tau.numel() == 1 && tau.scalar_type() == at::kFloat,
              "sparse_gemv_t_q8_cpu: tau must be a 1-element float32 tensor");
  g_kernel_calls.fetch_add(1, std::memory_order_relaxed);
  out_sizes.back() = N;
  at::Tensor y = at::empty(out_sizes, x_in.options());
  if (N == 0) return y;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor wq = is_row_major(wq_in) ? wq_in : wq_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  sparse_gemv_t_q8_typed(x, wq, scale, *tau.const_data_ptr<float>(), y);
  return y;
}

// --- CATS-style up projection: only the rows whose gate passes --------------------------------
// h[j] = a[j] * dot(w[j, :], x) where |a[j]| >= tau, else 0; w (M, D) row-major (neuron-major up
// weights: each kept neuron's row is one contiguous read), a = act(gate) (M,), x (D,). The baseline
// of arXiv 2404.08763 (CATS): the gate is computed in full, up and down skip the dropped neurons.
// out[g] = dot(rows[g][0:D], x[0:D]) for G rows at once: G concurrent streams (as gemv_rows keeps
// kGroup, one stream per core reads slower here than several) and one load of x per G rows.
template <int G, typename W>
inline void dot_rows(const W* const* rows, const float* x, int64_t D, float* out) {
  vf s[G];
  for (int g = 0; g < G; ++g) s[g] = splat(0.f);
  int64_t d = 0;
  for (; d + kVec <= D; d += kVec) {
    const vf xv = load_vec(x + d);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) s[g] += load_vec(rows[g] + d) * xv;
  }
  for (int g = 0; g < G; ++g) {
    float acc = 0.f;
    for (int i = 0; i < kVec; ++i) acc += s[g][i];
    for (int64_t e = d; e < D; ++e) acc += load_scalar(rows[g] + e) * x[e];
    out[g] = acc;
  }
}

template <typename T>
void gated_rows_typed(const at::Tensor& x, const at::Tensor& w, const at::Tensor& a, float tau, at::Tensor& h) {
  const int64_t M = w.size(0);
  const int64_t D = w.size(1);
  const int64_t ld = w.stride(0);
  const T* wp = w.const_data_ptr<T>();
  T* hp = h.mutable_data_ptr<T>();
  std::vector<float> xf(D);
  const T* xp = x.const_data_ptr<T>();
  for (int64_t d = 0; d < D; ++d) xf[d] = load_scalar(xp + d);
  std::vector<int32_t> idx(M);
  std::vector<float> val(M);
  const int64_t nact = gather(a.const_data_ptr<T>(), M, tau, idx.data(), val.data());
  g_weight_bytes.fetch_add(nact * D * static_cast<int64_t>(sizeof(T)), std::memory_order_relaxed);
  for (int64_t j = 0; j < M; ++j) hp[j] = T(0.f);
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(D, 1));
  at::parallel_for(0, nact, grain, [&](int64_t a0, int64_t a1) {
    // kGroup far-apart runs of the share, one row of each per pass (gemv_rows' stream layout)
    const int64_t len = (a1 - a0) / kGroup;
    const T* rows[kGroup];
    float dots[kGroup];
    for (int64_t r = 0; r < len; ++r) {
      for (int g = 0; g < kGroup; ++g) rows[g] = wp + static_cast<int64_t>(idx[a0 + g * len + r]) * ld;
      dot_rows<kGroup>(rows, xf.data(), D, dots);
      for (int g = 0; g < kGroup; ++g) {
        const int64_t i = a0 + g * len + r;
        hp[idx[i]] = T(val[i] * dots[g]);
      }
    }
    for (int64_t i = a0 + kGroup * len; i < a1; ++i) {
      rows[0] = wp + static_cast<int64_t>(idx[i]) * ld;
      dot_rows<1>(rows, xf.data(), D, dots);
      hp[idx[i]] = T(val[i] * dots[0]);
    }
  });
}

// x (..., D) holding one row, w (M, D), a (..., M) in x's dtype (float32 or bfloat16); returns (..., M).
at::Tensor gated_rows_gemv_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& a_in,
                               const at::Tensor& tau) {
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu() && a_in.device().is_cpu() && tau.device().is_cpu(),
              "gated_rows_gemv_cpu: CPU tensors only");
  TORCH_CHECK(w_in.dim() == 2, "gated_rows_gemv_cpu: w must be 2-D (M, D)");
  const int64_t M = w_in.size(0);
  const int64_t D = w_in.size(1);
  TORCH_CHECK(M <= INT32_MAX, "gated_rows_gemv_cpu: M must fit in int32");
  TORCH_CHECK(x_in.numel() == D && a_in.numel() == M, "gated_rows_gemv_cpu: x must hold one row of D, a one of M");
  TORCH_CHECK(x_in.scalar_type() == w_in.scalar_type() && a_in.scalar_type() == w_in.scalar_type(),
              "gated_rows_gemv_cpu: x, w and a dtypes differ");
  TORCH_CHECK(tau.numel() == 1 && tau.scalar_type() == at::kFloat,
              "gated_rows_gemv_cpu: tau must be a 1-element float32 tensor");
  g_kernel_calls.fetch_add(1, std::memory_order_relaxed);
  at::Tensor h = at::empty(a_in.sizes(), a_in.options());
  if (M == 0) return h;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor a = a_in.contiguous();
  const at::Tensor w = is_row_major(w_in) ? w_in : w_in.contiguous();
  const float t = *tau.const_data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat:
      gated_rows_typed<float>(x, w, a, t, h);
      break;
    case at::kBFloat16:
      gated_rows_typed<c10::BFloat16>(x, w, a, t, h);
      break;
    default:
      TORCH_CHECK(false, "gated_rows_gemv_cpu: only float32 and bfloat16, got ", x.scalar_type());
  }
  return h;
}

// --- clada::sparse_gemv_t for the CPU dispatch key ----------------------------
// The op is defined in Python (kernels/__init__.py) with one Python
// implementation for all devices. Once this library is loaded, the function
// below takes over CPU calls: the same dispatch rule and the same ValueError
// messages, minus ~10-20 us of Python per call, which is a quarter of a
// small layer's GEMV. Keep both in sync.

std::string py_shape(at::IntArrayRef sizes) {  // Python's tuple repr: (), (3,), (3, 5)
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + (sizes.size() == 1 ? ",)" : ")");
}

std::string py_dtype(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

void check_inputs(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& tau) {
  TORCH_CHECK_VALUE(wt.dim() == 2, "`wt` must be 2-D (K, N), got shape ", py_shape(wt.sizes()));
  TORCH_CHECK_VALUE(x.dim() >= 1, "`x` must have shape (..., K), got shape ", py_shape(x.sizes()));
  TORCH_CHECK_VALUE(x.size(-1) == wt.size(0), "`x` last dim must equal `wt` rows (K): got x shape ",
                    py_shape(x.sizes()), ", wt shape ", py_shape(wt.sizes()));
  TORCH_CHECK_VALUE(x.scalar_type() == wt.scalar_type(), "`x` and `wt` dtypes must match, got ",
                    py_dtype(x.scalar_type()), " and ", py_dtype(wt.scalar_type()));
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "`x` must be a floating-point tensor, got ",
                    py_dtype(x.scalar_type()));
  TORCH_CHECK_VALUE(tau.scalar_type() == at::kFloat && tau.numel() == 1 && tau.dim() <= 1,
                    "`tau` must be a 1-element float32 tensor (0-dim or shape (1,)), got dtype ",
                    py_dtype(tau.scalar_type()), " shape ", py_shape(tau.sizes()));
  TORCH_CHECK_VALUE(x.device() == wt.device(), "`x` and `wt` must be on one device, got ",
                    x.device().str(), " and ", wt.device().str());
}

// reference_sparse_gemv_t: threshold test in float32, then a dense matmul.
at::Tensor reference(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& tau) {
  at::Tensor mag = x.abs();
  if (mag.scalar_type() == at::kHalf || mag.scalar_type() == at::kBFloat16) mag = mag.to(at::kFloat);
  return at::where(mag.ge(tau), x, 0).matmul(wt);
}

at::Tensor sparse_gemv_t_op_cpu(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& tau) {
  check_inputs(x, wt, tau);
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const bool kernel_dtype = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  if (rows == 1 && kernel_dtype && x.device().is_cpu() && wt.device().is_cpu()) {
    return sparse_gemv_t_cpu(x, wt, tau.device().is_cpu() ? tau : tau.cpu());
  }
  return reference(x, wt, tau.to(x.device()));
}

void check_inputs_q8(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scale, const at::Tensor& tau) {
  TORCH_CHECK_VALUE(wq.dim() == 2 && wq.scalar_type() == at::kChar, "`wq` must be a 2-D int8 tensor (K, N), got dtype ",
                    py_dtype(wq.scalar_type()), " shape ", py_shape(wq.sizes()));
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == wq.size(0), "`x` last dim must equal `wq` rows (K): got x shape ",
                    py_shape(x.sizes()), ", wq shape ", py_shape(wq.sizes()));
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, "`x` must be float32 for int8 weights, got ",
                    py_dtype(x.scalar_type()));
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == wq.size(1),
                    "`scale` must be float32 of shape (N,) = (", wq.size(1), ",), got dtype ",
                    py_dtype(scale.scalar_type()), " shape ", py_shape(scale.sizes()));
  TORCH_CHECK_VALUE(tau.scalar_type() == at::kFloat && tau.numel() == 1 && tau.dim() <= 1,
                    "`tau` must be a 1-element float32 tensor (0-dim or shape (1,)), got dtype ",
                    py_dtype(tau.scalar_type()), " shape ", py_shape(tau.sizes()));
  TORCH_CHECK_VALUE(x.device() == wq.device() && x.device() == scale.device(),
                    "`x`, `wq` and `scale` must be on one device, got ", x.device().str(), ", ", wq.device().str(),
                    " and ", scale.device().str());
}

// reference_sparse_gemv_t_q8: threshold test in float32, dense matmul with the dequantized columns.
at::Tensor sparse_gemv_t_q8_op_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scale,
                                   const at::Tensor& tau) {
  check_inputs_q8(x, wq, scale, tau);
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  if (rows == 1) return sparse_gemv_t_q8_cpu(x, wq, scale, tau.device().is_cpu() ? tau : tau.cpu());
  return at::where(x.abs().ge(tau.to(x.device())), x, 0).matmul(wq.to(at::kFloat)).mul(scale);
}

// The same checks and dispatch as kernels/__init__.py's _gated_rows_gemv_impl (keep both in sync).
at::Tensor gated_rows_gemv_op_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& a, const at::Tensor& tau) {
  TORCH_CHECK_VALUE(w.dim() == 2, "`w` must be 2-D (M, D), got shape ", py_shape(w.sizes()));
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == w.size(1), "`x` last dim must equal `w` columns (D): got x shape ",
                    py_shape(x.sizes()), ", w shape ", py_shape(w.sizes()));
  TORCH_CHECK_VALUE(a.dim() == x.dim() && a.size(-1) == w.size(0) &&
                        std::equal(a.sizes().begin(), a.sizes().end() - 1, x.sizes().begin()),
                    "`a` must have shape (..., M) matching x's leading dims: got a shape ", py_shape(a.sizes()),
                    ", x shape ", py_shape(x.sizes()), ", w shape ", py_shape(w.sizes()));
  TORCH_CHECK_VALUE(x.scalar_type() == w.scalar_type() && a.scalar_type() == w.scalar_type(),
                    "`x`, `w` and `a` dtypes must match, got ", py_dtype(x.scalar_type()), ", ",
                    py_dtype(w.scalar_type()), " and ", py_dtype(a.scalar_type()));
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "`x` must be a floating-point tensor, got ",
                    py_dtype(x.scalar_type()));
  TORCH_CHECK_VALUE(tau.scalar_type() == at::kFloat && tau.numel() == 1 && tau.dim() <= 1,
                    "`tau` must be a 1-element float32 tensor (0-dim or shape (1,)), got dtype ",
                    py_dtype(tau.scalar_type()), " shape ", py_shape(tau.sizes()));
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const bool kernel_dtype = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  if (rows == 1 && kernel_dtype) return gated_rows_gemv_cpu(x, w, a, tau.device().is_cpu() ? tau : tau.cpu());
  at::Tensor mag = a.abs();
  if (mag.scalar_type() != at::kFloat) mag = mag.to(at::kFloat);
  return at::where(mag.ge(tau.to(a.device())), a.mul(x.matmul(w.t())), 0);
}

int64_t kernel_calls() { return g_kernel_calls.load(std::memory_order_relaxed); }
int64_t weight_bytes_read() { return g_weight_bytes.load(std::memory_order_relaxed); }

}  // namespace

TORCH_LIBRARY(clada_cpu, m) {
  m.def("sparse_gemv_t_cpu(Tensor x, Tensor wt, Tensor tau) -> Tensor", &sparse_gemv_t_cpu);
  m.def("sparse_gemv_t_q8_cpu(Tensor x, Tensor wq, Tensor scale, Tensor tau) -> Tensor", &sparse_gemv_t_q8_cpu);
  m.def("gated_rows_gemv_cpu(Tensor x, Tensor w, Tensor a, Tensor tau) -> Tensor", &gated_rows_gemv_cpu);
  m.def("kernel_calls() -> int", &kernel_calls);
  m.def("weight_bytes_read() -> int", &weight_bytes_read);
}

TORCH_LIBRARY_IMPL(clada, CPU, m) {
  m.impl("sparse_gemv_t", &sparse_gemv_t_op_cpu);
  m.impl("sparse_gemv_t_q8", &sparse_gemv_t_q8_op_cpu);
  m.impl("gated_rows_gemv", &gated_rows_gemv_op_cpu);
}
