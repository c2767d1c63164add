// Attention of a few query rows over a KV cache, CPU, float32 or bfloat16 (fp32 math; decode steps):
//   out[b,h,m,:] = softmax_t(scale * q[b,h,m,:] . k[b,h,t,:] + mask[b,h,m,t]) @ v[b,h,:,:]
//
// Why not aten's SDPA: at decode a layer's attention is a few query rows (grouped-query heads
// stacked, passes/gqa.py) over the whole cache, a memory-bound read of K and V. aten's CPU
// flash kernel splits the work by (batch, head, query block) only: SmolLM2's 3 KV heads on 2
// threads leave one thread idle half the time, ~75 us per layer at 384 cached tokens for
// 0.6 MB. Here the cache is also split along t (flash-decoding): every thread streams its own
// chunks of K then V once, for all query rows of its head, and the chunks' partial softmaxes
// are merged at the end.
//
// Registers the internal op clada_cpu::decode_attention_cpu and, for the CPU dispatch key, an
// implementation of the public op clada::decode_attention defined in kernels/__init__.py.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 16;    // query rows per (batch, head): more is a prefill, aten's job
constexpr int64_t kMaxDim = 512;    // head dims the kernel takes
constexpr int64_t kMinChunk = 64;   // cache rows per work item at least (fork/join is microseconds)
constexpr int64_t kMaxChunk = 1024; // and at most (the scores of a chunk stay in L1/L2)

// exp(x) for x <= 0 (scores minus their max), vectorizable: x = n ln2 + r, |r| <= ln2 / 2,
// e^r by its Taylor series to r^7 (relative error < 1e-8), 2^n through the exponent bits.
// Below -87 (and for -inf, a masked position) it is exactly 0, as in aten's softmax.
inline float exp_nonpositive(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  const float r = xc - n * 0.693147180559945309f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// bf16 -> fp32 is the bf16 bits in the upper half of the float: vectorizes as a shift
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename E>
struct Args {
  const E* q;
  const E* k;
  const E* v;
  const E* mask_f;      // additive mask (q's dtype), or nullptr
  const bool* mask_b;   // boolean mask (true = attend), or nullptr
  int64_t q_s[3], k_s[3], v_s[3], m_s[4];  // strides: q (b, h, m), k/v (b, h, t), mask (b, h, m, t)
  int64_t H, M, T, D, Dv, chunks, chunk;
  float scale;
};

// scores[m * n + t] = qf[m] . k[t] for the chunk's n cache rows (k at its first row).
// Generic: one dot product per (row, t) pair.
template <typename E>
void scores_generic(const Args<E>& a, const E* k, const float* qf, int64_t n, float* scores) {
  for (int64_t t = 0; t < n; ++t) {
    const E* kr = k + t * a.k_s[2];
    for (int64_t m = 0; m < a.M; ++m) {
      const float* qr = qf + m * a.D;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < a.D; ++d) s += qr[d] * to_float(kr[d]);
      scores[m * n + t] = s;
    }
  }
}

// acc[m, :] = sum over t of scores[m * n + t] * v[t, :] (acc zeroed here).
template <typename E>
void values_generic(const Args<E>& a, const E* v, const float* scores, int64_t n, float* acc) {
  std::fill(acc, acc + a.M * a.Dv, 0.0f);
  for (int64_t t = 0; t < n; ++t) {
    const E* vr = v + t * a.v_s[2];
    for (int64_t m = 0; m < a.M; ++m) {
      const float p = scores[m * n + t];
      if (p == 0.0f) continue;
      float* out = acc + m * a.Dv;
#pragma omp simd
      for (int64_t d = 0; d < a.Dv; ++d) out[d] += p * to_float(vr[d]);
    }
  }
}

#if defined(__AVX512F__)
// AVX-512: dot products for head dims 64 / 128 / 256, the value pass for 64 / 128. The generic loops above keep a query row's output
// accumulator in memory (a load and a store per cache row and 16 columns) and take each dot
// product with its own reduction; the vector code here holds a cache row's K in registers for every
// query row's dot product, and the V pass holds all of a pass's output rows x columns in
// registers while V streams through once, in order. V's rows are prefetched into L2 while K
// streams. Measured (old generic vs this, one process, interleaved, 30 layers' caches cycled with
// the L3 flushed each round, 2 threads, medians of 40): SmolLM2's 3 heads x 3 rows at 300 / 600
// cached tokens 41 -> 29 / 65 -> 48 us (fp32), 39 -> 17 / 73 -> 32 us (bf16); Qwen2.5-0.5B's
// 2 heads x 7 rows 1.6-1.7x (fp32), 2.4-2.5x (bf16). Same products, summed in another order:
// within fp32 rounding of the generic path (tests/test_attention.py's float64 oracle).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

template <int J, typename E>  // J = D / 16: 4, 8 or 16
void scores_avx512(const Args<E>& a, const E* k, const E* v, const float* qf, int64_t n, float* scores) {
  static_assert(J >= 2 && J % 2 == 0, "two accumulator chains over an even number of blocks");
  const int64_t v_bytes = a.Dv * static_cast<int64_t>(sizeof(E));
  for (int64_t t = 0; t < n; ++t) {
    const E* kr = k + t * a.k_s[2];
    // V's row t into the cache while K streams: the values pass then reads it from L2, and two
    // streams are in flight instead of one (a chunk's V is tens of KB)
    const char* vr = reinterpret_cast<const char*>(v + t * a.v_s[2]);
    for (int64_t off = 0; off < v_bytes; off += 64) _mm_prefetch(vr + off, _MM_HINT_T1);
    __m512 kv[J];
    for (int j = 0; j < J; ++j) kv[j] = load16(kr + 16 * j);
    for (int64_t m = 0; m < a.M; ++m) {
      const float* qr = qf + m * a.D;
      __m512 s0 = _mm512_mul_ps(load16(qr), kv[0]);
      __m512 s1 = _mm512_mul_ps(load16(qr + 16), kv[1]);
      for (int j = 2; j < J; j += 2) {
        s0 = _mm512_fmadd_ps(load16(qr + 16 * j), kv[j], s0);
        s1 = _mm512_fmadd_ps(load16(qr + 16 * (j + 1)), kv[j + 1], s1);
      }
      scores[m * n + t] = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    }
  }
}

// R output rows x J 16-column blocks of accumulators held in registers over the chunk's n cache
// rows, each V row read once, in order (a pass per column block would walk V with a stride of a
// row, which the prefetchers serve badly).
template <int R, int J, typename E>
void values_rows_avx512(const Args<E>& a, const E* v, const float* scores, int64_t n, float* acc) {
  __m512 o[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) o[r][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const E* vr = v + t * a.v_s[2];
    __m512 vv[J];
    for (int j = 0; j < J; ++j) vv[j] = load16(vr + 16 * j);
    for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(scores[r * n + t]);
      for (int j = 0; j < J; ++j) o[r][j] = _mm512_fmadd_ps(p, vv[j], o[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) _mm512_storeu_ps(acc + r * a.Dv + 16 * j, o[r][j]);
}

// Rows in passes of at most kRows, so accumulators + one V row fit the 32 vector registers.
template <int J, typename E>
void values_avx512(const Args<E>& a, const E* v, const float* scores, int64_t n, float* acc) {
  constexpr int kRows = J >= 8 ? 2 : 24 / J;
  for (int64_t m0 = 0; m0 < a.M; m0 += kRows) {
    const float* s = scores + m0 * n;
    float* o = acc + m0 * a.Dv;
    switch (std::min<int64_t>(kRows, a.M - m0)) {
      case 1: values_rows_avx512<1, J>(a, v, s, n, o); break;
      case 2: values_rows_avx512<2, J>(a, v, s, n, o); break;
      case 3: values_rows_avx512<3, J>(a, v, s, n, o); break;
      case 4: values_rows_avx512<4, J>(a, v, s, n, o); break;
      case 5: values_rows_avx512<5, J>(a, v, s, n, o); break;
      default: values_rows_avx512<kRows, J>(a, v, s, n, o); break;
    }
  }
}
#endif

template <typename E>
void scores_chunk(const Args<E>& a, const E* k, const E* v, const float* qf, int64_t n, float* scores) {
#if defined(__AVX512F__)
  switch (a.D) {
    case 64: return scores_avx512<4>(a, k, v, qf, n, scores);
    case 128: return scores_avx512<8>(a, k, v, qf, n, scores);
    case 256: return scores_avx512<16>(a, k, v, qf, n, scores);
    default: break;
  }
#endif
  scores_generic(a, k, qf, n, scores);
}

template <typename E>
void values_chunk(const Args<E>& a, const E* v, const float* scores, int64_t n, float* acc) {
#if defined(__AVX512F__)
  switch (a.Dv) {
    case 64: return values_avx512<4>(a, v, scores, n, acc);
    case 128: return values_avx512<8>(a, v, scores, n, acc);
    default: break;
  }
#endif
  values_generic(a, v, scores, n, acc);
}

// One (batch, head, chunk of t) item: for every query row its max score, sum of exp and the
// exp-weighted sum of V rows over the chunk. K and V rows are each read once.
template <typename E>
void attend_chunk(const Args<E>& a, int64_t item, float* qf, float* scores, float* mx, float* sum, float* acc) {
  const int64_t bh = item / a.chunks, c = item % a.chunks, b = bh / a.H, h = bh % a.H;
  const int64_t t0 = c * a.chunk, t1 = std::min(a.T, t0 + a.chunk), n = t1 - t0;
  const E* q = a.q + b * a.q_s[0] + h * a.q_s[1];
  const E* k = a.k + b * a.k_s[0] + h * a.k_s[1] + t0 * a.k_s[2];
  const E* v = a.v + b * a.v_s[0] + h * a.v_s[1] + t0 * a.v_s[2];
  for (int64_t m = 0; m < a.M; ++m)  // the query rows in fp32, scale folded in
    for (int64_t d = 0; d < a.D; ++d) qf[m * a.D + d] = to_float(q[m * a.q_s[2] + d]) * a.scale;
  scores_chunk(a, k, v, qf, n, scores);
  const int64_t mb = b * a.m_s[0] + h * a.m_s[1];
  if (a.mask_f || a.mask_b) {
    for (int64_t m = 0; m < a.M; ++m) {
      float* s = scores + m * n;
      const int64_t mi = mb + m * a.m_s[2] + t0 * a.m_s[3];
      if (a.mask_f)
        for (int64_t t = 0; t < n; ++t) s[t] += to_float(a.mask_f[mi + t * a.m_s[3]]);
      if (a.mask_b)
        for (int64_t t = 0; t < n; ++t)
          if (!a.mask_b[mi + t * a.m_s[3]]) s[t] = -std::numeric_limits<float>::infinity();
    }
  }
  for (int64_t m = 0; m < a.M; ++m) {
    float* s = scores + m * n;
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) best = std::max(best, s[t]);
    mx[m] = best;
    float total = 0.0f;
    if (best == -std::numeric_limits<float>::infinity()) {  // every position masked
      std::fill(s, s + n, 0.0f);
    } else {
#pragma omp simd reduction(+ : total)
      for (int64_t t = 0; t < n; ++t) {
        const float p = exp_nonpositive(s[t] - best);
        s[t] = p;
        total += p;
      }
    }
    sum[m] = total;
  }
  values_chunk(a, v, scores, n, acc);
}

bool kernel_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& mask) {
  if (!q.device().is_cpu() || q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return false;
  const auto dtype = q.scalar_type();
  if (dtype != at::kFloat && dtype != at::kBFloat16) return false;
  for (const auto* t : {&q, &k, &v})
    if (t->scalar_type() != dtype || t->stride(3) != 1) return false;
  const int64_t B = q.size(0), H = q.size(1);
  if (k.size(0) != B || v.size(0) != B || k.size(1) != H || v.size(1) != H) return false;  // broadcasts: aten
  if (q.size(2) > kMaxRows || q.size(3) > kMaxDim || v.size(3) > kMaxDim || k.size(3) != q.size(3)) return false;
  if (k.size(2) != v.size(2) || k.size(2) == 0) return false;
  if (mask) {
    if (mask->dim() != 4 || !(mask->scalar_type() == dtype || mask->scalar_type() == at::kBool)) return false;
  }
  return true;
}

template <typename E>
void attention_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3), T = k.size(2), Dv = v.size(3);
  Args<E> a{};
  a.q = q.data_ptr<E>();
  a.k = k.data_ptr<E>();
  a.v = v.data_ptr<E>();
  for (int i = 0; i < 3; ++i) {
    a.q_s[i] = q.stride(i);
    a.k_s[i] = k.stride(i);
    a.v_s[i] = v.stride(i);
  }
  at::Tensor m;
  if (mask) {
    m = mask->expand({B, H, M, T});  // broadcast dims get stride 0
    if (m.scalar_type() == at::kBool) {
      a.mask_b = m.data_ptr<bool>();
    } else {
      a.mask_f = m.data_ptr<E>();
    }
    for (int i = 0; i < 4; ++i) a.m_s[i] = m.stride(i);
  }
  a.H = H, a.M = M, a.T = T, a.D = D, a.Dv = Dv, a.scale = static_cast<float>(scale);
  // enough items for every thread to get several, each at least kMinChunk rows of the cache
  const int64_t threads = at::get_num_threads();
  const int64_t want = (4 * threads + B * H - 1) / (B * H);
  a.chunks = std::max<int64_t>(1, std::min(want, (T + kMinChunk - 1) / kMinChunk));
  a.chunks = std::max(a.chunks, (T + kMaxChunk - 1) / kMaxChunk);
  a.chunk = (T + a.chunks - 1) / a.chunks;
  a.chunks = (T + a.chunk - 1) / a.chunk;
  const int64_t items = B * H * a.chunks;
  std::vector<float> mx(items * M), sum(items * M), acc(items * M * Dv);
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(M * a.chunk), qf(M * D);
    for (int64_t i = i0; i < i1; ++i)
      attend_chunk(a, i, qf.data(), scores.data(), mx.data() + i * M, sum.data() + i * M, acc.data() + i * M * Dv);
  });
  // merge the chunks of each (batch, head, row): rescale to the global max
  E* o = out.data_ptr<E>();
  std::vector<float> dst(Dv);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t r = 0; r < M; ++r) {
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < a.chunks; ++c) best = std::max(best, mx[(bh * a.chunks + c) * M + r]);
      std::fill(dst.begin(), dst.end(), 0.0f);
      E* row = o + (bh * M + r) * Dv;
      if (best == -std::numeric_limits<float>::infinity()) {  // fully masked row: zeros
        std::fill(row, row + Dv, static_cast<E>(0.0f));
        continue;
      }
      float total = 0.0f;
      for (int64_t c = 0; c < a.chunks; ++c) {
        const int64_t i = bh * a.chunks + c;
        const float mxc = mx[i * M + r];
        if (mxc == -std::numeric_limits<float>::infinity()) continue;
        const float w = std::exp(mxc - best);
        total += w * sum[i * M + r];
        const float* src = acc.data() + (i * M + r) * Dv;
        for (int64_t d = 0; d < Dv; ++d) dst[d] += w * src[d];
      }
      const float inv = 1.0f / total;
      for (int64_t d = 0; d < Dv; ++d) row[d] = static_cast<E>(dst[d] * inv);
    }
  }
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& mask, double scale) {
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  if (out.numel() == 0) return out;
  if (q.scalar_type() == at::kBFloat16) {
    attention_typed<c10::BFloat16>(q, k, v, mask, scale, out);
  } else {
    attention_typed<float>(q, k, v, mask, scale, out);
  }
  return out;
}

// The public op on CPU: the kernel where it applies, aten's SDPA (the same function) elsewhere.
std::string shape_of(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += std::to_string(t.size(i)) + (t.dim() == 1 ? "," : i + 1 < t.dim() ? ", " : "");
  return s + ")";
}

// the same checks and messages as kernels/__init__.py's _check_attention
void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "`q`, `k`, `v` must be 4-D (batch, heads, tokens, dim), got shapes ", shape_of(q), ", ",
                    shape_of(k), ", ", shape_of(v));
  TORCH_CHECK_VALUE(!mask || mask->dim() == 4,
                    "`mask` must be None or 4-D (broadcastable to batch, heads, queries, keys), got shape ",
                    shape_of(*mask));
}

at::Tensor decode_attention_op_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::optional<at::Tensor>& mask, double scale) {
  check_attention(q, k, v, mask);
  if (kernel_applies(q, k, v, mask)) return decode_attention_cpu(q, k, v, mask, scale);
  return at::scaled_dot_product_attention(q, k, v, mask, 0.0, false, scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(clada_cpu, m) {
  m.def("decode_attention_cpu(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor",
        &decode_attention_cpu);
}

TORCH_LIBRARY_IMPL(clada, CPU, m) { m.impl("decode_attention", &decode_attention_op_cpu); }
