"""Decode plans: each decoder layer's one-token step in the layout the native decode step reads,
built once from the engine's tensors (no weight copies beyond the FFN's neuron-major buffer that
``HiReFFN.decode_plan()`` already holds).

``LayerPlan`` says what a layer computes; ``native_steps`` hands the plans to
``torch.classes.hire.DecodeModel`` (native/decode.cpp), which runs a whole token in one call. The
engine's eager ``forward`` is the reference the native step is tested against. A model the native
step cannot run (a proxy or activation it has no kernel for, oversampled or grouped selection, a
tensor-parallel shard) keeps the eager path, and ``reason`` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hire import native
from hire.arch import arch_spec, ffn_act, ffn_weights, mlp_module, split_gate_up
from hire.layers import HiReFFN
from hire.proxies import ExactProxy, QuantizedProxy
from hire.quant.tensor import QLinear, QTensor

PROXY_KINDS = {"dense": 0, "int4pack": 1, "matrix": 2, "int4": 3}  # native/decode.cpp's ProxyKind
QUANT_SLOTS = {"qkv": 0, "q": 1, "k": 2, "v": 3, "o": 4, "gate": 5, "up": 6, "down": 7}  # its QuantSlot
EMPTY = torch.empty(0)


class NotFusable(Exception):
    """Why a model keeps the eager decode step (its message is the reason)."""


@dataclass(frozen=True)
class FFNPlan:
    """One FFN's decode step: the ``keep`` best neurons by the proxy's estimate (all of them: dense)
    from the neuron-major ``rows`` [input part(s) | output row]; or a dense FFN over its own matrices,
    GGUF codes (``quant``) or 16-bit (``mats``), with ``rows`` empty."""

    rows: torch.Tensor  # (I, (parts+1)*D)
    parts: int  # 2 gated, 1 plain
    act: str
    keep: int
    proxy_kind: str = "dense"
    proxy_a: torch.Tensor = EMPTY  # int4pack: packed codes; matrix: (parts*I, D) weights
    proxy_b: torch.Tensor = EMPTY  # int4pack: scales and zeros
    proxy_group: int = 0
    quant: tuple[QTensor, ...] = ()  # a GGUF-quantized dense FFN: (gate, up, down) or (up, down); rows empty
    # a 16-bit dense FFN: (gate, up) (I, D) or (up,), then down (D, I), the model's own where they are in
    # the engine's dtype with contiguous rows; rows empty
    mats: tuple[torch.Tensor, ...] = ()

    @property
    def neurons(self) -> int:
        if self.quant or self.mats:
            return (self.quant or self.mats)[-2].shape[0]
        return self.rows.shape[0]

    def dense(self) -> "FFNPlan":
        return FFNPlan(self.rows, self.parts, self.act, self.neurons, quant=self.quant, mats=self.mats)


def ffn_plan(mlp: nn.Module, model: nn.Module, dtype: torch.dtype) -> FFNPlan:
    """The decode plan of one layer's FFN (a HiReFFN prepared for decoding, or a dense MLP)."""
    if isinstance(mlp, HiReFFN):
        plan = mlp.decode_plan()
        if plan.native_act is None or plan.b_in is not None or plan.b_out is not None:
            raise NotFusable("an FFN with biases or an activation without a kernel")
        if plan.keeps_all:
            return FFNPlan(plan.rows, plan.parts, plan.native_act, plan.neurons)
        if not plan.fused:
            raise NotFusable("grouped or oversampled FFN selection (group_size > 1 or oversample > 1)")
        kind, a, b, group = _proxy(plan.proxy)
        return FFNPlan(plan.rows, plan.parts, plan.native_act, plan.keep_groups, kind, a, b, group)
    spec = arch_spec(model)
    parts = _quantized_ffn(spec, mlp)
    if parts is not None:
        act = native.activation_name(ffn_act(spec, mlp))
        if act is None:
            raise NotFusable("an FFN activation without a kernel")
        return FFNPlan(EMPTY, len(parts) - 1, act, parts[-2].shape[0], quant=parts)
    weights = ffn_weights(spec, mlp)
    act = native.activation_name(weights.act)
    if act is None or weights.b_in is not None or weights.b_out is not None:
        raise NotFusable("an FFN with biases or an activation without a kernel")
    # the step reads the model's own matrices (a copy only where their dtype or layout differs): the
    # neuron-major rows of a sparse FFN would be a second copy of the weights
    ins = [weights.w_in, weights.w_up] if weights.gated else [weights.w_in]
    mats = tuple(_rows_in(w, dtype) for w in (*ins, weights.w_out_t.t()))
    return FFNPlan(EMPTY, len(ins), act, weights.neurons, mats=mats)


def _rows_in(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` itself where it is in ``dtype`` with contiguous rows, else such a copy."""
    w = w.detach()
    return w if w.dtype == dtype and w.stride(-1) == 1 else w.to(dtype).contiguous()


def _quantized_ffn(spec, mlp: nn.Module) -> tuple[QTensor, ...] | None:
    """(gate, up, down) or (up, down) QTensors of a GGUF-quantized MLP (None: not quantized)."""
    if spec.ffn == "gated_fused":  # Phi-3: gate and up as row views of the fused matrix
        if not isinstance(mlp.gate_up_proj, QLinear):
            return None
        if not isinstance(mlp.down_proj, QLinear) or mlp.gate_up_proj.bias is not None or mlp.down_proj.bias is not None:
            raise NotFusable("an FFN with some matrices quantized and some not, or with biases")
        return (*split_gate_up(mlp.gate_up_proj.q), mlp.down_proj.q)
    if spec.ffn != "gated":
        return None
    mods = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if not any(isinstance(m, QLinear) for m in mods):
        return None
    if not all(isinstance(m, QLinear) and m.bias is None for m in mods):
        raise NotFusable("an FFN with some matrices quantized and some not, or with biases")
    return tuple(m.q for m in mods)


def _proxy(proxy) -> tuple[str, torch.Tensor, torch.Tensor, int]:
    if isinstance(proxy, QuantizedProxy) and proxy.decode_gemv is not None:
        matrix, gemv = proxy.matrix, proxy.decode_gemv
        if matrix.bits == 4 and matrix.group_size % 64 == 0:
            # the fused 4-bit kernel reads the proxy's own codes and scales (native.int4_estimates)
            return "int4", matrix.packed, matrix.scales, matrix.group_size
        if gemv.kind == "int4pack":
            return "int4pack", gemv.packed, gemv.scales_zeros, matrix.group_size
        if gemv.kind == "dequantize":
            return "matrix", gemv.weight, EMPTY, 0
    if isinstance(proxy, ExactProxy) and proxy.decode_weight is not None:
        return "matrix", proxy.decode_weight, EMPTY, 0
    raise NotFusable(f"an FFN proxy without a native kernel ({type(proxy).__name__})")


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer's decode step (see native/decode.cpp's add_layer for the order)."""

    qkv: torch.Tensor | QTensor | tuple[QTensor, ...]  # (Nq + 2 Nkv, D) in the engine's dtype, or quantized
    qkv_bias: torch.Tensor  # float32 (Nq + 2 Nkv,) or empty
    o: torch.Tensor | QTensor  # (D, Nq)
    norms: tuple[torch.Tensor, ...]  # float32: attention, post-attention, FFN, post-FFN, q, k (empty: absent)
    rope: int
    sliding: int  # 0: global attention
    ffn: FFNPlan

    def native_args(self, hire: bool) -> tuple[list[torch.Tensor], list[int]]:
        f = self.ffn if hire else self.ffn.dense()
        qkv = self.qkv if isinstance(self.qkv, torch.Tensor) else EMPTY
        o = self.o if isinstance(self.o, torch.Tensor) else EMPTY
        tensors = [qkv, self.qkv_bias, o, *self.norms, f.rows, f.proxy_a, f.proxy_b]
        ints = [self.rope, self.sliding, native.ACTIVATIONS[f.act], f.parts, f.keep, PROXY_KINDS[f.proxy_kind],
                f.proxy_group]
        return tensors, ints

    def quant_args(self) -> list[tuple[int, QTensor]]:
        """(slot, matrix) of the layer's quantized matrices, for DecodeModel.set_quant."""
        out = []
        if isinstance(self.qkv, QTensor):
            out.append((QUANT_SLOTS["qkv"], self.qkv))
        elif isinstance(self.qkv, tuple):
            out += [(QUANT_SLOTS[n], q) for n, q in zip("qkv", self.qkv)]
        if isinstance(self.o, QTensor):
            out.append((QUANT_SLOTS["o"], self.o))
        names = ("gate", "up", "down") if len(self.ffn.quant) == 3 else ("up", "down")
        out += [(QUANT_SLOTS[n], q) for n, q in zip(names, self.ffn.quant)]
        return out


def layer_plans(engine) -> list[LayerPlan]:
    """Every layer's plan from a built engine (raises NotFusable with the reason)."""
    spec, model = engine.spec, engine.model
    arch = arch_spec(model)
    eps = {norm.eps for layer in engine.layers for norm in layer.norms.values()} | {engine.norm.eps}
    if len(eps) != 1:
        raise NotFusable(f"norms with different epsilons {sorted(eps)}")
    if any(layer.o_bias is not None for layer in engine.layers):
        raise NotFusable("an attention output bias")
    names = [spec.pre_attention_norm, spec.post_attention_norm, spec.pre_ffn_norm, spec.post_ffn_norm,
             *(spec.qk_norms or (None, None))]
    plans = []
    for layer in engine.layers:
        norms = tuple(layer.norms[n].weight.contiguous() if n is not None else EMPTY for n in names)
        bias = EMPTY if layer.qkv_bias is None else layer.qkv_bias.float().contiguous()
        mlp = mlp_module(arch, layer.module)
        if isinstance(layer.qkv, tuple) and not all(isinstance(q, QTensor) for q in layer.qkv):
            raise NotFusable("q/k/v projections mixed between GGUF codes and 16-bit weights")
        plans.append(LayerPlan(layer.qkv, bias, layer.o, norms, layer.rope, layer.sliding or 0,
                               ffn_plan(mlp, model, engine.dtype)))
    return plans


def native_steps(engine, model_class=None, plans: list[LayerPlan] | None = None) -> tuple[dict[bool, object] | None, str | None]:
    """``({False: dense step, True: HiRE step}, None)``, or ``(None, reason)`` when the model keeps
    the eager step. ``plans``: the engine's layer plans when already built; ``model_class``: another
    build's DecodeModel (tests of a SIMD variant)."""
    if model_class is None and not native.available():
        return None, f"native kernels unavailable ({native.unavailable_reason()})"
    if engine.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None, f"dtype {engine.dtype}"
    if plans is None:
        try:
            plans = layer_plans(engine)
        except NotFusable as exc:
            return None, str(exc)
    cls = model_class or native.decode_model_class()
    steps = {}
    for hire in (False, True):
        step = cls([engine.n_heads, engine.n_kv, engine.head_dim, engine.hidden], engine.scale, engine.norm.eps,
                   engine.k_cache, engine.v_cache, [c for c, _ in engine.rope_tables_f32],
                   [s for _, s in engine.rope_tables_f32], engine.norm.weight.contiguous())
        if engine.attention_softcap:
            step.set_softcap(engine.attention_softcap)
        if engine.residual_multiplier:
            step.set_residual(engine.residual_multiplier)
        for i, plan in enumerate(plans):
            step.add_layer(*plan.native_args(hire))
            if plan.ffn.mats:
                gate, up, down = plan.ffn.mats if len(plan.ffn.mats) == 3 else (EMPTY, *plan.ffn.mats)
                step.set_ffn_matrices(i, gate, up, down)
            for slot, q in plan.quant_args():
                if q.layout != "rows":
                    raise ValueError(f"layer {i}: the decode step reads quantized matrices in the rows layout")
                step.set_quant(i, slot, q.codes, q.scales, q.mins, q.bits, q.group, *q.shape, q.act_bits, q.supers)
        steps[hire] = step
    return steps, None
