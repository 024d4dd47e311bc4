// One token's attention over a layer's KV cache (the decode step's, and each row of a batched step's):
// the kernel in attention.cpp, shared by decode.cpp.
#pragma once
#include <torch/torch.h>
#include <cstdint>

namespace hire_native {

// out[h] = softmax(q[h] . K[g][first..end) * scale) . V[g][first..end) for every query head h, g its kv
// head (h / (hq / hkv)); K, V: one layer's (hkv, seq, hd) cache in T (float, c10::Half, c10::BFloat16).
// softcap c > 0: each score s becomes c * tanh(s / c) before the softmax (Gemma 2). Positions are split
// into chunks across threads (each chunk's softmax merged by its maximum), so a long context keeps
// every thread busy whatever the number of kv heads; accumulated in float32.
template <typename T>
void attend(const float* q, const T* kc, const T* vc, int64_t seq, int64_t first, int64_t end, int64_t hq,
            int64_t hkv, int64_t hd, float scale, float softcap, float* out);

}  // namespace hire_native
