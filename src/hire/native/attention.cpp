// One token's attention over a KV cache (attention.h). Per kv head and chunk of positions: the scores of
// the kv head's query heads (each K vector converted once for up to 6 of them, four positions' dot
// products reduced together), their softmax with a vectorised exp, and the weighted sum of V rows in
// registers; then the chunks merged. The kernel before it (a thread per query head, a scalar exp per
// score) made long contexts slow: docs/speed.md, "Long contexts".
#include "attention.h"

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include "simd.h"

namespace {
using namespace hire_simd;
using torch::Tensor;

constexpr int64_t kChunkMin = 64;      // positions: the fewest a work item takes when a context is split
constexpr int64_t kItemsPerThread = 4;  // work items per thread when it is (positions differ in cost)
// positions x query heads x head dim up to which one thread does it all: a parallel region costs more
// than it saves below it (SmolLM2's 9 x 64 at ~60 positions, Qwen2.5-1.5B's 12 x 128 at ~20; measured)
constexpr int64_t kSerialWork = 32768;

#if defined(__AVX512F__)
// query heads whose sums stay in registers together (32 vector registers: 6 heads x 4 positions + 4 K
// vectors + 1; 6 against 4 took a Qwen2.5-1.5B pass at 2,048 positions from 4.25-4.29 to 3.91-4.00 ms)
constexpr int kHeadsAtOnce = 6;
#else
constexpr int kHeadsAtOnce = 2;  // AVX2: 16 vector registers
#endif

#if !HIRE_SCALAR
// s[g * n + j] = q_g . K[j] for heads g0..g0+GB-1 and n rows of K, four rows at a time: each K vector
// converted once for all GB heads, each head's four product vectors reduced together (needs hd % kLanes == 0)
template <int GB, typename T>
void scores_block(const float* q, const T* K, int64_t n, int64_t hd, int64_t g0, float* s) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* k = K + j * hd;
    vec acc[GB][4];
    for (int g = 0; g < GB; ++g)
      for (int r = 0; r < 4; ++r) acc[g][r] = vzero();
    for (int64_t i = 0; i < hd; i += kLanes) {
      const vec k0 = load_w(k + i), k1 = load_w(k + hd + i), k2 = load_w(k + 2 * hd + i), k3 = load_w(k + 3 * hd + i);
      for (int g = 0; g < GB; ++g) {
        const vec x = vload(q + (g0 + g) * hd + i);
        acc[g][0] = vfmadd(k0, x, acc[g][0]);
        acc[g][1] = vfmadd(k1, x, acc[g][1]);
        acc[g][2] = vfmadd(k2, x, acc[g][2]);
        acc[g][3] = vfmadd(k3, x, acc[g][3]);
      }
    }
    for (int g = 0; g < GB; ++g) reduce4(acc[g][0], acc[g][1], acc[g][2], acc[g][3], s + (g0 + g) * n + j);
  }
  for (; j < n; ++j)
    for (int g = 0; g < GB; ++g) s[(g0 + g) * n + j] = dot(K + j * hd, q + (g0 + g) * hd, hd, static_cast<const T*>(nullptr));
}

// dst + g * stride = sum_j p[g * n + j] V[j] for heads g0..g0+GB-1: each V vector converted once for
// all GB heads, their sums in registers, IB vectors of the head dim at a time (needs hd % (IB kLanes) == 0)
template <int GB, int IB, typename T>
void weighted_block(const float* p, const T* V, int64_t n, int64_t hd, int64_t g0, float* dst, int64_t stride) {
  for (int64_t i0 = 0; i0 < hd; i0 += IB * kLanes) {
    vec acc[GB][IB];
    for (int g = 0; g < GB; ++g)
      for (int b = 0; b < IB; ++b) acc[g][b] = vzero();
    for (int64_t j = 0; j < n; ++j) {
      vec v[IB];
      for (int b = 0; b < IB; ++b) v[b] = load_w(V + j * hd + i0 + b * kLanes);
      for (int g = 0; g < GB; ++g) {
        const vec w = vset1(p[(g0 + g) * n + j]);
        for (int b = 0; b < IB; ++b) acc[g][b] = vfmadd(w, v[b], acc[g][b]);
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int b = 0; b < IB; ++b) vstore(dst + (g0 + g) * stride + i0 + b * kLanes, acc[g][b]);
  }
}

template <int IB, typename T>
void weighted_heads(const float* p, const T* V, int64_t n, int64_t hd, int64_t G, float* dst, int64_t stride) {
  for (int64_t g0 = 0; g0 < G; g0 += kHeadsAtOnce) {
    switch (std::min<int64_t>(kHeadsAtOnce, G - g0)) {
      case 1: weighted_block<1, IB>(p, V, n, hd, g0, dst, stride); break;
      case 2: weighted_block<2, IB>(p, V, n, hd, g0, dst, stride); break;
#if defined(__AVX512F__)
      case 3: weighted_block<3, IB>(p, V, n, hd, g0, dst, stride); break;
      case 4: weighted_block<4, IB>(p, V, n, hd, g0, dst, stride); break;
      case 5: weighted_block<5, IB>(p, V, n, hd, g0, dst, stride); break;
      case 6: weighted_block<6, IB>(p, V, n, hd, g0, dst, stride); break;
#endif
    }
  }
}
#endif

// s[g * n + j] = q_g . K[j] for the G query heads of one kv head and n rows of K
template <typename T>
void group_scores(const float* q, const T* K, int64_t n, int64_t hd, int64_t G, float* s) {
#if !HIRE_SCALAR
  if (hd % kLanes == 0) {
    for (int64_t g0 = 0; g0 < G; g0 += kHeadsAtOnce) {
      switch (std::min<int64_t>(kHeadsAtOnce, G - g0)) {
        case 1: scores_block<1>(q, K, n, hd, g0, s); break;
        case 2: scores_block<2>(q, K, n, hd, g0, s); break;
#if defined(__AVX512F__)
        case 3: scores_block<3>(q, K, n, hd, g0, s); break;
        case 4: scores_block<4>(q, K, n, hd, g0, s); break;
        case 5: scores_block<5>(q, K, n, hd, g0, s); break;
        case 6: scores_block<6>(q, K, n, hd, g0, s); break;
#endif
      }
    }
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j)
    for (int64_t g = 0; g < G; ++g) s[g * n + j] = dot(K + j * hd, q + g * hd, hd, static_cast<const T*>(nullptr));
}

// dst + g * stride = sum_j p[g * n + j] V[j] over n rows of V, for the G query heads of one kv head
template <typename T>
void group_weighted_rows(const float* p, const T* V, int64_t n, int64_t hd, int64_t G, float* dst, int64_t stride) {
#if !HIRE_SCALAR
  if (hd % (4 * kLanes) == 0) return weighted_heads<4>(p, V, n, hd, G, dst, stride);
  if (hd % (2 * kLanes) == 0) return weighted_heads<2>(p, V, n, hd, G, dst, stride);
  if (hd % kLanes == 0) return weighted_heads<1>(p, V, n, hd, G, dst, stride);
#endif
  for (int64_t g = 0; g < G; ++g) {
    float* o = dst + g * stride;
    std::fill(o, o + hd, 0.f);
    for (int64_t j = 0; j < n; ++j) axpy(p[g * n + j], V + j * hd, o, hd, static_cast<const T*>(nullptr));
  }
}

// s[0..n) = exp(s - max s) in place (scaled and soft-capped first); returns the max, *sum their sum
float softmax_terms(float* s, int64_t n, float scale, float softcap, float* sum) {
  int64_t i = 0;
  float m = -INFINITY;
#if !HIRE_SCALAR
  const vec vs = vset1(scale);
  if (softcap <= 0.f) {
    vec vm = vset1(-INFINITY);
    for (; i + kLanes <= n; i += kLanes) {
      const vec x = vmul(vload(s + i), vs);
      vstore(s + i, x);
      vm = vmax(vm, x);
    }
    alignas(64) float lanes[kLanes];
    vstore(lanes, vm);
    for (int64_t l = 0; l < kLanes; ++l) m = std::max(m, lanes[l]);
  }
#endif
  for (; i < n; ++i) {
    float x = s[i] * scale;
    if (softcap > 0.f) x = std::tanh(x / softcap) * softcap;
    s[i] = x;
    m = std::max(m, x);
  }
  i = 0;
  float total = 0.f;
#if !HIRE_SCALAR
  const vec vm = vset1(m);
  vec acc = vzero();
  for (; i + kLanes <= n; i += kLanes) {
    const vec e = vexp(vadd(vload(s + i), vmul(vm, vset1(-1.f))));
    vstore(s + i, e);
    acc = vadd(acc, e);
  }
  total = vsum(acc);
#endif
  for (; i < n; ++i) total += (s[i] = std::exp(s[i] - m));
  *sum = total;
  return m;
}

}  // namespace

namespace hire_native {

template <typename T>
void attend(const float* q, const T* kc, const T* vc, int64_t seq, int64_t first, int64_t end, int64_t hq,
            int64_t hkv, int64_t hd, float scale, float softcap, float* out) {
  const int64_t n = end - first, G = hq / hkv;
  TORCH_CHECK(n > 0 && first >= 0 && end <= seq, "attend: positions ", first, "..", end, " outside a cache of ", seq);
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const bool parallel = threads > 1 && n * hq * hd > kSerialWork;  // else one thread does it all
  int64_t chunks = 1;
  if (parallel)
    chunks = std::max<int64_t>(1, std::min((kItemsPerThread * threads + hkv - 1) / hkv, n / kChunkMin));
  const int64_t len = (n + chunks - 1) / chunks;
  chunks = (n + len - 1) / len;
  // per query head and chunk: the chunk's max score, its sum of exp(score - max), its weighted V rows
  std::vector<float> pm(chunks == 1 ? 0 : hq * chunks), pl(pm.size()), po(pm.size() * hd);
  auto run = [&](int64_t b, int64_t e) {
    std::vector<float> s(G * len), o(chunks == 1 ? G * hd : 0), sums(G);
    for (int64_t item = b; item < e; ++item) {
      const int64_t g = item / chunks, c = item % chunks, p0 = first + c * len, m = std::min(len, end - p0);
      const T* K = kc + (g * seq + p0) * hd;
      const T* V = vc + (g * seq + p0) * hd;
      group_scores(q + g * G * hd, K, m, hd, G, s.data());
      for (int64_t gi = 0; gi < G; ++gi) {
        const float mx = softmax_terms(s.data() + gi * m, m, scale, softcap, &sums[gi]);
        if (chunks > 1) pm[(g * G + gi) * chunks + c] = mx, pl[(g * G + gi) * chunks + c] = sums[gi];
      }
      if (chunks == 1) {
        group_weighted_rows(s.data(), V, m, hd, G, o.data(), hd);
        for (int64_t gi = 0; gi < G; ++gi)
          for (int64_t i = 0; i < hd; ++i) out[(g * G + gi) * hd + i] = o[gi * hd + i] / sums[gi];
      } else {
        group_weighted_rows(s.data(), V, m, hd, G, po.data() + (g * G * chunks + c) * hd, chunks * hd);
      }
    }
  };
  const int64_t items = hkv * chunks;
  if (parallel) {
    at::parallel_for(0, items, 1, run);
  } else {
    run(0, items);  // a short context: one thread, no parallel region to start
  }
  if (chunks == 1) return;
  for (int64_t h = 0; h < hq; ++h) {  // the chunks' softmaxes merged: each weighted by exp(its max - the max)
    const float* m = pm.data() + h * chunks;
    const float top = *std::max_element(m, m + chunks);
    float total = 0.f;
    float* o = out + h * hd;
    std::fill(o, o + hd, 0.f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float w = std::exp(m[c] - top);
      total += w * pl[h * chunks + c];
      axpy(w, po.data() + (h * chunks + c) * hd, o, hd, static_cast<const float*>(nullptr));
    }
    for (int64_t i = 0; i < hd; ++i) o[i] /= total;
  }
}

template void attend<float>(const float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t, float, float, float*);
template void attend<c10::Half>(const float*, const c10::Half*, const c10::Half*, int64_t, int64_t, int64_t, int64_t,
                                int64_t, int64_t, float, float, float*);
template void attend<c10::BFloat16>(const float*, const c10::BFloat16*, const c10::BFloat16*, int64_t, int64_t,
                                    int64_t, int64_t, int64_t, int64_t, float, float, float*);

}  // namespace hire_native

namespace {

// the kernel on its own, for tests and benchmarks: q (hq, hd) float32; k, v (hkv, seq, hd) of one dtype
// -> (hq, hd) float32, attending over positions first..end-1
Tensor attend_op(Tensor q, Tensor k, Tensor v, int64_t first, int64_t end, double scale, double softcap) {
  TORCH_CHECK(k.dim() == 3 && k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes(),
              "attend: k and v must be contiguous (kv heads, positions, head dim) of one shape, got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "attend: k and v must share a dtype, got ", k.scalar_type(),
              " and ", v.scalar_type());
  const int64_t hkv = k.size(0), seq = k.size(1), hd = k.size(2);
  TORCH_CHECK(q.dim() == 2 && q.size(1) == hd && q.size(0) % hkv == 0, "attend: q must be (query heads, ", hd,
              ") with a multiple of ", hkv, " heads, got ", q.sizes());
  TORCH_CHECK(0 <= first && first < end && end <= seq, "attend: positions ", first, "..", end,
              " must be a non-empty range inside the ", seq, " cached");
  TORCH_CHECK(softcap >= 0.0, "attend: the soft-cap must be >= 0 (0: none), got ", softcap);
  auto qf = q.to(torch::kFloat).contiguous();
  auto out = torch::empty_like(qf);
  const int64_t hq = q.size(0);
  switch (k.scalar_type()) {
    case torch::kFloat:
      hire_native::attend(qf.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), seq, first, end, hq, hkv,
                          hd, (float)scale, (float)softcap, out.data_ptr<float>());
      break;
    case torch::kHalf:
      hire_native::attend(qf.data_ptr<float>(), k.data_ptr<c10::Half>(), v.data_ptr<c10::Half>(), seq, first, end,
                          hq, hkv, hd, (float)scale, (float)softcap, out.data_ptr<float>());
      break;
    case torch::kBFloat16:
      hire_native::attend(qf.data_ptr<float>(), k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(), seq,
                          first, end, hq, hkv, hd, (float)scale, (float)softcap, out.data_ptr<float>());
      break;
    default: TORCH_CHECK(false, "attend: the cache must be float32, float16 or bfloat16, got ", k.scalar_type());
  }
  return out;
}

}  // namespace

HIRE_FRAGMENT_IMPL(HIRE_OPS_NAMESPACE, CPU, m) {
  m.impl("attend", &attend_op);
}

HIRE_FRAGMENT(HIRE_OPS_NAMESPACE, m) {
  m.def("attend(Tensor q, Tensor k, Tensor v, int first, int end, float scale, float softcap) -> Tensor");
}
