// The FFN's 4-bit proxy (hire.proxies.QuantizedMatrix's codes and scales, read as they are stored):
// the estimates of every neuron (int4_estimates), and the whole HiRE FFN step on it in one parallel
// region (int4_ffn: estimates, selection, the kept neurons' rows), which the decode step runs.
#include <torch/library.h>
#include <torch/torch.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>
#include "simd.h"
#include "int4.h"
#include "rows.h"

namespace {
using namespace hire_simd;
using torch::Tensor;

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
  std::vector<int8_t> codes(d);
  q.scale = quantize_int8(x, d, codes.data());
  const int64_t chunks = (padded + 63) / 64;
  q.even.assign(chunks * 32, 0);
  q.odd.assign(chunks * 32, 0);
  q.chunk_sum.assign(chunks, 0);
  for (int64_t i = 0; i < d; ++i) {
    (i % 2 ? q.odd : q.even)[i / 2] = codes[i];
    q.chunk_sum[i / 64] += codes[i];
  }
  q.offset.assign(chunks * 8, 0);
  for (int64_t c = 0; c < chunks; ++c) q.offset[c * 8] = -8 * q.chunk_sum[c];
  return q;
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
      const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(to_f(scales[r][c / per_group])),
                                           _mm256_set1_ps(to_f(scales[r][(c + 1) / per_group])), 1);
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
      acc[r] = _mm256_fmadd_ps(s, _mm256_set1_ps(to_f(scales[r][c / per_group])), acc[r]);
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
      total[r] += static_cast<float>(s) * to_f(scales[r][c / per_group]);
    }
  }
  for (int r = 0; r < nr; ++r) out[r] = total[r] * q.scale;
}

// est[b..e) for neurons b..e-1 of the proxy (packed, scales) and x's codes q (one thread's share).
void estimate_range(const Tensor& packed, const Tensor& scales, int64_t group, int64_t parts, int64_t act,
                    const QuantX& q, int64_t b, int64_t e, float* est) {
  const int64_t neurons = packed.size(0) / parts, chunks = packed.size(1) * 2 / 64;
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const c10::Half* sc = scales.data_ptr<c10::Half>();
  const int64_t pstride = packed.size(1), sstride = scales.size(1);
  std::vector<float> gate(e - b), up(e - b);
  for (int64_t i = b; i < e; ++i) {
    const uint8_t* rp[2] = {p + i * pstride, p + (neurons + i) * pstride};
    const c10::Half* rs[2] = {sc + i * sstride, sc + (neurons + i) * sstride};
    float v[2];
    int4_rows(rp, rs, static_cast<int>(parts), q, chunks, group, v);
    gate[i - b] = v[0];
    up[i - b] = v[1];
  }
  activate_n(gate.data(), parts == 2 ? up.data() : nullptr, est + b, e - b, act, true);
}

// |act(gate) * up| (gated) or |act(pre)| per neuron from the 4-bit proxy of the gate (and up) rows.
// packed: (parts*I, Dp/2) uint8, scales: (parts*I, Dp/group) float16 -> est (I,)
void int4_estimates(const float* x, int64_t d, const Tensor& packed, const Tensor& scales, int64_t group,
                    int64_t parts, int64_t act, float* est) {
  const QuantX q = quantize_x(x, d, packed.size(1) * 2);
  at::parallel_for(0, packed.size(0) / parts, 64, [&](int64_t b, int64_t e) {
    estimate_range(packed, scales, group, parts, act, q, b, e, est);
  });
}

}  // namespace

namespace hire_native {

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


// The HiRE FFN on its 4-bit proxy in one parallel region (no thread start between its phases):
// every thread estimates its share of the neurons and histograms their keys' top bits; one finds
// the threshold (the keep-th largest estimate; among equal ones the lowest indices first, as
// hire.topk.select_neurons); every thread writes its kept neurons in index order; the kept
// neurons are split evenly for the rows; the threads' partial outputs are summed by columns.
void int4_ffn(const Tensor& rows, const Tensor& packed, const Tensor& scales, int64_t group, int64_t keep,
              int64_t parts, int64_t act, const float* x, int64_t dim, float* y, double* timing) {
  const int64_t neurons = rows.size(0);
  const QuantX q = quantize_x(x, dim, packed.size(1) * 2);
  const int nt = std::max(1, at::get_num_threads());
  std::vector<float> est(neurons), partial(static_cast<size_t>(nt) * dim, 0.f);
  std::vector<uint32_t> key(neurons);
  std::vector<int64_t> hist(static_cast<size_t>(nt) * hire_native::kKeyBuckets, 0), above(nt, 0), equal(nt, 0), start(nt, 0),
      ties(nt, 0), sel(keep);
  uint32_t thr = 0;
  int64_t take_equal = 0;
  using clock = std::chrono::steady_clock;
  clock::time_point t0 = timing != nullptr ? clock::now() : clock::time_point(), t1 = t0, t2 = t0;
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), n_t = omp_get_num_threads();
    const int64_t b = neurons * t / n_t, e = neurons * (t + 1) / n_t;
    {  // 1. estimates, keys, histogram
      estimate_range(packed, scales, group, parts, act, q, b, e, est.data());
      int64_t* h = hist.data() + static_cast<size_t>(t) * hire_native::kKeyBuckets;
      for (int64_t i = b; i < e; ++i) {
        key[i] = hire_native::order_key(est[i]);
        ++h[hire_native::key_bucket(key[i])];
      }
    }
#pragma omp barrier
#pragma omp single
    {  // 2. the threshold key, and how many keys equal to it are kept
      if (timing != nullptr) t1 = clock::now();
      const hire_native::Threshold found = hire_native::find_threshold(key.data(), neurons, keep, hist.data(), n_t);
      thr = found.key;
      take_equal = found.equal;
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
    hire_native::ffn_rows_range(rows, sel.data(), keep * t / n_t, keep * (t + 1) / n_t, x, dim, parts, act,
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

void int4_estimates_into(const Tensor& packed, const Tensor& scales, int64_t group, int64_t parts, int64_t act,
                         const float* x, int64_t d, float* est) {
  const QuantX q = quantize_x(x, d, packed.size(1) * 2);
  at::parallel_for(0, packed.size(0) / parts, 64, [&](int64_t b, int64_t e) {
    estimate_range(packed, scales, group, parts, act, q, b, e, est);
  });
}

}  // namespace hire_native

// The HiRE FFN step on a 4-bit proxy alone (what DecodeModel runs per layer; for tests):
// x: (D,), rows: (I, (parts+1)*D), packed/scales: the proxy (parts*I rows), keep neurons -> (D,) float32
Tensor int4_ffn_op(Tensor x, Tensor rows, Tensor packed, Tensor scales, int64_t group, int64_t keep, int64_t act,
                   int64_t parts) {
  const int64_t d = x.numel(), neurons = rows.size(0);
  hire_native::check_int4(packed, scales, group, d);
  TORCH_CHECK(parts == 1 || parts == 2, "parts must be 1 or 2");
  TORCH_CHECK(rows.dim() == 2 && rows.stride(1) == 1 && rows.size(1) == (parts + 1) * d, "rows must be (I, ",
              (parts + 1) * d, ")");
  TORCH_CHECK(packed.size(0) == parts * neurons, "the proxy must have ", parts * neurons, " rows");
  TORCH_CHECK(keep >= 1 && keep <= neurons, "keep must be in [1, ", neurons, "], got ", keep);
  TORCH_CHECK(act >= 1 && act <= 4, "unknown activation ", act);
  auto xf = x.reshape({d}).to(torch::kFloat).contiguous();
  auto y = torch::empty({d}, xf.options());
  hire_native::int4_ffn(rows, packed, scales, group, keep, parts, act, xf.data_ptr<float>(), d, y.data_ptr<float>(),
                        nullptr);
  return y;
}

// The fused 4-bit proxy estimates alone (for tests against hire.proxies' eager meaning).
// x: (D,), packed: (parts*I, Dp/2), scales: (parts*I, Dp/group) -> float32 (I,)
Tensor int4_estimates_op(Tensor x, Tensor packed, Tensor scales, int64_t group, int64_t parts, int64_t act) {
  const int64_t d = x.numel();
  hire_native::check_int4(packed, scales, group, d);
  TORCH_CHECK(parts == 1 || parts == 2, "parts must be 1 or 2");
  TORCH_CHECK(packed.size(0) % parts == 0, "the proxy's rows do not split into ", parts, " parts");
  auto xf = x.reshape({d}).to(torch::kFloat).contiguous();
  auto est = torch::empty({packed.size(0) / parts}, xf.options());
  int4_estimates(xf.data_ptr<float>(), d, packed, scales, group, parts, act, est.data_ptr<float>());
  return est;
}

HIRE_FRAGMENT(HIRE_OPS_NAMESPACE, m) {
  m.def("int4_estimates(Tensor x, Tensor packed, Tensor scales, int group, int parts, int act) -> Tensor");
  m.def("int4_ffn(Tensor x, Tensor rows, Tensor packed, Tensor scales, int group, int keep, int act, int parts) -> Tensor");
}

HIRE_FRAGMENT_IMPL(HIRE_OPS_NAMESPACE, CPU, m) {
  m.impl("int4_estimates", &int4_estimates_op);
  m.impl("int4_ffn", &int4_ffn_op);
}
