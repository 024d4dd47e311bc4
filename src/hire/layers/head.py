"""HiReLMHead: exact logits for the proxy's candidate rows, -inf for the rest; ``exact_logits``, the
one exact head every path computes its logits with; ``TailBound``, what exact sampling needs
past the candidates (hire.engine.sampling, docs/sampling.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from hire import native
from hire.arch import arch_spec, config_value
from hire.config import HeadConfig
from hire.proxies import Cascade, LowRankProxy
from hire.quant.tensor import QLinear, QTensor
from hire.topk import rescore, scatter_scores, select_topk

MODES = ("decode", "always", "dense")  # see HiReLMHead and HiReFFN

# A tail row's logit bound is its first-pass proxy score plus TAIL_MARGIN times the row's proxy-error
# spread over the calibration states (LowRankProxy.spread). Chosen on held-out text
# (benchmarks/sampling.py, docs/sampling.md): a bound a row exceeds makes sampling inexact for that row,
# a wide one makes rejection sampling draw (and reject) more tail rows.
TAIL_MARGIN = 8.0


def exact_logits(h: torch.Tensor, weight: torch.Tensor | QTensor, rows: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, use_native: bool | None = None,
                 logit_map: "LogitMap | None" = None) -> torch.Tensor:
    """The exact head, the one function every path computes logits with (HiRE's candidates, the dense
    head, a batch's union, a sampled tail row): float32, the head's bias added on every path.
    ``weight`` is the head in its decode form: a 16-bit tensor or a GGUF QTensor (read in its codes).
    ``use_native``: the kernels or the eager path, as the caller decided when it was prepared (a layer
    prepared inside ``native.disabled()`` stays eager); None decides now. ``logit_map``: what the model
    does to its logits after the head (Granite divides them, Gemma 2 soft-caps them; ``LogitMap``,
    increasing, so it never changes which rows are the largest).
    # h: (B, D), rows: (m,) or None (every row) -> float32 (B, m) or (B, V)"""
    batch = h.shape[0]
    if use_native is None:
        use_native = native_rows_for(weight)
    if isinstance(weight, QTensor):
        if use_native:  # each row's codes read once for the B tokens
            out = native.qgemv(h, weight, rows).view(1, -1) if batch == 1 else native.qgemv_batch(h, weight, rows)
        else:  # eager: the dequantized blocks (every row: the codes are read block by block)
            out = weight.matmul(h) if rows is None else weight.matmul(h)[:, rows]
    elif use_native:  # float32 accumulation, rows split across threads
        if rows is None:
            out = torch.stack([native.gemv(h[j : j + 1], weight) for j in range(batch)])
        else:
            out = torch.stack([native.rows_dot(h[j : j + 1], weight, rows) for j in range(batch)])
    else:  # eager, float32 like the kernels, so that a machine without them picks the same tokens
        picked = weight if rows is None else weight.index_select(0, rows)
        out = F.linear(h.float(), picked.float())
    if bias is not None:
        out = out + (bias if rows is None else bias.index_select(0, rows)).float()
    return out if logit_map is None else logit_map(out)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """c * tanh(x / c), as transformers' Gemma 2 caps its logits."""
    return torch.tanh(x / cap) * cap


@dataclass(frozen=True)
class LogitMap:
    """An increasing map a model applies to its logits after the head: times ``scale`` (Granite's
    1 / logits_scaling), then soft-capped at ``cap`` (Gemma 2's final_logit_softcapping)."""

    scale: float = 1.0
    cap: float | None = None

    @classmethod
    def of(cls, model: nn.Module) -> "LogitMap | None":
        """The map ``model``'s forward applies after its head (its EngineSpec's ``logit_divisor`` and
        ``logit_softcap``), None where it is the identity."""
        spec = arch_spec(model).engine
        if spec is None:
            return None
        divisor = config_value(model.config, spec.logit_divisor)
        if divisor is not None and divisor <= 0:
            raise ValueError(f"{spec.logit_divisor} must be positive, got {divisor}")
        out = cls(1.0 / divisor if divisor else 1.0, config_value(model.config, spec.logit_softcap))
        return None if out == cls() else out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale if self.scale != 1.0 else x
        return soft_cap(x, self.cap) if self.cap else x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The logits before the map (a capped value is clamped just inside the cap first)."""
        if self.cap:
            y = torch.atanh((y / self.cap).clamp(-1 + 1e-6, 1 - 1e-6)) * self.cap
        return y / self.scale if self.scale != 1.0 else y


def native_rows_for(weight: torch.Tensor | QTensor) -> bool:
    """Whether ``exact_logits`` can read ``weight`` with the native kernels (built, and a layout they take)."""
    if isinstance(weight, QTensor):
        return native.available() and weight.layout == "rows"
    return native.usable(weight)


class TailBound:
    """One token's view past its candidates, for sampling (hire.engine.sampling): an upper bound
    on every vocabulary row's logit, and the exact logits of any rows on demand."""

    def __init__(self, bound: torch.Tensor, h: torch.Tensor, weight: torch.Tensor | QTensor,
                 bias: torch.Tensor | None, use_native: bool | None = None, logit_map: LogitMap | None = None):
        # (1, V) float32: first-pass score + margin (the sampler ignores the candidates'), mapped as the
        # logits are (an increasing map keeps it a bound)
        self.bound = bound if logit_map is None else logit_map(bound)
        self.h, self.weight, self.bias, self.use_native, self.logit_map = h, weight, bias, use_native, logit_map
        self._dense: torch.Tensor | None = None

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Exact logits of ``rows``.  # rows: (m,) -> float32 (m,)"""
        return exact_logits(self.h, self.weight, rows, self.bias, self.use_native, self.logit_map)[0]

    def dense(self) -> torch.Tensor:
        """Exact logits of every row, computed once.  # -> float32 (1, V)"""
        if self._dense is None:
            self._dense = exact_logits(self.h, self.weight, None, self.bias, self.use_native, self.logit_map)
        return self._dense


class HiReLMHead(nn.Module):
    """Wraps the LM head (kept as ``base_layer``).

    When one position's logits are asked for (decoding, and transformers' ``generate`` which
    slices the last position), the candidate rows chosen by ``selector`` get exact logits and
    every other row -inf: greedy and top-k sampling are then exact whenever the candidates contain
    the tokens they would pick. Temperature and top-p sampling need the rest of the vocabulary too:
    the engine's sampler draws past the candidates with ``tail`` (rejection sampling against the
    proxy's bound, exact wherever the bound holds: docs/sampling.md); the patched model's
    ``forward`` (transformers' ``generate``) has no such sampler and samples among the candidates
    only. Several positions at once (prefill, perplexity) stay
    dense: a normalised softmax needs every logit. ``mode="always"`` applies HiRE to every
    position (for measuring), ``mode="dense"`` never.
    """

    def __init__(self, base_layer: nn.Linear, config: HeadConfig, selector: Cascade,
                 logit_map: LogitMap | None = None):
        super().__init__()
        self.base_layer = base_layer
        # what the model does to its logits after the head (Gemma 2's cap, Granite's divisor): the decode
        # paths apply it to the exact logits they return; forward leaves it to the model's own forward
        self.logit_map = logit_map
        self.config = config
        self.selector = selector
        self.mode = "decode"
        self._weight: torch.Tensor | None = None  # the decode layout (prepare_decode)
        self._q = base_layer.q if isinstance(base_layer, QLinear) else None  # a GGUF-quantized head: its codes
        self.tail_margin = TAIL_MARGIN  # the tail bound's margin in proxy-error spreads (tail)
        self.native_rows = False  # exact rows on the native kernels (decided by prepare_decode)

    @property
    def weight(self) -> torch.Tensor:  # transformers reads the head's weight (tying, resizing)
        return self.base_layer.weight

    @property
    def vocab_size(self) -> int:
        # a quantized head's .weight dequantizes the whole matrix: its codes know the shape
        return self._q.shape[0] if self._q is not None else self.base_layer.weight.shape[0]

    def candidate_logits(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact logits of the candidate rows.

        # h: (N, D) -> logits: (N, k'), idx: (N, k')
        """
        idx = self.selector.select(h)
        logits = rescore(self.base_layer.weight, h, idx)
        if self.base_layer.bias is not None:
            logits = logits + self.base_layer.bias[idx]
        return logits, idx

    def topk(self, h: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The approximate top-k logits and their token ids, sorted descending.

        # h: (N, D) -> values: (N, k), idx: (N, k)
        """
        logits, idx = self.candidate_logits(h)
        return select_topk(logits, idx, self.config.k if k is None else k)

    def prepare_decode(self, dtype: torch.dtype) -> None:
        """Fix the decode-time form: proxies on fused kernels, the head weight in ``dtype``."""
        self.selector.prepare_decode(dtype)
        first = self.selector.proxies[0]
        if self.selector.blocks and isinstance(first, LowRankProxy):  # the first pass block by block, made now
            first.block_pack(self.selector.blocks)
        if self._q is None:  # else the candidates' rows are read in the head's own block format (exact_logits)
            self._weight = self.base_layer.weight.detach().to(dtype).contiguous()
        self.native_rows = native_rows_for(self.decode_weight)

    @property
    def decode_weight(self) -> torch.Tensor | QTensor:
        """The head as decoding reads it: the GGUF codes of a quantized head, else the 16-bit decode
        layout (prepare_decode)."""
        if self._q is not None:
            return self._q
        if self._weight is None:
            raise RuntimeError("the head has no decode layout yet: call prepare_decode(dtype) first")
        return self._weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def decode(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact float32 logits of the candidates for one token (``exact_logits``: only their rows are
        read, in place).  # h: (1, D) -> logits: (1, k'), idx: (1, k')"""
        idx = self.selector.decode_select(h)
        return exact_logits(h, self.decode_weight, idx[0], self.bias, self.native_rows, self.logit_map), idx

    def select_union(self, h: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The union of B tokens' candidates (ascending) and one token's candidate count. A one-stage
        low-rank selector with its block-major pack reads U once for the B tokens
        (LowRankProxy.decode_local_topk_batch); otherwise each token is selected on its own.
        # h: (B, D) -> union (m,)"""
        sel = self.selector
        first = sel.proxies[0]
        if len(sel.proxies) == 1 and sel.blocks and isinstance(first, LowRankProxy) \
                and first.block_pack(sel.blocks) is not None:
            rows, union = first.decode_local_topk_batch(h, sel.keep[0], sel.blocks)
            return union, rows.shape[1]
        picks = [sel.decode_select(h[j : j + 1])[0] for j in range(h.shape[0])]  # (k',) each
        if len(picks) == 1:
            return picks[0], picks[0].numel()
        # (m,) sorted; a mask over the vocabulary, not a sort of B * k' ids (Gemma, B 8: 0.6 ms against 1.2)
        member = torch.zeros(self.vocab_size, dtype=torch.bool)
        member[torch.cat(picks)] = True
        return member.nonzero()[:, 0], picks[0].numel()

    def exact_rows(self, h: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Exact float32 logits of ``rows`` (None: all).  # h: (B, D), rows: (m,) -> (B, m)"""
        return exact_logits(h, self.decode_weight, rows, self.bias, self.native_rows, self.logit_map)

    def tail(self, h: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor) -> TailBound:
        """What sampling needs past this token's candidates ``idx`` (exact ``logits``): every row's
        bound, the first-pass score plus ``tail_margin`` proxy-error spreads (Cascade.decode_bound).
        Costs a second first pass over the proxy (its fused kernel keeps only the selection).
        # h: (1, D), logits/idx: (1, m) -> TailBound over (1, V)"""
        bound = self.selector.decode_bound(h, self.tail_margin, logits, idx)
        return TailBound(bound, h, self.decode_weight, self.bias, self.native_rows, self.logit_map)

    def log_mass(self, h: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Every row's expected exp(logit), in log form, from the first-pass proxy (Cascade.decode_log_mass:
        the normaliser's tail of a HiRE step's log-probabilities, hire.engine.logprobs). Costs a second
        first pass over the proxy. With a logit map (Gemma 2's cap, Granite's divisor) the estimate runs
        on the logits before it (the proxy's units) and is mapped after: a plug-in estimate, like the
        rest of the tail's.  # h: (1, D), logits/idx: (1, m) -> float32 (1, V)"""
        if self.logit_map is None:
            return self.selector.decode_log_mass(h, logits, idx)
        return self.logit_map(self.selector.decode_log_mass(h, self.logit_map.inverse(logits), idx))

    def nbytes(self) -> int:
        """Bytes read per token: the proxies plus the k' exact rows (16 bits, or the head's GGUF codes)."""
        if self._q is not None:
            return self.selector.nbytes() + int(self.selector.keep[-1] * self._q.row_nbytes())
        return self.selector.head_nbytes()

    def dense_nbytes(self) -> int:
        return self._q.nbytes if self._q is not None else self.base_layer.weight.numel() * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D) -> logits: (B, T, V)
        positions = x.shape[-2] if x.dim() >= 2 else 1
        if self.mode == "dense" or (self.mode == "decode" and positions != 1):
            return self.base_layer(x)
        h = x.reshape(-1, x.shape[-1])  # (N, D)
        logits, idx = self.candidate_logits(h)
        return scatter_scores(self.vocab_size, idx, logits).reshape(*x.shape[:-1], self.vocab_size)

    def extra_repr(self) -> str:
        c = self.config
        return f"proxy={c.proxy}, k={c.k}, candidates={c.candidates}, mode={self.mode}"
