// Gather-GEMV kernels for one decode token: read only the selected rows of a weight matrix,
// in place (no gathered copy), with float32 accumulation.
//   rows_dot(x, W, idx, scales, parts, act): out[j] = act(dot(W[idx[j]], x)) per row part
//   rows_axpy(W, idx, a):                   out    = sum_j a[j] * W[idx[j]]
//   ffn_rows(x, R, idx, act, parts):         one FFN over the neurons idx, in its neuron-major rows
//   ffn_decode(...):                        one sparse FFN step after its proxy (below)
// W is float32, float16, bfloat16 or int8 (int8 with one float scale per row). Rows may be a view
// with any row stride (unit column stride): the FFN's input and output rows are views of one
// neuron-major buffer.
#include <torch/library.h>
#include <torch/torch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include <cstdint>
#include <string>
#include <cstring>
#include "simd.h"
#include "rows.h"

namespace {
using namespace hire_simd;

template <typename T>
void rows_dot_impl(const T* wp, int64_t ld, const float* xp, const int64_t* ip, const float* sp, float* op,
                   int64_t c, int64_t d, int64_t parts, int64_t act) {
  at::parallel_for(0, c, 64, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const T* row = wp + ip[j] * ld;
      const T* next = j + kAhead < e ? wp + ip[j + kAhead] * ld : nullptr;
      const float s = sp ? sp[ip[j]] : 1.f;
      if (act == NONE) {  // every part's product: the output is torch::empty, each value is written here
        for (int64_t p = 0; p < parts; ++p) op[j * parts + p] = dot(row + p * d, xp, d, next ? next + p * d : nullptr) * s;
      } else {  // parts is 1 or 2 (checked)
        const float v0 = dot(row, xp, d, next) * s;
        op[j] = parts == 2 ? activate(v0, act) * dot(row + d, xp, d, next ? next + d : nullptr) * s : activate(v0, act);
      }
    }
  });
}

// Output columns split across threads in 16-wide blocks: no reduction between threads.
template <typename T>
void rows_axpy_impl(const T* wp, int64_t ld, const int64_t* ip, const float* ap, float* op, int64_t c, int64_t n) {
  at::parallel_for(0, (n + 15) / 16, 4, [&](int64_t b, int64_t e) {
    const int64_t lo = b * 16, hi = std::min(n, e * 16);
    for (int64_t j = 0; j < c; ++j)
      axpy(ap[j], wp + ip[j] * ld + lo, op + lo, hi - lo, j + kAhead < c ? wp + ip[j + kAhead] * ld + lo : nullptr);
  });
}

// The FFN over neurons idx (all when idx is null), each read once as one contiguous block: its
// input row(s) then its output row. Neurons (not output columns) are split across threads, each
// summing into its own float32 output, so every thread streams whole blocks; the partial outputs
// are added at the end (threads x D floats, from L1/L2).
constexpr int64_t kBlocksAhead = 2;  // a block is ~3.5 KB (3 x 576 halves): two ahead covers the latency
// (measured: one neuron at a time streams the dense FFN at the speed of a plain GEMV; batches of 8
// neurons, dot products first and output rows after, made the dense FFN 1.5x slower)
// One thread's share: neurons idx[j0..j1) (j0..j1 when idx is null) summed into acc (d floats).
template <typename T>
void ffn_rows_range_impl(const T* w, int64_t ld, const int64_t* idx, int64_t j0, int64_t j1, const float* x,
                         int64_t d, int64_t parts, int64_t act, float* acc) {
  for (int64_t j = j0; j < j1; ++j) {
    const T* row = w + (idx ? idx[j] : j) * ld;
    const T* next = j + kBlocksAhead < j1 ? w + (idx ? idx[j + kBlocksAhead] : j + kBlocksAhead) * ld : nullptr;
    const float v0 = dot(row, x, d, next);
    const float a = parts == 2 ? activate(v0, act) * dot(row + d, x, d, next ? next + d : nullptr)
                               : activate(v0, act);
    axpy(a, row + parts * d, acc, d, next ? next + parts * d : nullptr);
  }
}

template <typename T>
void ffn_rows_impl(const T* w, int64_t ld, const int64_t* idx, int64_t c, const float* x, int64_t d,
                   int64_t parts, int64_t act, float* y) {
  const int64_t threads = at::get_num_threads();
  std::vector<float> partial(threads * d, 0.f);
  at::parallel_for(0, c, 16, [&](int64_t b, int64_t e) {
    ffn_rows_range_impl(w, ld, idx, b, e, x, d, parts, act, partial.data() + at::get_thread_num() * d);
  });
  for (int64_t i = 0; i < d; ++i) y[i] = 0.f;
  for (int64_t t = 0; t < threads; ++t) {
    const float* p = partial.data() + t * d;
    for (int64_t i = 0; i < d; ++i) y[i] += p[i];
  }
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
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, "W must be a 2-D tensor with contiguous rows, got shape ", w.sizes(),
              " and strides ", w.strides());
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
  // the kernel reads scales[idx[j]] from the data pointer: one float per row of W, densely stored
  TORCH_CHECK(!scaled || (scales.dim() == 1 && scales.size(0) == w.size(0) && scales.scalar_type() == torch::kFloat &&
                          scales.is_contiguous() && scales.device().is_cpu()),
              "scales must be a contiguous float32 (", w.size(0), ",) tensor, one value per row of W; got shape ",
              scales.sizes(), ", dtype ", scales.scalar_type(), " and strides ", scales.strides(),
              " (pass scales.float().contiguous())");
  TORCH_CHECK(scaled == (w.scalar_type() == torch::kChar), "int8 W needs per-row scales (and only int8 W)");
  auto xf = x.reshape({d}).to(torch::kFloat).contiguous();
  const int64_t out_parts = (act == NONE) ? parts : 1;
  auto out = torch::empty({c, out_parts}, x.options().dtype(torch::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float* sp = scaled ? scales.data_ptr<float>() : nullptr;
  const int64_t ld = w.stride(0);
  switch (w.scalar_type()) {
    case torch::kFloat: rows_dot_impl(w.data_ptr<float>(), ld, xp, ip, sp, op, c, d, parts, act); break;
    case torch::kHalf: rows_dot_impl(w.data_ptr<c10::Half>(), ld, xp, ip, sp, op, c, d, parts, act); break;
    case torch::kBFloat16: rows_dot_impl(w.data_ptr<c10::BFloat16>(), ld, xp, ip, sp, op, c, d, parts, act); break;
    case torch::kChar:
      TORCH_CHECK(parts == 1 && act == NONE, "int8 W: one part, no activation");
      rows_dot_impl(w.data_ptr<int8_t>(), ld, xp, ip, sp, op, c, d, parts, act);
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
  const int64_t ld = w.stride(0);
  switch (w.scalar_type()) {
    case torch::kFloat: rows_axpy_impl(w.data_ptr<float>(), ld, ip, ap, op, c, n); break;
    case torch::kHalf: rows_axpy_impl(w.data_ptr<c10::Half>(), ld, ip, ap, op, c, n); break;
    case torch::kBFloat16: rows_axpy_impl(w.data_ptr<c10::BFloat16>(), ld, ip, ap, op, c, n); break;
    default: TORCH_CHECK(false, "rows_axpy: unsupported weight dtype ", w.scalar_type());
  }
  return out;
}

namespace hire_native {

Threshold find_threshold(const uint32_t* keys, int64_t n, int64_t count, const int64_t* hist, int parts) {
  int64_t need = count;  // how many to take from the bucket that holds the count-th largest
  int bucket = kKeyBuckets - 1;
  for (; bucket > 0; --bucket) {
    int64_t total = 0;
    for (int p = 0; p < parts; ++p) total += hist[static_cast<int64_t>(p) * kKeyBuckets + bucket];
    if (total >= need) break;
    need -= total;
  }
  std::vector<uint32_t> cand;  // most estimates share an exponent: a bucket holds a few hundred
  for (int64_t i = 0; i < n; ++i)
    if (key_bucket(keys[i]) == bucket) cand.push_back(keys[i]);
  std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.end(), std::greater<uint32_t>());
  const uint32_t key = cand[need - 1];
  int64_t greater = 0;
  for (uint32_t k : cand) greater += k > key;
  return {key, need - greater};
}

std::vector<int64_t> select_top(const float* est, int64_t n, int64_t count) {
  std::vector<uint32_t> key(n);
  std::vector<int64_t> hist(kKeyBuckets, 0);
  for (int64_t i = 0; i < n; ++i) {
    key[i] = order_key(est[i]);
    ++hist[key_bucket(key[i])];
  }
  const Threshold thr = find_threshold(key.data(), n, count, hist.data(), 1);
  std::vector<int64_t> idx;
  idx.reserve(count);
  int64_t ties = thr.equal;
  for (int64_t i = 0; i < n && (int64_t)idx.size() < count; ++i) {
    if (key[i] > thr.key || (key[i] == thr.key && ties-- > 0)) idx.push_back(i);
  }
  return idx;
}

torch::Tensor neuron_estimates(const torch::Tensor& scores, int64_t neurons, int64_t act, bool gated) {
  // aten's vectorised activations, as the eager estimate uses: both paths pick the same neurons
  auto s = scores.reshape({gated ? 2 : 1, neurons}).to(torch::kFloat);
  auto est = activate_tensor(s[0], act);
  if (gated) est = est * s[1];
  return est.abs_().contiguous();
}

void ffn_rows(const torch::Tensor& w, const int64_t* idx, int64_t c, const float* x, int64_t d, int64_t parts,
              int64_t act, float* y) {
  const int64_t ld = w.stride(0);
  switch (w.scalar_type()) {
    case torch::kFloat: ffn_rows_impl(w.data_ptr<float>(), ld, idx, c, x, d, parts, act, y); break;
    case torch::kHalf: ffn_rows_impl(w.data_ptr<c10::Half>(), ld, idx, c, x, d, parts, act, y); break;
    case torch::kBFloat16: ffn_rows_impl(w.data_ptr<c10::BFloat16>(), ld, idx, c, x, d, parts, act, y); break;
    default: TORCH_CHECK(false, "ffn rows: unsupported weight dtype ", w.scalar_type());
  }
}

void ffn_rows_range(const torch::Tensor& w, const int64_t* idx, int64_t j0, int64_t j1, const float* x, int64_t d,
                    int64_t parts, int64_t act, float* acc) {
  const int64_t ld = w.stride(0);
  switch (w.scalar_type()) {
    case torch::kFloat: ffn_rows_range_impl(w.data_ptr<float>(), ld, idx, j0, j1, x, d, parts, act, acc); break;
    case torch::kHalf: ffn_rows_range_impl(w.data_ptr<c10::Half>(), ld, idx, j0, j1, x, d, parts, act, acc); break;
    case torch::kBFloat16:
      ffn_rows_range_impl(w.data_ptr<c10::BFloat16>(), ld, idx, j0, j1, x, d, parts, act, acc);
      break;
    default: TORCH_CHECK(false, "ffn rows: unsupported weight dtype ", w.scalar_type());
  }
}

}  // namespace hire_native

void check_ffn_rows(const torch::Tensor& rows, int64_t d, int64_t parts, int64_t act) {
  TORCH_CHECK(rows.dim() == 2 && rows.stride(1) == 1, "the FFN rows must be 2-D with contiguous rows");
  TORCH_CHECK(rows.size(1) == (parts + 1) * d, "the FFN rows are ", rows.size(1), " wide; expected ", parts + 1,
              " x ", d, " (input part(s), then the output row)");
  TORCH_CHECK(parts == 1 || parts == 2, "parts must be 1 (plain) or 2 (gated)");
  TORCH_CHECK(act != NONE, "ffn rows need an activation");
}

// The FFN output over neurons idx (empty: all of them) from neuron-major rows [input part(s) | output row].
// x: (D,), rows: (I, (parts+1)*D), idx: (c,) -> float32 (D,)
torch::Tensor ffn_rows_op(torch::Tensor x, torch::Tensor rows, torch::Tensor idx, int64_t act, int64_t parts) {
  const int64_t d = x.numel();
  check_ffn_rows(rows, d, parts, act);
  if (idx.numel()) check_rows(rows, idx);
  auto xf = x.reshape({d}).to(torch::kFloat).contiguous();
  auto out = torch::empty({d}, x.options().dtype(torch::kFloat));
  const int64_t c = idx.numel() ? idx.numel() : rows.size(0);
  hire_native::ffn_rows(rows, idx.numel() ? idx.data_ptr<int64_t>() : nullptr, c, xf.data_ptr<float>(), d, parts,
                        act, out.data_ptr<float>());
  return out;
}

// One FFN decode step after the proxy: |activation| estimates from the proxy scores (gated: gate
// scores then up scores), the best `count` neurons, and their output from the neuron-major rows.
torch::Tensor ffn_decode(torch::Tensor scores, torch::Tensor x, torch::Tensor rows, int64_t count, int64_t act,
                         bool gated) {
  const int64_t neurons = rows.size(0), parts = gated ? 2 : 1, d = x.numel();
  check_ffn_rows(rows, d, parts, act);
  TORCH_CHECK(scores.numel() == parts * neurons, "proxy scores have ", scores.numel(), " values, expected ",
              parts * neurons);
  TORCH_CHECK(count >= 1 && count <= neurons, "count must be in [1, ", neurons, "], got ", count);
  auto est = hire_native::neuron_estimates(scores, neurons, act, gated);
  auto idx = hire_native::select_top(est.data_ptr<float>(), neurons, count);
  auto xf = x.reshape({d}).to(torch::kFloat).contiguous();
  auto out = torch::empty({d}, x.options().dtype(torch::kFloat));
  hire_native::ffn_rows(rows, idx.data(), count, xf.data_ptr<float>(), d, parts, act, out.data_ptr<float>());
  return out;
}

// Which SIMD path this build's kernels take: "avx512", "avx2" or "scalar".
std::string simd_path() { return HIRE_SIMD; }

// Registered with the dispatcher (torch.ops.hire.*, or a variant's namespace): profiled as operators like aten's.
HIRE_LIBRARY(HIRE_OPS_NAMESPACE, m) {
  m.def("rows_dot(Tensor x, Tensor w, Tensor idx, Tensor scales, int parts, int act) -> Tensor");
  m.def("rows_axpy(Tensor w, Tensor idx, Tensor a) -> Tensor");
  m.def("ffn_rows(Tensor x, Tensor rows, Tensor idx, int act, int parts) -> Tensor");
  m.def("ffn_decode(Tensor scores, Tensor x, Tensor rows, int count, int act, bool gated) -> Tensor");
  m.def("simd_path() -> str", &simd_path);
  // no tensor arguments: a catch-all kernel, no dispatch key
}

HIRE_FRAGMENT_IMPL(HIRE_OPS_NAMESPACE, CPU, m) {
  m.impl("rows_dot", &rows_dot);
  m.impl("rows_axpy", &rows_axpy);
  m.impl("ffn_rows", &ffn_rows_op);
  m.impl("ffn_decode", &ffn_decode);
}
