// The LM head's first HiRE pass in one call: the low-rank proxy's scores of every vocabulary row
// (u_i . z, u_i the row's int8 codes times its scale) and the best `per` rows of each interleaved
// block (block b holds rows b, b + blocks, b + 2 blocks, ...; hire.topk.local_topk is its eager
// meaning). Gemma's 262,144 rows made torch's int8 GEMV plus a top-k over a (blocks, n/blocks) view
// ~0.75 ms of a token; this reads the codes once into a float score per row (1 MB for Gemma), then
// selects each block's best.
//
// z is quantized to int8 (one scale per token), and the codes are repacked once (pack_lowrank) into
// tiles of 16 rows: for each group of 4 columns, the 16 rows' 4 codes side by side. One multiply-add
// of a tile's 64 bytes with 4 of z's codes (broadcast) then adds 4 products to each of the 16 rows'
// sums: no horizontal sums. (With VNNI the codes are stored + 128 as unsigned bytes; the 128 comes out
// as 128 * sum(z's codes).)
#include <torch/library.h>
#include <torch/torch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#include "simd.h"

namespace {
using namespace hire_simd;
using torch::Tensor;

constexpr int64_t kTile = 16;  // rows per tile
constexpr int64_t kTilesAhead = 16;  // software prefetch distance, 16 KB at rank 64 (cold Gemma head: 0.61 -> 0.53 ms; 32 tiles: 0.59)
// With VNNI the tiles hold code + 128 as unsigned bytes (vpdpbusd multiplies unsigned by signed bytes
// without saturating). Without it, pmaddubsw would saturate its 16-bit pair sums (255 * 127 * 2 > 2^15),
// so the tiles keep the signed codes and the kernel multiplies |code| by z with code's sign.
#if defined(__AVX512VNNI__)
constexpr int32_t kBias = 128;
#else
constexpr int32_t kBias = 0;
#endif

// codes: (V, r) int8 -> (V/16, r/4, 16, 4) bytes: code + kBias
Tensor pack_lowrank(Tensor codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kChar, "codes must be a 2-D int8 tensor");
  const int64_t v = codes.size(0), r = codes.size(1);
  TORCH_CHECK(v % kTile == 0 && r % 4 == 0, "the packed low-rank proxy needs rows in multiples of ", kTile,
              " and a rank in multiples of 4, got ", v, " x ", r);
  auto u = (codes.to(torch::kInt) + kBias).to(kBias ? torch::kByte : torch::kChar);  // (V, r)
  return u.view({v / kTile, kTile, r / 4, 4}).permute({0, 2, 1, 3}).contiguous();  // (V/16, r/4, 16, 4)
}

// The 16 rows' scores, scale * sum of code * zq (+ bias * inv where the proxy has a row bias: inv
// is 1 / z's scale, so the bias keeps its size next to the unscaled sums), of one tile; returns a bit
// per row whose score beats its block's current minimum (floor), which is all the caller looks at.
inline uint32_t tile_scores(const uint8_t* tile, const int32_t* z4, int64_t groups, int32_t offset, const float* scale,
                            const c10::Half* bias, float inv, const float* floor, float* out) {
#if defined(__AVX512BW__)
  __m512i acc = _mm512_set1_epi32(-offset);
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i t = _mm512_loadu_si512(tile + g * 64);
    const __m512i zb = _mm512_set1_epi32(z4[g]);
#if defined(__AVX512VNNI__)
    acc = _mm512_dpbusd_epi32(acc, t, zb);
#else  // signed codes: |code| times z with code's sign, in 16-bit pairs that cannot saturate
    const __m512i zs = _mm512_mask_sub_epi8(zb, _mm512_movepi8_mask(t), _mm512_setzero_si512(), zb);
    acc = _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(t), zs), _mm512_set1_epi16(1)));
#endif
  }
  __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(scale));
  if (bias)
    v = _mm512_add_ps(v, _mm512_mul_ps(load_w(bias), _mm512_set1_ps(inv)));
  _mm512_storeu_ps(out, v);
  return _mm512_cmp_ps_mask(v, _mm512_loadu_ps(floor), _CMP_GT_OQ);
#elif !HIRE_SCALAR
  __m256i acc0 = _mm256_set1_epi32(-offset), acc1 = acc0;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i zb = _mm256_set1_epi32(z4[g]);
    const __m256i t0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + g * 64));
    const __m256i t1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + g * 64 + 32));
    // signed codes (no VNNI here): |code| times z with code's sign
    acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(t0), _mm256_sign_epi8(zb, t0)), ones));
    acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(t1), _mm256_sign_epi8(zb, t1)), ones));
  }
  __m256 v0 = _mm256_mul_ps(_mm256_cvtepi32_ps(acc0), _mm256_loadu_ps(scale));
  __m256 v1 = _mm256_mul_ps(_mm256_cvtepi32_ps(acc1), _mm256_loadu_ps(scale + 8));
  if (bias) {
    const __m256 iv = _mm256_set1_ps(inv);
    v0 = _mm256_add_ps(v0, _mm256_mul_ps(load_w(bias), iv));
    v1 = _mm256_add_ps(v1, _mm256_mul_ps(load_w(bias + 8), iv));
  }
  _mm256_storeu_ps(out, v0);
  _mm256_storeu_ps(out + 8, v1);
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v0, _mm256_loadu_ps(floor), _CMP_GT_OQ))) |
         (static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v1, _mm256_loadu_ps(floor + 8), _CMP_GT_OQ))) << 8);
#else
  uint32_t mask = 0;
  for (int64_t j = 0; j < kTile; ++j) {
    int32_t sum = -offset;
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* z = reinterpret_cast<const int8_t*>(&z4[g]);
      for (int64_t k = 0; k < 4; ++k) sum += static_cast<int8_t>(tile[g * 64 + j * 4 + k]) * z[k];  // kBias is 0
    }
    out[j] = static_cast<float>(sum) * scale[j];
    if (bias) out[j] += to_f(bias[j]) * inv;
    if (out[j] > floor[j]) mask |= 1u << j;
  }
  return mask;
#endif
}

}  // namespace

// z: (r,), packed: (V/16, r/4, 16, 4) uint8, scales: (V,) float32, bias: (V,) float16 or none
// -> (blocks * per,) int64 rows
Tensor lowrank_block_topk(Tensor z, Tensor packed, Tensor scales, int64_t blocks, int64_t per,
                          std::optional<Tensor> bias) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kTile && packed.size(3) == 4 && packed.is_contiguous() &&
              packed.scalar_type() == (kBias ? torch::kByte : torch::kChar), "packed must come from this build's pack_lowrank");
  const int64_t tiles = packed.size(0), groups = packed.size(1), v = tiles * kTile, r = groups * 4;
  TORCH_CHECK(z.numel() == r, "z has ", z.numel(), " values for a rank of ", r);
  TORCH_CHECK(scales.numel() == v && scales.scalar_type() == torch::kFloat && scales.is_contiguous(),
              "scales: float32, one per row (", v, ")");
  TORCH_CHECK(blocks >= kTile && blocks % kTile == 0 && v % blocks == 0, "blocks must be a multiple of ", kTile,
              " dividing ", v, ", got ", blocks);
  TORCH_CHECK(!bias || (bias->numel() == v && bias->scalar_type() == torch::kHalf && bias->is_contiguous()),
              "bias: float16, one per row (", v, ")");
  const c10::Half* bp = bias ? reinterpret_cast<const c10::Half*>(bias->data_ptr()) : nullptr;
  const int64_t stripe_rows = v / blocks;  // rows per block
  TORCH_CHECK(per >= 1 && per <= stripe_rows, "per must be in [1, ", stripe_rows, "], got ", per);
  // z as int8 codes (one scale), grouped 4 to an int32 for the broadcast
  auto zf = z.reshape({r}).to(torch::kFloat).contiguous();
  const float* zp = zf.data_ptr<float>();
  std::vector<int8_t> zq(r);
  const float inv = 1.f / quantize_int8(zp, r, zq.data());  // z's scale does not change the order of the sums
  std::vector<int32_t> z4(groups);
  int32_t zsum = 0;
  for (int64_t k = 0; k < r; ++k) zsum += zq[k];
  for (int64_t g = 0; g < groups; ++g) std::memcpy(&z4[g], zq.data() + g * 4, 4);
  const int32_t offset = kBias * zsum;
  auto out = torch::empty({blocks * per}, torch::kLong);
  int64_t* rows = out.data_ptr<int64_t>();
  std::fill(rows, rows + blocks * per, 0);
  const uint8_t* pp = static_cast<const uint8_t*>(packed.data_ptr());  // signed codes where kBias is 0
  const float* sp = scales.data_ptr<float>();
  // 1. every row's score, threads streaming contiguous ranges of tiles (1 MB for Gemma's 262,144 rows)
  std::vector<float> score(v);
  const std::vector<float> never(kTile, std::numeric_limits<float>::infinity());  // no row "beats" it
  at::parallel_for(0, tiles, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t tile = t0; tile < t1; ++tile) {
      if (tile + kTilesAhead < t1) {  // one stream per thread: keep enough lines in flight
        const uint8_t* ahead = pp + (tile + kTilesAhead) * groups * 64;
        for (int64_t line = 0; line < groups; ++line) prefetch(ahead + line * 64);
      }
      tile_scores(pp + tile * groups * 64, z4.data(), groups, offset, sp + tile * kTile, bp ? bp + tile * kTile : nullptr,
                  inv, never.data(), score.data() + tile * kTile);
    }
  });
  // 2. each block's best `per` rows (block b: rows b, b + blocks, ...), best first; among equal scores the
  // lower row. A threshold q from a sample of the scores (about 2 * per of a block's rows above it)
  // leaves short lists to select from; a block with fewer than `per` rows above q is selected from all
  // its rows, so the result is exact either way. (Streaming rows into per-block lists cost O(k' log)
  // insertions scattered over the blocks: Gemma's k' 16,384 took 2.4 ms; selecting over every row of
  // every block, 1.4 ms.)
  //
  // A NaN score (a NaN row scale or bias) comes after every real score, and NaNs among themselves in
  // row order: NaN compares false with everything, which is no strict weak order, and std::sort or
  // nth_element with such a comparator may read outside the range. NaNs never pass `> q`, so they
  // are only ever chosen from a block with fewer than `per` real scores above q (all its rows).
  float q = -std::numeric_limits<float>::infinity();
  const double above = std::min(1.0, 2.0 * per / stripe_rows + 64.0 / v);
  if (above < 0.5) {
    const int64_t step = std::max<int64_t>(1, v / 8192);
    std::vector<float> sample;
    for (int64_t i = 0; i < v; i += step)
      if (!std::isnan(score[i])) sample.push_back(score[i]);
    const int64_t at = std::min<int64_t>(static_cast<int64_t>(sample.size()) - 1,
                                         static_cast<int64_t>(above * sample.size()));
    if (at >= 0) {  // an all-NaN sample keeps q at -inf: every block is then selected from all its rows
      std::nth_element(sample.begin(), sample.begin() + at, sample.end(), std::greater<float>());
      q = sample[at];
    }
  }
  // the lists hold only real scores above q (NaN > q is false), so they take the plain order; the
  // NaN-aware one costs ~20 % of the whole call there (Gemma's shape, 1 thread), so it is kept for
  // blocks selected from all their rows
  auto better = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  auto better_or_nan = [](const auto& a, const auto& b) {
    const bool a_nan = std::isnan(a.first), b_nan = std::isnan(b.first);
    if (a_nan != b_nan) return b_nan;  // a real score before a NaN
    if (!a_nan && a.first != b.first) return a.first > b.first;
    return a.second < b.second;  // equal scores (or both NaN): the lower row first
  };
  at::parallel_for(0, blocks, 64, [&](int64_t b0, int64_t b1) {
    std::vector<std::vector<std::pair<float, int64_t>>> lists(b1 - b0);
    for (int64_t i = 0; i < stripe_rows; ++i) {  // row-major over the score buffer: each line read once
      const float* sc = score.data() + i * blocks;
      for (int64_t block = b0; block < b1; ++block)
        if (sc[block] > q) lists[block - b0].push_back({sc[block], block + i * blocks});
    }
    for (int64_t block = b0; block < b1; ++block) {
      auto& cand = lists[block - b0];
      if (static_cast<int64_t>(cand.size()) < per) {  // too few above q: every row of the block, NaNs included
        cand.resize(stripe_rows);
        for (int64_t i = 0; i < stripe_rows; ++i) cand[i] = {score[block + i * blocks], block + i * blocks};
        std::nth_element(cand.begin(), cand.begin() + (per - 1), cand.end(), better_or_nan);
        std::sort(cand.begin(), cand.begin() + per, better_or_nan);
      } else {
        std::nth_element(cand.begin(), cand.begin() + (per - 1), cand.end(), better);
        std::sort(cand.begin(), cand.begin() + per, better);
      }
      for (int64_t i = 0; i < per; ++i) rows[block * per + i] = cand[i].second;
    }
  });
  return out;
}

// ---- The first pass in block-major order (the decode path) ----------------------------------------
//
// lowrank_block_topk above scores tiles of 16 consecutive rows, i.e. one row of each of 16 blocks, so
// no block is complete before the whole of U is read, and the selection is a second pass over every
// score (Gemma's head: ~0.75 ms of scores, then ~0.1 ms for a threshold and ~0.9 ms selecting, of a
// 1.9 ms call). Packed block-major instead (pack_lowrank_blocks: a tile is 16 rows of ONE block, a
// block's tiles are contiguous, and the row scales and biases follow the same order), each block is
// scored (32 KB of codes for Gemma) and selected from its scores while they are in L1, in one stream
// over U per thread, threads owning ranges of blocks; no second pass, no sharing between threads.
//
// The selection of a block: its best `per` rows by (score desc, row asc), NaN after every real score.
// A running threshold q per activation keeps the sort short: the rows above q are the candidates
// (about per + 3 sqrt(per) + 4 of them, q being the previous block's target-th best score); a block
// with fewer than `per` rows above q is selected from all its rows, so the result is exact whatever q
// is (q only decides the work).
//
// z = V x is computed here too (float64 sums of the exact products, rounded to float32, so that
// torch's float64 product gives the same z: hire.proxies.lowrank.reference_block_select), then
// quantized to int8 with one scale per activation, as lowrank_block_topk does.
//
// The rows come back in ascending order (the exact head then reads them in address order), from a
// bitmap per activation; with `with_union`, the union of the B activations' rows too (one batched
// decode step computes the union's rows for every activation).
namespace {

// codes (V, r) int8, blocks -> (blocks, S/16, r/4, 16, 4) bytes (code + kBias), S = V / blocks: tile t of
// block b holds rows b + (16 t + j) blocks, j = 0..15
Tensor pack_block_codes(const Tensor& codes, int64_t blocks) {
  const int64_t v = codes.size(0), r = codes.size(1), stripe = v / blocks;
  auto u = (codes.to(torch::kInt) + kBias).to(kBias ? torch::kByte : torch::kChar);  // (V, r)
  // row = s * blocks + b, s = 16 t + j, column = 4 g + k
  return u.view({stripe / kTile, kTile, blocks, r / 4, 4}).permute({2, 0, 3, 1, 4}).contiguous();
}

// 4-bit codes (V, r) int8 in [-8, 7], blocks -> (blocks, S/16, r/8, 16, 4) bytes: line g of a tile holds
// the 16 rows' columns 8g..8g+3 as low nibbles and 8g+4..8g+7 as high nibbles, each code + 8 (0..15), at
// byte 4 j + k (row j, column 8g + k or 8g + 4 + k): the 8-bit layout's groups 2g and 2g + 1 in one line
Tensor pack_block_codes4(const Tensor& codes, int64_t blocks) {
  const int64_t v = codes.size(0), r = codes.size(1), stripe = v / blocks;
  TORCH_CHECK(codes.min().item<int>() >= -8 && codes.max().item<int>() <= 7, "4-bit codes must lie in [-8, 7]");
  auto u = (codes.to(torch::kInt) + 8).to(torch::kByte);  // (V, r) 0..15
  // row = s * blocks + b, s = 16 t + j, column = 8 g + 4 h + k -> (blocks, S/16, r/8, h, 16, 4)
  auto t = u.view({stripe / kTile, kTile, blocks, r / 8, 2, 4}).permute({2, 0, 3, 4, 1, 5}).contiguous();
  auto lo = t.select(3, 0), hi = t.select(3, 1);  // (blocks, S/16, r/8, 16, 4)
  return lo.bitwise_or(hi.bitwise_left_shift(4)).contiguous();
}

// sum of the exact products v[i] * x[i] in float64, rounded to float32
template <typename T>
float dot_f64(const T* v, const double* x, int64_t n) {
  int64_t i = 0;
  double s = 0.0;
#if defined(__AVX512F__)
  __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
  for (; i + 16 <= n; i += 16) {
    const __m512 w = load_w(v + i);
    a0 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(w)), _mm512_loadu_pd(x + i), a0);
    a1 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1))),
                         _mm512_loadu_pd(x + i + 8), a1);
  }
  s = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
#elif !HIRE_SCALAR
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  for (; i + 8 <= n; i += 8) {
    const __m256 w = load_w(v + i);
    a0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(w)), _mm256_loadu_pd(x + i), a0);
    a1 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(w, 1)), _mm256_loadu_pd(x + i + 4), a1);
  }
  const __m256d a = _mm256_add_pd(a0, a1);
  __m128d h = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
  s = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
#endif
  for (; i < n; ++i) s += static_cast<double>(to_f(v[i])) * x[i];  // the products are exact in float64
  return static_cast<float>(s);
}


// The 4-bit tile (pack_block_codes4): `lines` 64-byte lines, line g holding columns 8g..8g+3 of the 16 rows
// in its low nibbles and 8g+4..8g+7 in its high ones, each code + 8; z4[a * zld + 2g] and [.. + 2g + 1]
// are activation a's codes of those two groups of 4 columns; offset[a] = 8 * sum of a's codes. The
// unsigned codes (0..15) times signed z in 16-bit pairs cannot saturate (2 * 15 * 128 < 2^15), so the
// kernels without VNNI need no sign trick.
#if defined(__AVX512VNNI__)
template <int NB>
constexpr int kChains = NB == 1 ? 4 : NB == 2 ? 2 : 1;  // accumulator chains per activation
template <int C>
inline __m512i sum_chains(const __m512i* ch) {
  __m512i s = ch[0];
  for (int c = 1; c < C; ++c) s = _mm512_add_epi32(s, ch[c]);
  return s;
}
#endif

#if defined(__AVX512BW__)
template <int NB>
inline void store_scores(const __m512i* acc, const float* scale, const c10::Half* bias, const float* inv, float* out,
                         int64_t ld) {
  const __m512 sc = _mm512_loadu_ps(scale);
  const __m512 bs = bias ? load_w(bias) : _mm512_setzero_ps();
  for (int a = 0; a < NB; ++a) {
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[a]), sc);
    if (bias) v = _mm512_add_ps(v, _mm512_mul_ps(bs, _mm512_set1_ps(inv[a])));
    _mm512_storeu_ps(out + a * ld, v);
  }
}
#elif !HIRE_SCALAR
template <int NB>
inline void store_scores(const __m256i* acc0, const __m256i* acc1, const float* scale, const c10::Half* bias,
                         const float* inv, float* out, int64_t ld) {
  const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + 8);
  for (int a = 0; a < NB; ++a) {
    __m256 v0 = _mm256_mul_ps(_mm256_cvtepi32_ps(acc0[a]), s0);
    __m256 v1 = _mm256_mul_ps(_mm256_cvtepi32_ps(acc1[a]), s1);
    if (bias) {
      const __m256 iv = _mm256_set1_ps(inv[a]);
      v0 = _mm256_add_ps(v0, _mm256_mul_ps(load_w(bias), iv));
      v1 = _mm256_add_ps(v1, _mm256_mul_ps(load_w(bias + 8), iv));
    }
    _mm256_storeu_ps(out + a * ld, v0);
    _mm256_storeu_ps(out + a * ld + 8, v1);
  }
}
#endif

template <int NB>
inline void store_scores(const int32_t* sums, const float* scale, const c10::Half* bias, const float* inv,
                         float* out, int64_t ld) {
  for (int a = 0; a < NB; ++a)
    for (int64_t j = 0; j < kTile; ++j) {
      float v = static_cast<float>(sums[a * kTile + j]) * scale[j];
      if (bias) v += to_f(bias[j]) * inv[a];
      out[a * ld + j] = v;
    }
}

template <int NB>
inline void tile_scores4_nb(const uint8_t* tile, const int32_t* z4, int64_t zld, int64_t lines,
                            const int32_t* offset, const float* scale, const c10::Half* bias, const float* inv,
                            float* out, int64_t ld) {
#if defined(__AVX512VNNI__)
  // two vpdpbusd a line: the low nibbles' and the high ones' on chains of their own (see tile_scores_nb)
  constexpr int C = kChains<NB> < 2 ? 2 : kChains<NB>;
  __m512i ch[NB][C];
  for (int a = 0; a < NB; ++a)
    for (int c = 0; c < C; ++c) ch[a][c] = c == 0 ? _mm512_set1_epi32(-offset[a]) : _mm512_setzero_si512();
  const __m512i mask = _mm512_set1_epi8(0x0F);
  constexpr int P = C / 2;  // lines per round
  int64_t g = 0;
  auto line = [&](int64_t gg, int c) {
    const __m512i t = _mm512_loadu_si512(tile + gg * 64);
    const __m512i lo = _mm512_and_si512(t, mask), hi = _mm512_and_si512(_mm512_srli_epi16(t, 4), mask);
    for (int a = 0; a < NB; ++a) {
      ch[a][2 * c] = _mm512_dpbusd_epi32(ch[a][2 * c], lo, _mm512_set1_epi32(z4[a * zld + 2 * gg]));
      ch[a][2 * c + 1] = _mm512_dpbusd_epi32(ch[a][2 * c + 1], hi, _mm512_set1_epi32(z4[a * zld + 2 * gg + 1]));
    }
  };
  for (; g + P <= lines; g += P)
    for (int c = 0; c < P; ++c) line(g + c, c);
  for (; g < lines; ++g) line(g, 0);
  __m512i acc[NB];
  for (int a = 0; a < NB; ++a) acc[a] = sum_chains<C>(ch[a]);
  store_scores<NB>(acc, scale, bias, inv, out, ld);
#elif defined(__AVX512BW__)
  __m512i acc[NB];
  for (int a = 0; a < NB; ++a) acc[a] = _mm512_set1_epi32(-offset[a]);
  const __m512i mask = _mm512_set1_epi8(0x0F), ones = _mm512_set1_epi16(1);
  for (int64_t g = 0; g < lines; ++g) {
    const __m512i t = _mm512_loadu_si512(tile + g * 64);
    const __m512i lo = _mm512_and_si512(t, mask), hi = _mm512_and_si512(_mm512_srli_epi16(t, 4), mask);
    for (int a = 0; a < NB; ++a) {
      const __m512i z0 = _mm512_set1_epi32(z4[a * zld + 2 * g]), z1 = _mm512_set1_epi32(z4[a * zld + 2 * g + 1]);
      const __m512i p = _mm512_add_epi16(_mm512_maddubs_epi16(lo, z0), _mm512_maddubs_epi16(hi, z1));
      acc[a] = _mm512_add_epi32(acc[a], _mm512_madd_epi16(p, ones));
    }
  }
  store_scores<NB>(acc, scale, bias, inv, out, ld);
#elif !HIRE_SCALAR
  __m256i acc0[NB], acc1[NB];
  for (int a = 0; a < NB; ++a) acc0[a] = acc1[a] = _mm256_set1_epi32(-offset[a]);
  const __m256i ones = _mm256_set1_epi16(1), mask = _mm256_set1_epi8(0x0F);
  for (int64_t g = 0; g < lines; ++g) {
    const __m256i t0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + g * 64));
    const __m256i t1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + g * 64 + 32));
    const __m256i lo0 = _mm256_and_si256(t0, mask), hi0 = _mm256_and_si256(_mm256_srli_epi16(t0, 4), mask);
    const __m256i lo1 = _mm256_and_si256(t1, mask), hi1 = _mm256_and_si256(_mm256_srli_epi16(t1, 4), mask);
    for (int a = 0; a < NB; ++a) {
      const __m256i z0 = _mm256_set1_epi32(z4[a * zld + 2 * g]), z1 = _mm256_set1_epi32(z4[a * zld + 2 * g + 1]);
      const __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(lo0, z0), _mm256_maddubs_epi16(hi0, z1));
      const __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo1, z0), _mm256_maddubs_epi16(hi1, z1));
      acc0[a] = _mm256_add_epi32(acc0[a], _mm256_madd_epi16(p0, ones));
      acc1[a] = _mm256_add_epi32(acc1[a], _mm256_madd_epi16(p1, ones));
    }
  }
  store_scores<NB>(acc0, acc1, scale, bias, inv, out, ld);
#else
  int32_t sums[NB * kTile];
  for (int a = 0; a < NB; ++a) {
    const int8_t* z = reinterpret_cast<const int8_t*>(z4 + a * zld);
    for (int64_t j = 0; j < kTile; ++j) {
      int32_t sum = -offset[a];
      for (int64_t g = 0; g < lines; ++g)
        for (int64_t k = 0; k < 4; ++k) {
          const uint8_t byte = tile[g * 64 + j * 4 + k];
          sum += (byte & 0x0F) * z[g * 8 + k] + (byte >> 4) * z[g * 8 + 4 + k];
        }
      sums[a * kTile + j] = sum;
    }
  }
  store_scores<NB>(sums, scale, bias, inv, out, ld);
#endif
}

// The scores of one tile (16 rows) for NB activations: out[a * ld + j] = scale_j * sum_k code_jk zq_ak
// (+ bias_j * inv_a), with z4[a * zld + g] = activation a's codes of columns 4g..4g+3.
template <int NB, int BITS>
inline void tile_scores_nb(const uint8_t* tile, const int32_t* z4, int64_t zld, int64_t groups,
                           const int32_t* offset, const float* scale, const c10::Half* bias, const float* inv,
                           float* out, int64_t ld) {
  if constexpr (BITS == 4) {
    tile_scores4_nb<NB>(tile, z4, zld, groups, offset, scale, bias, inv, out, ld);
    return;
  }
#if defined(__AVX512VNNI__)
  // With one or two activations the lines go round-robin to C accumulator chains rather than one
  // vpdpbusd chain each (whose 5-cycle latency, not its throughput, bounds a chain): 5-10 % faster on a
  // U in L2 or L3, nothing from DRAM (the packaged models' and the 1.5B's shapes, one run each).
  constexpr int C = kChains<NB>;
  __m512i ch[NB][C];
  for (int a = 0; a < NB; ++a)
    for (int c = 0; c < C; ++c) ch[a][c] = c == 0 ? _mm512_set1_epi32(-offset[a]) : _mm512_setzero_si512();
  int64_t g = 0;
  for (; g + C <= groups; g += C)
    for (int c = 0; c < C; ++c) {
      const __m512i t = _mm512_loadu_si512(tile + (g + c) * 64);
      for (int a = 0; a < NB; ++a) ch[a][c] = _mm512_dpbusd_epi32(ch[a][c], t, _mm512_set1_epi32(z4[a * zld + g + c]));
    }
  for (; g < groups; ++g) {
    const __m512i t = _mm512_loadu_si512(tile + g * 64);
    for (int a = 0; a < NB; ++a) ch[a][0] = _mm512_dpbusd_epi32(ch[a][0], t, _mm512_set1_epi32(z4[a * zld + g]));
  }
  __m512i acc[NB];
  for (int a = 0; a < NB; ++a) acc[a] = sum_chains<C>(ch[a]);
  store_scores<NB>(acc, scale, bias, inv, out, ld);
#elif defined(__AVX512BW__)
  __m512i acc[NB];
  for (int a = 0; a < NB; ++a) acc[a] = _mm512_set1_epi32(-offset[a]);
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i t = _mm512_loadu_si512(tile + g * 64);
    // signed codes (no VNNI here): |code| times z with code's sign, in 16-bit pairs that cannot saturate
    const __m512i ta = _mm512_abs_epi8(t);
    const __mmask64 neg = _mm512_movepi8_mask(t);
    for (int a = 0; a < NB; ++a) {
      const __m512i zb = _mm512_set1_epi32(z4[a * zld + g]);
      const __m512i zs = _mm512_mask_sub_epi8(zb, neg, _mm512_setzero_si512(), zb);
      acc[a] = _mm512_add_epi32(acc[a], _mm512_madd_epi16(_mm512_maddubs_epi16(ta, zs), _mm512_set1_epi16(1)));
    }
  }
  store_scores<NB>(acc, scale, bias, inv, out, ld);
#elif !HIRE_SCALAR
  __m256i acc0[NB], acc1[NB];
  for (int a = 0; a < NB; ++a) acc0[a] = acc1[a] = _mm256_set1_epi32(-offset[a]);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i t0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + g * 64));
    const __m256i t1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + g * 64 + 32));
    const __m256i a0 = _mm256_abs_epi8(t0), a1 = _mm256_abs_epi8(t1);
    for (int a = 0; a < NB; ++a) {  // signed codes (no VNNI here): |code| times z with code's sign
      const __m256i zb = _mm256_set1_epi32(z4[a * zld + g]);
      acc0[a] = _mm256_add_epi32(acc0[a], _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(zb, t0)), ones));
      acc1[a] = _mm256_add_epi32(acc1[a], _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(zb, t1)), ones));
    }
  }
  store_scores<NB>(acc0, acc1, scale, bias, inv, out, ld);
#else
  for (int a = 0; a < NB; ++a) {
    const int8_t* z = reinterpret_cast<const int8_t*>(z4 + a * zld);
    for (int64_t j = 0; j < kTile; ++j) {
      int32_t sum = -offset[a];
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t k = 0; k < 4; ++k) sum += static_cast<int8_t>(tile[g * 64 + j * 4 + k]) * z[g * 4 + k];  // kBias is 0
      float v = static_cast<float>(sum) * scale[j];
      if (bias) v += to_f(bias[j]) * inv[a];
      out[a * ld + j] = v;
    }
  }
#endif
}

using TileFn = void (*)(const uint8_t*, const int32_t*, int64_t, int64_t, const int32_t*, const float*,
                        const c10::Half*, const float*, float*, int64_t);
constexpr int kMaxNB = 8;  // activations scored per read of a tile (registers: 8 accumulators)
constexpr TileFn kTileFns[kMaxNB] = {tile_scores_nb<1, 8>, tile_scores_nb<2, 8>, tile_scores_nb<3, 8>,
                                     tile_scores_nb<4, 8>, tile_scores_nb<5, 8>, tile_scores_nb<6, 8>,
                                     tile_scores_nb<7, 8>, tile_scores_nb<8, 8>};
constexpr TileFn kTileFns4[kMaxNB] = {tile_scores_nb<1, 4>, tile_scores_nb<2, 4>, tile_scores_nb<3, 4>,
                                      tile_scores_nb<4, 4>, tile_scores_nb<5, 4>, tile_scores_nb<6, 4>,
                                      tile_scores_nb<7, 4>, tile_scores_nb<8, 4>};

constexpr int64_t kTilesFar = 64;  // L2 prefetch distance of the block-major pass (64 KB at rank 64)

using Cand = std::pair<float, int32_t>;  // (score, stripe index within the block)
inline bool better_or_nan(const Cand& a, const Cand& b) {
  const bool a_nan = std::isnan(a.first), b_nan = std::isnan(b.first);
  if (a_nan != b_nan) return b_nan;  // a real score before a NaN
  if (!a_nan && a.first != b.first) return a.first > b.first;
  return a.second < b.second;  // equal scores (or both NaN): the lower row first
}

// The scores above q (never NaN) and their indices, in index order, into val/idx (room for n + 16);
// returns how many.
inline int64_t above(const float* sc, int64_t n, float q, float* val, int32_t* idx, int32_t base = 0) {
  int64_t m = 0, i = 0;
#if defined(__AVX512F__)
  const __m512 vq = _mm512_set1_ps(q);
  __m512i iota = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                  _mm512_set1_epi32(base));
  for (; i + 16 <= n; i += 16, iota = _mm512_add_epi32(iota, _mm512_set1_epi32(16))) {
    const __m512 v = _mm512_loadu_ps(sc + i);
    const __mmask16 mask = _mm512_cmp_ps_mask(v, vq, _CMP_GT_OQ);
    _mm512_storeu_ps(val + m, _mm512_maskz_compress_ps(mask, v));  // full stores, kept up to m
    _mm512_storeu_si512(idx + m, _mm512_maskz_compress_epi32(mask, iota));
    m += __builtin_popcount(mask);
  }
#elif !HIRE_SCALAR
  const __m256 vq = _mm256_set1_ps(q);
  for (; i + 8 <= n; i += 8) {
    uint32_t mask = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(sc + i), vq, _CMP_GT_OQ)));
    for (; mask; mask &= mask - 1) {
      const int64_t j = i + __builtin_ctz(mask);
      val[m] = sc[j];
      idx[m++] = base + static_cast<int32_t>(j);
    }
  }
#endif
  for (; i < n; ++i)
    if (sc[i] > q) {
      val[m] = sc[i];
      idx[m++] = base + static_cast<int32_t>(i);
    }
  return m;
}

// Candidate i's place among val[0..m) (padded with -inf to a multiple of 16): how many are greater, and
// how many before it are equal (the lower row first), so that every candidate has its own rank.
constexpr int64_t kRankMax = 160;  // up to this many candidates, ranks by counting (m^2 / 16 compares)
inline int64_t rank_of(const float* val, int64_t m, int64_t i) {
  const float vi = val[i];
  int64_t r = 0, j = 0;
#if defined(__AVX512F__)
  const __m512 b = _mm512_set1_ps(vi);
  for (; j < m; j += 16) {
    const __m512 v = _mm512_loadu_ps(val + j);
    const uint32_t before = i >= j + 16 ? 0xFFFFu : (i > j ? (1u << (i - j)) - 1 : 0u);
    r += __builtin_popcount(_mm512_cmp_ps_mask(v, b, _CMP_GT_OQ)) +
         __builtin_popcount(_mm512_cmp_ps_mask(v, b, _CMP_EQ_OQ) & before);
  }
#elif !HIRE_SCALAR
  const __m256 b = _mm256_set1_ps(vi);
  for (; j < m; j += 8) {
    const __m256 v = _mm256_loadu_ps(val + j);
    const uint32_t before = i >= j + 8 ? 0xFFu : (i > j ? (1u << (i - j)) - 1 : 0u);
    r += __builtin_popcount(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, b, _CMP_GT_OQ)))) +
         __builtin_popcount(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, b, _CMP_EQ_OQ))) & before);
  }
#else
  for (; j < m; ++j) r += val[j] > vi || (val[j] == vi && j < i);
#endif
  return r;
}

#if defined(__AVX512F__)
// rank_of for every candidate of a block with at most 16 * V of them (val padded with -inf to 16 * V),
// with the block's masks held in V registers: no loop per candidate, no branch. The kept ones (rank
// below per) go to pick (room for per + 1) in row order; q_next: the one whose rank is target - 1.
template <int V>
inline void rank_all(const float* val, const int32_t* idx, int64_t m, int64_t per, int64_t target, int32_t* pick,
                     float& q_next) {
  __m512 v[V];
  for (int c = 0; c < V; ++c) v[c] = _mm512_loadu_ps(val + 16 * c);
  int64_t k = 0;
  for (int64_t i = 0; i < m; ++i) {
    const __m512 b = _mm512_set1_ps(val[i]);
    uint64_t gt = 0, eq = 0;
    for (int c = 0; c < V; ++c) {
      gt |= static_cast<uint64_t>(_mm512_cmp_ps_mask(v[c], b, _CMP_GT_OQ)) << (16 * c);
      eq |= static_cast<uint64_t>(_mm512_cmp_ps_mask(v[c], b, _CMP_EQ_OQ)) << (16 * c);
    }
    const int64_t r = __builtin_popcountll(gt) + __builtin_popcountll(eq & ((uint64_t{1} << i) - 1));  // 0 for the best
    pick[k] = idx[i];
    k += r < per;
    q_next = r == target - 1 ? val[i] : q_next;
  }
}
#endif

// Scratch for select_block, one per thread.
struct Scratch {
  std::vector<float> val, tmp;
  std::vector<int32_t> idx;
  std::vector<Cand> all;
  explicit Scratch(int64_t n) : val(std::max<int64_t>(n, 64) + 32), tmp(n + 16), idx(n + 16), all(n) {}  // val: rank_all pads to 64
};

// One block's best `per` of its n scores (their indices into pick, ascending), exact; q: the running
// threshold (NaN: none yet), updated to this block's target-th best score where it is known. The m
// scores above q (q as it was while the block was scored) are in w.val / w.idx already, in row order.
void select_block(const float* sc, int64_t n, int64_t per, int64_t target, float& q, int64_t m, Scratch& w,
                  int32_t* pick) {
  if (std::isnan(q) || m < per) {  // every row of the block, NaNs included: (score desc, row asc), NaN last
    Cand* cand = w.all.data();
    for (int64_t i = 0; i < n; ++i) cand[i] = {sc[i], static_cast<int32_t>(i)};
    if (target < n) {
      std::nth_element(cand, cand + (target - 1), cand + n, better_or_nan);
      q = cand[target - 1].first;  // a NaN here leaves q unknown: the next block takes all its rows too
    }
    std::nth_element(cand, cand + (per - 1), cand + std::min(target, n), better_or_nan);
    for (int64_t i = 0; i < per; ++i) pick[i] = cand[i].second;
    std::sort(pick, pick + per);
    return;
  }
  if (m <= kRankMax) {  // few candidates: each one's rank by counting, branch-free (no sort)
    float* val = w.val.data();
    // padding never > or == a candidate: to a multiple of 16 past m, and to 64 for rank_all (room: 64 + 16)
    for (int64_t i = m; i < std::max<int64_t>(m + 16, 64); ++i) val[i] = -std::numeric_limits<float>::infinity();
    float q_next = q;
#if defined(__AVX512F__)
    if (m <= 32)  // the common case (q sits near a block's target-th best): masks held in registers
      rank_all<2>(val, w.idx.data(), m, per, target, pick, q_next);
    else if (m <= 64)
      rank_all<4>(val, w.idx.data(), m, per, target, pick, q_next);
    else
#endif
    {
      int64_t k = 0;
      for (int64_t i = 0; i < m; ++i) {
        const int64_t r = rank_of(val, m, i);  // 0 for the best
        if (r < per) pick[k++] = w.idx[i];
        if (r == target - 1) q_next = val[i];
      }
    }
    if (m > target + target / 2) q = q_next;  // q was low: raise it to this block's target-th best
    return;
  }
  // the per-th best value t among the m real scores above q; all above t are kept, and of those equal
  // to t the lowest rows (val/idx are in row order)
  float* tmp = w.tmp.data();
  std::copy(w.val.data(), w.val.data() + m, tmp);
  std::nth_element(tmp, tmp + (per - 1), tmp + m, std::greater<float>());
  const float t = tmp[per - 1];
  if (m > target) {  // q was low: raise it to this block's target-th best
    std::nth_element(tmp + per, tmp + (target - 1), tmp + m, std::greater<float>());
    q = tmp[target - 1];
  }
  int64_t greater = 0;
  for (int64_t i = 0; i < m; ++i) greater += w.val[i] > t;
  int64_t ties = per - greater, k = 0;
  for (int64_t i = 0; i < m; ++i) {
    const float v = w.val[i];
    if (v > t || (v == t && ties-- > 0)) pick[k++] = w.idx[i];
  }
}

}  // namespace

// codes (V, r) int8, scales (V,) float32, bias (V,) float16 or none -> [codes in block-major tiles
// (blocks, S/16, r/4, 16, 4), scales (blocks, S) float32, bias (blocks, S) float16 or empty], S = V / blocks
std::vector<Tensor> pack_lowrank_blocks(Tensor codes, Tensor scales, std::optional<Tensor> bias, int64_t blocks,
                                        int64_t bits) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kChar, "codes must be a 2-D int8 tensor");
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4, got ", bits);
  const int64_t v = codes.size(0), r = codes.size(1), multiple = bits == 8 ? 4 : 8;
  TORCH_CHECK(blocks >= 1 && v % blocks == 0 && (v / blocks) % kTile == 0 && r % multiple == 0,
              "the block-major low-rank proxy needs blocks dividing the rows into blocks of a multiple of ", kTile,
              " rows and a rank in multiples of ", multiple, " (", bits, "-bit codes), got ", v, " x ", r, " in ",
              blocks, " blocks");
  TORCH_CHECK(scales.numel() == v && scales.scalar_type() == torch::kFloat, "scales: float32, one per row (", v, ")");
  TORCH_CHECK(!bias || (bias->numel() == v && bias->scalar_type() == torch::kHalf), "bias: float16, one per row (", v, ")");
  const int64_t stripe = v / blocks;
  auto bm = [&](const Tensor& t) { return t.reshape({stripe, blocks}).t().contiguous(); };  // row s * blocks + b -> (b, s)
  return {bits == 8 ? pack_block_codes(codes, blocks) : pack_block_codes4(codes, blocks), bm(scales),
          bias ? bm(*bias) : torch::empty({0}, torch::kHalf)};
}

// x: (B, D), v: (r, D) float32/16/bfloat16, packed/scales/bias from pack_lowrank_blocks, per: rows kept
// per block -> (rows (B, blocks * per) int64 ascending, union (m,) int64 ascending, empty unless with_union)
std::tuple<Tensor, Tensor> lowrank_select(Tensor x, Tensor v, Tensor packed, Tensor scales, std::optional<Tensor> bias,
                                          int64_t per, bool with_union) {
  TORCH_CHECK(packed.dim() == 5 && packed.size(3) == kTile && packed.size(4) == 4 && packed.is_contiguous(),
              "packed must come from this build's pack_lowrank_blocks");
  // 8-bit codes: a 64-byte line per 4 columns; 4-bit codes (two to a byte): per 8 columns
  const int64_t blocks = packed.size(0), tpb = packed.size(1), lines = packed.size(2);
  const bool four = v.dim() == 2 && v.size(0) == lines * 8;
  const int64_t groups = four ? 2 * lines : lines, r = groups * 4;
  TORCH_CHECK(packed.scalar_type() == (four || kBias ? torch::kByte : torch::kChar),
              "packed must come from this build's pack_lowrank_blocks");
  const int64_t stripe = tpb * kTile, n = blocks * stripe;
  TORCH_CHECK(v.dim() == 2 && v.size(0) == r && v.is_contiguous() &&
              (v.scalar_type() == torch::kFloat || v.scalar_type() == torch::kHalf || v.scalar_type() == torch::kBFloat16),
              "v must be a contiguous float32, float16 or bfloat16 (", r, ", D) matrix, got ", v.sizes(), " ",
              v.scalar_type());
  const int64_t d = v.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == d && x.size(0) >= 1, "x must be (B, ", d, ") with B >= 1, got ", x.sizes());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == blocks && scales.size(1) == stripe &&
              scales.scalar_type() == torch::kFloat && scales.is_contiguous(),
              "scales: float32 (", blocks, ", ", stripe, "), block-major (pack_lowrank_blocks)");
  TORCH_CHECK(!bias || (bias->dim() == 2 && bias->size(0) == blocks && bias->size(1) == stripe &&
                        bias->scalar_type() == torch::kHalf && bias->is_contiguous()),
              "bias: float16 (", blocks, ", ", stripe, "), block-major (pack_lowrank_blocks)");
  TORCH_CHECK(per >= 1 && per <= stripe, "per must be in [1, ", stripe, "], got ", per);
  TORCH_CHECK(x.device().is_cpu() && v.device().is_cpu() && packed.device().is_cpu(), "CPU tensors only");
  const int64_t batch = x.size(0);
  // z = V x per activation, then its int8 codes (one scale each), 4 to an int32 for the broadcasts
  auto xc = x.contiguous();
  std::vector<double> xd(batch * d);
  switch (xc.scalar_type()) {
    case torch::kFloat: for (int64_t i = 0; i < batch * d; ++i) xd[i] = xc.data_ptr<float>()[i]; break;
    case torch::kHalf: for (int64_t i = 0; i < batch * d; ++i) xd[i] = to_f(xc.data_ptr<c10::Half>()[i]); break;
    case torch::kBFloat16: for (int64_t i = 0; i < batch * d; ++i) xd[i] = to_f(xc.data_ptr<c10::BFloat16>()[i]); break;
    default: TORCH_CHECK(false, "x must be float32, float16 or bfloat16, got ", xc.scalar_type());
  }
  const double* xp = xd.data();
  std::vector<float> zf(batch * r), inv(batch);
  std::vector<int32_t> z4(batch * groups), offset(batch);
  std::vector<int8_t> zq(r);
  for (int64_t a = 0; a < batch; ++a) {
    for (int64_t k = 0; k < r; ++k) {
      switch (v.scalar_type()) {
        case torch::kFloat: zf[a * r + k] = dot_f64(v.data_ptr<float>() + k * d, xp + a * d, d); break;
        case torch::kHalf: zf[a * r + k] = dot_f64(v.data_ptr<c10::Half>() + k * d, xp + a * d, d); break;
        default: zf[a * r + k] = dot_f64(v.data_ptr<c10::BFloat16>() + k * d, xp + a * d, d); break;
      }
    }
    inv[a] = 1.f / quantize_int8(zf.data() + a * r, r, zq.data());
    int32_t zsum = 0;
    for (int64_t k = 0; k < r; ++k) zsum += zq[k];
    offset[a] = (four ? 8 : kBias) * zsum;
    std::memcpy(z4.data() + a * groups, zq.data(), r);
  }
  const uint8_t* pp = static_cast<const uint8_t*>(packed.data_ptr());
  const float* sp = scales.data_ptr<float>();
  const c10::Half* bp = bias ? reinterpret_cast<const c10::Half*>(bias->data_ptr()) : nullptr;
  const int64_t target = std::min<int64_t>(stripe, per + static_cast<int64_t>(std::ceil(3.0 * std::sqrt(per))) + 4);
  // each activation's rows as a bitmap over the vocabulary (the rows in ascending order from it); a
  // bitmap per thread and activation, so that threads never write the same word
  const int64_t words = (n + 63) / 64, k = blocks * per;
  const int threads = at::get_num_threads();
  // reused from call to call: a fresh buffer is fresh pages, and a page fault costs ~1 us here (a VM)
  static thread_local std::vector<uint64_t> bits_buffer;  // (a lambda names a thread_local, never captures it:
  std::vector<uint64_t>& bits = bits_buffer;              // the threads below reach it through this reference)
  bits.assign(static_cast<int64_t>(threads) * batch * words, 0);
  std::vector<char> used(threads, 0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    used[tid] = 1;
    uint64_t* mine = bits.data() + static_cast<int64_t>(tid) * batch * words;
    std::vector<float> score(batch * stripe);
    std::vector<Scratch> scratch(batch, Scratch(stripe));
    std::vector<int64_t> found(batch);  // each activation's scores above its q so far in this block
    std::vector<int32_t> pick(per + 1);  // (rank_all writes one past the kept)
    std::vector<float> q(batch, std::numeric_limits<float>::quiet_NaN());  // running thresholds: none yet
    const int64_t tile_bytes = lines * 64, t_end = b1 * tpb;
    const TileFn* fns = four ? kTileFns4 : kTileFns;
    for (int64_t block = b0; block < b1; ++block) {
      std::fill(found.begin(), found.end(), 0);
      for (int64_t t = 0; t < tpb; ++t) {
        const int64_t tile = block * tpb + t;
        if (tile + kTilesAhead < t_end) {  // one stream per thread: keep enough lines in flight
          const uint8_t* ahead = pp + (tile + kTilesAhead) * tile_bytes;
          for (int64_t line = 0; line < lines; ++line) prefetch(ahead + line * 64);
        }
        if (tile + kTilesFar < t_end) {  // and further ahead into L2, so that the stream runs on while a block is selected
          const uint8_t* far = pp + (tile + kTilesFar) * tile_bytes;
          for (int64_t line = 0; line < lines; ++line) __builtin_prefetch(far + line * 64, 0, 2);  // prefetcht1
        }
        const int64_t row = block * stripe + t * kTile;  // block-major row of the tile's first
        for (int64_t a0 = 0; a0 < batch; a0 += kMaxNB) {
          const int nb = static_cast<int>(std::min<int64_t>(kMaxNB, batch - a0));
          fns[nb - 1](pp + tile * tile_bytes, z4.data() + a0 * groups, groups, lines, offset.data() + a0,
                           sp + row, bp ? bp + row : nullptr, inv.data() + a0, score.data() + a0 * stripe + t * kTile,
                           stripe);
        }
        // the tile's scores above q, while they are in L1 (the block's selection does not read them again)
        for (int64_t a = 0; a < batch; ++a)
          if (!std::isnan(q[a]))
            found[a] += above(score.data() + a * stripe + t * kTile, kTile, q[a], scratch[a].val.data() + found[a],
                              scratch[a].idx.data() + found[a], static_cast<int32_t>(t * kTile));
      }
      for (int64_t a = 0; a < batch; ++a) {
        select_block(score.data() + a * stripe, stripe, per, target, q[a], found[a], scratch[a], pick.data());
        uint64_t* bw = mine + a * words;
        for (int64_t i = 0; i < per; ++i) {
          const int64_t row = block + static_cast<int64_t>(pick[i]) * blocks;
          bw[row >> 6] |= uint64_t{1} << (row & 63);
        }
      }
    }
  });
  for (int tid = 1; tid < threads; ++tid)  // every thread's bits into the first's
    if (used[tid]) {
      const uint64_t* other = bits.data() + static_cast<int64_t>(tid) * batch * words;
      for (int64_t w = 0; w < batch * words; ++w) bits[w] |= other[w];
    }
  auto rows = torch::empty({batch, k}, torch::kLong);
  int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t a = 0; a < batch; ++a) {
    int64_t* out = rp + a * k;
    const uint64_t* bw = bits.data() + a * words;
    for (int64_t w = 0; w < words; ++w)
      for (uint64_t m = bw[w]; m; m &= m - 1) *out++ = w * 64 + __builtin_ctzll(m);
  }
  Tensor uni = torch::empty({0}, torch::kLong);
  if (with_union) {
    if (batch == 1) {
      uni = rows[0].clone();
    } else {
      for (int64_t a = 1; a < batch; ++a)
        for (int64_t w = 0; w < words; ++w) bits[w] |= bits[a * words + w];
      int64_t count = 0;
      for (int64_t w = 0; w < words; ++w) count += __builtin_popcountll(bits[w]);
      uni = torch::empty({count}, torch::kLong);
      int64_t* out = uni.data_ptr<int64_t>();
      for (int64_t w = 0; w < words; ++w)
        for (uint64_t m = bits[w]; m; m &= m - 1) *out++ = w * 64 + __builtin_ctzll(m);
    }
  }
  return {rows, uni};
}

// The counts behind hire.topk.topk_ranks: scores (N, n) float32, ref (N, k) float32 ascending, no NaN
// -> (N, blocks, k + 1) int64: for each position, block (row % blocks) and j in [1, k], how many rows
// have exactly j of the position's k ref scores below their own (j = 0 is left 0: only the rows above
// ref[0], a few in a thousand for a proxy worth checking, are placed). A NaN score counts as -inf.
Tensor topk_rank_counts(Tensor scores, Tensor ref, int64_t blocks) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == torch::kFloat && scores.is_contiguous(),
              "scores must be a contiguous float32 (N, n) matrix, got ", scores.sizes(), " ", scores.scalar_type());
  const int64_t npos = scores.size(0), n = scores.size(1);
  TORCH_CHECK(ref.dim() == 2 && ref.size(0) == npos && ref.size(1) >= 1 && ref.scalar_type() == torch::kFloat &&
              ref.is_contiguous(), "ref must be a contiguous float32 (", npos, ", k) matrix with k >= 1, got ",
              ref.sizes(), " ", ref.scalar_type());
  TORCH_CHECK(blocks >= 1 && n % blocks == 0, "blocks=", blocks, " must be >= 1 and divide the number of rows n=", n);
  const int64_t k = ref.size(1), width = blocks * (k + 1);
  auto counts = torch::zeros({npos, blocks, k + 1}, torch::kLong);
  const float* sp = scores.data_ptr<float>();
  const float* rp = ref.data_ptr<float>();
  int64_t* cp = counts.data_ptr<int64_t>();
  at::parallel_for(0, npos, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* s = sp + p * n;
      const float* r = rp + p * k;
      int64_t* c = cp + p * width;
      const float low = r[0];
#if defined(__AVX512F__)
      // k <= 64: the k scores in 4 registers (+inf past k), a row's count in 4 compares and no branch
      __m512 rv[4];
      for (int q = 0; q < 4; ++q) {
        const int64_t left = std::clamp<int64_t>(k - 16 * q, 0, 16);
        rv[q] = _mm512_mask_loadu_ps(_mm512_set1_ps(std::numeric_limits<float>::infinity()),
                                     static_cast<__mmask16>((1u << left) - 1), r + 16 * q);
      }
#endif
      auto place = [&](int64_t j) {  // s[j] > low: j's count of ref scores below it, in [1, k]
        int64_t below;
#if defined(__AVX512F__)
        if (k <= 64) {
          const __m512 v = _mm512_set1_ps(s[j]);
          below = __builtin_popcount(_mm512_cmp_ps_mask(rv[0], v, _CMP_LT_OQ)) +
                  __builtin_popcount(_mm512_cmp_ps_mask(rv[1], v, _CMP_LT_OQ)) +
                  __builtin_popcount(_mm512_cmp_ps_mask(rv[2], v, _CMP_LT_OQ)) +
                  __builtin_popcount(_mm512_cmp_ps_mask(rv[3], v, _CMP_LT_OQ));
        } else
#endif
          below = std::lower_bound(r, r + k, s[j]) - r;
        c[(j % blocks) * (k + 1) + below] += 1;
      };
      int64_t j = 0;
#if defined(__AVX512F__)
      const __m512 vl = _mm512_set1_ps(low);
      for (; j + 16 <= n; j += 16)  // (NaN compares false: never placed)
        for (uint32_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + j), vl, _CMP_GT_OQ); m; m &= m - 1)
          place(j + __builtin_ctz(m));
#elif !HIRE_SCALAR
      const __m256 vl = _mm256_set1_ps(low);
      for (; j + 8 <= n; j += 8)
        for (uint32_t m = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + j), vl, _CMP_GT_OQ)));
             m; m &= m - 1)
          place(j + __builtin_ctz(m));
#endif
      for (; j < n; ++j)
        if (s[j] > low) place(j);
    }
  });
  return counts;
}

HIRE_FRAGMENT(HIRE_OPS_NAMESPACE, m) {
  m.def("pack_lowrank(Tensor codes) -> Tensor");
  m.def("lowrank_block_topk(Tensor z, Tensor packed, Tensor scales, int blocks, int per, Tensor? bias=None) -> Tensor");
  m.def("pack_lowrank_blocks(Tensor codes, Tensor scales, Tensor? bias, int blocks, int bits=8) -> Tensor[]");
  m.def("lowrank_select(Tensor x, Tensor v, Tensor packed, Tensor scales, Tensor? bias, int per, bool with_union) -> (Tensor, Tensor)");
  m.def("topk_rank_counts(Tensor scores, Tensor ref, int blocks) -> Tensor");
}

HIRE_FRAGMENT_IMPL(HIRE_OPS_NAMESPACE, CPU, m) {
  m.impl("pack_lowrank", &pack_lowrank);
  m.impl("lowrank_block_topk", &lowrank_block_topk);
  m.impl("pack_lowrank_blocks", &pack_lowrank_blocks);
  m.impl("lowrank_select", &lowrank_select);
  m.impl("topk_rank_counts", &topk_rank_counts);
}
