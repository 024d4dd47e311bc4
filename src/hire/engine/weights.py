"""How the engine holds a model's weights: each projection as the engine reads it (a 16-bit tensor or
a GGUF QTensor), q/k/v fused for one read, and the model's own projections pointed at what the engine
reads, so that the weights are held once."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from hire.arch import EngineSpec, arch_spec
from hire.layers import HiReFFN
from hire.quant.tensor import QLinear, QTensor, fuse_rows


def projection(module: nn.Module):
    """A projection's weight as the engine reads it: the QTensor of a QLinear, else the tensor."""
    return module.q if isinstance(module, QLinear) else module.weight.detach()


def share_rows(rows: torch.Tensor, modules: list[nn.Module]) -> None:
    """Point each 16-bit projection's weight at its rows of ``rows`` (theirs stacked, in order), so
    that the model and the engine read one copy: contiguous row views, the same values and layout."""
    start = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight.data = rows[start : start + n]
        start += n


def fused_qkv(attn: nn.Module, spec: EngineSpec, dtype: torch.dtype):
    """One layer's q, k and v as one matrix (their rows stacked; GGUF codes of different layouts stay
    a tuple) and their stacked bias or None; the model's q, k and v become views of the fused matrix
    where there is one (one copy).  # -> (qkv, qkv_bias)"""
    if spec.qkv is not None:  # Phi-3: one matrix already, q's rows then k's then v's
        fused = getattr(attn, spec.qkv)
        qkv = fused.q if isinstance(fused, QLinear) else fused.weight.detach().contiguous()
        return qkv, None if fused.bias is None else fused.bias.detach().to(dtype)
    q, k, v = (getattr(attn, name) for name in (spec.q, spec.k, spec.v))
    if any(isinstance(p, QLinear) for p in (q, k, v)):
        qkv = fuse_rows([projection(p) for p in (q, k, v)])
        if isinstance(qkv, QTensor):  # the model's q, k and v read the fused codes too
            start = 0
            for p in (q, k, v):
                n = p.q.shape[0]
                p.q = replace(qkv.take_rows(slice(start, start + n)), format=p.q.format)
                start += n
    else:
        qkv = torch.cat([q.weight, k.weight, v.weight]).detach().contiguous()
        share_rows(qkv, [q, k, v])
    qkv_bias = None
    if any(proj.bias is not None for proj in (q, k, v)):  # Qwen2: q, k and v all have one
        qkv_bias = torch.cat([proj.bias if proj.bias is not None else torch.zeros(proj.out_features, dtype=dtype)
                              for proj in (q, k, v)]).detach().to(dtype)
    return qkv, qkv_bias


# the dtypes whose products with a transposed weight torch runs at full speed on the CPU (not float16)
SHARED_DOWN = (torch.bfloat16, torch.float32)


def share_ffn_weights(engine) -> None:
    """With the native step (``engine.plans``), each 16-bit gated HiRE FFN's gate and up weights
    become views of the neuron-major rows its sparse step reads ([gate_i | up_i | down column i]), so
    that they are held once. (A dense FFN's step reads the model's own matrices: nothing to share.)
    The views are row-strided: torch's products read them as fast as contiguous ones from 64 tokens
    on, slower for single tokens, which the native step decodes. In bfloat16 and float32 the down
    projection becomes the transposed view of the rows' down columns too (64 tokens through 1,536 x
    8,960: 5.1 against 4.7 ms in bfloat16, 13.3 against 12.0 in float32); in float16 it keeps its own
    (out, in) copy: torch's float16 product with a transposed weight is ~80x slower (2.9 s against
    36 ms)."""
    if arch_spec(engine.model).ffn != "gated":
        return
    for layer, plan in zip(engine.layers, engine.plans):
        rows = plan.ffn.rows
        hire_ffn = getattr(layer.module, engine.mlp)
        mlp = hire_ffn.base_layer if isinstance(hire_ffn, HiReFFN) else hire_ffn
        gate, up = mlp.gate_proj, mlp.up_proj
        if plan.ffn.quant or isinstance(gate, QLinear) or isinstance(up, QLinear):
            continue
        d = gate.weight.shape[1]
        if rows.dtype != gate.weight.dtype or rows.shape != (gate.weight.shape[0], 2 * d + mlp.down_proj.weight.shape[0]):
            continue
        gate.weight.data = rows[:, :d]
        up.weight.data = rows[:, d : 2 * d]
        if rows.dtype in SHARED_DOWN and isinstance(hire_ffn, HiReFFN):
            down = rows[:, 2 * d :]  # (I, D_out): the down columns, neuron-major
            mlp.down_proj.weight.data = down.t()
            hire_ffn.weights.w_out_t = down  # its view of the old (out, in) weight would keep that alive
