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

// One (batch, head, chunk of t) item: for every query row its max score, sum of exp and the
// exp-weighted sum of V rows over the chunk. K and V rows are each read once.
template <typename E>
void attend_chunk(const Args<E>& a, int64_t item, float* qf, float* scores, float* mx, float* sum, float* acc) {
  const int64_t bh = item / a.chunks, c = item % a.chunks, b = bh / a.H, h = bh % a.H;
  const int64_t t0 = c * a.chunk, t1 = std::min(a.T, t0 + a.chunk), n = t1 - t0;
  const E* q = a.q + b * a.q_s[0] + h * a.q_s[1];
  const E* k = a.k + b * a.k_s[0] + h * a.k_s[1];
  const E* v = a.v + b * a.v_s[0] + h * a.v_s[1];
  const int64_t mb = b * a.m_s[0] + h * a.m_s[1];
  for (int64_t m = 0; m < a.M; ++m)  // the query rows in fp32, scale folded in
    for (int64_t d = 0; d < a.D; ++d) qf[m * a.D + d] = to_float(q[m * a.q_s[2] + d]) * a.scale;
  for (int64_t t = 0; t < n; ++t) {
    const E* kr = k + (t0 + t) * a.k_s[2];
    for (int64_t m = 0; m < a.M; ++m) {
      const float* qr = qf + m * a.D;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < a.D; ++d) s += qr[d] * to_float(kr[d]);
      const int64_t mi = mb + m * a.m_s[2] + (t0 + t) * a.m_s[3];
      if (a.mask_f) s += to_float(a.mask_f[mi]);
      if (a.mask_b && !a.mask_b[mi]) s = -std::numeric_limits<float>::infinity();
      scores[m * n + t] = s;
    }
  }
  std::fill(acc, acc + a.M * a.Dv, 0.0f);
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
  for (int64_t t = 0; t < n; ++t) {
    const E* vr = v + (t0 + t) * a.v_s[2];
    for (int64_t m = 0; m < a.M; ++m) {
      const float p = scores[m * n + t];
      if (p == 0.0f) continue;
      float* out = acc + m * a.Dv;
#pragma omp simd
      for (int64_t d = 0; d < a.Dv; ++d) out[d] += p * to_float(vr[d]);
    }
  }
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
