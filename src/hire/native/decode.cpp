// The whole decode step of one token in one native call: every layer's attention (RMSNorm, fused
// QKV GEMV and bias, q/k norms, RoPE, cache write, attention over the cache, output projection)
// and FFN (dense, or HiRE: proxy scores, selection, the selected neurons' rows), then the final
// norm. Python keeps the embedding lookup, the LM head and sampling. Per-op dispatch was ~2.5 ms
// of a ~12 ms SmolLM2 token in eager torch; here a token is one call.
//
// The weights and the KV cache are the engine's own tensors (no copies): the DecodeModel holds
// references. It runs what hire.engine.Engine.forward computes for one token (the eager
// reference it is tested against), accumulating in float32 with float32 activations.
#include <torch/custom_class.h>
#include <torch/library.h>
#include <torch/torch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>
#include "simd.h"
#include "attention.h"
#include "int4.h"
#include "quant.h"
#include "rows.h"

namespace {
using namespace hire_simd;
using torch::Tensor;

// y[r] = W[r] . x for every row: rows split across threads, streamed in order.
template <typename T>
void gemv_impl(const T* w, int64_t ld, const float* x, int64_t d, float* y, int64_t n) {
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) y[r] = dot(w + r * ld, x, d, static_cast<const T*>(nullptr));
  });
}

void gemv(const Tensor& w, const float* x, float* y) {
  const int64_t n = w.size(0), d = w.size(1), ld = w.stride(0);
  switch (w.scalar_type()) {
    case torch::kFloat: gemv_impl(w.data_ptr<float>(), ld, x, d, y, n); break;
    case torch::kHalf: gemv_impl(w.data_ptr<c10::Half>(), ld, x, d, y, n); break;
    case torch::kBFloat16: gemv_impl(w.data_ptr<c10::BFloat16>(), ld, x, d, y, n); break;
    default: TORCH_CHECK(false, "decode: unsupported weight dtype ", w.scalar_type());
  }
}

// out = x / rms(x) * w  (w already holds Gemma's 1 + weight); out may be x
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

// rotate-half RoPE of `heads` vectors of hd values in place
void rope(float* v, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* p = v + h * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float a = p[i], b = p[i + half];
      p[i] = a * cos[i] - b * sin[i];
      p[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

template <typename T>
void store(T* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

struct Layer {
  Tensor qkv, qkv_bias, o;                                    // (Nq+2Nkv, D), (Nq+2Nkv,) f32 or empty, (D, Nq)
  Tensor attn_norm, post_attn_norm, ffn_norm, post_ffn_norm;  // float32 (D,), each may be empty (none: OLMo 2 has no pre-norms)
  Tensor q_norm, k_norm;  // float32 (hd,) per head, (Hq*hd,) / (Hkv*hd,) over all heads at once (OLMo 2), or empty
  bool qk_whole = false;  // q_norm and k_norm over all heads at once (told by their size in add_layer)
  Tensor ffn;                                                 // (I, (parts+1)*D) neuron-major [in part(s) | out]
  // or a dense FFN's own matrices (set_ffn_matrices): gate (empty: plain), up (I, D), down (D, I); in the
  // engine's dtype, rows contiguous. The model's weights, so that the step holds no copy of them
  Tensor gate, up, down;
  Tensor proxy_a, proxy_b;                                    // the FFN proxy (see ProxyKind)
  // GGUF-quantized matrices (set_quant), used where the dense tensors above are empty
  hire_native::QMat quant[8];  // QuantSlot
  int64_t rope = 0, sliding = 0, act = 0, parts = 2, keep = 0, proxy_kind = 0, proxy_group = 0;
};

enum ProxyKind { DENSE_FFN = 0, INT4PACK = 1, MATRIX = 2, INT4 = 3 };
enum QuantSlot { Q_QKV = 0, Q_Q = 1, Q_K = 2, Q_V = 3, Q_O = 4, Q_GATE = 5, Q_UP = 6, Q_DOWN = 7 };

Tensor opt(const Tensor& t) { return t.numel() ? t : Tensor(); }

}  // namespace

// A model's decode step over the engine's tensors; built once (hire.engine.plan), called per token.
// In the ops' namespace: a variant build's class is then another C++ type, which torch's class
// registry (keyed by type) needs to load both libraries side by side.
namespace HIRE_OPS_NAMESPACE {
struct DecodeModel : torch::CustomClassHolder {
  int64_t hq, hkv, hd, dim;
  double scale, eps;
  double softcap = 0.0;  // the attention scores' soft-cap (set_softcap; 0: none)
  float residual = 1.f;  // each attention and FFN output's multiplier before the residual add (Granite; set_residual)
  Tensor k_cache, v_cache;  // (L, Hkv, S, hd), written in place
  std::vector<Tensor> cos, sin;  // float32 (S, hd) per rotary table
  Tensor final_norm;
  std::vector<Layer> layers;
  bool timing = false;
  // when timing: attention, FFN, and within the FFN its proxy estimates and its selection
  double seconds[4] = {0.0, 0.0, 0.0, 0.0};

  DecodeModel(std::vector<int64_t> dims, double scale, double eps, Tensor k_cache, Tensor v_cache,
              std::vector<Tensor> cos, std::vector<Tensor> sin, Tensor final_norm)
      : scale(scale), eps(eps), k_cache(k_cache), v_cache(v_cache), cos(cos), sin(sin), final_norm(final_norm) {
    TORCH_CHECK(dims.size() == 4, "dims: (query heads, kv heads, head dim, hidden)");
    hq = dims[0], hkv = dims[1], hd = dims[2], dim = dims[3];
    TORCH_CHECK(hq > 0, "query heads must be positive, got ", hq);
    TORCH_CHECK(hkv > 0, "kv heads must be positive, got ", hkv);
    TORCH_CHECK(hd > 0 && hd % 2 == 0, "the head dim must be even and positive (rotate-half RoPE), got ", hd);
    TORCH_CHECK(dim > 0, "the hidden size must be positive, got ", dim);
    TORCH_CHECK(hq % hkv == 0, "query heads ", hq, " are not a multiple of kv heads ", hkv);
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                k_cache.sizes() == v_cache.sizes() && k_cache.size(1) == hkv && k_cache.size(3) == hd,
                "the caches must be contiguous (L, ", hkv, ", S, ", hd, "), got k ", k_cache.sizes(), " and v ",
                v_cache.sizes());
    check_cache_dtypes(k_cache, v_cache);
    TORCH_CHECK(cos.size() == sin.size() && !cos.empty(), "one cos and one sin table per rotary type, got ",
                cos.size(), " cos and ", sin.size(), " sin tables");
    for (size_t i = 0; i < cos.size(); ++i) {
      check_table(cos[i], "cos", i, k_cache.size(2));
      check_table(sin[i], "sin", i, k_cache.size(2));
    }
    check_vec(final_norm, dim, "final norm");
  }

  // a rotary table is read at row `pos` for every position the caches hold: float32 (>= S, hd)
  void check_table(const Tensor& t, const char* what, size_t i, int64_t seq) const {
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.dim() == 2 && t.is_contiguous() && t.size(0) >= seq &&
                t.size(1) == hd, what, " table ", i, " must be float32, 2-D, contiguous and (", seq, "+, ", hd,
                ") (a row per cache position); got dtype ", t.scalar_type(), ", shape ", t.sizes(), ", strides ",
                t.strides());
  }

  static void check_cache_dtypes(const Tensor& k, const Tensor& v) {
    const auto dt = k.scalar_type();
    TORCH_CHECK(dt == torch::kFloat || dt == torch::kHalf || dt == torch::kBFloat16,
                "the caches must be float32, float16 or bfloat16, got ", dt);
    TORCH_CHECK(v.scalar_type() == dt, "the v cache must have the k cache's dtype ", dt, ", got ", v.scalar_type());
  }

  // the fewest positions any rotary table holds: every position a step reads must be below it
  int64_t table_positions(int64_t* which) const {
    int64_t n = cos[0].size(0);
    *which = 0;
    for (size_t i = 0; i < cos.size(); ++i)
      if (std::min(cos[i].size(0), sin[i].size(0)) < n) n = std::min(cos[i].size(0), sin[i].size(0)), *which = i;
    return n;
  }

  void check_position(int64_t pos, const char* op) const {
    int64_t which = 0;
    const int64_t n = table_positions(&which);
    TORCH_CHECK(pos < n, op, ": position ", pos, " is past rotary table ", which, "'s ", n, " positions");
  }

  // a dense matrix the GEMV kernels read row by row from its data pointer: (rows, cols), unit column stride
  static void check_matrix(const Tensor& t, int64_t rows, int64_t cols, const char* what) {
    const auto dt = t.scalar_type();
    TORCH_CHECK(dt == torch::kFloat || dt == torch::kHalf || dt == torch::kBFloat16, what,
                " must be float32, float16 or bfloat16, got ", dt);
    TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.stride(1) == 1 && t.stride(0) >= cols,
                what, " must be (", rows, ", ", cols, ") with contiguous rows, got shape ", t.sizes(), " and strides ",
                t.strides(), " (pass .contiguous())");
  }

  static void check_vec(const Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.numel() == n, what,
                " must be a contiguous float32 vector of ", n);
  }

  // tensors: qkv, qkv_bias, o, attn_norm, post_attn_norm, ffn_norm, post_ffn_norm, q_norm, k_norm,
  //          ffn rows, proxy_a, proxy_b (empty tensors where absent)
  // ints:    rope table, sliding window (0: global), activation, parts, keep, proxy kind, proxy group size
  void add_layer(std::vector<Tensor> t, std::vector<int64_t> ints) {
    TORCH_CHECK(t.size() == 12 && ints.size() == 7, "add_layer: 12 tensors and 7 ints");
    TORCH_CHECK((int64_t)layers.size() < k_cache.size(0), "more layers than the cache holds");
    Layer L;
    L.qkv = t[0], L.qkv_bias = opt(t[1]), L.o = t[2];
    L.attn_norm = opt(t[3]), L.post_attn_norm = opt(t[4]), L.ffn_norm = opt(t[5]), L.post_ffn_norm = opt(t[6]);
    L.q_norm = opt(t[7]), L.k_norm = opt(t[8]), L.ffn = t[9], L.proxy_a = opt(t[10]), L.proxy_b = opt(t[11]);
    L.rope = ints[0], L.sliding = ints[1], L.act = ints[2], L.parts = ints[3], L.keep = ints[4];
    L.proxy_kind = ints[5], L.proxy_group = ints[6];
    const int64_t nq = hq * hd, nkv = hkv * hd;
    L.qkv = opt(L.qkv), L.o = opt(L.o), L.ffn = opt(L.ffn);  // empty: quantized (set_quant)
    if (L.qkv.defined()) check_matrix(L.qkv, nq + 2 * nkv, dim, "qkv");
    if (L.o.defined()) check_matrix(L.o, dim, nq, "o");
    if (L.qkv_bias.defined()) check_vec(L.qkv_bias, nq + 2 * nkv, "qkv bias");
    if (L.attn_norm.defined()) check_vec(L.attn_norm, dim, "attention norm");
    if (L.ffn_norm.defined()) check_vec(L.ffn_norm, dim, "FFN norm");
    if (L.post_attn_norm.defined()) check_vec(L.post_attn_norm, dim, "post-attention norm");
    if (L.post_ffn_norm.defined()) check_vec(L.post_ffn_norm, dim, "post-FFN norm");
    TORCH_CHECK(L.q_norm.defined() == L.k_norm.defined(), "q and k norms come together");
    if (L.q_norm.defined()) {
      L.qk_whole = L.q_norm.numel() == nq && hq > 1;  // over all heads at once, else per head
      check_vec(L.q_norm, L.qk_whole ? nq : hd, "q norm");
      check_vec(L.k_norm, L.qk_whole ? nkv : hd, "k norm");
    }
    TORCH_CHECK(L.rope >= 0 && L.rope < (int64_t)cos.size(), "rotary table ", L.rope, " does not exist");
    TORCH_CHECK(L.sliding >= 0, "the sliding window must be >= 0 positions (0: global attention), got ", L.sliding);
    TORCH_CHECK(L.parts == 1 || L.parts == 2, "parts must be 1 or 2");
    TORCH_CHECK(L.act >= 1 && L.act <= 4, "unknown activation ", L.act);
    if (!L.ffn.defined()) {  // a dense FFN: its matrices come with set_quant or set_ffn_matrices
      layers.push_back(std::move(L));
      return;
    }
    TORCH_CHECK(L.ffn.dim() == 2, "FFN rows must be (I, ", (L.parts + 1) * dim, "), got ", L.ffn.sizes());
    const int64_t neurons = L.ffn.size(0);
    check_matrix(L.ffn, neurons, (L.parts + 1) * dim, "the FFN rows");
    TORCH_CHECK(L.keep >= 1 && L.keep <= neurons, "keep must be in [1, ", neurons, "]");
    if (L.keep < neurons) {
      TORCH_CHECK(L.proxy_kind == INT4PACK || L.proxy_kind == MATRIX || L.proxy_kind == INT4,
                  "a sparse FFN needs a proxy");
      if (L.proxy_kind == INT4) {
        hire_native::check_int4(L.proxy_a, L.proxy_b, L.proxy_group, dim);
        TORCH_CHECK(L.proxy_a.size(0) == L.parts * neurons, "the 4-bit proxy must have ", L.parts * neurons, " rows");
      } else if (L.proxy_kind == MATRIX) {
        TORCH_CHECK(L.proxy_a.defined(), "the proxy matrix is missing");
        check_matrix(L.proxy_a, L.parts * neurons, dim, "the proxy matrix");
      } else {
        TORCH_CHECK(L.proxy_a.defined() && L.proxy_b.defined() && L.proxy_group > 0, "int4pack proxy: packed, scales");
      }
    }
    layers.push_back(std::move(L));
  }

  // a GGUF-quantized matrix of layer l (hire.quant.QTensor's parts, rows layout) in slot (QuantSlot)
  void set_quant(int64_t l, int64_t slot, Tensor codes, Tensor scales, Tensor mins, int64_t bits, int64_t group,
                 int64_t out, int64_t in, int64_t act_bits, Tensor supers) {
    TORCH_CHECK(l >= 0 && l < (int64_t)layers.size(), "set_quant: layer ", l, " was not added");
    TORCH_CHECK(slot >= Q_QKV && slot <= Q_DOWN, "set_quant: unknown slot ", slot);
    Layer& L = layers[l];
    const int64_t nq = hq * hd, nkv = hkv * hd;
    const int64_t want_out[] = {nq + 2 * nkv, nq, nkv, nkv, dim, -1, -1, dim};
    const int64_t want_in[] = {dim, dim, dim, dim, nq, dim, dim, -1};
    TORCH_CHECK((want_out[slot] < 0 || out == want_out[slot]) && (want_in[slot] < 0 || in == want_in[slot]),
                "set_quant: slot ", slot, " of layer ", l, " must be (", want_out[slot], ", ", want_in[slot], "), got (",
                out, ", ", in, ")");
    L.quant[slot] = hire_native::make_qmat(codes, scales, mins, bits, group, in, false, act_bits, supers);
    TORCH_CHECK(L.quant[slot].n == out, "set_quant: ", L.quant[slot].n, " code rows for ", out, " outputs");
  }

  // the dense FFN of layer l (added without FFN rows) as its own 16-bit or float32 matrices: gate (empty
  // for a plain FFN) and up (I, D), down (D, I), each row-contiguous, one dtype
  void set_ffn_matrices(int64_t l, Tensor gate, Tensor up, Tensor down) {
    TORCH_CHECK(l >= 0 && l < (int64_t)layers.size(), "set_ffn_matrices: layer ", l, " was not added");
    Layer& L = layers[l];
    TORCH_CHECK(!L.ffn.defined(), "set_ffn_matrices: layer ", l, " has FFN rows already");
    TORCH_CHECK(up.dim() == 2 && up.size(1) == dim, "set_ffn_matrices: up must be (I, ", dim, "), got ", up.sizes());
    const int64_t neurons = up.size(0);
    TORCH_CHECK(L.keep == neurons, "layer ", l, ": an FFN over its matrices runs dense (keep ", L.keep, " of ", neurons, ")");
    TORCH_CHECK(L.parts == 2 ? gate.numel() > 0 : gate.numel() == 0, "set_ffn_matrices: a gate matrix ",
                L.parts == 2 ? "is missing (gated FFN)" : "for a plain FFN");
    check_matrix(up, neurons, dim, "the FFN's up matrix");
    check_matrix(down, dim, neurons, "the FFN's down matrix");
    if (L.parts == 2) check_matrix(gate, neurons, dim, "the FFN's gate matrix");
    TORCH_CHECK(down.scalar_type() == up.scalar_type() && (L.parts == 1 || gate.scalar_type() == up.scalar_type()),
                "set_ffn_matrices: the matrices must share one dtype");
    L.gate = L.parts == 2 ? gate : Tensor(), L.up = up, L.down = down;
  }

  // every layer has each matrix either dense or quantized
  void check_complete() const {
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& L = layers[l];
      TORCH_CHECK(L.qkv.defined() || L.quant[Q_QKV].defined() ||
                  (L.quant[Q_Q].defined() && L.quant[Q_K].defined() && L.quant[Q_V].defined()),
                  "layer ", l, " has no q/k/v projection");
      TORCH_CHECK(L.o.defined() || L.quant[Q_O].defined(), "layer ", l, " has no output projection");
      if (!L.ffn.defined() && !L.down.defined()) {
        TORCH_CHECK(L.quant[Q_UP].defined() && L.quant[Q_DOWN].defined() && (L.parts == 1 || L.quant[Q_GATE].defined()),
                    "layer ", l, " has no FFN");
        const int64_t neurons = L.quant[Q_UP].n;
        TORCH_CHECK(L.quant[Q_DOWN].width == neurons && (L.parts == 1 || L.quant[Q_GATE].n == neurons),
                    "layer ", l, ": the quantized FFN's matrices disagree on its neurons");
        TORCH_CHECK(L.keep == neurons, "layer ", l, ": a quantized FFN runs dense (keep ", L.keep, " of ", neurons, ")");
      }
    }
  }

  void project_qkv(const Layer& L, const float* x, float* qkv) {
    const int64_t nq = hq * hd, nkv = hkv * hd;
    if (L.qkv.defined()) {
      gemv(L.qkv, x, qkv);
    } else if (L.quant[Q_QKV].defined()) {
      hire_native::qgemv(L.quant[Q_QKV], x, nullptr, nq + 2 * nkv, qkv);
    } else {
      hire_native::qgemv_multi({&L.quant[Q_Q], &L.quant[Q_K], &L.quant[Q_V]}, x, {qkv, qkv + nq, qkv + nq + nkv});
    }
  }

  // the dense FFN over quantized matrices: down (act(gate x) * up x)
  void quant_ffn(const Layer& L, const float* x, float* y) {
    const int64_t neurons = L.quant[Q_UP].n;
    std::vector<float> h(neurons), g(L.parts == 2 ? neurons : 0);
    if (L.parts == 2) {
      hire_native::qgemv_multi({&L.quant[Q_GATE], &L.quant[Q_UP]}, x, {g.data(), h.data()});
      activate_n(g.data(), h.data(), h.data(), neurons, L.act, false);
    } else {
      hire_native::qgemv(L.quant[Q_UP], x, nullptr, neurons, h.data());
      activate_n(h.data(), nullptr, h.data(), neurons, L.act, false);
    }
    hire_native::qgemv(L.quant[Q_DOWN], h.data(), nullptr, dim, y);
  }

  // the dense FFN over its own 16-bit (or float32) matrices: down (act(gate x) * up x)
  void matrix_ffn(const Layer& L, const float* x, float* y) {
    const int64_t neurons = L.up.size(0);
    std::vector<float> h(neurons), g(L.parts == 2 ? neurons : 0);
    if (L.parts == 2) gemv(L.gate, x, g.data());
    gemv(L.up, x, h.data());
    activate_n(L.parts == 2 ? g.data() : h.data(), L.parts == 2 ? h.data() : nullptr, h.data(), neurons, L.act, false);
    gemv(L.down, h.data(), y);
  }

  // h: (D,) float32 residual stream of the token at position pos -> final-normed hidden (D,) float32
  Tensor step(Tensor h_in, int64_t pos) {
    RECORD_FUNCTION("hire::decode_step", std::vector<c10::IValue>({h_in}));  // an operator to the profiler
    TORCH_CHECK(h_in.numel() == dim, "the hidden state has ", h_in.numel(), " values, expected ", dim);
    TORCH_CHECK(pos >= 0 && pos < k_cache.size(2), "position ", pos, " is outside the cache (", k_cache.size(2), ")");
    check_position(pos, "step");
    TORCH_CHECK((int64_t)layers.size() == k_cache.size(0), "the model has ", layers.size(), " of ", k_cache.size(0),
                " layers");
    check_complete();
    auto h = h_in.reshape({dim}).to(torch::kFloat).clone();
    float* hp = h.data_ptr<float>();
    const int64_t nq = hq * hd, nkv = hkv * hd;
    std::vector<float> x(dim), qkv(nq + 2 * nkv), att(nq), y(dim);
    using clock = std::chrono::steady_clock;
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& L = layers[l];
      const auto t0 = timing ? clock::now() : clock::time_point();
      // --- attention
      pre_norm(hp, L.attn_norm, x.data());
      project_qkv(L, x.data(), qkv.data());
      if (L.qkv_bias.defined()) {
        const float* b = L.qkv_bias.data_ptr<float>();
        for (int64_t i = 0; i < nq + 2 * nkv; ++i) qkv[i] += b[i];
      }
      float *q = qkv.data(), *k = q + nq, *v = k + nkv;
      qk_norms(L, q, k);
      const float* c = cos[L.rope].data_ptr<float>() + pos * hd;
      const float* s = sin[L.rope].data_ptr<float>() + pos * hd;
      rope(q, hq, hd, c, s);
      rope(k, hkv, hd, c, s);
      const int64_t end = pos + 1, first = L.sliding ? std::max<int64_t>(0, end - L.sliding) : 0;
      switch (k_cache.scalar_type()) {
        case torch::kHalf: cache_attend<c10::Half>(l, k, v, q, pos, first, end, att.data()); break;
        case torch::kBFloat16: cache_attend<c10::BFloat16>(l, k, v, q, pos, first, end, att.data()); break;
        case torch::kFloat: cache_attend<float>(l, k, v, q, pos, first, end, att.data()); break;
        default: TORCH_CHECK(false, "decode: unsupported cache dtype ", k_cache.scalar_type());
      }
      if (L.o.defined()) {
        gemv(L.o, att.data(), y.data());
      } else {
        hire_native::qgemv(L.quant[Q_O], att.data(), nullptr, dim, y.data());
      }
      if (L.post_attn_norm.defined()) rms_norm(y.data(), L.post_attn_norm.data_ptr<float>(), dim, eps, y.data());
      for (int64_t i = 0; i < dim; ++i) hp[i] += y[i] * residual;
      const auto t1 = timing ? clock::now() : clock::time_point();
      // --- FFN
      pre_norm(hp, L.ffn_norm, x.data());
      ffn(L, x.data(), y.data());
      if (L.post_ffn_norm.defined()) rms_norm(y.data(), L.post_ffn_norm.data_ptr<float>(), dim, eps, y.data());
      for (int64_t i = 0; i < dim; ++i) hp[i] += y[i] * residual;
      if (timing) {
        const auto t2 = clock::now();
        seconds[0] += std::chrono::duration<double>(t1 - t0).count();
        seconds[1] += std::chrono::duration<double>(t2 - t1).count();
      }
    }
    auto out = torch::empty({1, dim}, h.options());
    rms_norm(hp, final_norm.data_ptr<float>(), dim, eps, out.data_ptr<float>());
    return out;
  }

  // a layer's norm before attention or the FFN into out; none (OLMo 2): the residual stream as it is
  void pre_norm(const float* h, const Tensor& w, float* out) const {
    if (w.defined()) {
      rms_norm(h, w.data_ptr<float>(), dim, eps, out);
    } else {
      std::copy(h, h + dim, out);
    }
  }

  // q's and k's RMSNorms, per head (Qwen 3, Gemma 3) or over all heads at once (OLMo 2), in place
  void qk_norms(const Layer& L, float* q, float* k) const {
    if (!L.q_norm.defined()) return;
    if (L.qk_whole) {
      rms_norm(q, L.q_norm.data_ptr<float>(), hq * hd, eps, q);
      rms_norm(k, L.k_norm.data_ptr<float>(), hkv * hd, eps, k);
      return;
    }
    for (int64_t i = 0; i < hq; ++i) rms_norm(q + i * hd, L.q_norm.data_ptr<float>(), hd, eps, q + i * hd);
    for (int64_t i = 0; i < hkv; ++i) rms_norm(k + i * hd, L.k_norm.data_ptr<float>(), hd, eps, k + i * hd);
  }

  // write this token's k, v into layer l's cache at pos, then attend over first..end-1
  template <typename T>
  void cache_attend(int64_t l, const float* k, const float* v, const float* q, int64_t pos, int64_t first,
                    int64_t end, float* out) {
    cache_attend_in<T>(k_cache, v_cache, l, k, v, q, pos, first, end, out);
  }

  // the same over any (L, Hkv, S, hd) cache pair (a batch slot's)
  template <typename T>
  void cache_attend_in(const Tensor& kcache, const Tensor& vcache, int64_t l, const float* k, const float* v,
                       const float* q, int64_t pos, int64_t first, int64_t end, float* out) {
    const int64_t seq = kcache.size(2);
    T* kc = kcache.data_ptr<T>() + l * hkv * seq * hd;
    T* vc = vcache.data_ptr<T>() + l * hkv * seq * hd;
    for (int64_t i = 0; i < hkv; ++i) {
      store(kc + (i * seq + pos) * hd, k + i * hd, hd);
      store(vc + (i * seq + pos) * hd, v + i * hd, hd);
    }
    hire_native::attend<T>(q, kc, vc, seq, first, end, hq, hkv, hd, (float)scale, (float)softcap, out);
  }

  void attend_slot(const Tensor& kcache, const Tensor& vcache, int64_t l, const float* k, const float* v,
                   const float* q, int64_t pos, int64_t first, int64_t end, float* out) {
    switch (kcache.scalar_type()) {
      case torch::kHalf: cache_attend_in<c10::Half>(kcache, vcache, l, k, v, q, pos, first, end, out); break;
      case torch::kBFloat16: cache_attend_in<c10::BFloat16>(kcache, vcache, l, k, v, q, pos, first, end, out); break;
      case torch::kFloat: cache_attend_in<float>(kcache, vcache, l, k, v, q, pos, first, end, out); break;
      default: TORCH_CHECK(false, "decode: unsupported cache dtype ", kcache.scalar_type());
    }
  }

  // W x for the rows of x (B, in): quantized matrices read once for the batch (qgemv_batch, each row
  // bit for bit what qgemv gives it); a 16-bit matrix row by row (gemv)
  void project_batch(const Tensor& dense, const hire_native::QMat& q, const float* x, int64_t batch, int64_t in,
                     int64_t out, float* y) {
    if (dense.defined()) {
      for (int64_t j = 0; j < batch; ++j) gemv(dense, x + j * in, y + j * out);
    } else {
      hire_native::qgemv_batch(q, x, batch, nullptr, out, y);
    }
  }

  void project_qkv_batch(const Layer& L, const float* x, int64_t batch, float* qkv) {
    const int64_t nq = hq * hd, nkv = hkv * hd, n = nq + 2 * nkv;
    if (L.qkv.defined() || L.quant[Q_QKV].defined()) {
      project_batch(L.qkv, L.quant[Q_QKV], x, batch, dim, n, qkv);
      return;
    }
    // q, k, v quantized apart: each for the batch, then interleaved per row as the fused layout is
    std::vector<float> part(batch * nq);
    const int64_t sizes[] = {nq, nkv, nkv}, offsets[] = {0, nq, nq + nkv};
    for (int m = 0; m < 3; ++m) {
      hire_native::qgemv_batch(L.quant[Q_Q + m], x, batch, nullptr, sizes[m], part.data());
      for (int64_t j = 0; j < batch; ++j)
        std::copy_n(part.data() + j * sizes[m], sizes[m], qkv + j * n + offsets[m]);
    }
  }

  // the FFN of a batch: quantized dense (matrices read once), 16-bit dense (row by row), or sparse
  // over the union of the rows' selected neurons (each row's output from every neuron of the union)
  void ffn_batch(const Layer& L, const float* x, int64_t batch, float* y) {
    if (L.down.defined()) {
      for (int64_t j = 0; j < batch; ++j) matrix_ffn(L, x + j * dim, y + j * dim);
      return;
    }
    if (!L.ffn.defined()) {
      const int64_t neurons = L.quant[Q_UP].n;
      std::vector<float> h(batch * neurons), g(L.parts == 2 ? batch * neurons : 0);
      if (L.parts == 2) {
        hire_native::qgemv_batch(L.quant[Q_GATE], x, batch, nullptr, neurons, g.data());
        hire_native::qgemv_batch(L.quant[Q_UP], x, batch, nullptr, neurons, h.data());
        for (int64_t j = 0; j < batch; ++j)
          activate_n(g.data() + j * neurons, h.data() + j * neurons, h.data() + j * neurons, neurons, L.act, false);
      } else {
        hire_native::qgemv_batch(L.quant[Q_UP], x, batch, nullptr, neurons, h.data());
        for (int64_t j = 0; j < batch; ++j)
          activate_n(h.data() + j * neurons, nullptr, h.data() + j * neurons, neurons, L.act, false);
      }
      hire_native::qgemv_batch(L.quant[Q_DOWN], h.data(), batch, nullptr, dim, y);
      return;
    }
    const int64_t neurons = L.ffn.size(0);
    if (L.keep == neurons || batch == 1) {
      for (int64_t j = 0; j < batch; ++j) ffn(L, x + j * dim, y + j * dim);
      if (L.keep < neurons) union_sum += L.keep, union_count += 1;
      return;
    }
    std::vector<char> chosen(neurons, 0);
    for (int64_t j = 0; j < batch; ++j) {
      Tensor scores, est;
      if (L.proxy_kind == INT4) {
        est = torch::empty({neurons}, torch::kFloat);
        hire_native::int4_estimates_into(L.proxy_a, L.proxy_b, L.proxy_group, L.parts, L.act, x + j * dim, dim,
                                         est.data_ptr<float>());
      } else if (L.proxy_kind == INT4PACK) {
        auto xb = torch::from_blob(const_cast<float*>(x + j * dim), {1, dim}, torch::kFloat).to(torch::kBFloat16);
        scores = at::_weight_int4pack_mm_for_cpu(xb, L.proxy_a, L.proxy_group, L.proxy_b);
      } else {
        scores = torch::empty({L.parts * neurons}, torch::kFloat);
        gemv(L.proxy_a, x + j * dim, scores.data_ptr<float>());
      }
      if (!est.defined()) est = hire_native::neuron_estimates(scores, neurons, L.act, L.parts == 2);
      for (int64_t i : hire_native::select_top(est.data_ptr<float>(), neurons, L.keep)) chosen[i] = 1;
    }
    std::vector<int64_t> idx;
    for (int64_t i = 0; i < neurons; ++i)
      if (chosen[i]) idx.push_back(i);
    union_sum += static_cast<int64_t>(idx.size()), union_count += 1;
    for (int64_t j = 0; j < batch; ++j)
      hire_native::ffn_rows(L.ffn, idx.data(), static_cast<int64_t>(idx.size()), x + j * dim, dim, L.parts, L.act,
                            y + j * dim);
  }

  // B tokens, token j at position pos[j] of batch slot slots[j] of the caches (B sequences' next
  // tokens, or a prompt's tokens in one slot)
  // (slots, L, Hkv, S, hd): h (B, D) float32 -> final-normed hidden (B, D) float32. Weights are read
  // once for the batch where they are quantized; each row's arithmetic is step()'s.
  Tensor step_batch(Tensor h_in, Tensor pos_in, Tensor slots_in, Tensor k_slots, Tensor v_slots) {
    RECORD_FUNCTION("hire::decode_step_batch", std::vector<c10::IValue>({h_in}));
    TORCH_CHECK(h_in.dim() == 2 && h_in.size(1) == dim, "step_batch: h must be (batch, ", dim, "), got ", h_in.sizes());
    const int64_t batch = h_in.size(0);
    TORCH_CHECK(pos_in.numel() == batch && slots_in.numel() == batch, "step_batch: one position and one slot per row");
    TORCH_CHECK(k_slots.dim() == 5 && k_slots.is_contiguous() && v_slots.is_contiguous() &&
                k_slots.sizes() == v_slots.sizes() && k_slots.size(1) == (int64_t)layers.size() &&
                k_slots.size(2) == hkv && k_slots.size(4) == hd,
                "step_batch: the caches must be contiguous (slots, ", layers.size(), ", ", hkv, ", S, ", hd, "), got k ",
                k_slots.sizes(), " and v ", v_slots.sizes());
    check_cache_dtypes(k_slots, v_slots);
    check_complete();
    auto pos_t = pos_in.to(torch::kLong).contiguous(), slot_t = slots_in.to(torch::kLong).contiguous();
    const int64_t* pos = pos_t.data_ptr<int64_t>();
    const int64_t* slot = slot_t.data_ptr<int64_t>();
    std::vector<Tensor> kc(batch), vc(batch);
    for (int64_t j = 0; j < batch; ++j) {
      TORCH_CHECK(slot[j] >= 0 && slot[j] < k_slots.size(0), "step_batch: slot ", slot[j], " is not in the caches");
      TORCH_CHECK(pos[j] >= 0 && pos[j] < k_slots.size(3), "step_batch: position ", pos[j], " is outside the cache (",
                  k_slots.size(3), ")");
      check_position(pos[j], "step_batch");  // the slots' caches may be longer than the tables
      // a slot may hold several rows (a prompt's tokens): in increasing positions, each row writes its
      // keys and values before the later rows of its slot attend to them (causal, layer by layer)
      for (int64_t i = 0; i < j; ++i)
        TORCH_CHECK(slot[i] != slot[j] || pos[i] < pos[j], "step_batch: the rows of slot ", slot[j],
                    " must come in increasing positions");
      kc[j] = k_slots[slot[j]], vc[j] = v_slots[slot[j]];
    }
    auto h = h_in.to(torch::kFloat).contiguous().clone();
    float* hp = h.data_ptr<float>();
    const int64_t nq = hq * hd, nkv = hkv * hd, nqkv = nq + 2 * nkv;
    std::vector<float> x(batch * dim), qkv(batch * nqkv), att(batch * nq), y(batch * dim);
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& L = layers[l];
      for (int64_t j = 0; j < batch; ++j)
        pre_norm(hp + j * dim, L.attn_norm, x.data() + j * dim);
      project_qkv_batch(L, x.data(), batch, qkv.data());
      for (int64_t j = 0; j < batch; ++j) {
        float* row = qkv.data() + j * nqkv;
        if (L.qkv_bias.defined()) {
          const float* b = L.qkv_bias.data_ptr<float>();
          for (int64_t i = 0; i < nqkv; ++i) row[i] += b[i];
        }
        float *q = row, *k = q + nq, *v = k + nkv;
        qk_norms(L, q, k);
        const float* c = cos[L.rope].data_ptr<float>() + pos[j] * hd;
        const float* s = sin[L.rope].data_ptr<float>() + pos[j] * hd;
        rope(q, hq, hd, c, s);
        rope(k, hkv, hd, c, s);
        const int64_t end = pos[j] + 1, first = L.sliding ? std::max<int64_t>(0, end - L.sliding) : 0;
        attend_slot(kc[j], vc[j], l, k, v, q, pos[j], first, end, att.data() + j * nq);
      }
      project_batch(L.o, L.quant[Q_O], att.data(), batch, nq, dim, y.data());
      for (int64_t j = 0; j < batch; ++j) {
        float* yj = y.data() + j * dim;
        if (L.post_attn_norm.defined()) rms_norm(yj, L.post_attn_norm.data_ptr<float>(), dim, eps, yj);
        for (int64_t i = 0; i < dim; ++i) hp[j * dim + i] += yj[i] * residual;
        pre_norm(hp + j * dim, L.ffn_norm, x.data() + j * dim);
      }
      ffn_batch(L, x.data(), batch, y.data());
      for (int64_t j = 0; j < batch; ++j) {
        float* yj = y.data() + j * dim;
        if (L.post_ffn_norm.defined()) rms_norm(yj, L.post_ffn_norm.data_ptr<float>(), dim, eps, yj);
        for (int64_t i = 0; i < dim; ++i) hp[j * dim + i] += yj[i] * residual;
      }
    }
    auto out = torch::empty({batch, dim}, h.options());
    for (int64_t j = 0; j < batch; ++j)
      rms_norm(hp + j * dim, final_norm.data_ptr<float>(), dim, eps, out.data_ptr<float>() + j * dim);
    return out;
  }

  // c * tanh(score / c) on every attention score before its softmax (Gemma 2's attn_logit_softcapping); 0: none
  void set_softcap(double c) {
    TORCH_CHECK(c >= 0.0 && std::isfinite(c), "the attention soft-cap must be finite and >= 0 (0: none), got ", c);
    softcap = c;
  }

  // Granite's residual_multiplier: attention and FFN outputs times m before the residual add; 1: none
  void set_residual(double m) {
    TORCH_CHECK(std::isfinite(m) && m > 0.0, "the residual multiplier must be finite and > 0, got ", m);
    residual = static_cast<float>(m);
  }

  // the sparse FFNs' union of selected neurons since the last call: (sum of union sizes, layer steps)
  std::vector<int64_t> take_union() {
    std::vector<int64_t> r = {union_sum, union_count};
    union_sum = union_count = 0;
    return r;
  }
  int64_t union_sum = 0, union_count = 0;

  void ffn(const Layer& L, const float* x, float* y) {
    if (!L.ffn.defined()) {
      L.down.defined() ? matrix_ffn(L, x, y) : quant_ffn(L, x, y);
      return;
    }
    const int64_t neurons = L.ffn.size(0);
    if (L.keep == neurons) {
      hire_native::ffn_rows(L.ffn, nullptr, neurons, x, dim, L.parts, L.act, y);
      return;
    }
    if (L.proxy_kind == INT4) {  // measured A B A B against three parallel calls: 1-4 % faster per token
      hire_native::int4_ffn(L.ffn, L.proxy_a, L.proxy_b, L.proxy_group, L.keep, L.parts, L.act, x, dim, y,
                            timing ? seconds + 2 : nullptr);
      return;
    }
    Tensor scores;
    if (L.proxy_kind == INT4PACK) {
      auto xb = torch::from_blob(const_cast<float*>(x), {1, dim}, torch::kFloat).to(torch::kBFloat16);
      scores = at::_weight_int4pack_mm_for_cpu(xb, L.proxy_a, L.proxy_group, L.proxy_b);
    } else {
      scores = torch::empty({L.parts * neurons}, torch::kFloat);
      gemv(L.proxy_a, x, scores.data_ptr<float>());
    }
    auto est = hire_native::neuron_estimates(scores, neurons, L.act, L.parts == 2);
    auto idx = hire_native::select_top(est.data_ptr<float>(), neurons, L.keep);
    hire_native::ffn_rows(L.ffn, idx.data(), L.keep, x, dim, L.parts, L.act, y);
  }

  void set_timing(bool on) {
    timing = on;
    seconds[0] = seconds[1] = seconds[2] = seconds[3] = 0.0;
  }

  // seconds in attention, the FFN, the FFN's proxy and its selection since set_timing(true)
  std::vector<double> timings() { return {seconds[0], seconds[1], seconds[2], seconds[3]}; }
};
}  // namespace HIRE_OPS_NAMESPACE
using HIRE_OPS_NAMESPACE::DecodeModel;

// y = W x for every row of W, in float32: the dense LM head (its logits then feed a float32 argmax,
// several times faster on CPU than a float16 one). x: (D,), W: (n, D) -> (n,)
Tensor gemv_op(Tensor x, Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1 && w.size(1) == x.numel(), "gemv: W must be (n, ", x.numel(),
              ") with contiguous rows, got ", w.sizes());
  auto xf = x.reshape({x.numel()}).to(torch::kFloat).contiguous();
  auto y = torch::empty({w.size(0)}, xf.options());
  gemv(w, xf.data_ptr<float>(), y.data_ptr<float>());
  return y;
}

HIRE_FRAGMENT_IMPL(HIRE_OPS_NAMESPACE, CPU, m) {
  m.impl("gemv", &gemv_op);
}

HIRE_FRAGMENT(HIRE_OPS_NAMESPACE, m) {
  m.def("gemv(Tensor x, Tensor w) -> Tensor");
  m.class_<DecodeModel>("DecodeModel")
      .def(torch::init<std::vector<int64_t>, double, double, Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>,
                       Tensor>())
      .def("add_layer", &DecodeModel::add_layer)
      .def("set_quant", &DecodeModel::set_quant)
      .def("set_ffn_matrices", &DecodeModel::set_ffn_matrices)
      .def("step", &DecodeModel::step)
      .def("step_batch", &DecodeModel::step_batch)
      .def("take_union", &DecodeModel::take_union)
      .def("set_timing", &DecodeModel::set_timing)
      .def("set_softcap", &DecodeModel::set_softcap)
      .def("set_residual", &DecodeModel::set_residual)
      .def("timings", &DecodeModel::timings);
}
