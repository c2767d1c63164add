// The host loop's per-token statistics of the next-token distribution, CPU, float32 or bfloat16:
//   token = argmax(logits) when not given (greedy),
//   surprisal = -log2 p(token) / log2(V), entropy = -sum p log2 p / log2(V), p = softmax(logits),
//   both set to 1 where either is not finite (NaN/inf logits), else clamped to [0, 1].
// The same contract as controller.token_signals (the torch reference and the path everywhere else).
//
// Why: the controller reads both every step, and the torch composition (log_softmax, exp, where,
// mul, sum, gather, isfinite...) walks the vocabulary ~8 times with a new tensor each time:
// ~0.2 ms a token for SmolLM2's 49k vocabulary and 1.1-1.6 ms for Qwen2.5's 152k (plus 0.2-0.6 ms
// for the argmax), 5-8% of a Qwen decode step. Here: one pass for the max (and the NaN check),
// one for sum exp(x - m) and sum exp(x - m) (x - m), with the identities
//   log S = log sum exp(x - m),  entropy (nats) = log S - sum e (x - m) / S,
//   surprisal (nats) = m + log S - x[token].
// The first index of the maximum is found by a scan that stops at it (torch.argmax: the first
// maximal value; a NaN counts as the maximum, as in torch).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift, exact
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// exp(x) for x <= 0, lanes below -87.3 (exp < 2^-126, -inf included) give 0: Cephes expf's
// reduction x = n ln2 + r, |r| <= ln2 / 2, its degree-6 polynomial, 2^n applied by vscalefps.
// Relative error ~2 ulp, far below what the statistics need.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}
#endif

struct RowStats {
  int64_t token;
  float surprisal, entropy;
  bool nonfinite;
};

// Max of the row; sets has_nan when any element is NaN.
template <typename T>
float row_max(const T* x, int64_t V, bool& has_nan) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 mv = _mm512_set1_ps(m);
  __mmask16 nan = 0;
  for (; i + 16 <= V; i += 16) {
    const __m512 v = load16(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mv = _mm512_max_ps(mv, v);
  }
  m = _mm512_reduce_max_ps(mv);
  has_nan = nan != 0;
#else
  has_nan = false;
#endif
  for (; i < V; ++i) {
    const float v = to_float(x[i]);
    has_nan |= std::isnan(v);
    m = v > m ? v : m;
  }
  return m;
}

// sum e and sum e (x - m) over the row, e = exp(x - m); m finite, no NaN in the row. fp32 vector
// sums over blocks of kBlock elements, added up in double: a 152k vocabulary summed in fp32 lanes
// alone drifts by ~1e-5 relative.
constexpr int64_t kBlock = 2048;

template <typename T>
void row_sums(const T* x, int64_t V, float m, double& S, double& W) {
  S = 0.0;
  W = 0.0;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 mv = _mm512_set1_ps(m);
  const __m512 floor = _mm512_set1_ps(-88.f);
  while (i + 32 <= V) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, w0 = s0, w1 = s0;
    const int64_t end = std::min(V, i + kBlock);
    for (; i + 32 <= end; i += 32) {
      // lanes with e == 0 (x - m < -87.3, -inf) add nothing: z is clamped, so 0 * z stays 0
      const __m512 z0 = _mm512_max_ps(_mm512_sub_ps(load16(x + i), mv), floor);
      const __m512 z1 = _mm512_max_ps(_mm512_sub_ps(load16(x + i + 16), mv), floor);
      const __m512 e0 = exp_nonpositive(z0), e1 = exp_nonpositive(z1);
      s0 = _mm512_add_ps(s0, e0);
      s1 = _mm512_add_ps(s1, e1);
      w0 = _mm512_fmadd_ps(e0, z0, w0);
      w1 = _mm512_fmadd_ps(e1, z1, w1);
    }
    S += _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    W += _mm512_reduce_add_ps(_mm512_add_ps(w0, w1));
  }
#endif
  for (; i < V; ++i) {
    const double z = static_cast<double>(to_float(x[i])) - m;
    const double e = std::exp(z);
    S += e;
    if (e > 0.0) W += e * z;
  }
}

template <typename T>
int64_t first_index_of(const T* x, int64_t V, float m, bool nan) {
  for (int64_t i = 0; i < V; ++i) {
    const float v = to_float(x[i]);
    if (nan ? std::isnan(v) : v == m) return i;
  }
  return 0;
}

template <typename T>
RowStats row_stats(const T* x, int64_t V, int64_t token) {
  bool nan = false;
  const float m = row_max(x, V, nan);
  RowStats r{token, 1.f, 1.f, true};
  if (token < 0) r.token = first_index_of(x, V, m, nan);
  if (nan || !std::isfinite(m)) return r;  // NaN, +inf, or all -inf: log_softmax is NaN
  double S, W;
  row_sums(x, V, m, S, W);
  const double logS = std::log(S);
  const double norm = std::log(static_cast<double>(V));  // nats -> the reference's log2 / log2(V)
  const double ent = (logS - W / S) / norm;
  const double sur = (static_cast<double>(m) + logS - to_float(x[r.token])) / norm;
  if (!std::isfinite(ent) || !std::isfinite(sur)) return r;
  r.entropy = static_cast<float>(std::min(1.0, std::max(0.0, ent)));
  r.surprisal = static_cast<float>(std::min(1.0, std::max(0.0, sur)));
  r.nonfinite = false;
  return r;
}

// logits (B, V) float32/bfloat16 contiguous, tokens None (argmax) or (B,) int64 in [0, V).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_signals_cpu(
    const at::Tensor& logits_in, const std::optional<at::Tensor>& tokens) {
  TORCH_CHECK(logits_in.device().is_cpu() && logits_in.dim() == 2 && logits_in.size(1) > 0,
              "token_signals_cpu: logits must be a CPU (B, V) tensor with V > 0");
  TORCH_CHECK(logits_in.scalar_type() == at::kFloat || logits_in.scalar_type() == at::kBFloat16,
              "token_signals_cpu: float32 or bfloat16 logits only");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  at::Tensor tok = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor sur = at::empty({B}, logits.options().dtype(at::kFloat));
  at::Tensor ent = at::empty({B}, logits.options().dtype(at::kFloat));
  at::Tensor bad = at::empty({B}, logits.options().dtype(at::kBool));
  const int64_t* given = nullptr;
  at::Tensor tokens_c;
  if (tokens.has_value()) {
    tokens_c = tokens->contiguous();
    TORCH_CHECK(tokens_c.device().is_cpu() && tokens_c.scalar_type() == at::kLong && tokens_c.numel() == B,
                "token_signals_cpu: tokens must be a CPU int64 tensor of B elements");
    given = tokens_c.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(given[b] >= 0 && given[b] < V, "token_signals_cpu: token ", given[b], " outside [0, ", V, ")");
  }
  for (int64_t b = 0; b < B; ++b) {  // one row is ~50-150 us: not worth a parallel region at batch 1
    const int64_t t = given ? given[b] : -1;
    const RowStats r = logits.scalar_type() == at::kFloat
                           ? row_stats(logits.const_data_ptr<float>() + b * V, V, t)
                           : row_stats(logits.const_data_ptr<c10::BFloat16>() + b * V, V, t);
    tok.mutable_data_ptr<int64_t>()[b] = r.token;
    sur.mutable_data_ptr<float>()[b] = r.surprisal;
    ent.mutable_data_ptr<float>()[b] = r.entropy;
    bad.mutable_data_ptr<bool>()[b] = r.nonfinite;
  }
  return {tok, sur, ent, bad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(clada_cpu, m) {
  m.def("token_signals_cpu(Tensor logits, Tensor? tokens) -> (Tensor, Tensor, Tensor, Tensor)", &token_signals_cpu);
}
