// GGUF-quantized matrices in the kernels' affine-code layout (hire.quant.formats): shared by the
// quantized products (quant.cpp) and the decode step (decode.cpp).
#pragma once
#include <torch/torch.h>
#include <cstdint>
#include <vector>

namespace hire_native {

// A QTensor's parts (hire.quant.tensor): codes in 64-column chunks of planes, one scale (and min)
// per group of columns; value = scale * (code - zero) + min.
struct QMat {
  torch::Tensor codes, scales, mins;  // mins empty: symmetric codes (zero = 2^(bits-1))
  // K formats: float16 (n, width / 256) super-scales, then as many super-mins where there are mins;
  // scales and mins are then int8 sub-scales: scale = super * sub (hire.quant.formats.k_scale_parts)
  torch::Tensor supers;
  int64_t bits = 0, group = 0;
  int64_t act_bits = 8;  // qgemv quantizes x to int8 (llama.cpp's way, fastest) or int16 (~float32)
  int64_t n = 0;      // rows of codes: out (rows layout) or in (columns layout)
  int64_t width = 0;  // logical length of a row of codes: in (rows) or out (columns)
  bool defined() const { return codes.defined() && codes.numel() > 0; }
  int64_t chunks() const { return (width + 63) / 64; }
  bool two_level() const { return supers.defined() && supers.numel() > 0; }
};

// checks the parts of a QTensor whose code rows are `width` long (padded to 64)
QMat make_qmat(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& mins, int64_t bits,
               int64_t group, int64_t width, bool columns, int64_t act_bits = 8,
               const torch::Tensor& supers = torch::Tensor());

// y[i] = W[rows[i]] . x for i < count (rows null: every row), x quantized per 32 columns to w.act_bits
void qgemv(const QMat& w, const float* x, const int64_t* rows, int64_t count, float* y);

// the same for the rows of x (batch, w.width): y[j * count + i] = W[rows[i]] . x[j], each x[j]
// quantized on its own as qgemv quantizes it (each product qgemv's; from 6 rows on AVX-512 with int16
// activations, to float32 rounding: the same integer sums added in another order)
void qgemv_batch(const QMat& w, const float* x, int64_t batch, const int64_t* rows, int64_t count, float* y);

// the same x times several matrices of one width (q, k and v; gate and up): x quantized once, all
// their rows in one parallel region; ys[m] gets matrix m's rows
void qgemv_multi(const std::vector<const QMat*>& ws, const float* x, const std::vector<float*>& ys);

// y[0..out) = sum_j a[j] * W[:, idx[j]] for j < count (idx null: every column, a has w.n entries);
// W in the columns layout, accumulated in float32
void qaxpy(const QMat& w, const int64_t* idx, const float* a, int64_t count, int64_t out, float* y);

}  // namespace hire_native
