// The whole decode step of one token in one native call: every layer's attention (RMSNorm, fused
// QKV GEMV and bias, q/k norms, RoPE, cache write, attention over the cache, output projection)
// and FFN (dense, or HiRE: proxy scores, selection, the selected neurons' rows), then the final
// norm. Python keeps the embedding lookup, the LM head and sampling. Per-op dispatch was ~2.5 ms
// of a ~12 ms SmolLM2 token in eager torch; here a token is one call.
//
// The weights and the KV cache are the engine's own tensors (no copies): the DecodeModel holds
// references. It runs what hire.engine.Engine.forward computes for one token (the eager
// reference it is tested against), accumulating in float32 with float32 activations.
#include <torch/custom_class.h>
#include <torch/library.h>
#include <torch/torch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <omp.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>
#include "simd.h"
#include "rows.h"

namespace {
using namespace hire_simd;
using torch::Tensor;

// y[r] = W[r] . x for every row: rows split across threads, streamed in order.
template <typename T>
void gemv_impl(const T* w, int64_t ld, const float* x, int64_t d, float* y, int64_t n) {
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) y[r] = dot(w + r * ld, x, d, static_cast<const T*>(nullptr));
  });
}

void gemv(const Tensor& w, const float* x, float* y) {
  const int64_t n = w.size(0), d = w.size(1), ld = w.stride(0);
  switch (w.scalar_type()) {
    case torch::kFloat: gemv_impl(w.data_ptr<float>(), ld, x, d, y, n); break;
    case torch::kHalf: gemv_impl(w.data_ptr<c10::Half>(), ld, x, d, y, n); break;
    case torch::kBFloat16: gemv_impl(w.data_ptr<c10::BFloat16>(), ld, x, d, y, n); break;
    default: TORCH_CHECK(false, "decode: unsupported weight dtype ", w.scalar_type());
  }
}

// out = x / rms(x) * w  (w already holds Gemma's 1 + weight); out may be x
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

// rotate-half RoPE of `heads` vectors of hd values in place
void rope(float* v, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* p = v + h * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float a = p[i], b = p[i + half];
      p[i] = a * cos[i] - b * sin[i];
      p[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

template <typename T>
void store(T* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// softmax(q . K[first..end) * scale) . V[first..end) per query head; K, V: (Hkv, S, hd) of one layer
template <typename T>
void attend(const float* q, const T* kc, const T* vc, int64_t seq, int64_t first, int64_t end, int64_t hq,
            int64_t hkv, int64_t hd, float scale, float* out) {
  const int64_t group = hq / hkv;
  at::parallel_for(0, hq, 1, [&](int64_t b, int64_t e) {
    std::vector<float> p(end - first);
    for (int64_t h = b; h < e; ++h) {
      const T* K = kc + (h / group) * seq * hd;
      const T* V = vc + (h / group) * seq * hd;
      const float* qh = q + h * hd;
      float m = -INFINITY;
      for (int64_t j = first; j < end; ++j) {
        p[j - first] = dot(K + j * hd, qh, hd, static_cast<const T*>(nullptr)) * scale;
        m = std::max(m, p[j - first]);
      }
      float sum = 0.f;
      for (auto& s : p) sum += (s = std::exp(s - m));
      float* o = out + h * hd;
      std::fill(o, o + hd, 0.f);
      for (int64_t j = first; j < end; ++j) axpy(p[j - first] / sum, V + j * hd, o, hd, static_cast<const T*>(nullptr));
    }
  });
}

// --- the FFN's 4-bit proxy (hire.proxies.QuantizedMatrix: codes + 8 packed two per byte, the even
// column in the low nibble; one float16 scale per group of columns), fused with the estimates.
// The activation is quantized to int8 once per token (one scale), so each 64-column chunk is two
// integer multiply-adds (u8 x s8 -> s16 -> s32, exact) and one float FMA with the group's scale;
// the +8 offset of the codes is taken out once per row from the per-chunk sums of the int8 x.
struct QuantX {
  std::vector<int8_t> even, odd;  // x's int8 codes of the even and odd columns, padded with zeros
  std::vector<int32_t> chunk_sum;  // sum of the codes of each 64-column chunk
  std::vector<int32_t> offset;     // 8 lanes per chunk: -8 * chunk_sum in lane 0, zeros (the codes' +8)
  float scale = 1.f;
};

QuantX quantize_x(const float* x, int64_t d, int64_t padded) {
  QuantX q;
  float amax = 0.f;
  for (int64_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(x[i]));
  q.scale = amax > 0.f ? amax / 127.f : 1.f;
  const int64_t chunks = (padded + 63) / 64;
  q.even.assign(chunks * 32, 0);
  q.odd.assign(chunks * 32, 0);
  q.chunk_sum.assign(chunks, 0);
  for (int64_t i = 0; i < d; ++i) {
    const int8_t v = static_cast<int8_t>(std::nearbyint(std::min(127.f, std::max(-127.f, x[i] / q.scale))));
    (i % 2 ? q.odd : q.even)[i / 2] = v;
    q.chunk_sum[i / 64] += v;
  }
  q.offset.assign(chunks * 8, 0);
  for (int64_t c = 0; c < chunks; ++c) q.offset[c * 8] = -8 * q.chunk_sum[c];
  return q;
}

// float16 -> float32 in one instruction (c10::Half's conversion is a portable bit-twiddling routine)
inline float half_f(c10::Half h) {
#if !HIRE_SCALAR
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

// The scores of `nr` rows (1 or 2: a neuron's gate and up rows, sharing the loads of x): sum over
// columns of (code - 8) * scale[group] * x, with x as its int8 codes. The +8 offset of the codes
// is taken out of lane 0 of each chunk's integer sums (offset_chunk = 8 * sum of x's codes there).
inline void int4_rows(const uint8_t* const* p, const c10::Half* const* scales, int nr, const QuantX& q,
                      int64_t chunks, int64_t group, float* out) {
  const int64_t per_group = group / 64;  // chunks sharing one scale
  int64_t c = 0;
  float total[2] = {0.f, 0.f};
#if !HIRE_SCALAR
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
#if defined(__AVX512BW__)
  // two chunks (128 columns) per step; lanes 0-7 hold chunk c's sums, lanes 8-15 chunk c + 1's
  const __m512i low512 = _mm512_set1_epi8(0x0F);
  __m512 acc512[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; c + 2 <= chunks; c += 2) {
    const __m512i xe = _mm512_loadu_si512(q.even.data() + c * 32);
    const __m512i xo = _mm512_loadu_si512(q.odd.data() + c * 32);
    const __m512i off = _mm512_loadu_si512(q.offset.data() + c * 8);
    for (int r = 0; r < nr; ++r) {
      const __m512i b = _mm512_loadu_si512(p[r] + c * 32);
      const __m512i lo = _mm512_and_si512(b, low512), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low512);
#if defined(__AVX512VNNI__)
      const __m512i s32 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(off, lo, xe), hi, xo);
#else
      const __m512i s16 = _mm512_add_epi16(_mm512_maddubs_epi16(lo, xe), _mm512_maddubs_epi16(hi, xo));
      const __m512i s32 = _mm512_add_epi32(_mm512_madd_epi16(s16, _mm512_set1_epi16(1)), off);
#endif
      const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(half_f(scales[r][c / per_group])),
                                           _mm256_set1_ps(half_f(scales[r][(c + 1) / per_group])), 1);
      acc512[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s32), sv, acc512[r]);
    }
  }
  for (int r = 0; r < nr; ++r)
    acc[r] = _mm256_add_ps(_mm512_castps512_ps256(acc512[r]), _mm512_extractf32x8_ps(acc512[r], 1));
#endif
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (; c < chunks; ++c) {
    const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.even.data() + c * 32));
    const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.odd.data() + c * 32));
    const __m256i off = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.offset.data() + c * 8));
    for (int r = 0; r < nr; ++r) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p[r] + c * 32));
      const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
      const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
      const __m256 s = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(s16, ones), off));
      acc[r] = _mm256_fmadd_ps(s, _mm256_set1_ps(half_f(scales[r][c / per_group])), acc[r]);
    }
  }
  for (int r = 0; r < nr; ++r) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    total[r] = _mm_cvtss_f32(h);
  }
#endif
  for (; c < chunks; ++c) {  // scalar builds
    for (int r = 0; r < nr; ++r) {
      int32_t s = -8 * q.chunk_sum[c];
      for (int64_t j = 0; j < 32; ++j)
        s += (p[r][c * 32 + j] & 0x0F) * q.even[c * 32 + j] + (p[r][c * 32 + j] >> 4) * q.odd[c * 32 + j];
      total[r] += static_cast<float>(s) * half_f(scales[r][c / per_group]);
    }
  }
  for (int r = 0; r < nr; ++r) out[r] = total[r] * q.scale;
}

// |act(gate) * up| (gated) or |act(pre)| per neuron from the 4-bit proxy of the gate (and up) rows.
// packed: (parts*I, Dp/2) uint8, scales: (parts*I, Dp/group) float16 -> est (I,)
void int4_estimates(const float* x, int64_t d, const Tensor& packed, const Tensor& scales, int64_t group,
                    int64_t parts, int64_t act, float* est) {
  const int64_t rows = packed.size(0), neurons = rows / parts, padded = packed.size(1) * 2;
  const int64_t chunks = padded / 64;
  const QuantX q = quantize_x(x, d, padded);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const c10::Half* sc = scales.data_ptr<c10::Half>();
  const int64_t pstride = packed.size(1), sstride = scales.size(1);
  at::parallel_for(0, neurons, 64, [&](int64_t b, int64_t e) {
    std::vector<float> gate(e - b), up(e - b);
    for (int64_t i = b; i < e; ++i) {
      const uint8_t* rp[2] = {p + i * pstride, p + (neurons + i) * pstride};
      const c10::Half* rs[2] = {sc + i * sstride, sc + (neurons + i) * sstride};
      float v[2];
      int4_rows(rp, rs, (int)parts, q, chunks, group, v);
      gate[i - b] = v[0];
      up[i - b] = v[1];
    }
    activate_n(gate.data(), parts == 2 ? up.data() : nullptr, est + b, e - b, act, true);
  });
}

void check_int4(const Tensor& packed, const Tensor& scales, int64_t group, int64_t d) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == torch::kByte,
              "the 4-bit proxy's codes must be a contiguous (n, Dp/2) uint8 tensor");
  TORCH_CHECK(group >= 64 && group % 64 == 0, "the 4-bit proxy kernel takes groups of a multiple of 64 columns, got ",
              group);
  TORCH_CHECK(packed.size(1) * 2 % group == 0 && packed.size(1) * 2 >= d, "codes of ", packed.size(1) * 2,
              " columns for a width of ", d, " in groups of ", group);
  TORCH_CHECK(scales.dim() == 2 && scales.is_contiguous() && scales.scalar_type() == torch::kHalf &&
              scales.size(0) == packed.size(0) && scales.size(1) == packed.size(1) * 2 / group,
              "the 4-bit proxy's scales must be contiguous float16 (n, Dp/group)");
}

struct Layer {
  Tensor qkv, qkv_bias, o;                                    // (Nq+2Nkv, D), (Nq+2Nkv,) f32 or empty, (D, Nq)
  Tensor attn_norm, post_attn_norm, ffn_norm, post_ffn_norm;  // float32 (D,), the post ones may be empty
  Tensor q_norm, k_norm;                                      // float32 (hd,) or empty
  Tensor ffn;                                                 // (I, (parts+1)*D) neuron-major [in part(s) | out]
  Tensor proxy_a, proxy_b;                                    // the FFN proxy (see ProxyKind)
  int64_t rope = 0, sliding = 0, act = 0, parts = 2, keep = 0, proxy_kind = 0, proxy_group = 0;
};

enum ProxyKind { DENSE_FFN = 0, INT4PACK = 1, MATRIX = 2, INT4 = 3 };

Tensor opt(const Tensor& t) { return t.numel() ? t : Tensor(); }

// The HiRE FFN on its 4-bit proxy in one parallel region (no thread start between its phases):
// every thread estimates its share of the neurons and histograms their keys' top bits; one finds
// the threshold (the keep-th largest estimate; among equal ones the lowest indices first, as
// hire.topk.select_neurons); every thread writes its kept neurons in index order; the kept
// neurons are split evenly for the rows; the threads' partial outputs are summed by columns.
// timing: null, or {proxy seconds, selection seconds} to add to
void ffn_int4_region(const Layer& L, const float* x, int64_t dim, float* y, double* timing) {
  constexpr int kBits = 11, kBuckets = 1 << kBits;
  const int64_t neurons = L.ffn.size(0), keep = L.keep, padded = L.proxy_a.size(1) * 2, chunks = padded / 64;
  const QuantX q = quantize_x(x, dim, padded);
  const int nt = std::max(1, at::get_num_threads());
  std::vector<float> est(neurons), partial(static_cast<size_t>(nt) * dim, 0.f);
  std::vector<uint32_t> key(neurons);
  std::vector<int64_t> hist(static_cast<size_t>(nt) * kBuckets, 0), above(nt, 0), equal(nt, 0), start(nt, 0),
      ties(nt, 0), sel(keep);
  uint32_t thr = 0;
  int64_t take_equal = 0;
  const uint8_t* p = L.proxy_a.data_ptr<uint8_t>();
  const c10::Half* sc = L.proxy_b.data_ptr<c10::Half>();
  const int64_t pstride = L.proxy_a.size(1), sstride = L.proxy_b.size(1);
  using clock = std::chrono::steady_clock;
  clock::time_point t0 = timing != nullptr ? clock::now() : clock::time_point(), t1 = t0, t2 = t0;
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), n_t = omp_get_num_threads();
    const int64_t b = neurons * t / n_t, e = neurons * (t + 1) / n_t;
    {  // 1. estimates, keys, histogram
      std::vector<float> gate(e - b), up(e - b);
      for (int64_t i = b; i < e; ++i) {
        const uint8_t* rp[2] = {p + i * pstride, p + (neurons + i) * pstride};
        const c10::Half* rs[2] = {sc + i * sstride, sc + (neurons + i) * sstride};
        float v[2];
        int4_rows(rp, rs, static_cast<int>(L.parts), q, chunks, L.proxy_group, v);
        gate[i - b] = v[0];
        up[i - b] = v[1];
      }
      activate_n(gate.data(), L.parts == 2 ? up.data() : nullptr, est.data() + b, e - b, L.act, true);
      int64_t* h = hist.data() + static_cast<size_t>(t) * kBuckets;
      for (int64_t i = b; i < e; ++i) {
        key[i] = hire_native::order_key(est[i]);
        ++h[key[i] >> (32 - kBits)];
      }
    }
#pragma omp barrier
#pragma omp single
    {  // 2. the threshold key, and how many keys equal to it are kept
      if (timing != nullptr) t1 = clock::now();
      int64_t need = keep;
      int bucket = kBuckets - 1;
      for (; bucket > 0; --bucket) {
        int64_t total = 0;
        for (int u = 0; u < n_t; ++u) total += hist[static_cast<size_t>(u) * kBuckets + bucket];
        if (total >= need) break;
        need -= total;
      }
      std::vector<uint32_t> cand;
      for (int64_t i = 0; i < neurons; ++i)
        if (static_cast<int>(key[i] >> (32 - kBits)) == bucket) cand.push_back(key[i]);
      std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.end(), std::greater<uint32_t>());
      thr = cand[need - 1];
      int64_t greater = 0;
      for (uint32_t k : cand) greater += k > thr;
      take_equal = need - greater;
    }
    {  // 3. each thread's kept neurons, in index order, at its offset
      int64_t a = 0, eq = 0;
      for (int64_t i = b; i < e; ++i) {
        a += key[i] > thr;
        eq += key[i] == thr;
      }
      above[t] = a;
      equal[t] = eq;
    }
#pragma omp barrier
#pragma omp single
    {
      int64_t offset = 0, left = take_equal;
      for (int u = 0; u < n_t; ++u) {
        ties[u] = std::min(equal[u], left);
        left -= ties[u];
        start[u] = offset;
        offset += above[u] + ties[u];
      }
    }
    {
      int64_t pos = start[t], tie = ties[t];
      for (int64_t i = b; i < e; ++i)
        if (key[i] > thr || (key[i] == thr && tie-- > 0)) sel[pos++] = i;
    }
#pragma omp barrier
    if (t == 0 && timing != nullptr) t2 = clock::now();
    // 4. the kept neurons' rows, split evenly
    hire_native::ffn_rows_range(L.ffn, sel.data(), keep * t / n_t, keep * (t + 1) / n_t, x, dim, L.parts, L.act,
                                partial.data() + static_cast<size_t>(t) * dim);
#pragma omp barrier
    // 5. the partial outputs summed, columns split
    for (int64_t c = dim * t / n_t; c < dim * (t + 1) / n_t; ++c) {
      float sum = 0.f;
      for (int u = 0; u < n_t; ++u) sum += partial[static_cast<size_t>(u) * dim + c];
      y[c] = sum;
    }
  }
  if (timing != nullptr) {
    timing[0] += std::chrono::duration<double>(t1 - t0).count();
    timing[1] += std::chrono::duration<double>(t2 - t1).count();
  }
}


}  // namespace

// A model's decode step over the engine's tensors; built once (hire.engine.plan), called per token.
// In the ops' namespace: a variant build's class is then another C++ type, which torch's class
// registry (keyed by type) needs to load both libraries side by side.
namespace HIRE_OPS_NAMESPACE {
struct DecodeModel : torch::CustomClassHolder {
  int64_t hq, hkv, hd, dim;
  double scale, eps;
  Tensor k_cache, v_cache;  // (L, Hkv, S, hd), written in place
  std::vector<Tensor> cos, sin;  // float32 (S, hd) per rotary table
  Tensor final_norm;
  std::vector<Layer> layers;
  bool timing = false;
  // when timing: attention, FFN, and within the FFN its proxy estimates and its selection
  double seconds[4] = {0.0, 0.0, 0.0, 0.0};

  DecodeModel(std::vector<int64_t> dims, double scale, double eps, Tensor k_cache, Tensor v_cache,
              std::vector<Tensor> cos, std::vector<Tensor> sin, Tensor final_norm)
      : scale(scale), eps(eps), k_cache(k_cache), v_cache(v_cache), cos(cos), sin(sin), final_norm(final_norm) {
    TORCH_CHECK(dims.size() == 4, "dims: (query heads, kv heads, head dim, hidden)");
    hq = dims[0], hkv = dims[1], hd = dims[2], dim = dims[3];
    TORCH_CHECK(hq % hkv == 0, "query heads ", hq, " are not a multiple of kv heads ", hkv);
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                k_cache.sizes() == v_cache.sizes() && k_cache.size(1) == hkv && k_cache.size(3) == hd,
                "the caches must be contiguous (L, Hkv, S, hd)");
    TORCH_CHECK(cos.size() == sin.size() && !cos.empty(), "one cos and one sin table per rotary type");
    for (size_t i = 0; i < cos.size(); ++i)
      TORCH_CHECK(cos[i].scalar_type() == torch::kFloat && cos[i].is_contiguous() && sin[i].is_contiguous() &&
                  cos[i].size(1) == hd && cos[i].size(0) >= k_cache.size(2), "rotary tables: float32 (S, hd)");
    check_vec(final_norm, dim, "final norm");
  }

  static void check_vec(const Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.numel() == n, what,
                " must be a contiguous float32 vector of ", n);
  }

  // tensors: qkv, qkv_bias, o, attn_norm, post_attn_norm, ffn_norm, post_ffn_norm, q_norm, k_norm,
  //          ffn rows, proxy_a, proxy_b (empty tensors where absent)
  // ints:    rope table, sliding window (0: global), activation, parts, keep, proxy kind, proxy group size
  void add_layer(std::vector<Tensor> t, std::vector<int64_t> ints) {
    TORCH_CHECK(t.size() == 12 && ints.size() == 7, "add_layer: 12 tensors and 7 ints");
    TORCH_CHECK((int64_t)layers.size() < k_cache.size(0), "more layers than the cache holds");
    Layer L;
    L.qkv = t[0], L.qkv_bias = opt(t[1]), L.o = t[2];
    L.attn_norm = t[3], L.post_attn_norm = opt(t[4]), L.ffn_norm = t[5], L.post_ffn_norm = opt(t[6]);
    L.q_norm = opt(t[7]), L.k_norm = opt(t[8]), L.ffn = t[9], L.proxy_a = opt(t[10]), L.proxy_b = opt(t[11]);
    L.rope = ints[0], L.sliding = ints[1], L.act = ints[2], L.parts = ints[3], L.keep = ints[4];
    L.proxy_kind = ints[5], L.proxy_group = ints[6];
    const int64_t nq = hq * hd, nkv = hkv * hd;
    TORCH_CHECK(L.qkv.dim() == 2 && L.qkv.size(0) == nq + 2 * nkv && L.qkv.size(1) == dim && L.qkv.stride(1) == 1,
                "qkv must be (", nq + 2 * nkv, ", ", dim, ")");
    TORCH_CHECK(L.o.dim() == 2 && L.o.size(0) == dim && L.o.size(1) == nq && L.o.stride(1) == 1, "o must be (", dim,
                ", ", nq, ")");
    if (L.qkv_bias.defined()) check_vec(L.qkv_bias, nq + 2 * nkv, "qkv bias");
    check_vec(L.attn_norm, dim, "attention norm");
    check_vec(L.ffn_norm, dim, "FFN norm");
    if (L.post_attn_norm.defined()) check_vec(L.post_attn_norm, dim, "post-attention norm");
    if (L.post_ffn_norm.defined()) check_vec(L.post_ffn_norm, dim, "post-FFN norm");
    TORCH_CHECK(L.q_norm.defined() == L.k_norm.defined(), "q and k norms come together");
    if (L.q_norm.defined()) {
      check_vec(L.q_norm, hd, "q norm");
      check_vec(L.k_norm, hd, "k norm");
    }
    TORCH_CHECK(L.rope >= 0 && L.rope < (int64_t)cos.size(), "rotary table ", L.rope, " does not exist");
    TORCH_CHECK(L.parts == 1 || L.parts == 2, "parts must be 1 or 2");
    TORCH_CHECK(L.act >= 1 && L.act <= 4, "unknown activation ", L.act);
    TORCH_CHECK(L.ffn.dim() == 2 && L.ffn.size(1) == (L.parts + 1) * dim && L.ffn.stride(1) == 1,
                "FFN rows must be (I, ", (L.parts + 1) * dim, ")");
    const int64_t neurons = L.ffn.size(0);
    TORCH_CHECK(L.keep >= 1 && L.keep <= neurons, "keep must be in [1, ", neurons, "]");
    if (L.keep < neurons) {
      TORCH_CHECK(L.proxy_kind == INT4PACK || L.proxy_kind == MATRIX || L.proxy_kind == INT4,
                  "a sparse FFN needs a proxy");
      if (L.proxy_kind == INT4) {
        check_int4(L.proxy_a, L.proxy_b, L.proxy_group, dim);
        TORCH_CHECK(L.proxy_a.size(0) == L.parts * neurons, "the 4-bit proxy must have ", L.parts * neurons, " rows");
      } else if (L.proxy_kind == MATRIX) {
        TORCH_CHECK(L.proxy_a.dim() == 2 && L.proxy_a.size(0) == L.parts * neurons && L.proxy_a.size(1) == dim,
                    "the proxy matrix must be (", L.parts * neurons, ", ", dim, ")");
      } else {
        TORCH_CHECK(L.proxy_a.defined() && L.proxy_b.defined() && L.proxy_group > 0, "int4pack proxy: packed, scales");
      }
    }
    layers.push_back(std::move(L));
  }

  // h: (D,) float32 residual stream of the token at position pos -> final-normed hidden (D,) float32
  Tensor step(Tensor h_in, int64_t pos) {
    RECORD_FUNCTION("hire::decode_step", std::vector<c10::IValue>({h_in}));  // an operator to the profiler
    TORCH_CHECK(h_in.numel() == dim, "the hidden state has ", h_in.numel(), " values, expected ", dim);
    TORCH_CHECK(pos >= 0 && pos < k_cache.size(2), "position ", pos, " is outside the cache (", k_cache.size(2), ")");
    TORCH_CHECK((int64_t)layers.size() == k_cache.size(0), "the model has ", layers.size(), " of ", k_cache.size(0),
                " layers");
    auto h = h_in.reshape({dim}).to(torch::kFloat).clone();
    float* hp = h.data_ptr<float>();
    const int64_t nq = hq * hd, nkv = hkv * hd;
    std::vector<float> x(dim), qkv(nq + 2 * nkv), att(nq), y(dim);
    using clock = std::chrono::steady_clock;
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& L = layers[l];
      const auto t0 = timing ? clock::now() : clock::time_point();
      // --- attention
      rms_norm(hp, L.attn_norm.data_ptr<float>(), dim, eps, x.data());
      gemv(L.qkv, x.data(), qkv.data());
      if (L.qkv_bias.defined()) {
        const float* b = L.qkv_bias.data_ptr<float>();
        for (int64_t i = 0; i < nq + 2 * nkv; ++i) qkv[i] += b[i];
      }
      float *q = qkv.data(), *k = q + nq, *v = k + nkv;
      if (L.q_norm.defined()) {
        for (int64_t i = 0; i < hq; ++i) rms_norm(q + i * hd, L.q_norm.data_ptr<float>(), hd, eps, q + i * hd);
        for (int64_t i = 0; i < hkv; ++i) rms_norm(k + i * hd, L.k_norm.data_ptr<float>(), hd, eps, k + i * hd);
      }
      const float* c = cos[L.rope].data_ptr<float>() + pos * hd;
      const float* s = sin[L.rope].data_ptr<float>() + pos * hd;
      rope(q, hq, hd, c, s);
      rope(k, hkv, hd, c, s);
      const int64_t end = pos + 1, first = L.sliding ? std::max<int64_t>(0, end - L.sliding) : 0;
      switch (k_cache.scalar_type()) {
        case torch::kHalf: cache_attend<c10::Half>(l, k, v, q, pos, first, end, att.data()); break;
        case torch::kBFloat16: cache_attend<c10::BFloat16>(l, k, v, q, pos, first, end, att.data()); break;
        case torch::kFloat: cache_attend<float>(l, k, v, q, pos, first, end, att.data()); break;
        default: TORCH_CHECK(false, "decode: unsupported cache dtype ", k_cache.scalar_type());
      }
      gemv(L.o, att.data(), y.data());
      if (L.post_attn_norm.defined()) rms_norm(y.data(), L.post_attn_norm.data_ptr<float>(), dim, eps, y.data());
      for (int64_t i = 0; i < dim; ++i) hp[i] += y[i];
      const auto t1 = timing ? clock::now() : clock::time_point();
      // --- FFN
      rms_norm(hp, L.ffn_norm.data_ptr<float>(), dim, eps, x.data());
      ffn(L, x.data(), y.data());
      if (L.post_ffn_norm.defined()) rms_norm(y.data(), L.post_ffn_norm.data_ptr<float>(), dim, eps, y.data());
      for (int64_t i = 0; i < dim; ++i) hp[i] += y[i];
      if (timing) {
        const auto t2 = clock::now();
        seconds[0] += std::chrono::duration<double>(t1 - t0).count();
        seconds[1] += std::chrono::duration<double>(t2 - t1).count();
      }
    }
    auto out = torch::empty({1, dim}, h.options());
    rms_norm(hp, final_norm.data_ptr<float>(), dim, eps, out.data_ptr<float>());
    return out;
  }

  // write this token's k, v into layer l's cache at pos, then attend over first..end-1
  template <typename T>
  void cache_attend(int64_t l, const float* k, const float* v, const float* q, int64_t pos, int64_t first,
                    int64_t end, float* out) {
    const int64_t seq = k_cache.size(2);
    T* kc = k_cache.data_ptr<T>() + l * hkv * seq * hd;
    T* vc = v_cache.data_ptr<T>() + l * hkv * seq * hd;
    for (int64_t i = 0; i < hkv; ++i) {
      store(kc + (i * seq + pos) * hd, k + i * hd, hd);
      store(vc + (i * seq + pos) * hd, v + i * hd, hd);
    }
    attend<T>(q, kc, vc, seq, first, end, hq, hkv, hd, (float)scale, out);
  }

  void ffn(const Layer& L, const float* x, float* y) {
    const int64_t neurons = L.ffn.size(0);
    if (L.keep == neurons) {
      hire_native::ffn_rows(L.ffn, nullptr, neurons, x, dim, L.parts, L.act, y);
      return;
    }
    if (L.proxy_kind == INT4) {  // measured A B A B against three parallel calls: 1-4 % faster per token
      ffn_int4_region(L, x, dim, y, timing ? seconds + 2 : nullptr);
      return;
    }
    Tensor scores;
    if (L.proxy_kind == INT4PACK) {
      auto xb = torch::from_blob(const_cast<float*>(x), {1, dim}, torch::kFloat).to(torch::kBFloat16);
      scores = at::_weight_int4pack_mm_for_cpu(xb, L.proxy_a, L.proxy_group, L.proxy_b);
    } else {
      scores = torch::empty({L.parts * neurons}, torch::kFloat);
      gemv(L.proxy_a, x, scores.data_ptr<float>());
    }
    auto est = hire_native::neuron_estimates(scores, neurons, L.act, L.parts == 2);
    auto idx = hire_native::select_top(est.data_ptr<float>(), neurons, L.keep);
    hire_native::ffn_rows(L.ffn, idx.data(), L.keep, x, dim, L.parts, L.act, y);
  }

  void set_timing(bool on) {
    timing = on;
    seconds[0] = seconds[1] = seconds[2] = seconds[3] = 0.0;
  }

  // seconds in attention, the FFN, the FFN's proxy and its selection since set_timing(true)
  std::vector<double> timings() { return {seconds[0], seconds[1], seconds[2], seconds[3]}; }
};
}  // namespace HIRE_OPS_NAMESPACE
using HIRE_OPS_NAMESPACE::DecodeModel;

// The HiRE FFN step on a 4-bit proxy alone (what DecodeModel runs per layer; for tests):
// x: (D,), rows: (I, (parts+1)*D), packed/scales: the proxy (parts*I rows), keep neurons -> (D,) float32
Tensor int4_ffn_op(Tensor x, Tensor rows, Tensor packed, Tensor scales, int64_t group, int64_t keep, int64_t act,
                   int64_t parts) {
  const int64_t d = x.numel(), neurons = rows.size(0);
  check_int4(packed, scales, group, d);
  TORCH_CHECK(parts == 1 || parts == 2, "parts must be 1 or 2");
  TORCH_CHECK(rows.dim() == 2 && rows.stride(1) == 1 && rows.size(1) == (parts + 1) * d, "rows must be (I, ",
              (parts + 1) * d, ")");
  TORCH_CHECK(packed.size(0) == parts * neurons, "the proxy must have ", parts * neurons, " rows");
  TORCH_CHECK(keep >= 1 && keep <= neurons, "keep must be in [1, ", neurons, "], got ", keep);
  TORCH_CHECK(act >= 1 && act <= 4, "unknown activation ", act);
  Layer L;
  L.ffn = rows, L.proxy_a = packed, L.proxy_b = scales, L.proxy_group = group, L.keep = keep, L.act = act;
  L.parts = parts, L.proxy_kind = INT4;
  auto xf = x.reshape({d}).to(torch::kFloat).contiguous();
  auto y = torch::empty({d}, xf.options());
  ffn_int4_region(L, xf.data_ptr<float>(), d, y.data_ptr<float>(), nullptr);
  return y;
}

// y = W x for every row of W, in float32: the dense LM head (its logits then feed a float32 argmax,
// several times faster on CPU than a float16 one). x: (D,), W: (n, D) -> (n,)
Tensor gemv_op(Tensor x, Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1 && w.size(1) == x.numel(), "gemv: W must be (n, ", x.numel(),
              ") with contiguous rows, got ", w.sizes());
  auto xf = x.reshape({x.numel()}).to(torch::kFloat).contiguous();
  auto y = torch::empty({w.size(0)}, xf.options());
  gemv(w, xf.data_ptr<float>(), y.data_ptr<float>());
  return y;
}

// The fused 4-bit proxy estimates alone (for tests against hire.proxies' eager meaning).
// x: (D,), packed: (parts*I, Dp/2), scales: (parts*I, Dp/group) -> float32 (I,)
Tensor int4_estimates_op(Tensor x, Tensor packed, Tensor scales, int64_t group, int64_t parts, int64_t act) {
  const int64_t d = x.numel();
  check_int4(packed, scales, group, d);
  TORCH_CHECK(parts == 1 || parts == 2, "parts must be 1 or 2");
  TORCH_CHECK(packed.size(0) % parts == 0, "the proxy's rows do not split into ", parts, " parts");
  auto xf = x.reshape({d}).to(torch::kFloat).contiguous();
  auto est = torch::empty({packed.size(0) / parts}, xf.options());
  int4_estimates(xf.data_ptr<float>(), d, packed, scales, group, parts, act, est.data_ptr<float>());
  return est;
}

// TORCH_LIBRARY pastes its namespace argument unexpanded: one more macro level expands it first.
#define HIRE_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define HIRE_FRAGMENT_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

HIRE_FRAGMENT_IMPL(HIRE_OPS_NAMESPACE, CPU, m) {
  m.impl("int4_estimates", &int4_estimates_op);
  m.impl("gemv", &gemv_op);
  m.impl("int4_ffn", &int4_ffn_op);
}

HIRE_FRAGMENT(HIRE_OPS_NAMESPACE, m) {
  m.def("int4_estimates(Tensor x, Tensor packed, Tensor scales, int group, int parts, int act) -> Tensor");
  m.def("gemv(Tensor x, Tensor w) -> Tensor");
  m.def("int4_ffn(Tensor x, Tensor rows, Tensor packed, Tensor scales, int group, int keep, int act, int parts) -> Tensor");
  m.class_<DecodeModel>("DecodeModel")
      .def(torch::init<std::vector<int64_t>, double, double, Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>,
                       Tensor>())
      .def("add_layer", &DecodeModel::add_layer)
      .def("step", &DecodeModel::step)
      .def("set_timing", &DecodeModel::set_timing)
      .def("timings", &DecodeModel::timings);
}
