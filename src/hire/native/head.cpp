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

HIRE_FRAGMENT(HIRE_OPS_NAMESPACE, m) {
  m.def("pack_lowrank(Tensor codes) -> Tensor");
  m.def("lowrank_block_topk(Tensor z, Tensor packed, Tensor scales, int blocks, int per, Tensor? bias=None) -> Tensor");
}

HIRE_FRAGMENT_IMPL(HIRE_OPS_NAMESPACE, CPU, m) {
  m.impl("pack_lowrank", &pack_lowrank);
  m.impl("lowrank_block_topk", &lowrank_block_topk);
}
