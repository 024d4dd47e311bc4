"""HiReLMHead: exact logits for the proxy's candidate rows, -inf for the rest."""

from __future__ import annotations

import torch
from torch import nn

from hire import native
from hire.config import HeadConfig
from hire.proxies import Cascade
from hire.quant.tensor import QLinear
from hire.topk import rescore, scatter_scores, select_topk

MODES = ("decode", "always", "dense")  # see HiReLMHead and HiReFFN


class HiReLMHead(nn.Module):
    """Wraps the LM head (kept as ``base_layer``).

    When one position's logits are asked for (decoding, and transformers' ``generate`` which
    slices the last position), the candidate rows chosen by ``selector`` get exact logits and
    every other row -inf: greedy, top-k and top-p sampling are then exact whenever the candidates
    contain the tokens they would pick. Several positions at once (prefill, perplexity) stay
    dense: a normalised softmax needs every logit. ``mode="always"`` applies HiRE to every
    position (for measuring), ``mode="dense"`` never.
    """

    def __init__(self, base_layer: nn.Linear, config: HeadConfig, selector: Cascade):
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.selector = selector
        self.mode = "decode"
        self._weight: torch.Tensor | None = None  # the decode layout (prepare_decode)
        self._q = base_layer.q if isinstance(base_layer, QLinear) else None  # a GGUF-quantized head: its codes
        self._native = False

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
        if self._q is not None:  # candidates' rows are read in the head's own block format
            self._native = native.available()
            return
        self._weight = self.base_layer.weight.detach().to(dtype).contiguous()
        self._native = native.usable(self._weight)

    def decode(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact logits of the candidates for one token.  # h: (1, D) -> logits: (1, k'), idx: (1, k')"""
        idx = self.selector.decode_select(h)
        if self._q is not None:  # the candidates' quantized rows, in place (eager: their dequantized rows)
            logits = (native.qgemv(h, self._q, idx[0]) if self._native else self._q.matmul(h)[0, idx[0]]).view(1, -1)
            logits = logits.to(h.dtype)
        elif self._native:  # only the candidates' rows are read, in place
            logits = native.rows_dot(h, self._weight, idx[0]).view(1, -1).to(self._weight.dtype)
        else:  # eager, float32 like the kernel, so that a machine without it picks the same tokens
            logits = native.reference_rows_dot(h, self._weight, idx[0]).view(1, -1).to(self._weight.dtype)
        if self.base_layer.bias is not None:
            logits = logits + self.base_layer.bias[idx]
        return logits, idx

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
