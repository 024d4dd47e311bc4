// What the decode step (decode.cpp) shares with the row kernels (sparse_rows.cpp).
#pragma once
#include <torch/torch.h>
#include <cstdint>
#include <vector>

namespace hire_native {

// The indices of the `count` largest of est[0..n), in ascending order; among equal values the
// lowest indices are taken. (hire.topk.select_neurons is its eager meaning.)
std::vector<int64_t> select_top(const float* est, int64_t n, int64_t count);

// |act(gate) * up| (gated) or |act(pre)| per neuron from proxy scores (parts x neurons).
torch::Tensor neuron_estimates(const torch::Tensor& scores, int64_t neurons, int64_t act, bool gated);

// y (d,) = sum over neurons idx[0..c) (0..c when idx is null) of a_i * out_i, a_i = act(in_i . x) for
// one part or act(gate_i . x) * (up_i . x) for two, from neuron-major rows [part(s) | out] of w.
void ffn_rows(const torch::Tensor& w, const int64_t* idx, int64_t c, const float* x, int64_t d, int64_t parts,
              int64_t act, float* y);

}  // namespace hire_native
