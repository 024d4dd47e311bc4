// Products with GGUF-quantized matrices in their codes (hire.quant: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
// Q4_K, Q5_K, Q6_K, Q2_K, Q3_K, IQ4_NL, IQ4_XS, all read as value = scale * (code - zero) + min per
// group of 16 or 32 columns; Q2_K's and Q3_K's codes held as 4-bit ones, the IQ4 formats' 4-bit indices
// read through a table as 8-bit codes, kLut4):
//
// * qgemv: rows . x, for every row or a list of rows (the LM head's candidates). x is quantized to
//   int8 once per call, one scale per 32 columns (llama.cpp's Q8_0 activations); each 64-column
//   chunk is one integer multiply-add (VNNI dpbusd, or pmaddubsw + pmaddwd on AVX2: u8 codes x s8
//   activations, exact in int32) and one float FMA with the lanes' weight x activation scales.
//   The symmetric formats' zero is taken out of the integer sums with the activation's per-lane
//   sums; the affine formats' mins add min x (activation scale x lane sum).
// * qgemv_batch: the same for B activations at once (a decode step of B sequences; a prompt): each
//   row's codes are read from memory once. Up to 5 activations (and without AVX-512) the products
//   are qgemv's own, bit for bit; from 6, on AVX-512, the activations sit in a vector's lanes
//   (rows_lanes) in int16 (also where w.act_bits is 8): with int16 activations the same integer
//   sums as qgemv's, float sums in another order.
// * qaxpy: sum_j a_j W[:, j] over selected columns of a matrix stored column-major (the FFN's down
//   projection), in float32: a group's columns share its scales, so each group's codes are summed
//   first and its scales applied once.
#include <torch/library.h>
#include <torch/torch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>
#include "simd.h"
#include "quant.h"

namespace {
using namespace hire_simd;
using torch::Tensor;
using hire_native::QMat;

// The activation, int8 per 32 columns, with its per-lane (4 columns) sums and scales.
struct QX {
  int64_t chunks = 0;
  std::vector<int8_t> q;           // chunks * 64 codes (zero padded)
  std::vector<int32_t> lanesum;    // chunks * 16: sum of the lane's 4 codes
  std::vector<float> lane_scale;   // chunks * 16: the lane's activation scale
  std::vector<float> lane_xsum;    // chunks * 16: scale * lanesum (what a min multiplies)
  std::vector<float> gscale, gxsum;  // chunks * 2, per 32 columns: the scale, scale * sum of the codes
  std::vector<float> gscale16;       // chunks * 4, per 16 columns: the (32 columns') scale
  std::vector<float> gxsum16;        // chunks * 4, per 16 columns: scale * sum of the codes (Q2_K's mins)
};

// The activation in int16 per 32 columns (scale max|x| / kTop16): the float32 product to ~1e-5.
// kTop16 = 127 x 256, so that each code is 256 hi + lo with hi and lo int8 (hi in [-127, 127], lo in
// [-128, 127]): the K kernels multiply the codes by both with int8 VNNI (two vpdpbusd) and add them
// in int32, the int16 product without widening the codes.
constexpr float kTop16 = 32512.f;
struct QX16 {
  int64_t chunks = 0;
  std::vector<int16_t> q;       // chunks * 64
  std::vector<float> scale;     // per 32 columns
  std::vector<float> gsum;      // per 32 columns: scale * sum of the codes (what a min multiplies)
  std::vector<float> gsum16;    // per 16 columns: the same (the mins of 16-column groups, Q2_K)
  std::vector<float> scale16;   // per 16 columns: the (32 columns') scale
  // per chunk, 16 lanes: [scale of columns 0-31 x 8 | of 32-63 x 8], and [gsum 0-31, 0 x 7, gsum 32-63, 0 x 7]
  std::vector<float> lane_scale, lane_gsum;
  std::vector<int8_t> hi, lo;    // chunks * 64: q = 256 hi + lo
  std::vector<int32_t> lanesum;  // chunks * 16: the sum of q over each 4 columns (int8 lanes: the zero's term)
  // hi and lo by pairs of chunks (the K kernels on AVX-512: both chunks' codes split from one load):
  // pair p's 128 bytes are chunk 2p's columns 0-31, chunk 2p+1's 0-31, chunk 2p's 32-63, 2p+1's 32-63
  // (pair_offset); zero6p, zero4p and zero8p: -32, -8 and -128 x the 4-column sums in that order (the
  // zero of Q6_K's 6-bit codes, of Q3_K's held as 4-bit, and of IQ4's table codes)
  std::vector<int8_t> hi2, lo2;
  std::vector<int32_t> zero6p, zero4p, zero8p;
};

// where column e (0-63) of chunk c sits in the paired order (the last chunk of an odd count stays put)
inline int64_t pair_offset(int64_t c, int64_t e, int64_t chunks) {
  if (c == chunks - 1 && chunks % 2) return c * 64 + e;
  return (c / 2) * 128 + (e / 32) * 64 + (c % 2) * 32 + e % 32;
}

// x (d values, zero padded to n, a multiple of 32) in codes per 32 values: scale max|x| / top (1 where
// all are zero), code = x / scale rounded half to even (hire.quant.reference_quantize_x's meaning,
// bit for bit: the same division and rounding, 16 lanes at a time on AVX-512)
void quantize_groups(const float* x, int64_t d, int64_t n, float top, int32_t* q, float* scales) {
  alignas(64) float buf[32];
  for (int64_t g = 0; g < n / 32; ++g) {
    const float* p = x + g * 32;
    if (g * 32 + 32 > d) {  // the padded tail
      std::fill_n(buf, 32, 0.f);
      if (d > g * 32) std::copy(p, x + d, buf);
      p = buf;
    }
#if defined(__AVX512F__)
    const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float sc = amax > 0.f ? amax / top : 1.f;
    const __m512 vs = _mm512_set1_ps(sc), hi = _mm512_set1_ps(top), lo = _mm512_set1_ps(-top);
    for (int h = 0; h < 2; ++h) {
      const __m512 v = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_div_ps(h ? b : a, vs)));
      _mm512_storeu_si512(q + g * 32 + 16 * h,
                          _mm512_cvtps_epi32(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    }
#else
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(p[i]));
    const float sc = amax > 0.f ? amax / top : 1.f;
    for (int i = 0; i < 32; ++i)
      q[g * 32 + i] = static_cast<int32_t>(std::nearbyint(std::min(top, std::max(-top, p[i] / sc))));
#endif
    scales[g] = sc;
  }
}

QX16 quantize_x16(const float* x, int64_t d) {
  QX16 r;
  r.chunks = (d + 63) / 64;
  const int64_t n = r.chunks * 64;
  std::vector<int32_t> q(n);
  r.scale.resize(n / 32);
  quantize_groups(x, d, n, kTop16, q.data(), r.scale.data());
  r.q.resize(n);
  r.hi.resize(n);
  r.lo.resize(n);
  r.lanesum.resize(n / 4);
  {  // local pointers: the compiler vectorises what it cannot prove the vectors' members do not alias
    const int32_t* __restrict qi = q.data();
    int16_t* __restrict q16 = r.q.data();
    int8_t* __restrict hi = r.hi.data();
    int8_t* __restrict lo = r.lo.data();
    int32_t* __restrict ls = r.lanesum.data();
    for (int64_t i = 0; i < n; ++i) {
      q16[i] = static_cast<int16_t>(qi[i]);
      const int32_t h = (qi[i] + 128) >> 8;  // floor: lo in [-128, 127]
      hi[i] = static_cast<int8_t>(h);
      lo[i] = static_cast<int8_t>(qi[i] - 256 * h);
    }
    for (int64_t l = 0; l < n / 4; ++l) ls[l] = qi[4 * l] + qi[4 * l + 1] + qi[4 * l + 2] + qi[4 * l + 3];
  }
  r.hi2.resize(n);
  r.lo2.resize(n);
  r.zero6p.resize(n / 4);
  r.zero4p.resize(n / 4);
  r.zero8p.resize(n / 4);
  for (int64_t c = 0; c < r.chunks; ++c)
    for (int64_t e = 0; e < 64; e += 32) {  // 32 columns stay together
      const int64_t to = pair_offset(c, e, r.chunks), from = c * 64 + e;
      std::copy_n(r.hi.begin() + from, 32, r.hi2.begin() + to);
      std::copy_n(r.lo.begin() + from, 32, r.lo2.begin() + to);
      for (int64_t l = 0; l < 8; ++l) {
        r.zero6p[to / 4 + l] = -32 * r.lanesum[from / 4 + l];
        r.zero4p[to / 4 + l] = -8 * r.lanesum[from / 4 + l];
        r.zero8p[to / 4 + l] = -128 * r.lanesum[from / 4 + l];
      }
    }
  r.gsum.resize(n / 32);
  r.gsum16.resize(n / 16);
  r.scale16.resize(n / 16);
  for (int64_t g = 0; g < n / 32; ++g) {
    int32_t half[2] = {0, 0};
    for (int64_t l = g * 8; l < g * 8 + 8; ++l) half[(l - g * 8) / 4] += r.lanesum[l];
    r.gsum[g] = r.scale[g] * static_cast<float>(half[0] + half[1]);
    r.gsum16[2 * g] = r.scale[g] * static_cast<float>(half[0]);
    r.gsum16[2 * g + 1] = r.scale[g] * static_cast<float>(half[1]);
    r.scale16[2 * g] = r.scale16[2 * g + 1] = r.scale[g];
  }
  r.lane_scale.assign(r.chunks * 16, 0.f);
  r.lane_gsum.assign(r.chunks * 16, 0.f);
  for (int64_t c = 0; c < r.chunks; ++c)
    for (int h = 0; h < 2; ++h) {
      std::fill_n(r.lane_scale.begin() + c * 16 + 8 * h, 8, r.scale[2 * c + h]);
      r.lane_gsum[c * 16 + 8 * h] = r.gsum[2 * c + h];
    }
  return r;
}

QX quantize_x(const float* x, int64_t d) {
  QX r;
  r.chunks = (d + 63) / 64;
  const int64_t n = r.chunks * 64;
  std::vector<int32_t> q(n);
  r.gscale.resize(n / 32);
  quantize_groups(x, d, n, 127.f, q.data(), r.gscale.data());
  r.q.resize(n);
  {
    const int32_t* __restrict qi = q.data();
    int8_t* __restrict q8 = r.q.data();
    for (int64_t i = 0; i < n; ++i) q8[i] = static_cast<int8_t>(qi[i]);
  }
  r.lanesum.resize(r.chunks * 16);
  r.lane_scale.resize(r.chunks * 16);
  r.lane_xsum.resize(r.chunks * 16);
  r.gxsum.resize(n / 32);
  r.gxsum16.resize(n / 16);
  r.gscale16.resize(n / 16);
  for (int64_t g = 0; g < n / 32; ++g) {
    const float sc = r.gscale[g];
    int32_t total = 0;
    for (int64_t l = g * 8; l < g * 8 + 8; ++l) {
      const int32_t sum = q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3];
      r.lanesum[l] = sum;
      r.lane_scale[l] = sc;
      r.lane_xsum[l] = sc * static_cast<float>(sum);
      total += sum;
    }
    r.gxsum[g] = sc * static_cast<float>(total);
    for (int k = 0; k < 2; ++k) {
      const int64_t l = g * 8 + 4 * k;
      r.gxsum16[2 * g + k] = sc * static_cast<float>(r.lanesum[l] + r.lanesum[l + 1] + r.lanesum[l + 2] + r.lanesum[l + 3]);
    }
    r.gscale16[2 * g] = r.gscale16[2 * g + 1] = sc;
  }
  return r;
}

// "bits" 9: the IQ4 formats' 4-bit indices into sixteen values, stored as a nibble plane and read as
// the 8-bit codes value + 128 (zero 128) through a 16-byte table (a byte shuffle)
constexpr int kLut4 = 9;
constexpr int64_t chunk_bytes(int bits) { return bits == 4 || bits == kLut4 ? 32 : bits == 5 ? 40 : bits == 6 ? 48 : 64; }
constexpr int zero_of(int bits) { return bits == kLut4 ? 128 : 1 << (bits - 1); }
// the code width whose zero sums a matrix of `bits` reads (IQ4's table codes share 8-bit's zero, 128)
constexpr int zero_bits(int64_t bits) { return bits == kLut4 ? 8 : static_cast<int>(bits); }
alignas(16) constexpr uint8_t kIq4Codes[16] = {1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241};

// code of column e (0..63) of a chunk (the scalar path and the checks)
template <int BITS>
inline int code_at(const uint8_t* p, int e) {
  if (BITS == 8) return p[e];
  int c = e < 32 ? (p[e] & 0x0F) : (p[e - 32] >> 4);
  if (BITS == kLut4) return kIq4Codes[c];
  if (BITS == 5) c |= ((p[32 + e / 8] >> (e % 8)) & 1) << 4;
  if (BITS == 6) c |= ((p[32 + e % 16] >> (2 * (e / 16))) & 3) << 4;
  return c;
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HIRE_QUANT_512 1
// the 64 codes of a chunk as bytes, in column order
template <int BITS>
inline __m512i codes512(const uint8_t* p) {
  if (BITS == 8) return _mm512_loadu_si512(p);
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, m4)),
                                 _mm256_and_si256(_mm256_srli_epi16(b, 4), m4), 1);
  if (BITS == kLut4)
    return _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kIq4Codes))), u);
  if (BITS == 5) {
    uint64_t mask;
    std::memcpy(&mask, p + 32, 8);
    u = _mm512_or_si512(u, _mm512_maskz_mov_epi8(mask, _mm512_set1_epi8(0x10)));
  }
  if (BITS == 6) {
    const __m512i t = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32)));
    const __m512i shift = _mm512_set_epi64(0x0006000600060006LL, 0x0006000600060006LL, 0x0004000400040004LL,
                                           0x0004000400040004LL, 0x0002000200020002LL, 0x0002000200020002LL, 0, 0);
    const __m512i top = _mm512_and_si512(_mm512_srlv_epi16(t, shift), _mm512_set1_epi8(0x03));
    u = _mm512_or_si512(u, _mm512_slli_epi16(top, 4));
  }
  return u;
}

// 2 (GROUP 32) or 4 (GROUP 16) consecutive scales as float32 in the low lanes
template <int GROUP, typename S>
inline __m128 load_scales(const S* s) {
  if constexpr (std::is_same_v<S, float>) {
    return GROUP == 32 ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s))) : _mm_loadu_ps(s);
  } else {
    int64_t raw = 0;
    std::memcpy(&raw, s, GROUP == 32 ? 4 : 8);
    return _mm_cvtph_ps(_mm_cvtsi64_si128(raw));
  }
}

template <typename S>
inline __m128 scales4(const S* s) { return load_scales<16>(s); }

// the chunk's 2 (group 32) or 4 (group 16) scales, one per lane
template <int GROUP, typename S>
inline __m512 lanes512(const S* s) {
  const __m128 v = load_scales<GROUP>(s);
  const __m512i idx = GROUP == 32 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                  : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v));
}
#elif !HIRE_SCALAR
#define HIRE_QUANT_256 1
// half h (columns 32h..32h+31) of a chunk's codes
template <int BITS>
inline __m256i codes256(const uint8_t* p, int h) {
  if (BITS == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256i u = _mm256_and_si256(h ? _mm256_srli_epi16(b, 4) : b, m4);
  if (BITS == kLut4)
    return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kIq4Codes))), u);
  if (BITS == 5) {
    uint32_t bits;
    std::memcpy(&bits, p + 32 + 4 * h, 4);
    // byte k of the 32 gets bit k: replicate byte k/8 of the word into bytes 8(k/8).., test bit k%8
    const __m256i rep = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
                                            _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                                              0x0101010101010101LL, 0));
    const __m256i sel = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
    const __m256i on = _mm256_cmpeq_epi8(_mm256_and_si256(rep, sel), sel);
    u = _mm256_or_si256(u, _mm256_and_si256(on, _mm256_set1_epi8(0x10)));
  }
  if (BITS == 6) {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32));
    const __m128i m3 = _mm_set1_epi8(0x03);
    const __m128i a = _mm_and_si128(_mm_srli_epi16(t, 4 * h), m3), b2 = _mm_and_si128(_mm_srli_epi16(t, 4 * h + 2), m3);
    u = _mm256_or_si256(u, _mm256_slli_epi16(_mm256_set_m128i(b2, a), 4));
  }
  return u;
}

template <int GROUP, typename S>
inline __m256 lanes256(const S* s, int h) {  // s: the chunk's scales
  if (GROUP == 32) return _mm256_set1_ps(to_f(s[h]));
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(to_f(s[2 * h]))), _mm_set1_ps(to_f(s[2 * h + 1])), 1);
}
#endif

#if !HIRE_SCALAR
// the sum of a ymm's 8 floats (vsum is the build's widest vector's: a zmm where AVX-512 exists, which the
// AVX2 branch below also takes on AVX-512 CPUs without VNNI)
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// A row's scales (or mins) as the kernels read them, group g's value by get(g) and a chunk's as
// vectors (at: lanes512's, four: scales4's in the low lanes; half: the AVX2 half's), from float32
// or float16 scales, or (S = KScale) the K formats' two levels: int8 sub-scales times their float16
// super-scale per 256 columns.
struct KScale {};
template <int GROUP, typename S>
struct SV {
  static constexpr int64_t per = 64 / GROUP;
  const S* s;
  explicit SV(const S* p = nullptr) : s(p) {}
  float get(int64_t g) const { return to_f(s[g]); }
#if HIRE_QUANT_512
  __m512 at(int64_t c) const { return lanes512<GROUP>(s + c * per); }
  __m512 four(int64_t c) const { return _mm512_castps128_ps512(scales4(s + c * per)); }
#elif HIRE_QUANT_256
  __m256 half(int64_t c, int h) const { return lanes256<GROUP>(s + c * per, h); }
#endif
};
template <int GROUP>
struct SV<GROUP, KScale> {
  static constexpr int64_t per = 64 / GROUP, per_super = 256 / GROUP;
  const int8_t* s;
  const c10::Half* sup;
  explicit SV(const int8_t* p = nullptr, const c10::Half* q = nullptr) : s(p), sup(q) {}
  float get(int64_t g) const { return to_f(sup[g / per_super]) * static_cast<float>(s[g]); }
#if HIRE_QUANT_256  // (on AVX-512 the K formats take qdot_k8 / qdot_k16xr, which read the two levels themselves)
  __m256 half(int64_t c, int h) const {
    if (GROUP == 32) return _mm256_set1_ps(get(c * per + h));
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(get(c * per + 2 * h))),
                                _mm_set1_ps(get(c * per + 2 * h + 1)), 1);
  }
#endif
};

// Prefetch while a row is read: the lines of `ahead` (null: none) at the offsets [off, off + n) that
// the row is being read at, a line at a time over the row's product rather than a burst of whole rows
// (rows_range: a dense matrix's codes kStreamAhead bytes on, a list's row kListAhead on)
inline void prefetch_along(const uint8_t* ahead, int64_t off, int64_t n) {
  if (ahead)
    for (int64_t o = 0; o < n; o += 64) prefetch_kept(ahead + off + o);
}

// W[row] . x for one row of codes (chunks of planes), its scales and mins (SV readers); ahead: see prefetch_along
template <int BITS, int GROUP, bool MIN, typename S>
float qdot(const uint8_t* codes, SV<GROUP, S> sc, SV<GROUP, S> mn, const QX& x, const int32_t* zsum,
           const uint8_t* ahead) {
  constexpr int64_t cb = chunk_bytes(BITS), per = 64 / GROUP;
  const int64_t chunks = x.chunks;
#if HIRE_QUANT_512
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    prefetch_along(ahead, c * cb, cb);
    const __m512i u = codes512<BITS>(codes + c * cb);
    const __m512i xq = _mm512_loadu_si512(x.q.data() + c * 64);
    const __m512i init = MIN ? _mm512_setzero_si512() : _mm512_loadu_si512(zsum + c * 16);
    const __m512i s = _mm512_dpbusd_epi32(init, u, xq);
    const __m512 ls = _mm512_loadu_ps(x.lane_scale.data() + c * 16);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(sc.at(c), ls), acc);
    if (MIN) acc = _mm512_fmadd_ps(mn.at(c), _mm512_loadu_ps(x.lane_xsum.data() + c * 16), acc);
  }
  return _mm512_reduce_add_ps(acc);
#elif HIRE_QUANT_256
  __m256 acc = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t c = 0; c < chunks; ++c) {
    prefetch_along(ahead, c * cb, cb);
    for (int h = 0; h < 2; ++h) {
      const __m256i u = codes256<BITS>(codes + c * cb, h);
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + c * 64 + 32 * h));
      __m256i s;
      if (BITS == 8 || BITS == kLut4) {  // u8 x s8 pairs could overflow int16: multiply the signed codes (u - 128) instead
        const __m256i w = _mm256_xor_si256(u, _mm256_set1_epi8(static_cast<char>(0x80)));
        s = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xq, w)), ones);
      } else {
        s = _mm256_madd_epi16(_mm256_maddubs_epi16(u, xq), ones);
        if (!MIN) s = _mm256_add_epi32(s, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(zsum + c * 16 + 8 * h)));
      }
      const __m256 ls = _mm256_loadu_ps(x.lane_scale.data() + c * 16 + 8 * h);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(sc.half(c, h), ls), acc);
      if (MIN) acc = _mm256_fmadd_ps(mn.half(c, h), _mm256_loadu_ps(x.lane_xsum.data() + c * 16 + 8 * h), acc);
    }
  }
  return hsum256(acc);
#else
  float total = 0.f;
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* p = codes + c * cb;
    for (int l = 0; l < 16; ++l) {
      int32_t s = MIN ? 0 : zsum[c * 16 + l];
      for (int e = 4 * l; e < 4 * l + 4; ++e) s += code_at<BITS>(p, e) * x.q[c * 64 + e];
      const int64_t g = c * per + (4 * l) / GROUP;
      total += static_cast<float>(s) * (sc.get(g) * x.lane_scale[c * 16 + l]);
      if (MIN) total += mn.get(g) * x.lane_xsum[c * 16 + l];
    }
  }
  return total;
#endif
}

// the same with x in int16: (u - zero) x summed in int32 pairs (vpdpwssd / pmaddwd), one scale per
// 32 columns (two per 32 for 16-column groups), mins per group in scalar
#if HIRE_QUANT_512
// the 64 codes of a chunk widened to int16, columns 0-31 in half[0] and 32-63 in half[1]: the packed
// nibble bytes are widened once, then masked (low nibbles) and shifted (high nibbles)
template <int BITS>
inline void codes512x16(const uint8_t* p, __m512i* half) {
  if (BITS == kLut4) {
    const __m512i u = codes512<BITS>(p);
    half[0] = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(u));
    half[1] = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(u, 1));
    return;
  }
  if (BITS == 8) {
    half[0] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    half[1] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
    return;
  }
  const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  half[0] = _mm512_and_si512(w, _mm512_set1_epi16(0x0F));
  half[1] = _mm512_srli_epi16(w, 4);
  if (BITS == 5) {
    uint64_t mask;
    std::memcpy(&mask, p + 32, 8);
    const __m512i bit = _mm512_set1_epi16(0x10);
    half[0] = _mm512_or_si512(half[0], _mm512_maskz_mov_epi16(static_cast<__mmask32>(mask), bit));
    half[1] = _mm512_or_si512(half[1], _mm512_maskz_mov_epi16(static_cast<__mmask32>(mask >> 32), bit));
  }
  if (BITS == 6) {  // byte i of the top plane: bits 2k..2k+1 are column i + 16k's
    const __m256i t = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32)));
    const __m256i three = _mm256_set1_epi16(3);
    for (int h = 0; h < 2; ++h) {
      const __m256i a = _mm256_and_si256(_mm256_srli_epi16(t, 4 * h), three);
      const __m256i b = _mm256_and_si256(_mm256_srli_epi16(t, 4 * h + 2), three);
      const __m512i top = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
      half[h] = _mm512_or_si512(half[h], _mm512_slli_epi16(top, 4));
    }
  }
}
#endif

#if HIRE_QUANT_512
// Permutes of float32 scale vectors into the lanes of a chunk's int32 sums (vpdpbusd: 4 columns a lane)
struct PermTables {
  alignas(64) int32_t g32[4][16];   // chunk j, group 32 (int8 lanes 0-7 and 8-15): 2j, 2j + 1
  alignas(64) int32_t g16[4][16];   // chunk j, group 16, int8 lanes (4 columns): 4j + lane / 4
  alignas(64) int32_t g32x8[8][16];  // chunk j of 8, group 32 (qdot16's blocks of 16 groups): 2j, 2j + 1
  PermTables() {
    for (int j = 0; j < 8; ++j)
      for (int l = 0; l < 16; ++l) {
        if (j < 4) {
          g32[j][l] = 2 * j + l / 8;
          g16[j][l] = 4 * j + l / 4;
        }
        g32x8[j][l] = 2 * j + l / 8;
      }
  }
};
const PermTables kPerm;

inline __m512 perm(const int32_t* idx, __m512 v) { return _mm512_permutexvar_ps(_mm512_load_si512(idx), v); }

// 16 consecutive scales (float32 or float16) as float32
template <typename S>
inline __m512 scales16(const S* s) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm512_loadu_ps(s);
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
  }
}

// 256 h + (init + u . lo) per lane, h = u . hi: the int16 activation's two int8 products. Without a
// zero term (MIN: init is 0) the lo product accumulates onto 256 h itself, one add fewer per chunk
// (the 1.5B's 84 FFN matrices, Q4_K and Q6_K, 2 threads, A B A B: 1.02-1.18x in three runs)
template <bool MIN>
inline __m512i hi_lo(__m512i h, __m512i init, __m512i u, __m512i lo) {
  if (MIN) return _mm512_dpbusd_epi32(_mm512_slli_epi32(h, 8), u, lo);
  return _mm512_add_epi32(_mm512_slli_epi32(h, 8), _mm512_dpbusd_epi32(init, u, lo));
}
#endif

#if HIRE_QUANT_512
// chunk c's int32 sums per 4-column lane, codes p x the int16 activation (zsum: the symmetric formats' zero)
template <int BITS, bool MIN>
inline __m512i chunk_sums(const uint8_t* p, const QX16& x, const int32_t* zsum, int64_t c) {
  const __m512i u = codes512<BITS>(p);
  const __m512i init = MIN ? _mm512_setzero_si512() : _mm512_loadu_si512(zsum + c * 16);
  const __m512i h = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512(x.hi.data() + c * 64));
  return hi_lo<MIN>(h, init, u, _mm512_loadu_si512(x.lo.data() + c * 64));
}
#endif

template <int BITS, int GROUP, bool MIN, typename S>
float qdot16(const uint8_t* codes, SV<GROUP, S> sc, SV<GROUP, S> mn, const QX16& x, const int32_t* zsum,
             const uint8_t* ahead) {
  constexpr int64_t cb = chunk_bytes(BITS), per = 64 / GROUP;
  constexpr int16_t zero = MIN ? 0 : zero_of(BITS);
  float total = 0.f;
#if HIRE_QUANT_512
  // the codes times the activation's hi and lo bytes (q = 256 hi + lo), as qdot multiplies int8 ones;
  // the zero comes out through the activation's 4-column sums (zsum). With groups of 32, eight chunks
  // at a time: their 16 groups' scales (weight x activation) are formed once as a vector and each chunk
  // takes its lanes' with one permute, and the mins' term is one FMA per 8 chunks (as the K formats'
  // super-blocks): SmolLM2's 210 Q4_1 matrices, 2 threads, 5.4 against 6.7 ms (old, new, old, new)
  __m512 acc = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(), macc = _mm512_setzero_ps();
  int64_t c = 0;
  if constexpr (GROUP == 32) {
    for (; c + 8 <= x.chunks; c += 8) {
      prefetch_along(ahead, c * cb, 8 * cb);
      const __m512 w = _mm512_mul_ps(scales16(sc.s + 2 * c), _mm512_loadu_ps(x.scale.data() + 2 * c));
      if (MIN) macc = _mm512_fmadd_ps(scales16(mn.s + 2 * c), _mm512_loadu_ps(x.gsum.data() + 2 * c), macc);
      for (int j = 0; j < 8; ++j) {
        const __m512i s = chunk_sums<BITS, MIN>(codes + (c + j) * cb, x, zsum, c + j);
        __m512& a = j % 2 ? acc2 : acc;
        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), perm(kPerm.g32x8[j], w), a);
      }
    }
  }
  for (; c < x.chunks; ++c) {
    prefetch_along(ahead, c * cb, cb);
    const __m512i s = chunk_sums<BITS, MIN>(codes + c * cb, x, zsum, c);
    const __m512 sv = GROUP == 32 ? sc.at(c) : perm(kPerm.g16[0], sc.four(c));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(sv, _mm512_loadu_ps(x.lane_scale.data() + c * 16)), acc);
    if (MIN) {
      if (GROUP == 32) {
        acc = _mm512_fmadd_ps(mn.at(c), _mm512_loadu_ps(x.lane_gsum.data() + c * 16), acc);
      } else {
        for (int g = 0; g < 4; ++g) total += mn.get(c * per + g) * x.gsum16[4 * c + g];  // Q2_K's mins per 16 columns
      }
    }
  }
  return total + _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc, acc2), macc));
#elif HIRE_QUANT_256
  __m256 acc = _mm256_setzero_ps();
  const __m256i z = _mm256_set1_epi16(zero);
  for (int64_t c = 0; c < x.chunks; ++c) {
    prefetch_along(ahead, c * cb, cb);
    for (int h = 0; h < 2; ++h) {
      const __m256i u = codes256<BITS>(codes + c * cb, h);
      const float xs = x.scale[2 * c + h];
      for (int k = 0; k < 2; ++k) {  // 16 columns
        __m256i w = _mm256_cvtepu8_epi16(k ? _mm256_extracti128_si256(u, 1) : _mm256_castsi256_si128(u));
        if (!MIN) w = _mm256_sub_epi16(w, z);
        const __m256i s = _mm256_madd_epi16(
            w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + c * 64 + 32 * h + 16 * k)));
        const float sw = sc.get(c * per + (GROUP == 32 ? h : 2 * h + k));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(sw * xs), acc);
      }
      if (MIN) {
        if (GROUP == 32) total += mn.get(c * per + h) * x.gsum[2 * c + h];
        else for (int k = 0; k < 2; ++k) total += mn.get(c * per + 2 * h + k) * x.gsum16[4 * c + 2 * h + k];
      }
    }
  }
  return total + hsum256(acc);
#else
  for (int64_t c = 0; c < x.chunks; ++c) {
    const uint8_t* p = codes + c * cb;
    for (int g = 0; g < per; ++g) {
      int64_t s = 0;
      for (int e = g * GROUP; e < (g + 1) * GROUP; ++e) s += (code_at<BITS>(p, e) - zero) * x.q[c * 64 + e];
      total += static_cast<float>(s) * (sc.get(c * per + g) * x.scale[2 * c + (g * GROUP) / 32]);
    }
    if (MIN)
      for (int g = 0; g < per; ++g) total += mn.get(c * per + g) * (GROUP == 32 ? x.gsum[2 * c + g] : x.gsum16[4 * c + g]);
  }
  return total;
#endif
}

#if HIRE_QUANT_512
// The K formats' products on AVX-512, a super-block (256 columns, 4 chunks) at a time: its scales
// are formed once as float32 vectors (super x sub x the activation's scale per group) and each
// chunk picks its lanes' scales with one permute (kPerm's tables); the mins' term is a dot product
// per super-block (sub-mins x the activation's group sums), not per chunk.

// a super-block's (8 or 16) sub-scales x its super-scale x the activation's scales of their groups
template <int GROUP>
inline __m512 super_scales(const int8_t* sub, float d, const float* xs) {
  if (GROUP == 32) {
    const __m256 s = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sub))));
    return _mm512_castps256_ps512(_mm256_mul_ps(_mm256_mul_ps(s, _mm256_set1_ps(d)), _mm256_loadu_ps(xs)));
  }
  const __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sub))));
  return _mm512_mul_ps(_mm512_mul_ps(s, _mm512_set1_ps(d)), _mm512_loadu_ps(xs));
}

// the mins' term of a super-block (8 groups of 32): dmin x sum_g sub_min_g x (the activation's group sum)
inline __m256 super_mins(const int8_t* msub, float dmin, const float* gx, __m256 acc) {
  const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(msub))));
  return _mm256_fmadd_ps(_mm256_mul_ps(m, _mm256_set1_ps(dmin)), _mm256_loadu_ps(gx), acc);
}


// the same for 16 groups of 16 (Q2_K), folded into 8 lanes
inline __m256 super_mins16(const int8_t* msub, float dmin, const float* gx, __m256 acc) {
  const __m512 m = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(msub))));
  const __m512 p = _mm512_mul_ps(_mm512_mul_ps(m, _mm512_set1_ps(dmin)), _mm512_loadu_ps(gx));
  return _mm256_add_ps(acc, _mm256_add_ps(_mm512_castps512_ps256(p),
                                          _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1))));
}

// a super-block's scale vector (super_scales) and, with mins, its mins' term added to macc
template <int GROUP, bool MIN>
inline __m512 super_block(const int8_t* sub, const int8_t* msub, const c10::Half* sup, const c10::Half* msup,
                          int64_t b, const float* xs, const float* gx, __m256& macc) {
  constexpr int64_t gps = 256 / GROUP;
  if (MIN) {
    if (GROUP == 32) macc = super_mins(msub + 8 * b, to_f(msup[b]), gx + 8 * b, macc);
    else macc = super_mins16(msub + 16 * b, to_f(msup[b]), gx + 16 * b, macc);
  }
  return super_scales<GROUP>(sub + gps * b, to_f(sup[b]), xs + gps * b);
}

// int8 activations (QX): as qdot
template <int BITS, int GROUP, bool MIN>
float qdot_k8(const uint8_t* codes, const int8_t* sub, const int8_t* msub, const c10::Half* sup,
              const c10::Half* msup, const QX& x, const int32_t* zsum, const uint8_t* ahead) {
  constexpr int64_t cb = chunk_bytes(BITS);
  __m512 acc = _mm512_setzero_ps();
  __m256 macc = _mm256_setzero_ps();
  for (int64_t b = 0; b < x.chunks / 4; ++b) {
    const __m512 w = super_block<GROUP, MIN>(sub, msub, sup, msup, b,
                                             GROUP == 32 ? x.gscale.data() : x.gscale16.data(),
                                             GROUP == 32 ? x.gxsum.data() : x.gxsum16.data(), macc);
    prefetch_along(ahead, 4 * b * cb, 4 * cb);
    for (int j = 0; j < 4; ++j) {
      const int64_t c = 4 * b + j;
      const __m512i u = codes512<BITS>(codes + c * cb);
      const __m512i init = MIN ? _mm512_setzero_si512() : _mm512_loadu_si512(zsum + c * 16);
      const __m512i s = _mm512_dpbusd_epi32(init, u, _mm512_loadu_si512(x.q.data() + c * 64));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), perm(GROUP == 32 ? kPerm.g32[j] : kPerm.g16[j], w), acc);
    }
  }
  return _mm512_reduce_add_ps(acc) + (MIN ? hsum256(macc) : 0.f);
}

// the codes of chunks c and c+1 (p: chunk c's), split as the paired activation is: lo = chunk c's
// columns 0-31 then chunk c+1's 0-31, hi = their columns 32-63. The nibble planes of both come from
// one (Q4_K) or two loads and split once, the 2-bit planes (Q6_K) by variable shifts.
template <int BITS>
inline void codes_pair(const uint8_t* p, __m512i& lo, __m512i& hi) {
  constexpr int64_t cb = chunk_bytes(BITS);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i b = BITS == 4 || BITS == kLut4 ? _mm512_loadu_si512(p)
                              : _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
                                                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + cb)), 1);
  lo = _mm512_and_si512(b, m4);
  hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4);
  if (BITS == kLut4) {
    const __m512i table = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kIq4Codes)));
    lo = _mm512_shuffle_epi8(table, lo);
    hi = _mm512_shuffle_epi8(table, hi);
  }
  if (BITS == 5) {
    uint64_t m0, m1;
    std::memcpy(&m0, p + 32, 8);
    std::memcpy(&m1, p + cb + 32, 8);
    const __m512i bit = _mm512_set1_epi8(0x10);
    lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi8((m0 & 0xFFFFFFFFULL) | (m1 << 32), bit));
    hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi8((m0 >> 32) | (m1 & 0xFFFFFFFF00000000ULL), bit));
  }
  if (BITS == 6) {  // byte i of a chunk's top plane: bits 2k..2k+1 are column i + 16k's
    const __m512i t = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32)))),
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + cb + 32))), 1);
    // per 128-bit lane (16-bit shifts; the 0x30 mask drops what crosses a byte): lo wants bits 0-1 (columns
    // 0-15) and 2-3 (16-31) at 4-5, hi bits 4-5 (32-47) and 6-7 (48-63)
    const __m512i sl = _mm512_set_epi64(0x0002000200020002LL, 0x0002000200020002LL, 0x0004000400040004LL, 0x0004000400040004LL,
                                        0x0002000200020002LL, 0x0002000200020002LL, 0x0004000400040004LL, 0x0004000400040004LL);
    const __m512i sr = _mm512_set_epi64(0x0002000200020002LL, 0x0002000200020002LL, 0, 0,
                                        0x0002000200020002LL, 0x0002000200020002LL, 0, 0);
    const __m512i m30 = _mm512_set1_epi8(0x30);
    lo = _mm512_or_si512(lo, _mm512_and_si512(_mm512_sllv_epi16(t, sl), m30));
    hi = _mm512_or_si512(hi, _mm512_and_si512(_mm512_srlv_epi16(t, sr), m30));
  }
}

// the group of each lane of a paired vector: pair j of a super-block (chunks 2j, 2j+1), half h
struct PairTables {
  alignas(64) int32_t g32[2][2][16], g16[2][2][16];
  alignas(64) int32_t g32x[2][2][2][16];  // g32 for super-block k of two held in one vector (8 k + ...)
  PairTables() {
    for (int j = 0; j < 2; ++j)
      for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 16; ++l) {
          const int chunk = 2 * j + l / 8;
          g32[j][h][l] = 2 * chunk + h;
          g16[j][h][l] = 4 * chunk + 2 * h + (l % 8) / 4;
          for (int k = 0; k < 2; ++k) g32x[k][j][h][l] = 8 * k + g32[j][h][l];
        }
  }
};
const PairTables kPair;

// [p[0] x 8, p[1] x 8]: two super-blocks' float16 supers, each over its 8 lanes
inline __m512 two_supers(const c10::Half* p) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(to_f(p[0]))),
                                             _mm256_castps_pd(_mm256_set1_ps(to_f(p[1]))), 1));
}

// int16 activations (QX16), K formats: the codes times the activation's hi and lo bytes (vpdpbusd), two
// chunks at a time in the paired order, for R rows at once (1 or 2): the activation's loads and the lane
// tables are shared by the R rows. On Zen 4 one row at a time was bound by those loads (per 64 code bytes:
// the codes, four 64-byte activation vectors and two tables). Each row's sums are in the same order
// whatever R, so a row's product is the same to the bit alone or beside another.
template <int BITS, int GROUP, bool MIN, int R>
void qdot_k16xr(const uint8_t* const* codes, const SV<GROUP, KScale>* sc, const SV<GROUP, KScale>* mn, const QX16& x,
                const uint8_t* const* ahead, float* out) {
  constexpr int64_t cb = chunk_bytes(BITS);
  static_assert(MIN || BITS == 6 || BITS == 4 || BITS == kLut4, "the paired products know the zero of 6- and 4-bit codes and of IQ4's");
  __m512 acc[R][2];
  __m256 macc[R];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps(), macc[r] = _mm256_setzero_ps();
  const int64_t nsb = x.chunks / 4;
  const int32_t* zero = MIN ? nullptr : (BITS == 6 ? x.zero6p : BITS == 4 ? x.zero4p : x.zero8p).data();
  // pair pr of the R rows with their scale vectors w[r], lanes picked by the tables t[h]
  auto pair = [&](int64_t pr, const int32_t* const t[2], const __m512* w) {
    __m512i u[R][2];
    for (int r = 0; r < R; ++r) {
      prefetch_along(ahead[r], 2 * pr * cb, 2 * cb);
      codes_pair<BITS>(codes[r] + 2 * pr * cb, u[r][0], u[r][1]);
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t off = pr * 128 + h * 64;
      const __m512i hi = _mm512_loadu_si512(x.hi2.data() + off), lo = _mm512_loadu_si512(x.lo2.data() + off);
      const __m512i init = MIN ? _mm512_setzero_si512() : _mm512_loadu_si512(zero + off / 4);
      const __m512i idx = _mm512_load_si512(t[h]);
      for (int r = 0; r < R; ++r) {
        const __m512i hh = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[r][h], hi);
        const __m512i sum = hi_lo<MIN>(hh, init, u[r][h], lo);
        acc[r][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_permutexvar_ps(idx, w[r]), acc[r][h]);
      }
    }
  };
  int64_t b = 0;
  if constexpr (GROUP == 32) {  // two super-blocks' 16 scales in one vector (b's in lanes 0-7, b+1's in 8-15)
    __m512 macc2[R];
    for (int r = 0; r < R; ++r) macc2[r] = _mm512_setzero_ps();
    for (; b + 2 <= nsb; b += 2) {
      __m512 w[R];
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc[r].s + 8 * b))));
        w[r] = _mm512_mul_ps(_mm512_mul_ps(s, two_supers(sc[r].sup + b)), _mm512_loadu_ps(x.scale.data() + 8 * b));
        if (MIN) {
          const __m512 m = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn[r].s + 8 * b))));
          macc2[r] = _mm512_fmadd_ps(_mm512_mul_ps(m, two_supers(mn[r].sup + b)), _mm512_loadu_ps(x.gsum.data() + 8 * b), macc2[r]);
        }
      }
      for (int k = 0; k < 2; ++k)
        for (int j = 0; j < 2; ++j) {
          const int32_t* t[2] = {kPair.g32x[k][j][0], kPair.g32x[k][j][1]};
          pair(2 * (b + k) + j, t, w);
        }
    }
    for (int r = 0; r < R; ++r) acc[r][0] = _mm512_add_ps(acc[r][0], macc2[r]);
  }
  for (; b < nsb; ++b) {
    __m512 w[R];
    for (int r = 0; r < R; ++r)
      w[r] = super_block<GROUP, MIN>(sc[r].s, mn[r].s, sc[r].sup, mn[r].sup, b, GROUP == 32 ? x.scale.data() : x.scale16.data(),
                                     GROUP == 32 ? x.gsum.data() : x.gsum16.data(), macc[r]);
    for (int j = 0; j < 2; ++j) {
      const int32_t* t[2] = {GROUP == 32 ? kPair.g32[j][0] : kPair.g16[j][0], GROUP == 32 ? kPair.g32[j][1] : kPair.g16[j][1]};
      pair(2 * b + j, t, w);
    }
  }
  for (int r = 0; r < R; ++r)
    out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) + (MIN ? hsum256(macc[r]) : 0.f);
}
#endif

// -zero * (the activation's sums) per int32 lane, for each code width: the symmetric formats' zero
// taken out of the integer sums. A lane holds 4 columns (vpdpbusd), for int8 and int16 activations alike.
struct ZeroSums {
  std::vector<int32_t> by_bits[9];
  const int32_t* get(int bits) const { return by_bits[zero_bits(bits)].data(); }
};

// bits: a mask of the code widths (1 << bits) of the symmetric matrices that will read them
ZeroSums zero_sums(const std::vector<int32_t>& lane_sums, int bits_mask) {
  ZeroSums z;
  for (int bits : {4, 5, 6, 8}) {
    if (!(bits_mask >> bits & 1)) continue;
    z.by_bits[bits].resize(lane_sums.size());
    for (size_t i = 0; i < lane_sums.size(); ++i) z.by_bits[bits][i] = -(1 << (bits - 1)) * lane_sums[i];
  }
  return z;
}


// A dense matrix's codes are prefetched kStreamAhead bytes ahead of where they are read, a line per
// line read (prefetch_along): the hardware prefetcher barely ramps up in a layer's matrix. Issue 23,
// the 1.5B's 84 FFN matrices (715 MB, Q4_K and Q6_K) from DRAM, 2 threads, A B A B in one process:
// 18.5 GB/s with whole rows 4 ahead (the former way, a burst of a row's lines at each row's start),
// 22.1 GB/s with 1 KB ahead a line at a time, 23.3-24.1 with 2 KB, 22.5-23.8 with 3-4 KB, 22.9 with
// 2 KB into L2 only; in separate processes in turn, this build 21.5-22.3 and the 2 KB macro build
// 20.2-22.1. (Before, whole rows: 8.3 GB/s without prefetch, 15.3-16.3 with 4 rows, 14.3 with 8.)
constexpr int64_t kStreamAhead = 2048;
// a list of rows (the HiRE head's candidates): the row kListAhead on, its codes a line at a time as the
// current row is read and its scales whole. Gemma's head (Q8_0), 16,384 random rows, separate processes
// in turn: 10.6-11.1 GB/s with whole rows 8 ahead, 14.1-21.0 a line at a time (4, 12 or 16 rows ahead:
// within the noise of 8 there; on the 1.5B's 2,048 Q6_K rows 16 was 10-13 % faster in one run and the
// same in another, A B A B with the caches evicted)
constexpr int64_t kListAhead = 8;
// and a whole row kListFar on into L2 (prefetcht2), with its scales: the line-at-a-time prefetch above
// then finds it there. Gemma's head (Q8_0), 8,192 and 16,384 random rows from DRAM, 2 threads, A B A B
// in one process (variant builds), medians of 30-60: 0.41 / 0.48, 0.54 / 0.60 and 0.58 / 0.64 ms
// with / without (16 rows on; 24, 32 and 48 within the noise of 16)
constexpr int64_t kListFar = 16;
// into every cache level, or (l2) into L2 only (prefetcht2: kListFar)
inline void prefetch_bytes(const void* p, int64_t bytes, bool l2 = false) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) {
    if (l2) {
      __builtin_prefetch(c + off, 0, 1);
    } else {
      prefetch(c + off);
    }
  }
}

// The scales (and mins) of a matrix's rows, as SV readers of each row (one-level float32/float16, or
// the K formats' two levels).
template <int GROUP, typename S, bool MIN>
struct RowScales {
  const S* sc;
  const S* mn;
  int64_t gs;
  explicit RowScales(const QMat& w)
      : sc(w.scales.data_ptr<S>()), mn(MIN ? w.mins.data_ptr<S>() : nullptr), gs(w.scales.stride(0)) {}
  SV<GROUP, S> scales(int64_t r) const { return SV<GROUP, S>(sc + r * gs); }
  SV<GROUP, S> mins(int64_t r) const { return SV<GROUP, S>(MIN ? mn + r * gs : nullptr); }
  void prefetch(int64_t r, bool l2 = false) const {  // a row picked from a list: its scales are not next to the last row's
    prefetch_bytes(sc + r * gs, gs * static_cast<int64_t>(sizeof(S)), l2);
    if (MIN) prefetch_bytes(mn + r * gs, gs * static_cast<int64_t>(sizeof(S)), l2);
  }
};
template <int GROUP, bool MIN>
struct RowScales<GROUP, KScale, MIN> {
  const int8_t* sc;
  const int8_t* mn;
  const c10::Half* sup;
  int64_t gs, ss, nsup;
  explicit RowScales(const QMat& w)
      : sc(w.scales.data_ptr<int8_t>()), mn(MIN ? w.mins.data_ptr<int8_t>() : nullptr),
        sup(reinterpret_cast<const c10::Half*>(w.supers.data_ptr<at::Half>())), gs(w.scales.stride(0)),
        ss(w.supers.stride(0)), nsup(w.width / 256) {}
  SV<GROUP, KScale> scales(int64_t r) const { return SV<GROUP, KScale>(sc + r * gs, sup + r * ss); }
  SV<GROUP, KScale> mins(int64_t r) const {
    return SV<GROUP, KScale>(MIN ? mn + r * gs : nullptr, sup + r * ss + nsup);
  }
  void prefetch(int64_t r, bool l2 = false) const {
    prefetch_bytes(sc + r * gs, gs, l2);
    if (MIN) prefetch_bytes(mn + r * gs, gs, l2);
    prefetch_bytes(sup + r * ss, ss * 2, l2);
  }
};

// while row i of rows b..e-1 (a list, or null: the matrix's rows) is computed: what to prefetch along
// its codes (prefetch_along): a dense matrix's codes kStreamAhead bytes on (past the last row they are
// addresses never read), a list's row kListAhead on, whose scales are prefetched here (and the row
// kListFar on, whole, into L2)
template <typename RS>
inline const uint8_t* prefetch_ahead(const uint8_t* codes, int64_t rb, const RS& rs, const int64_t* rows, int64_t i,
                                     int64_t e) {
  if (!rows) return codes + i * rb + kStreamAhead;
  if (i + kListFar < e) {
    prefetch_bytes(codes + rows[i + kListFar] * rb, rb, true);
    rs.prefetch(rows[i + kListFar], true);
  }
  if (i + kListAhead >= e) return nullptr;
  rs.prefetch(rows[i + kListAhead]);
  return codes + rows[i + kListAhead] * rb;
}

// one row's product for either activation width (the int8 or the int16 path)
template <int BITS, int GROUP, bool MIN, typename S>
inline float qdot_row(const uint8_t* codes, SV<GROUP, S> sc, SV<GROUP, S> mn, const QX& x, const int32_t* z,
                      const uint8_t* ahead) {
#if HIRE_QUANT_512
  if constexpr (std::is_same_v<S, KScale>) {
    return qdot_k8<BITS, GROUP, MIN>(codes, sc.s, mn.s, sc.sup, mn.sup, x, z, ahead);
  } else {
    return qdot<BITS, GROUP, MIN, S>(codes, sc, mn, x, z, ahead);
  }
#else
  return qdot<BITS, GROUP, MIN, S>(codes, sc, mn, x, z, ahead);
#endif
}
template <int BITS, int GROUP, bool MIN, typename S>
inline float qdot_row(const uint8_t* codes, SV<GROUP, S> sc, SV<GROUP, S> mn, const QX16& x, const int32_t* z,
                      const uint8_t* ahead) {
#if HIRE_QUANT_512
  if constexpr (std::is_same_v<S, KScale>) {
    float out;
    qdot_k16xr<BITS, GROUP, MIN, 1>(&codes, &sc, &mn, x, &ahead, &out);
    return out;
  } else {
    return qdot16<BITS, GROUP, MIN, S>(codes, sc, mn, x, z, ahead);
  }
#else
  return qdot16<BITS, GROUP, MIN, S>(codes, sc, mn, x, z, ahead);
#endif
}

// rows b..e-1 of the list (rows null: the matrix's rows b..e-1) -> y[b..e-1]; no threads of its own
template <int BITS, int GROUP, bool MIN, typename S, typename X>
void rows_range(const QMat& w, const X& x, const ZeroSums& z, const int64_t* rows, int64_t b, int64_t e, float* y) {
  const int64_t rb = w.codes.stride(0);
  const uint8_t* codes = w.codes.data_ptr<uint8_t>();
  const RowScales<GROUP, S, MIN> rs(w);
  int64_t i = b;
#if HIRE_QUANT_512
  if constexpr (std::is_same_v<S, KScale> && std::is_same_v<X, QX16>) {
    // rows i and i + n/2: two streams, each read in order (rows i and i + 1 in lockstep read slower from
    // DRAM than one row at a time: the hardware's stream prefetch saw their lines alternate). The 1.5B's
    // 84 FFN matrices (Q4_K, Q6_K), 2 threads, AMD Zen 4, A B A B, medians of 10: two rows against one
    // 29.6 / 25.6 and 34.1 / 30.8 GB/s hot (one matrix in L3), 21.8 / 20.3 and 22.6 / 21.0 from DRAM; three
    // or four rows at once were no faster hot and slower from DRAM (18.4-21.0). The one-level formats
    // stay one row at a time: two at once ran SmolLM2's Q4_1 FFN (in L3) at 16.9 against 18.3 GB/s
    constexpr int R = 2;
    const int64_t part = (e - b) / R;
    float out[R];
    for (int64_t k = 0; k < part; ++k) {
      const uint8_t* cr[R];
      SV<GROUP, KScale> sr[R], mr[R];
      const uint8_t* ar[R];
      for (int j = 0; j < R; ++j) {
        const int64_t at = b + j * part + k, r = rows ? rows[at] : at;
        cr[j] = codes + r * rb, sr[j] = rs.scales(r), mr[j] = rs.mins(r);
        ar[j] = prefetch_ahead(codes, rb, rs, rows, at, b + (j + 1) * part);
      }
      qdot_k16xr<BITS, GROUP, MIN, R>(cr, sr, mr, x, ar, out);
      for (int j = 0; j < R; ++j) y[b + j * part + k] = out[j];
    }
    i = b + R * part;
  }
#endif
  for (; i < e; ++i) {
    const int64_t r = rows ? rows[i] : i;
    const uint8_t* ahead = prefetch_ahead(codes, rb, rs, rows, i, e);
    y[i] = qdot_row<BITS, GROUP, MIN, S>(codes + r * rb, rs.scales(r), rs.mins(r), x, z.get(BITS), ahead);
  }
}

// rows b..e-1 of the list (as rows_range) for each of the B activations: y[j * stride + i]
template <int BITS, int GROUP, bool MIN, typename S, typename X>
void rows_range_batch(const QMat& w, const std::vector<X>& xs, const std::vector<ZeroSums>& zs, const int64_t* rows,
                      int64_t b, int64_t e, float* y, int64_t stride) {
  const int64_t rb = w.codes.stride(0);
  const uint8_t* codes = w.codes.data_ptr<uint8_t>();
  const RowScales<GROUP, S, MIN> rs(w);
  const int64_t batch = static_cast<int64_t>(xs.size());
  for (int64_t i = b; i < e; ++i) {
    const int64_t r = rows ? rows[i] : i;
    const uint8_t* ahead = prefetch_ahead(codes, rb, rs, rows, i, e);
    for (int64_t j = 0; j < batch; ++j)  // the first activation's product prefetches
      y[j * stride + i] = qdot_row<BITS, GROUP, MIN, S>(codes + r * rb, rs.scales(r), rs.mins(r), xs[j], zs[j].get(BITS),
                                                        j ? nullptr : ahead);
  }
}

#if HIRE_QUANT_512
// A batch of 4..16 int16 activations with one activation per lane of a zmm: row by row, each pair of
// a row's codes is broadcast and multiplied (vpdpwssd) with the 16 activations' codes of those two
// columns, four rows at a time. A 64-column chunk of 4 rows x B activations is then 32 loads and
// 128 multiply-adds, where the one-activation layout (qdot16) spends ~15 instructions per row, chunk
// and activation on loads, folds and scales. The integer sums are qdot16's; the float sums run in
// another order (per group, not per lane), so a row equals qgemv's to float32 rounding.
constexpr int64_t kActLanes = 16, kRowsT = 4;
// from this many activations the lanes layout pays: its cost is ~flat up to 16, the one-activation
// layout's grows with them (SmolLM2's batched step when this was chosen: lanes 10.3 ms at 4 and 11.1
// at 8, one activation 8.2 and 17.3; benchmarks/batch_step.py --parts step times the current choice)
constexpr int64_t kLanesFrom = 6;

struct QXLanes {
  int64_t batch = 0, pairs = 0;
  std::vector<int32_t> xi;  // pairs x 16: activation b's int16 codes of columns 2p, 2p+1 in lane b
  std::vector<float> sx;    // (pairs / 16) x 16: activation scale per 32 columns
  std::vector<float> gsum;  // (pairs / 16) x 16: scale x sum of codes per 32 columns (what a min multiplies)
  std::vector<float> gsum16;  // (pairs / 8) x 16: the same per 16 columns (Q2_K's mins)
};

QXLanes lanes_of(const std::vector<QX16>& xs) {
  QXLanes X;
  X.batch = static_cast<int64_t>(xs.size());
  X.pairs = xs[0].chunks * 32;
  X.xi.assign(X.pairs * kActLanes, 0);
  X.sx.assign(X.pairs / 16 * kActLanes, 0.f);
  X.gsum.assign(X.pairs / 16 * kActLanes, 0.f);
  X.gsum16.assign(X.pairs / 8 * kActLanes, 0.f);
  for (int64_t b = 0; b < X.batch; ++b) {
    const QX16& x = xs[b];
    for (int64_t p = 0; p < X.pairs; ++p) {
      const uint32_t lo = static_cast<uint16_t>(x.q[2 * p]), hi = static_cast<uint16_t>(x.q[2 * p + 1]);
      X.xi[p * kActLanes + b] = static_cast<int32_t>(lo | (hi << 16));
    }
    for (int64_t h = 0; h < X.pairs / 16; ++h) {
      X.sx[h * kActLanes + b] = x.scale[h];
      X.gsum[h * kActLanes + b] = x.gsum[h];
    }
    for (int64_t g = 0; g < X.pairs / 8; ++g) X.gsum16[g * kActLanes + b] = x.gsum16[g];
  }
  return X;
}

// 16 activations in a zmm (8 in a ymm measured no faster on Zen 4: the broadcasts of the codes and
// the row loop cost as much as the multiply-adds)
struct Lanes16 {
  using I = __m512i;
  using F = __m512;
  static I zero() { return _mm512_setzero_si512(); }
  static F fzero() { return _mm512_setzero_ps(); }
  static I load(const int32_t* p) { return _mm512_loadu_si512(p); }
  static I dot(I s, I x, int32_t w) { return _mm512_dpwssd_epi32(s, x, _mm512_set1_epi32(w)); }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static F fma(I s, float sw, F sx, F acc) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(_mm512_set1_ps(sw), sx), acc); }
  static F fma_min(float m, F g, F acc) { return _mm512_fmadd_ps(_mm512_set1_ps(m), g, acc); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};
// rows (count R <= 4, ids rid) . the lanes' activations -> y[b * stride + out[r]]
template <int BITS, int GROUP, bool MIN, typename S, int R, typename L>
inline void rows_lanes(const QMat& w, const QXLanes& X, const int64_t* rid, const int64_t* out, float* y,
                       int64_t stride, int16_t* buf, const RowScales<GROUP, S, MIN>& rs) {
  constexpr int64_t cb = chunk_bytes(BITS), per = 64 / GROUP;
  constexpr int16_t zero = MIN ? 0 : zero_of(BITS);
  const int64_t chunks = X.pairs / 32, rb = w.codes.stride(0);
  const uint8_t* codes = w.codes.data_ptr<uint8_t>();
  SV<GROUP, S> sc[R], mn[R];
  for (int r = 0; r < R; ++r) {  // the rows' codes as int16 (code - zero), once for every activation
    const uint8_t* row = codes + rid[r] * rb;
    sc[r] = rs.scales(rid[r]);
    mn[r] = rs.mins(rid[r]);
    for (int64_t c = 0; c < chunks; ++c) {
      __m512i half[2];
      codes512x16<BITS>(row + c * cb, half);
      for (int h = 0; h < 2; ++h)
        _mm512_storeu_si512(buf + r * chunks * 64 + c * 64 + 32 * h,
                            _mm512_sub_epi16(half[h], _mm512_set1_epi16(zero)));
    }
  }
  typename L::F acc[R];
  for (int r = 0; r < R; ++r) acc[r] = L::fzero();
  const int32_t* pairs = reinterpret_cast<const int32_t*>(buf);
  constexpr int64_t group_pairs = GROUP / 2;
  for (int64_t g = 0; g < X.pairs / group_pairs; ++g) {  // one weight scale per group of columns
    typename L::I s[R];
    for (int r = 0; r < R; ++r) s[r] = L::zero();
    for (int64_t p = g * group_pairs; p < (g + 1) * group_pairs; ++p) {
      const typename L::I xv = L::load(X.xi.data() + p * kActLanes);
      for (int r = 0; r < R; ++r) s[r] = L::dot(s[r], xv, pairs[r * chunks * 32 + p]);
    }
    const int64_t h = g * GROUP / 32;  // the activation's 32-column scale
    const typename L::F sxv = L::loadf(X.sx.data() + h * kActLanes);
    for (int r = 0; r < R; ++r) {
      acc[r] = L::fma(s[r], sc[r].get(g), sxv, acc[r]);
      if (MIN)
        acc[r] = L::fma_min(mn[r].get(g), L::loadf((GROUP == 32 ? X.gsum.data() + h * kActLanes : X.gsum16.data() + g * kActLanes)), acc[r]);
    }
  }
  alignas(64) float lanes[kActLanes];
  for (int r = 0; r < R; ++r) {
    L::store(lanes, acc[r]);
    for (int64_t b = 0; b < X.batch; ++b) y[b * stride + out[r]] = lanes[b];
  }
}

template <int BITS, int GROUP, bool MIN, typename S>
void rows_range_lanes(const QMat& w, const QXLanes& X, const int64_t* rows, int64_t b, int64_t e, float* y,
                      int64_t stride) {
  std::vector<int16_t> buf(kRowsT * X.pairs * 2);
  const RowScales<GROUP, S, MIN> rs(w);
  const int64_t rb = w.codes.stride(0);
  const uint8_t* codes = w.codes.data_ptr<uint8_t>();
  int64_t rid[kRowsT], out[kRowsT];
  int64_t i = b;
  for (; i + kRowsT <= e; i += kRowsT) {
    for (int r = 0; r < kRowsT; ++r) rid[r] = rows ? rows[i + r] : i + r, out[r] = i + r;
    if (i + 2 * kRowsT <= e)
      for (int r = 0; r < kRowsT; ++r) prefetch_bytes(codes + (rows ? rows[i + kRowsT + r] : i + kRowsT + r) * rb, rb);
    rows_lanes<BITS, GROUP, MIN, S, kRowsT, Lanes16>(w, X, rid, out, y, stride, buf.data(), rs);
  }
  for (; i < e; ++i) {
    rid[0] = rows ? rows[i] : i, out[0] = i;
    rows_lanes<BITS, GROUP, MIN, S, 1, Lanes16>(w, X, rid, out, y, stride, buf.data(), rs);
  }
}
#endif

// x quantized to ``act_bits`` (int8 or int16) with its zero sums per 4-column lane, handed to f
template <typename F>
void with_quantized_x(int64_t act_bits, const float* x, int64_t width, int zmask, F&& f) {
  if (act_bits == 16) {
    const QX16 qx = quantize_x16(x, width);
    f(qx, zero_sums(qx.lanesum, zmask));
  } else {
    const QX qx = quantize_x(x, width);
    f(qx, zero_sums(qx.lanesum, zmask));
  }
}

// the zero sums a matrix reads: its code width's where its codes are symmetric (no mins)
inline int zero_mask(const QMat& w) { return w.mins.numel() ? 0 : 1 << zero_bits(w.bits); }

// B activations (rows of x, `width` apart) quantized each on its own, as with_quantized_x does one
template <typename F>
void with_quantized_batch(int64_t act_bits, const float* x, int64_t batch, int64_t width, int zmask, F&& f) {
  if (act_bits == 16) {
    std::vector<QX16> qx;
    std::vector<ZeroSums> z;
    for (int64_t j = 0; j < batch; ++j) {
      qx.push_back(quantize_x16(x + j * width, width));
      z.push_back(zero_sums(qx.back().lanesum, zmask));
    }
    f(qx, z);
  } else {
    std::vector<QX> qx;
    std::vector<ZeroSums> z;
    for (int64_t j = 0; j < batch; ++j) {
      qx.push_back(quantize_x(x + j * width, width));
      z.push_back(zero_sums(qx.back().lanesum, zmask));
    }
    f(qx, z);
  }
}

// float32 codes of columns [0, n) of one code row (chunks of planes)
template <int BITS>
inline void codes_f(const uint8_t* p, int64_t chunks, float* out) {
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* q = p + c * chunk_bytes(BITS);
    float* o = out + c * 64;
#if HIRE_QUANT_512
    const __m512i u = codes512<BITS>(q);
    for (int k = 0; k < 4; ++k)
      _mm512_storeu_ps(o + 16 * k, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(u, k))));
#elif HIRE_QUANT_256
    for (int h = 0; h < 2; ++h) {
      const __m256i u = codes256<BITS>(q, h);
      for (int k = 0; k < 4; ++k) {
        const __m128i part = k < 2 ? _mm256_castsi256_si128(u) : _mm256_extracti128_si256(u, 1);
        const __m128i eight = (k & 1) ? _mm_srli_si128(part, 8) : part;
        _mm256_storeu_ps(o + 32 * h + 8 * k, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight)));
      }
    }
#else
    for (int e = 0; e < 64; ++e) o[e] = static_cast<float>(code_at<BITS>(q, e));
#endif
  }
}

// columns layout: y = sum_j a_j W[:, idx_j]; threads split the output rows, each reads its part of
// every selected column; the selected columns of one group are summed, then the group's scales applied
template <int BITS, int GROUP, bool MIN, typename S>
void qaxpy_impl(const QMat& w, const int64_t* idx, const float* a, int64_t count, int64_t out, float* y) {
  std::vector<std::pair<int64_t, float>> sel(count);
  for (int64_t j = 0; j < count; ++j) sel[j] = {idx ? idx[j] : j, a[j]};
  if (idx) std::sort(sel.begin(), sel.end(), [](const auto& p, const auto& q) { return p.first < q.first; });
  const int64_t chunks = w.chunks(), rb = w.codes.stride(0), gs = w.scales.stride(0);
  const uint8_t* codes = w.codes.data_ptr<uint8_t>();
  const S* sc = w.scales.data_ptr<S>();
  const S* mn = MIN ? w.mins.data_ptr<S>() : nullptr;
  const float zero = MIN ? 0.f : static_cast<float>(zero_of(BITS));
  std::vector<float> result(chunks * 64, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const int64_t n = (c1 - c0) * 64;
    std::vector<float> acc(n, 0.f), col(n, 0.f);
    float* yl = result.data() + c0 * 64;
    auto flush = [&](int64_t g, float total) {  // y += scale_g * (acc - zero * total) + min_g * total
      const S* s = sc + g * gs + c0 * 64;
      const S* m = MIN ? mn + g * gs + c0 * 64 : nullptr;
      for (int64_t e = 0; e < n; ++e) {
        yl[e] += to_f(s[e]) * (acc[e] - zero * total) + (MIN ? to_f(m[e]) * total : 0.f);
        acc[e] = 0.f;
      }
    };
    int64_t group = -1;
    float total = 0.f;
    for (size_t j = 0; j < sel.size(); ++j) {
      const int64_t g = sel[j].first / GROUP;
      if (g != group) {
        if (group >= 0) flush(group, total);
        group = g, total = 0.f;
      }
      if (j + 2 < sel.size()) prefetch(codes + sel[j + 2].first * rb + c0 * chunk_bytes(BITS));
      codes_f<BITS>(codes + sel[j].first * rb + c0 * chunk_bytes(BITS), c1 - c0, col.data());
      axpy(sel[j].second, col.data(), acc.data(), n, static_cast<const float*>(nullptr));
      total += sel[j].second;
    }
    if (group >= 0) flush(group, total);
  });
  std::copy(result.begin(), result.begin() + out, y);
}

// rows [r0, r1) of a rows-layout matrix as float32 (the multi-token product: prefill, perplexity)
template <int BITS, int GROUP, bool MIN, typename S>
void dequant_impl(const QMat& w, int64_t r0, int64_t r1, float* out) {
  const int64_t rb = w.codes.stride(0), chunks = w.chunks();
  const uint8_t* codes = w.codes.data_ptr<uint8_t>();
  const float zero = MIN ? 0.f : static_cast<float>(zero_of(BITS));
  at::parallel_for(r0, r1, 16, [&](int64_t b, int64_t e) {
    std::vector<float> row(chunks * 64);
    const RowScales<GROUP, S, MIN> rs(w);
    for (int64_t r = b; r < e; ++r) {
      codes_f<BITS>(codes + r * rb, chunks, row.data());
      const auto sc = rs.scales(r);
      const auto mn = rs.mins(r);
      float* o = out + (r - r0) * w.width;
      for (int64_t i = 0; i < w.width; ++i) {
        const int64_t g = i / GROUP;
        o[i] = sc.get(g) * (row[i] - zero) + (MIN ? mn.get(g) : 0.f);
      }
    }
  });
}

template <template <int, int, bool, typename> class F, typename... Args>
void dispatch(const QMat& w, Args&&... args) {
  const bool half = w.scales.scalar_type() == torch::kHalf, has_min = w.mins.numel() > 0, k = w.two_level();
#define HIRE_Q(B, G, M)                                                              \
  if (w.bits == B && w.group == G && has_min == M) {                                 \
    if (half) return F<B, G, M, c10::Half>::run(w, std::forward<Args>(args)...);     \
    return F<B, G, M, float>::run(w, std::forward<Args>(args)...);                   \
  }
#define HIRE_QK(B, G, M) \
  if (k && w.bits == B && w.group == G && has_min == M) return F<B, G, M, KScale>::run(w, std::forward<Args>(args)...);
  HIRE_QK(4, 32, true) HIRE_QK(5, 32, true) HIRE_QK(6, 16, false) HIRE_QK(4, 16, false)  // Q4_K, Q5_K, Q6_K, Q3_K
  HIRE_QK(4, 16, true)  // Q2_K
  HIRE_QK(kLut4, 32, false)  // IQ4_XS
  TORCH_CHECK(!k, "no quantized kernel for two-level scales of ", w.bits, "-bit codes in groups of ", w.group);
  HIRE_Q(8, 32, false) HIRE_Q(4, 32, false) HIRE_Q(4, 32, true) HIRE_Q(5, 32, false) HIRE_Q(5, 32, true)
  HIRE_Q(6, 16, false) HIRE_Q(4, 16, false) HIRE_Q(4, 16, true) HIRE_Q(kLut4, 32, false)
#undef HIRE_Q
#undef HIRE_QK
  TORCH_CHECK(false, "no quantized kernel for ", w.bits, "-bit codes in groups of ", w.group,
              has_min ? " with mins" : "");
}

template <int B, int G, bool M, typename S>
struct RowsF {
  template <typename X>
  static void run(const QMat& w, const X& x, const ZeroSums& z, const int64_t* rows, int64_t b, int64_t e, float* y) {
    rows_range<B, G, M, S>(w, x, z, rows, b, e, y);
  }
};
template <int B, int G, bool M, typename S>
struct RowsBatchF {
  template <typename X>
  static void run(const QMat& w, const std::vector<X>& xs, const std::vector<ZeroSums>& zs, const int64_t* rows,
                  int64_t b, int64_t e, float* y, int64_t stride) {
    rows_range_batch<B, G, M, S>(w, xs, zs, rows, b, e, y, stride);
  }
};
#if HIRE_QUANT_512
template <int B, int G, bool M, typename S>
struct RowsLanesF {
  static void run(const QMat& w, const QXLanes& X, const int64_t* rows, int64_t b, int64_t e, float* y,
                  int64_t stride) {
    rows_range_lanes<B, G, M, S>(w, X, rows, b, e, y, stride);
  }
};
#endif
template <int B, int G, bool M, typename S>
struct DequantF {
  static void run(const QMat& w, int64_t r0, int64_t r1, float* out) { dequant_impl<B, G, M, S>(w, r0, r1, out); }
};
template <int B, int G, bool M, typename S>
struct AxpyF {
  static void run(const QMat& w, const int64_t* idx, const float* a, int64_t count, int64_t out, float* y) {
    if constexpr (std::is_same_v<S, KScale>) {
      TORCH_CHECK(false, "qaxpy reads the columns layout, whose scales are one level");
    } else {
      qaxpy_impl<B, G, M, S>(w, idx, a, count, out, y);
    }
  }
};

}  // namespace

namespace hire_native {

QMat make_qmat(const Tensor& codes, const Tensor& scales, const Tensor& mins, int64_t bits, int64_t group,
               int64_t width, bool columns, int64_t act_bits, const Tensor& supers) {
  TORCH_CHECK(act_bits == 8 || act_bits == 16, "activations are quantized to 8 or 16 bits, got ", act_bits);
  QMat w;
  w.act_bits = act_bits;
  w.codes = codes, w.scales = scales, w.mins = mins, w.bits = bits, w.group = group, w.width = width;
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.dim() == 2 && codes.stride(1) == 1,
              "quantized codes must be uint8 (rows, bytes) with contiguous rows");
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 6 || bits == 8 || bits == kLut4,
              "codes must have 4, 5, 6 or 8 bits (or 9: IQ4's 4-bit indices), got ", bits);
  TORCH_CHECK(group == 16 || group == 32, "scale groups must be 16 or 32 columns, got ", group);
  w.n = codes.size(0);
  TORCH_CHECK(codes.size(1) == w.chunks() * chunk_bytes(bits), "code rows must be ", w.chunks() * chunk_bytes(bits),
              " bytes for ", width, " columns of ", bits, " bits, got ", codes.size(1));
  if (supers.defined() && supers.numel()) {  // a K format's two levels
    TORCH_CHECK(!columns && width % 256 == 0 && (group == 16 || group == 32),
                "two-level scales are the rows layout of whole 256-column super-blocks");
    const int64_t nsup = width / 256, groups = width / group;
    TORCH_CHECK(scales.scalar_type() == torch::kChar && scales.dim() == 2 && scales.stride(1) == 1 &&
                scales.size(0) == w.n && scales.size(1) == groups,
                "two-level sub-scales must be int8 (", w.n, ", ", groups, ") with contiguous rows, got ", scales.sizes());
    if (mins.numel())
      TORCH_CHECK(mins.scalar_type() == torch::kChar && mins.sizes() == scales.sizes() && mins.strides() == scales.strides(),
                  "two-level sub-mins must match the sub-scales' dtype, shape and strides");
    const int64_t want = (mins.numel() ? 2 : 1) * nsup;
    TORCH_CHECK(supers.scalar_type() == torch::kHalf && supers.dim() == 2 && supers.stride(1) == 1 &&
                supers.size(0) == w.n && supers.size(1) == want,
                "super-scales must be float16 (", w.n, ", ", want, ") with contiguous rows, got ", supers.sizes());
    w.supers = supers;
    return w;
  }
  TORCH_CHECK((scales.scalar_type() == torch::kFloat || scales.scalar_type() == torch::kHalf) && scales.dim() == 2 &&
              scales.stride(1) == 1, "scales must be float32 or float16 (groups, columns) with contiguous rows");
  if (mins.numel()) {
    TORCH_CHECK(mins.scalar_type() == scales.scalar_type() && mins.sizes() == scales.sizes() &&
                mins.strides() == scales.strides(), "mins must match the scales' dtype, shape and strides");
  }
  if (columns) {
    TORCH_CHECK(scales.size(0) * group == w.n && scales.size(1) >= w.chunks() * 64, "column-layout scales must be (",
                w.n / group, ", ", w.chunks() * 64, "), got ", scales.sizes());
  } else {
    TORCH_CHECK(scales.size(0) == w.n && scales.size(1) >= w.chunks() * 64 / group, "row-layout scales must be (", w.n,
                ", ", w.chunks() * 64 / group, "), got ", scales.sizes());
  }
  return w;
}

void qgemv(const QMat& w, const float* x, const int64_t* rows, int64_t count, float* y) {
  with_quantized_x(w.act_bits, x, w.width, zero_mask(w), [&](const auto& qx, const ZeroSums& z) {
    at::parallel_for(0, count, 16, [&](int64_t b, int64_t e) { dispatch<RowsF>(w, qx, z, rows, b, e, y); });
  });
}

void qgemv_batch(const QMat& w, const float* x, int64_t batch, const int64_t* rows, int64_t count, float* y) {
#if HIRE_QUANT_512
  // activations in lanes, 16 at a time, in int16 whatever w.act_bits: int8 saves no arithmetic in this
  // layout, and its one-activation kernels ran a 1.5B's 512-token prefill at 0.6x the lanes' speed
  if (batch >= kLanesFrom) {
    for (int64_t b0 = 0; b0 < batch; b0 += kActLanes) {
      const int64_t n = std::min(kActLanes, batch - b0);
      if (n < kLanesFrom) {  // a short tail: the one-activation layout
        qgemv_batch(w, x + b0 * w.width, n, rows, count, y + b0 * count);
        continue;
      }
      std::vector<QX16> xs;
      for (int64_t j = 0; j < n; ++j) xs.push_back(quantize_x16(x + (b0 + j) * w.width, w.width));
      const QXLanes X = lanes_of(xs);
      at::parallel_for(0, count, 16, [&](int64_t b, int64_t e) {
        dispatch<RowsLanesF>(w, X, rows, b, e, y + b0 * count, count);
      });
    }
    return;
  }
#endif
  with_quantized_batch(w.act_bits, x, batch, w.width, zero_mask(w), [&](const auto& qx, const std::vector<ZeroSums>& z) {
    at::parallel_for(0, count, 16, [&](int64_t b, int64_t e) { dispatch<RowsBatchF>(w, qx, z, rows, b, e, y, count); });
  });
}

void qgemv_multi(const std::vector<const QMat*>& ws, const float* x, const std::vector<float*>& ys) {
  TORCH_CHECK(!ws.empty() && ws.size() == ys.size(), "qgemv_multi: one output per matrix");
  std::vector<int64_t> start(ws.size() + 1, 0);
  for (size_t m = 0; m < ws.size(); ++m) {
    TORCH_CHECK(ws[m]->width == ws[0]->width && ws[m]->act_bits == ws[0]->act_bits,
                "qgemv_multi: the matrices must share their width and activation bits");
    start[m + 1] = start[m] + ws[m]->n;
  }
  // rows b..e-1 of the stacked matrices: each matrix's part of them
  int zmask = 0;
  for (const QMat* m : ws) zmask |= zero_mask(*m);
  with_quantized_x(ws[0]->act_bits, x, ws[0]->width, zmask, [&](const auto& qx, const ZeroSums& z) {
    at::parallel_for(0, start.back(), 16, [&](int64_t b, int64_t e) {
      for (size_t m = 0; m < ws.size(); ++m) {
        const int64_t lo = std::max(b, start[m]), hi = std::min(e, start[m + 1]);
        if (lo < hi) dispatch<RowsF>(*ws[m], qx, z, nullptr, lo - start[m], hi - start[m], ys[m]);
      }
    });
  });
}

void qaxpy(const QMat& w, const int64_t* idx, const float* a, int64_t count, int64_t out, float* y) {
  dispatch<AxpyF>(w, idx, a, count, out, y);
}

}  // namespace hire_native

namespace {

// x: (width,) float; rows: empty (all) or int64 row ids -> float32 (count,)
Tensor qgemv_op(Tensor x, Tensor codes, Tensor scales, Tensor mins, int64_t bits, int64_t group, int64_t width,
                Tensor rows, int64_t act_bits, Tensor supers) {
  const QMat w = hire_native::make_qmat(codes, scales, mins, bits, group, width, false, act_bits, supers);
  TORCH_CHECK(x.numel() == width, "qgemv: x has ", x.numel(), " values, the matrix ", width, " columns");
  auto xf = x.reshape({width}).to(torch::kFloat).contiguous();
  const bool all = rows.numel() == 0;
  auto r = all ? rows : rows.to(torch::kLong).contiguous();
  const int64_t count = all ? w.n : r.numel();
  if (!all) {
    const auto [lo, hi] = std::minmax_element(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + count);
    TORCH_CHECK(count == 0 || (*lo >= 0 && *hi < w.n), "qgemv: row ids must be in [0, ", w.n, ")");
  }
  auto y = torch::empty({count}, xf.options());
  hire_native::qgemv(w, xf.data_ptr<float>(), all ? nullptr : r.data_ptr<int64_t>(), count, y.data_ptr<float>());
  return y;
}

// x: (B, width) float; rows: empty (all) or int64 row ids -> float32 (B, count)
Tensor qgemv_batch_op(Tensor x, Tensor codes, Tensor scales, Tensor mins, int64_t bits, int64_t group, int64_t width,
                      Tensor rows, int64_t act_bits, Tensor supers) {
  const QMat w = hire_native::make_qmat(codes, scales, mins, bits, group, width, false, act_bits, supers);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == width, "qgemv_batch: x must be (batch, ", width, "), got ", x.sizes());
  auto xf = x.to(torch::kFloat).contiguous();
  const bool all = rows.numel() == 0;
  auto r = all ? rows : rows.to(torch::kLong).contiguous();
  const int64_t count = all ? w.n : r.numel();
  if (!all) {
    const auto [lo, hi] = std::minmax_element(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + count);
    TORCH_CHECK(count == 0 || (*lo >= 0 && *hi < w.n), "qgemv_batch: row ids must be in [0, ", w.n, ")");
  }
  auto y = torch::empty({x.size(0), count}, xf.options());
  if (x.size(0) > 0)
    hire_native::qgemv_batch(w, xf.data_ptr<float>(), x.size(0), all ? nullptr : r.data_ptr<int64_t>(), count,
                             y.data_ptr<float>());
  return y;
}

// rows [r0, r1) of a rows-layout matrix, dequantized -> float32 (r1 - r0, width)
Tensor qdequant_op(Tensor codes, Tensor scales, Tensor mins, int64_t bits, int64_t group, int64_t width, int64_t r0,
                   int64_t r1, Tensor supers) {
  const QMat w = hire_native::make_qmat(codes, scales, mins, bits, group, width, false, 8, supers);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= w.n, "qdequant: rows [", r0, ", ", r1, ") outside [0, ", w.n, ")");
  auto out = torch::empty({r1 - r0, width}, torch::kFloat);
  dispatch<DequantF>(w, r0, r1, out.data_ptr<float>());
  return out;
}

// a: (count,) coefficients of the columns idx (empty: every column, a has one per column) -> float32 (out,)
Tensor qaxpy_op(Tensor a, Tensor idx, Tensor codes, Tensor scales, Tensor mins, int64_t bits, int64_t group,
                int64_t out) {
  const QMat w = hire_native::make_qmat(codes, scales, mins, bits, group, out, true, 8);
  auto af = a.reshape({a.numel()}).to(torch::kFloat).contiguous();
  const bool all = idx.numel() == 0;
  auto ix = all ? idx : idx.to(torch::kLong).contiguous();
  const int64_t count = all ? w.n : ix.numel();
  TORCH_CHECK(af.numel() == count, "qaxpy: ", af.numel(), " coefficients for ", count, " columns");
  if (!all) {
    const auto [lo, hi] = std::minmax_element(ix.data_ptr<int64_t>(), ix.data_ptr<int64_t>() + count);
    TORCH_CHECK(count == 0 || (*lo >= 0 && *hi < w.n), "qaxpy: column ids must be in [0, ", w.n, ")");
  }
  auto y = torch::zeros({out}, af.options());
  hire_native::qaxpy(w, all ? nullptr : ix.data_ptr<int64_t>(), af.data_ptr<float>(), count, out, y.data_ptr<float>());
  return y;
}

}  // namespace

HIRE_FRAGMENT(HIRE_OPS_NAMESPACE, m) {
  m.def("qgemv(Tensor x, Tensor codes, Tensor scales, Tensor mins, int bits, int group, int width, Tensor rows, int act_bits, Tensor supers) -> Tensor");
  m.def("qgemv_batch(Tensor x, Tensor codes, Tensor scales, Tensor mins, int bits, int group, int width, Tensor rows, int act_bits, Tensor supers) -> Tensor");
  m.def("qdequant(Tensor codes, Tensor scales, Tensor mins, int bits, int group, int width, int r0, int r1, Tensor supers) -> Tensor");
  m.def("qaxpy(Tensor a, Tensor idx, Tensor codes, Tensor scales, Tensor mins, int bits, int group, int out) -> Tensor");
}

HIRE_FRAGMENT_IMPL(HIRE_OPS_NAMESPACE, CPU, m) {
  m.impl("qgemv", &qgemv_op);
  m.impl("qgemv_batch", &qgemv_batch_op);
  m.impl("qaxpy", &qaxpy_op);
  m.impl("qdequant", &qdequant_op);
}
