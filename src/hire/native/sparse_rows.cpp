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
#include <string>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif

// The ops register under HIRE_OPS_NAMESPACE (torch.ops.<namespace>.*): `hire` normally; a variant
// build (build.py's build_variant) picks its own, so that it can be loaded beside the default one.
#ifndef HIRE_OPS_NAMESPACE
#define HIRE_OPS_NAMESPACE hire
#endif

namespace {

enum Act { NONE = 0, SILU = 1, GELU_TANH = 2, GELU = 3, RELU = 4 };

inline float to_f(float v) { return v; }
inline float to_f(c10::Half v) { return static_cast<float>(v); }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_f(int8_t v) { return static_cast<float>(v); }

// One SIMD vocabulary per instruction set, picked by the compiler flags (-march=native): a vector
// of kLanes float32 and the operations the kernels need, including load_w, which reads kLanes
// weights of any kernel dtype as float32. The kernels below are written once against it; without
// AVX-512 or AVX2 (+FMA, F16C) they run their scalar tail loops only.
#if defined(__AVX512F__)
#define HIRE_SIMD "avx512"
#define HIRE_SCALAR 0
using vec = __m512;
constexpr int64_t kLanes = 16;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset1(float a) { return _mm512_set1_ps(a); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vfmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
inline vec load_w(const float* p) { return _mm512_loadu_ps(p); }
inline vec load_w(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vec load_w(const c10::BFloat16* p) {  // bfloat16 is the top half of a float32
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline vec load_w(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HIRE_SIMD "avx2"
#define HIRE_SCALAR 0
using vec = __m256;
constexpr int64_t kLanes = 8;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset1(float a) { return _mm256_set1_ps(a); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vfmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // 8 -> 4
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                           // 4 -> 2
  s = _mm_add_ss(s, _mm_movehdup_ps(s));                                            // 2 -> 1
  return _mm_cvtss_f32(s);
}
inline vec load_w(const float* p) { return _mm256_loadu_ps(p); }
inline vec load_w(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline vec load_w(const c10::BFloat16* p) {  // bfloat16 is the top half of a float32
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline vec load_w(const int8_t* p) {  // 8 bytes: the load must not read past the row
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#else
#define HIRE_SIMD "scalar"
#define HIRE_SCALAR 1
#endif

// Rows are picked at random, which defeats the hardware prefetcher: each loop step also
// prefetches the same part of the next selected row (`next`, may be null).
constexpr int64_t kAhead = 8;  // rows ahead
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }  // read, keep in all cache levels

template <typename T>
inline float dot(const T* w, const float* x, int64_t n, const T* next) {
  int64_t i = 0;
  float s = 0.f;
#if !HIRE_SCALAR
  vec a0 = vzero(), a1 = vzero();  // two accumulators: two FMA chains in flight
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    if (next) prefetch(next + i);
    a0 = vfmadd(load_w(w + i), vload(x + i), a0);
    a1 = vfmadd(load_w(w + i + kLanes), vload(x + i + kLanes), a1);
  }
  for (; i + kLanes <= n; i += kLanes) a0 = vfmadd(load_w(w + i), vload(x + i), a0);
  s = vsum(vadd(a0, a1));
#endif
  for (; i < n; ++i) s += to_f(w[i]) * x[i];
  return s;
}

template <typename T>
inline void axpy(float a, const T* w, float* y, int64_t n, const T* next) {
  int64_t i = 0;
#if !HIRE_SCALAR
  const vec va = vset1(a);
  for (; i + kLanes <= n; i += kLanes) {
    if (next && (i * sizeof(T)) % 64 == 0) prefetch(next + i);  // once per cache line
    vstore(y + i, vfmadd(va, load_w(w + i), vload(y + i)));
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

// Which SIMD path this build's kernels take: "avx512", "avx2" or "scalar".
std::string simd_path() { return HIRE_SIMD; }

// TORCH_LIBRARY pastes its namespace argument unexpanded: one more macro level expands it first.
#define HIRE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define HIRE_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

// Registered with the dispatcher (torch.ops.hire.*, or a variant's namespace): profiled as operators like aten's.
HIRE_LIBRARY(HIRE_OPS_NAMESPACE, m) {
  m.def("rows_dot(Tensor x, Tensor w, Tensor idx, Tensor scales, int parts, int act) -> Tensor");
  m.def("rows_axpy(Tensor w, Tensor idx, Tensor a) -> Tensor");
  m.def("ffn_decode(Tensor scores, Tensor x, Tensor w_in, Tensor w_out, int count, int act, bool gated) -> Tensor");
  m.def("simd_path() -> str", &simd_path);  // no tensor arguments: a catch-all kernel, no dispatch key
}

HIRE_LIBRARY_IMPL(HIRE_OPS_NAMESPACE, CPU, m) {
  m.impl("rows_dot", &rows_dot);
  m.impl("rows_axpy", &rows_axpy);
  m.impl("ffn_decode", &ffn_decode);
}
