"""The one architecture table: where a transformers model keeps what HiRE patches and what the engine reads.

Every room that needs to know a model's layout (``patch``, ``engine``, ``layers.topk_ffn``, ``eval``,
``train``, ``distributed``) looks it up here by ``config.model_type``; none hard-codes attribute names.

The bottom floor: imports nothing from hire but ``errors``, so every room may read it.

Adding an architecture: if its decoder layers, MLP and LM head sit where one of the entries below
has them, add ``"<model_type>": <that entry>`` to ``ARCHITECTURES``; ``sparsify_`` then works. For the
engine's fast decode loop, give the entry an ``EngineSpec`` too (its norms, attention projections,
rotary module), and add the model to ``tests/tiny_models.py`` so the table-driven tests cover it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from hire.errors import HireError


class UnsupportedArchitecture(HireError, ValueError):
    """A model whose ``config.model_type`` the table (or the engine's part of it) does not know."""


@dataclass(frozen=True)
class EngineSpec:
    """What ``hire.engine.Engine``'s own decoder reads of a Llama-like model: module paths and
    attribute names, and the few ways such models differ (Gemma's norms, scale and rotary tables).

    A decoder layer computes, with the residual stream ``h`` in float32:
        a = attention(pre_attention_norm(h));  h += post_attention_norm(a) (or a)
        f = ffn(pre_ffn_norm(h));              h += post_ffn_norm(f) (or f)
    """

    embed: str = "model.embed_tokens"  # the embedding module (Gemma's apply their sqrt(D) scale themselves)
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"  # called as rotary(x, positions[, layer_type])
    rotary_per_layer_type: bool = False  # Gemma 3: local and global layers have their own rotary bases
    # config attribute: per layer 1 where the layer rotates q and k, 0 where it does not (SmolLM3's
    # no_rope_layers, a NoPE layer every fourth); None: every layer rotates
    rope_layers: str | None = None
    attention: str = "self_attn"  # attribute of a decoder layer
    qkv: str | None = None  # one fused q/k/v projection (Phi-3's qkv_proj: q's rows, then k's, then v's)
    q: str = "q_proj"  # attributes of the attention module
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    # RMSNorms of q and k on the attention module: per head (Qwen 3, Gemma 3; weights of head_dim), or
    # over all heads at once (OLMo 2; weights of Hq * head_dim and Hkv * head_dim), told by their size
    qk_norms: tuple[str, str] | None = None
    # attributes of a decoder layer; None: no norm there (OLMo 2 normalises after attention and FFN only)
    pre_attention_norm: str | None = "input_layernorm"
    post_attention_norm: str | None = None  # Gemma normalises the attention output before the residual add
    pre_ffn_norm: str | None = "post_attention_layernorm"  # Llama's name for the norm before its MLP
    post_ffn_norm: str | None = None
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight)
    norm_eps: str = "variance_epsilon"  # the epsilon attribute of the norm modules
    attention_scale: str | None = None  # config attribute s for a 1/sqrt(s) score scale; None: 1/sqrt(head_dim)
    # config attributes of soft-caps c (c * tanh(x / c); the attribute None or 0: none): Gemma 2's
    # attention scores before their softmax, and its logits after the LM head
    attention_softcap: str | None = None
    logit_softcap: str | None = None
    # Granite's multipliers (config attributes; None: none): the embeddings times one, the attention
    # score scale itself (instead of 1/sqrt(...)), each attention and FFN output times one before the
    # residual add, and the logits divided by one after the head
    embedding_multiplier: str | None = None
    attention_multiplier: str | None = None
    residual_multiplier: str | None = None
    logit_divisor: str | None = None


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path to the ModuleList of decoder layers
    # "gated" (gate/up/down), "gated_fused" (Phi-3: gate_up_proj holds gate's rows then up's, activation_fn),
    # "conv1d" (GPT-2 c_fc/c_proj) or "inline" (OPT fc1/fc2 on the layer)
    ffn: str
    mlp: str = "mlp"  # attribute of a decoder layer holding the MLP module
    head: str = "lm_head"
    engine: EngineSpec | None = None  # None: the engine does not run it (the patched model's generate() does)


_LLAMA_ENGINE = EngineSpec()
_GEMMA_NORMS = dict(  # Gemma 2 and 3: four norms a layer, each scaling by (1 + weight)
    post_attention_norm="post_attention_layernorm",
    pre_ffn_norm="pre_feedforward_layernorm",
    post_ffn_norm="post_feedforward_layernorm",
    norm_weight_offset=1.0,
    norm_eps="eps",
    attention_scale="query_pre_attn_scalar",
)
_GEMMA2_ENGINE = EngineSpec(**_GEMMA_NORMS, attention_softcap="attn_logit_softcapping",
                            logit_softcap="final_logit_softcapping")
_GEMMA3_ENGINE = EngineSpec(**_GEMMA_NORMS, rotary_per_layer_type=True, qk_norms=("q_norm", "k_norm"))
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(layers="model.layers", ffn="gated", engine=_LLAMA_ENGINE),
    "mistral": ArchSpec(layers="model.layers", ffn="gated", engine=_LLAMA_ENGINE),
    "qwen2": ArchSpec(layers="model.layers", ffn="gated", engine=_LLAMA_ENGINE),  # + q/k/v biases (the engine adds them)
    "qwen3": ArchSpec(layers="model.layers", ffn="gated", engine=EngineSpec(qk_norms=("q_norm", "k_norm"))),
    # OLMo 2: norms after attention and after the FFN only, q and k normalised over all heads at once
    "olmo2": ArchSpec(layers="model.layers", ffn="gated", engine=EngineSpec(
        pre_attention_norm=None, post_attention_norm="post_attention_layernorm", pre_ffn_norm=None,
        post_ffn_norm="post_feedforward_layernorm", qk_norms=("q_norm", "k_norm"))),
    # Granite: Llama's layout with four multipliers
    "granite": ArchSpec(layers="model.layers", ffn="gated", engine=EngineSpec(
        embedding_multiplier="embedding_multiplier", attention_multiplier="attention_multiplier",
        residual_multiplier="residual_multiplier", logit_divisor="logits_scaling")),
    # SmolLM3: Llama's layout, every fourth layer without RoPE (NoPE)
    "smollm3": ArchSpec(layers="model.layers", ffn="gated", engine=EngineSpec(rope_layers="no_rope_layers")),
    # Gemma 1: Llama's layout with Gemma's norms (its embedding module applies the sqrt(D) scale)
    "gemma": ArchSpec(layers="model.layers", ffn="gated", engine=EngineSpec(norm_weight_offset=1.0, norm_eps="eps")),
    # Gemma 2: Gemma 3's four norms a layer, no q/k norms, one rotary table, soft-capped attention and logits
    "gemma2": ArchSpec(layers="model.layers", ffn="gated", engine=_GEMMA2_ENGINE),
    "gemma3_text": ArchSpec(layers="model.layers", ffn="gated", engine=_GEMMA3_ENGINE),
    # Phi-3 (mini 4k; the long-context files' rope_factors_* tensors are refused by the GGUF loader):
    # Llama's layout with q/k/v and gate/up each fused into one matrix
    "phi3": ArchSpec(layers="model.layers", ffn="gated_fused", engine=EngineSpec(qkv="qkv_proj")),
    "gpt2": ArchSpec(layers="transformer.h", ffn="conv1d"),
    "opt": ArchSpec(layers="model.decoder.layers", ffn="inline"),
}


def config_value(config, attribute: str | None) -> float | None:
    """The number a model's config sets under ``attribute`` (one of EngineSpec's soft-caps or
    multipliers), None where the spec names none or the config leaves it unset (None or 0)."""
    value = getattr(config, attribute, None) if attribute else None
    return float(value) if value else None


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def arch_spec(model: nn.Module) -> ArchSpec:
    """The table entry for ``model`` (by ``model.config.model_type``)."""
    model_type = _model_type(model)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}: HiRE knows {sorted(ARCHITECTURES)}. "
            "For a model with the same layout as one of them, add an entry to hire.arch.ARCHITECTURES "
            "(see the module docstring)."
        )
    return ARCHITECTURES[model_type]


def engine_supported(model_type: str) -> bool:
    """True when hire.engine.Engine runs this architecture (else use the patched model's generate())."""
    spec = ARCHITECTURES.get(model_type)
    return spec is not None and spec.engine is not None


def engine_architectures() -> tuple[str, ...]:
    return tuple(sorted(t for t in ARCHITECTURES if engine_supported(t)))


def engine_spec(model: nn.Module) -> EngineSpec:
    """The engine's part of ``model``'s table entry; a clear error when the engine does not run it."""
    model_type = _model_type(model)
    if not engine_supported(model_type):
        raise UnsupportedArchitecture(
            f"the engine supports {engine_architectures()}, not {model_type!r}; use the patched model's generate() "
            "instead (hire generate does so by itself)"
        )
    return ARCHITECTURES[model_type].engine


def head_module(model: nn.Module) -> nn.Module:
    """The LM head (a HiReLMHead while patched)."""
    return model.get_submodule(arch_spec(model).head)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_spec(model).layers)


class InlineMLP(nn.Module):
    """OPT keeps fc1, its activation and fc2 on the decoder layer itself. While patched, they are
    held here (HiReFFN's ``base_layer``) and the layer's slots run HiReFFN then pass-throughs."""

    def __init__(self, fc1: nn.Linear, act: nn.Module, fc2: nn.Linear):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mlp_module(spec: ArchSpec, layer: nn.Module) -> nn.Module:
    """A decoder layer's MLP as one module (OPT's inline fc1/act/fc2 wrapped in an InlineMLP)."""
    if spec.ffn == "inline":
        return InlineMLP(layer.fc1, layer.activation_fn, layer.fc2)
    return getattr(layer, spec.mlp)


@dataclass
class FFNWeights:
    """An FFN's weights as views of the original parameters (no copies), neuron-major where
    the original allows: row i of ``w_in``/``w_up``/``w_out_t`` all belong to neuron i.

    gated (Llama SwiGLU, Gemma GeGLU): y = (act(x W_in^T) * (x W_up^T)) W_out_t
    plain (GPT-2, OPT):                y = act(x W_in^T + b_in) W_out_t + b_out
    """

    w_in: torch.Tensor  # (I, D)
    w_out_t: torch.Tensor  # (I, D_out)
    act: Callable[[torch.Tensor], torch.Tensor]
    w_up: torch.Tensor | None = None  # (I, D), gated MLPs only
    b_in: torch.Tensor | None = None  # (I,)
    b_out: torch.Tensor | None = None  # (D_out,)

    @property
    def gated(self) -> bool:
        return self.w_up is not None

    @property
    def neurons(self) -> int:
        return self.w_in.shape[0]

    def activations(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Exact neuron activations, of all neurons or of ``rows`` only (reads only those rows).

        # x: (N, D), rows: (m,) or None -> (N, m or I)
        """
        def pick(t):
            return t if t is None or rows is None else t.index_select(0, rows)

        a = self.act(F.linear(x, pick(self.w_in), pick(self.b_in)))
        if self.gated:
            a = a * F.linear(x, pick(self.w_up))
        return a

    def project(self, a: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Output projection from the activations of ``rows`` (reads only those rows of W_out^T).

        # a: (N, m), rows: (m,) or None -> (N, D_out)
        """
        w = self.w_out_t if rows is None else self.w_out_t.index_select(0, rows)
        return F.linear(a, w.t(), self.b_out)


def split_gate_up(w):
    """A fused gate_up matrix (gate's rows, then up's; a tensor or a QTensor) -> (gate, up) row views."""
    half = w.shape[0] // 2
    if isinstance(w, torch.Tensor):
        return w[:half], w[half:]
    return w.take_rows(slice(0, half)), w.take_rows(slice(half, 2 * half))


def ffn_act(spec: ArchSpec, mlp: nn.Module):
    """A gated MLP's activation module."""
    return mlp.activation_fn if spec.ffn == "gated_fused" else mlp.act_fn


def ffn_weights(spec: ArchSpec, mlp: nn.Module) -> FFNWeights:
    """Views of an FFN's weights in HiRE's neuron-major orientation (``mlp`` as ``mlp_module`` gives it)."""
    if spec.ffn == "gated_fused":
        gate, up = split_gate_up(mlp.gate_up_proj.weight)
        return FFNWeights(w_in=gate, w_up=up, w_out_t=mlp.down_proj.weight.t(), act=mlp.activation_fn,
                          b_out=mlp.down_proj.bias)
    if spec.ffn == "gated":
        return FFNWeights(
            w_in=mlp.gate_proj.weight,
            w_up=mlp.up_proj.weight,
            w_out_t=mlp.down_proj.weight.t(),
            act=mlp.act_fn,
            b_in=mlp.gate_proj.bias,
            b_out=mlp.down_proj.bias,
        )
    if spec.ffn == "conv1d":  # GPT-2's Conv1D stores (in, out)
        return FFNWeights(
            w_in=mlp.c_fc.weight.t(), w_out_t=mlp.c_proj.weight, act=mlp.act, b_in=mlp.c_fc.bias, b_out=mlp.c_proj.bias
        )
    if spec.ffn == "inline":
        return FFNWeights(w_in=mlp.fc1.weight, w_out_t=mlp.fc2.weight.t(), act=mlp.act, b_in=mlp.fc1.bias, b_out=mlp.fc2.bias)
    raise AssertionError(spec.ffn)


def apply_rope_freqs(model: nn.Module, factors) -> int:
    """Divide every rotary module's frequencies by ``factors``, one per frequency: the RoPE frequency
    factors a GGUF carries as its ``rope_freqs`` tensor (Llama 3.1 and later: llama.cpp rotates by
    ``pos * theta_i / factors[i]``), which transformers' config of the file does not express. Also
    kept on the config (``config.rope_freqs``) so that a saved copy of the model carries them.
    Returns how many rotary modules it changed; a count of factors that is not the modules' is an error."""
    factors = torch.as_tensor(factors, dtype=torch.float32).reshape(-1)
    changed = 0
    for name, module in model.named_modules():
        inv = getattr(module, "inv_freq", None)
        if not isinstance(inv, torch.Tensor):
            continue
        if inv.numel() != factors.numel():
            raise ValueError(f"{name}: {inv.numel()} rotary frequencies, but the model file has {factors.numel()} "
                             "RoPE frequency factors (rope_freqs); the file and its config do not match")
        module.inv_freq = (inv.float() / factors).to(inv.dtype)
        if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
            module.original_inv_freq = module.inv_freq.clone()
        changed += 1
    if changed == 0:
        raise ValueError(f"the model file has RoPE frequency factors (rope_freqs), but {type(model).__name__} has no "
                         "rotary module to apply them to")
    model.config.rope_freqs = [float(f) for f in factors]
    return changed
