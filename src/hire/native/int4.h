// What the decode step (decode.cpp) uses of the 4-bit proxy kernels (int4.cpp).
#pragma once
#include <torch/torch.h>
#include <cstdint>

namespace hire_native {

// Raise unless packed (n, Dp/2) uint8 and scales (n, Dp/group) float16 are a 4-bit proxy of width d.
void check_int4(const torch::Tensor& packed, const torch::Tensor& scales, int64_t group, int64_t d);

// One HiRE FFN step on its 4-bit proxy: every neuron's estimate, the best `keep` (hire.topk.select_neurons),
// their output from the neuron-major rows, into y (d floats). timing: null, or {proxy seconds,
// selection seconds} to add to.
void int4_ffn(const torch::Tensor& rows, const torch::Tensor& packed, const torch::Tensor& scales, int64_t group,
              int64_t keep, int64_t parts, int64_t act, const float* x, int64_t d, float* y, double* timing);

// Every neuron's |activation| estimate from the 4-bit proxy (what int4_ffn selects on) into est (n / parts).
void int4_estimates_into(const torch::Tensor& packed, const torch::Tensor& scales, int64_t group, int64_t parts,
                         int64_t act, const float* x, int64_t d, float* est);

}  // namespace hire_native
