"""Bytes read from weights per decoded token, dense vs HiRE, in 16-bit storage (a GGUF model run
in its block codes, hire.quant, counts its codes, scales and mins).

Dense counts every weight a token touches once (of the embedding, one row). HiRE counts the
proxies it streams plus the exact rows it computes. The KV cache is left out: it depends on the
context length, not on HiRE.

:func:`gguf_tensor_bytes` is the yardstick for a GGUF model: its file's tensor bytes, which a dense
step over the codes should read about once (a tied head is one tensor: read fully as the head, and
one row of it as the embedding).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from hire.arch import arch_spec, decoder_layers, head_module
from hire.layers import HiReFFN, HiReLMHead
from hire.quant.tensor import QEmbedding, QLinear

BYTES_16 = 2
PARTS = ("head", "ffn", "attention", "embedding", "other")


def _ffn_modules(model: nn.Module) -> list[nn.Module]:
    """Each layer's FFN as a module holding its weights (the original, when patched)."""
    spec = arch_spec(model)
    out = []
    for layer in decoder_layers(model):
        mod = layer.fc1 if spec.ffn == "inline" else getattr(layer, spec.mlp)
        if isinstance(mod, HiReFFN):
            out.append(mod.base_layer)
        elif spec.ffn == "inline":
            out.extend([layer.fc1, layer.fc2])
        else:
            out.append(mod)
    return out


def bytes_per_token(model: nn.Module) -> dict:
    """{"dense": {part: bytes}, "hire": {part: bytes}} over PARTS plus "total". Parts HiRE does
    not touch read the same in both."""
    head = head_module(model)
    head_base = head.base_layer if isinstance(head, HiReLMHead) else head
    embed_module = model.get_input_embeddings()
    embedding = None if isinstance(embed_module, QEmbedding) else embed_module.weight
    head_ids = {id(p) for p in head_base.parameters()}
    ffn_ids = {id(p) for m in _ffn_modules(model) for p in m.parameters()}
    layer_ids = {id(p) for p in decoder_layers(model).parameters()}

    dense = dict.fromkeys(PARTS, 0)
    # one row per token, even when tied to the head
    dense["embedding"] = int(embed_module.q.row_nbytes()) if embedding is None else embedding.shape[1] * BYTES_16
    ffn_modules = {id(m) for f in _ffn_modules(model) for m in f.modules()}
    layer_modules = {id(m) for m in decoder_layers(model).modules()}
    for module in model.modules():
        if isinstance(module, QLinear):
            part = ("head" if module is head_base else "ffn" if id(module) in ffn_modules else
                    "attention" if id(module) in layer_modules else "other")
            dense[part] += module.q.nbytes
    for p in {id(p): p for p in model.parameters()}.values():
        if id(p) in head_ids:
            part = "head"
        elif p is embedding:
            continue
        elif id(p) in ffn_ids:
            part = "ffn"
        elif id(p) in layer_ids and p.dim() >= 2:
            part = "attention"
        else:
            part = "other"  # norms, biases outside the FFN
        dense[part] += p.numel() * BYTES_16

    hire = dict(dense)
    if isinstance(head, HiReLMHead):
        hire["head"] = head.nbytes()
    ffns = [m for m in model.modules() if isinstance(m, HiReFFN)]
    if ffns:
        hire["ffn"] = sum(f.nbytes() for f in ffns) + (dense["ffn"] - sum(f.dense_nbytes() for f in ffns))
    dense["total"] = sum(dense[p] for p in PARTS)
    hire["total"] = sum(hire[p] for p in PARTS)
    # the head in 16 bits, whatever it is stored in: the yardstick of head_bytes_fraction_16bit
    dense["head_16bit"] = head_base.out_features * head_base.in_features * BYTES_16
    return {"dense": dense, "hire": hire}


def gguf_tensor_bytes(path: str | Path) -> int:
    """The bytes of every tensor in the GGUF file ``path``: the sum of its header's tensor sizes (a
    head tied to token_embd is no tensor of its own, so counted once). The tensor table comes from
    the loader's metadata cache (hire.quant.load, keyed on the file's size and mtime) when it is
    complete, else from the ``gguf`` package's reader (~10 s for a 262k-token vocabulary)."""
    from hire.files import verify_cache
    from hire.quant.load import TABLE, check_gguf_header, meta_entry

    path = Path(path)
    check_gguf_header(path)
    entry = meta_entry(path)
    if (entry / TABLE).is_file() and verify_cache(entry) is None:
        return sum(int(t["nbytes"]) for t in json.loads((entry / TABLE).read_text()))
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # gguf raises assorted errors on truncated files
        raise ValueError(f"{path} is a corrupt or truncated GGUF file ({type(err).__name__}: {err})") from err
    return sum(int(t.n_bytes) for t in reader.tensors)
