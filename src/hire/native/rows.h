// What the decode step (decode.cpp) shares with the row kernels (sparse_rows.cpp).
#pragma once
#include <torch/torch.h>
#include <cstdint>
#include <cstring>
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

// One thread's part of ffn_rows: neurons idx[j0..j1) added into acc (d floats), no threads started.
void ffn_rows_range(const torch::Tensor& w, const int64_t* idx, int64_t j0, int64_t j1, const float* x, int64_t d,
                    int64_t parts, int64_t act, float* acc);

// The selection threshold over order keys: keep every key above `key`, and the first `equal` keys equal
// to it in index order. From the keys' top kKeyBits histogram (the sum of `parts` histograms of
// kKeyBuckets counts each), then an exact selection among the one bucket that holds the count-th largest.
constexpr int kKeyBits = 11, kKeyBuckets = 1 << kKeyBits;
struct Threshold {
  uint32_t key;
  int64_t equal;
};
Threshold find_threshold(const uint32_t* keys, int64_t n, int64_t count, const int64_t* hist, int parts);
inline int key_bucket(uint32_t key) { return static_cast<int>(key >> (32 - kKeyBits)); }

// A float's bits as an unsigned key with the same order (larger float, larger key).
inline uint32_t order_key(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
}

}  // namespace hire_native
