// The SIMD vocabulary the native kernels are written against (one definition per instruction
// set, picked by the compiler flags: -march=native, or a variant build's -mno-avx512f), plus the
// scalar helpers they share. Included by every kernel file.
#pragma once
#include <torch/torch.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif

// The ops register under HIRE_OPS_NAMESPACE (torch.ops.<namespace>.*): `hire` normally; a variant
// build (build.py's build_variant) picks its own, so that it can be loaded beside the default one.
#ifndef HIRE_OPS_NAMESPACE
#define HIRE_OPS_NAMESPACE hire
#endif
#define HIRE_STR2(x) #x
#define HIRE_STR(x) HIRE_STR2(x)
// TORCH_LIBRARY* paste their namespace argument unexpanded: one more macro level expands it first.
#define HIRE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define HIRE_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define HIRE_FRAGMENT_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace hire_simd {

enum Act { NONE = 0, SILU = 1, GELU_TANH = 2, GELU = 3, RELU = 4 };

inline float to_f(float v) { return v; }
// float16 -> float32 in one instruction where F16C exists (c10::Half's conversion is a portable
// bit-twiddling routine); the same value either way
inline float to_f(c10::Half v) {
#if defined(__F16C__)
  return _cvtsh_ss(v.x);
#else
  return static_cast<float>(v);
#endif
}
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_f(int8_t v) { return static_cast<float>(v); }

// One SIMD vocabulary per instruction set, picked by the compiler flags (-march=native): a vector
// of kLanes float32 and the operations the kernels need, including load_w, which reads kLanes
// weights of any kernel dtype as float32. The kernels below are written once against it; without
// AVX-512 or AVX2 (+FMA, F16C) they run their scalar tail loops only.
#if defined(__AVX512F__)
#define HIRE_SIMD "avx512"
#define HIRE_SCALAR 0
using vec = __m512;
constexpr int64_t kLanes = 16;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset1(float a) { return _mm512_set1_ps(a); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vfmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
inline vec load_w(const float* p) { return _mm512_loadu_ps(p); }
inline vec load_w(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vec load_w(const c10::BFloat16* p) {  // bfloat16 is the top half of a float32
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline vec load_w(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HIRE_SIMD "avx2"
#define HIRE_SCALAR 0
using vec = __m256;
constexpr int64_t kLanes = 8;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset1(float a) { return _mm256_set1_ps(a); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vfmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // 8 -> 4
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                           // 4 -> 2
  s = _mm_add_ss(s, _mm_movehdup_ps(s));                                            // 2 -> 1
  return _mm_cvtss_f32(s);
}
inline vec load_w(const float* p) { return _mm256_loadu_ps(p); }
inline vec load_w(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline vec load_w(const c10::BFloat16* p) {  // bfloat16 is the top half of a float32
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline vec load_w(const int8_t* p) {  // 8 bytes: the load must not read past the row
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#else
#define HIRE_SIMD "scalar"
#define HIRE_SCALAR 1
#endif

// Rows are picked at random, which defeats the hardware prefetcher: each loop step also
// prefetches the same part of the next selected row (`next`, may be null).
constexpr int64_t kAhead = 8;  // rows ahead
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }  // read, keep in all cache levels
// the same as an asm statement, for a pointer parameter whose only use is to prefetch: GCC's
// interprocedural passes dropped such a parameter together with its __builtin_prefetch calls
inline void prefetch_kept(const void* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

template <typename T>
inline float dot(const T* w, const float* x, int64_t n, const T* next) {
  int64_t i = 0;
  float s = 0.f;
#if !HIRE_SCALAR
  vec a0 = vzero(), a1 = vzero();  // two accumulators: two FMA chains in flight
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    if (next) prefetch(next + i);
    a0 = vfmadd(load_w(w + i), vload(x + i), a0);
    a1 = vfmadd(load_w(w + i + kLanes), vload(x + i + kLanes), a1);
  }
  for (; i + kLanes <= n; i += kLanes) a0 = vfmadd(load_w(w + i), vload(x + i), a0);
  s = vsum(vadd(a0, a1));
#endif
  for (; i < n; ++i) s += to_f(w[i]) * x[i];
  return s;
}

template <typename T>
inline void axpy(float a, const T* w, float* y, int64_t n, const T* next) {
  int64_t i = 0;
#if !HIRE_SCALAR
  const vec va = vset1(a);
  for (; i + kLanes <= n; i += kLanes) {
    if (next && (i * sizeof(T)) % 64 == 0) prefetch(next + i);  // once per cache line
    vstore(y + i, vfmadd(va, load_w(w + i), vload(y + i)));
  }
#endif
  for (; i < n; ++i) y[i] += a * to_f(w[i]);
}

// The few more vector operations the activations need, per instruction set: vround (to nearest),
// vpow2 (2^n for a whole-number n, built in the exponent bits), and the arithmetic.
#if defined(__AVX512F__)
inline vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vpow2(vec n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline vec vfnmadd(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
inline vec vabs(vec a) { return _mm512_abs_ps(a); }
#elif !HIRE_SCALAR
inline vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vpow2(vec n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline vec vfnmadd(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }
inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
inline vec vabs(vec a) { return _mm256_andnot_ps(vset1(-0.f), a); }
#endif

#if !HIRE_SCALAR
// exp over a vector (Cephes' expf: range reduction by ln 2, a degree-6 polynomial; ~1 ulp), for
// the activations below: silu(v) = v / (1 + exp(-v)), gelu_tanh(v) = v / (1 + exp(-2 y)) since
// 0.5 (1 + tanh(y)) = sigmoid(2 y).
inline vec vexp(vec x) {
  x = vmin(vmax(x, vset1(-87.3f)), vset1(88.3f));  // keeps 2^n a normal float
  const vec n = vround(vmul(x, vset1(1.44269504088896341f)));
  const vec r = vfnmadd(n, vset1(-2.12194440e-4f), vfnmadd(n, vset1(0.693359375f), x));  // x - n ln 2, in two parts
  vec y = vset1(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = vfmadd(y, r, vset1(c));
  y = vfmadd(y, vmul(r, r), vadd(r, vset1(1.f)));
  return vmul(y, vpow2(n));
}
#endif

#if !HIRE_SCALAR
// s[0..4) = the sums of the lanes of a, b, c and d: four dot products finished together (within each
// 128-bit lane the four vectors are interleaved, then the lanes added), cheaper than four vsum
inline void reduce4(vec a, vec b, vec c, vec d, float* s) {
#if defined(__AVX512F__)
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a0+a2 b0+b2 a1+a3 b1+b3
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  __m512 t = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));  // a b c d, per 128-bit lane
  t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, _MM_SHUFFLE(1, 0, 3, 2)));
  t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, _MM_SHUFFLE(2, 3, 0, 1)));
  _mm_storeu_ps(s, _mm512_castps512_ps128(t));
#else
  const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
  const __m256 t = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
#endif
}
#endif

inline float activate(float v, int64_t act) {
  switch (act) {
    case SILU: return v / (1.f + std::exp(-v));
    case GELU_TANH: return v / (1.f + std::exp(-1.5957691216057308f * (v + 0.044715f * v * v * v)));  // = 0.5 v (1 + tanh(y))
    case GELU: return 0.5f * v * (1.f + std::erf(v * 0.7071067811865476f));
    case RELU: return v > 0.f ? v : 0.f;
    default: return v;
  }
}

// x's int8 codes with one scale (max|x| / 127, round half to even; hire.native.quantize_activation is
// the eager meaning): out[i] = code of x[i]; returns the scale.
inline float quantize_int8(const float* x, int64_t n, int8_t* out) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = amax > 0.f ? amax / 127.f : 1.f;
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<int8_t>(std::nearbyint(std::min(127.f, std::max(-127.f, x[i] / scale))));
  return scale;
}

// out[i] = act(g[i]) * u[i] (u may be null: act(g[i])), |out[i]| with absval; n values, vectorised
// for silu, gelu_tanh and relu.
inline void activate_n(const float* g, const float* u, float* out, int64_t n, int64_t act, bool absval) {
  int64_t i = 0;
#if !HIRE_SCALAR
  if (act == SILU || act == GELU_TANH || act == RELU) {
    const vec one = vset1(1.f);
    for (; i + kLanes <= n; i += kLanes) {
      const vec v = vload(g + i);
      vec a;
      if (act == RELU) {
        a = vmax(v, vzero());
      } else {
        vec arg = v;  // silu: exp(-v); gelu_tanh: exp(-2 y), y = 0.79788456 (v + 0.044715 v^3)
        if (act == GELU_TANH)
          arg = vmul(vset1(1.5957691216057308f), vfmadd(vmul(vset1(0.044715f), vmul(v, v)), v, v));
        a = vdiv(v, vadd(one, vexp(vmul(arg, vset1(-1.f)))));
      }
      if (u) a = vmul(a, vload(u + i));
      vstore(out + i, absval ? vabs(a) : a);
    }
  }
#endif
  for (; i < n; ++i) {
    const float a = activate(g[i], act) * (u ? u[i] : 1.f);
    out[i] = absval ? std::fabs(a) : a;
  }
}

}  // namespace hire_simd
