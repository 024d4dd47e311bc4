// Gather-GEMV kernels for one decode token: read only the selected rows of a weight matrix,
// in place (no gathered copy), with float32 accumulation.
//   rows_dot(x, W, idx, scales, parts, act): out[j] = act(dot(W[idx[j]], x)) per row part
//   rows_axpy(W, idx, a):                   out    = sum_j a[j] * W[idx[j]]
//   ffn_decode(...):                        one sparse FFN step after its proxy (below)
// W is float32, float16, bfloat16 or int8 (int8 with one float scale per row).
#include <torch/library.h>
#include <torch/torch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

enum Act { NONE = 0, SILU = 1, GELU_TANH = 2, GELU = 3, RELU = 4 };

inline float to_f(float v) { return v; }
inline float to_f(c10::Half v) { return static_cast<float>(v); }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_f(int8_t v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const c10::BFloat16* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

// Rows are picked at random, which defeats the hardware prefetcher: each loop step also
// prefetches the same part of the next selected row (`next`, may be null).
constexpr int64_t kAhead = 8;  // rows ahead
inline void prefetch(const void* p) {
#if defined(__AVX512F__)
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
#endif
}

template <typename T>
inline float dot(const T* w, const float* x, int64_t n, const T* next) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    if (next) prefetch(next + i);
    a0 = _mm512_fmadd_ps(load16(w + i), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(load16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
  }
  for (; i + 16 <= n; i += 16) a0 = _mm512_fmadd_ps(load16(w + i), _mm512_loadu_ps(x + i), a0);
  s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
  for (; i < n; ++i) s += to_f(w[i]) * x[i];
  return s;
}

template <typename T>
inline void axpy(float a, const T* w, float* y, int64_t n, const T* next) {
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 va = _mm512_set1_ps(a);
  for (; i + 16 <= n; i += 16) {
    if (next && (i * sizeof(T)) % 64 == 0) prefetch(next + i);
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, load16(w + i), _mm512_loadu_ps(y + i)));
  }
#endif
  for (; i < n; ++i) y[i] += a * to_f(w[i]);
}

inline float activate(float v, int64_t act) {
  switch (act) {
    case SILU: return v / (1.f + std::exp(-v));
    case GELU_TANH: return 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case GELU: return 0.5f * v * (1.f + std::erf(v * 0.7071067811865476f));
    case RELU: return v > 0.f ? v : 0.f;
    default: return v;
  }
}

template <typename T>
void rows_dot_impl(const T* wp, const float* xp, const int64_t* ip, const float* sp, float* op,
                   int64_t c, int64_t d, int64_t parts, int64_t act) {
  at::parallel_for(0, c, 64, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const T* row = wp + ip[j] * parts * d;
      const T* next = j + kAhead < e ? wp + ip[j + kAhead] * parts * d : nullptr;
      const float v0 = dot(row, xp, d, next) * (sp ? sp[ip[j]] : 1.f);
      const float v1 = parts == 2 ? dot(row + d, xp, d, next ? next + d : nullptr) : 0.f;
      if (act == NONE) {
        op[j * parts] = v0;
        if (parts == 2) op[j * 2 + 1] = v1;
      } else {
        op[j] = parts == 2 ? activate(v0, act) * v1 : activate(v0, act);
      }
    }
  });
}

// Output columns split across threads in 16-wide blocks: no reduction between threads.
template <typename T>
void rows_axpy_impl(const T* wp, const int64_t* ip, const float* ap, float* op, int64_t c, int64_t n) {
  at::parallel_for(0, (n + 15) / 16, 4, [&](int64_t b, int64_t e) {
    const int64_t lo = b * 16, hi = std::min(n, e * 16);
    for (int64_t j = 0; j < c; ++j)
      axpy(ap[j], wp + ip[j] * n + lo, op + lo, hi - lo, j + kAhead < c ? wp + ip[j + kAhead] * n + lo : nullptr);
  });
}

torch::Tensor activate_tensor(const torch::Tensor& v, int64_t act) {
  switch (act) {
    case SILU: return at::silu(v);
    case GELU_TANH: return at::gelu(v, "tanh");
    case GELU: return at::gelu(v);
    case RELU: return at::relu(v);
    default: return v.clone();
  }
}

void check_rows(const torch::Tensor& w, const torch::Tensor& idx) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "W must be a contiguous 2-D tensor, got shape ", w.sizes());
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == torch::kLong, "idx must be a 1-D int64 tensor");
  TORCH_CHECK(w.device().is_cpu() && idx.device().is_cpu(), "these kernels run on CPU tensors only");
  TORCH_CHECK(idx.is_contiguous(), "idx must be contiguous");
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < idx.numel(); ++j)
    TORCH_CHECK(ip[j] >= 0 && ip[j] < w.size(0), "idx[", j, "] = ", ip[j], " is out of range [0, ", w.size(0), ")");
}

}  // namespace

torch::Tensor rows_dot(torch::Tensor x, torch::Tensor w, torch::Tensor idx, torch::Tensor scales,
                       int64_t parts, int64_t act) {
  check_rows(w, idx);
  TORCH_CHECK(parts >= 1 && w.size(1) % parts == 0, "W's width ", w.size(1), " is not ", parts, " parts");
  const int64_t d = w.size(1) / parts, c = idx.numel();
  TORCH_CHECK(x.numel() == d, "x has ", x.numel(), " elements, W's rows have ", d, " per part");
  TORCH_CHECK(act == NONE || parts <= 2, "an activation needs 1 part (plain) or 2 parts (gated)");
  const bool scaled = scales.numel() > 0;
  TORCH_CHECK(!scaled || (scales.numel() == w.size(0) && scales.scalar_type() == torch::kFloat),
              "scales must be float32 with one value per row of W");
  TORCH_CHECK(scaled == (w.scalar_type() == torch::kChar), "int8 W needs per-row scales (and only int8 W)");
  auto xf = x.reshape({d}).to(torch::kFloat).contiguous();
  const int64_t out_parts = (act == NONE) ? parts : 1;
  auto out = torch::empty({c, out_parts}, x.options().dtype(torch::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float* sp = scaled ? scales.data_ptr<float>() : nullptr;
  switch (w.scalar_type()) {
    case torch::kFloat: rows_dot_impl(w.data_ptr<float>(), xp, ip, sp, op, c, d, parts, act); break;
    case torch::kHalf: rows_dot_impl(w.data_ptr<c10::Half>(), xp, ip, sp, op, c, d, parts, act); break;
    case torch::kBFloat16: rows_dot_impl(w.data_ptr<c10::BFloat16>(), xp, ip, sp, op, c, d, parts, act); break;
    case torch::kChar:
      TORCH_CHECK(parts == 1 && act == NONE, "int8 W: one part, no activation");
      rows_dot_impl(w.data_ptr<int8_t>(), xp, ip, sp, op, c, d, parts, act);
      break;
    default: TORCH_CHECK(false, "rows_dot: unsupported weight dtype ", w.scalar_type());
  }
  return out;
}

torch::Tensor rows_axpy(torch::Tensor w, torch::Tensor idx, torch::Tensor a) {
  check_rows(w, idx);
  TORCH_CHECK(a.numel() == idx.numel(), "a has ", a.numel(), " weights for ", idx.numel(), " rows");
  TORCH_CHECK(w.scalar_type() != torch::kChar, "rows_axpy takes float W");
  const int64_t n = w.size(1), c = idx.numel();
  auto af = a.reshape({c}).to(torch::kFloat).contiguous();
  auto out = torch::zeros({n}, a.options().dtype(torch::kFloat));
  const float* ap = af.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  switch (w.scalar_type()) {
    case torch::kFloat: rows_axpy_impl(w.data_ptr<float>(), ip, ap, op, c, n); break;
    case torch::kHalf: rows_axpy_impl(w.data_ptr<c10::Half>(), ip, ap, op, c, n); break;
    case torch::kBFloat16: rows_axpy_impl(w.data_ptr<c10::BFloat16>(), ip, ap, op, c, n); break;
    default: TORCH_CHECK(false, "rows_axpy: unsupported weight dtype ", w.scalar_type());
  }
  return out;
}

// One FFN decode step after the proxy: |activation| estimates from the proxy scores (gated:
// gate scores then up scores), the best `count` neurons, their exact activations from the
// neuron-major input rows, and the weighted sum of their output rows. One call per layer.
torch::Tensor ffn_decode(torch::Tensor scores, torch::Tensor x, torch::Tensor w_in, torch::Tensor w_out,
                         int64_t count, int64_t act, bool gated) {
  const int64_t neurons = w_in.size(0), parts = gated ? 2 : 1;
  TORCH_CHECK(w_out.dim() == 2 && w_out.size(0) == neurons, "w_out must have one row per neuron (", neurons, ")");
  TORCH_CHECK(scores.numel() == parts * neurons, "proxy scores have ", scores.numel(), " values, expected ",
              parts * neurons);
  TORCH_CHECK(count >= 1 && count <= neurons, "count must be in [1, ", neurons, "], got ", count);
  TORCH_CHECK(w_in.scalar_type() == w_out.scalar_type(), "w_in and w_out must share a dtype");
  // estimates with aten's vectorised activations, then the count-th largest as a threshold:
  // one pass collects the kept rows already in ascending order (ties: lowest rows first)
  auto s = scores.reshape({parts, neurons}).to(torch::kFloat);
  auto est = activate_tensor(s[0], act);
  if (gated) est = est * s[1];
  est = est.abs_().contiguous();
  const float* ep = est.data_ptr<float>();
  std::vector<float> vals(ep, ep + neurons);
  std::nth_element(vals.begin(), vals.begin() + (count - 1), vals.end(), std::greater<float>());
  const float thr = vals[count - 1];
  int64_t above = 0;
  for (int64_t i = 0; i < neurons; ++i) above += ep[i] > thr;
  int64_t ties = count - above;  // rows equal to the threshold still to take
  auto idx = torch::empty({count}, torch::kLong);
  int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0, n = 0; i < neurons && n < count; ++i) {
    if (ep[i] > thr || (ep[i] == thr && ties-- > 0)) ip[n++] = i;
  }
  auto a = rows_dot(x, w_in, idx, torch::empty({0}), parts, act);
  return rows_axpy(w_out, idx, a);
}

// Registered with the dispatcher (torch.ops.hire.*): profiled as operators like aten's.
TORCH_LIBRARY(hire, m) {
  m.def("rows_dot(Tensor x, Tensor w, Tensor idx, Tensor scales, int parts, int act) -> Tensor");
  m.def("rows_axpy(Tensor w, Tensor idx, Tensor a) -> Tensor");
  m.def("ffn_decode(Tensor scores, Tensor x, Tensor w_in, Tensor w_out, int count, int act, bool gated) -> Tensor");
}

TORCH_LIBRARY_IMPL(hire, CPU, m) {
  m.impl("rows_dot", &rows_dot);
  m.impl("rows_axpy", &rows_axpy);
  m.impl("ffn_decode", &ffn_decode);
}
