"""The low-rank LM-head proxy (HiRE-LR) trained jointly with a model: float factors with their own
Adam, re-anchored on the current head now and then, exported in the layout HiRE decodes with."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hire.calibrate.train import proxy_kl_loss, rms_adam
from hire.proxies import LowRankProxy
from hire.proxies.quantized_matrix import QuantizedMatrix


class HeadInputs:
    """Captures the LM head's input on every forward pass (the proxy learns from the training batch's)."""

    def __init__(self, model: nn.Module):
        self.value: torch.Tensor | None = None  # (B, T, D), the last forward's
        self._hook = model.get_output_embeddings().register_forward_hook(self._grab)

    def _grab(self, module, args, out) -> None:
        self.value = args[0]

    def remove(self) -> None:
        self._hook.remove()


class HeadProxyFactors:
    """HiRE-LR trained jointly with the model: float factors U (V, r) and V (r, D), scores = U (V h),
    and their Adam (step sizes relative to each factor's RMS). Exported with U in int8."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, lr: float):
        self.u = u.float().requires_grad_(True)  # (V, r)
        self.v = v.float().requires_grad_(True)  # (r, D)
        self.lr = lr
        self.opt = rms_adam([self.u, self.v], lr)

    @classmethod
    def fit(cls, head_weight: torch.Tensor, rank: int, lr: float) -> "HeadProxyFactors":
        """The plain SVD of the head (no head inputs exist before training). # head_weight: (V, D)"""
        init = LowRankProxy.from_weight(head_weight.detach(), rank, u_bits=16)
        return cls(init.u, init.v, lr)

    def refit(self, head_weight: torch.Tensor, states: torch.Tensor) -> None:
        """Re-anchor on the current head, activation-aware on ``states`` (N, D), with a fresh optimizer
        (its step sizes follow the new factors' RMS)."""
        refit = LowRankProxy.from_weight(head_weight.detach(), self.rank, states=states, u_bits=16)
        with torch.no_grad():
            self.u.copy_(refit.u.float())
            self.v.copy_(refit.v.float())
        self.opt = rms_adam([self.u, self.v], self.lr)

    @property
    def rank(self) -> int:
        return self.v.shape[0]

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """# h: (N, D) -> (N, V)"""
        return (h @ self.v.t()) @ self.u.t()

    def learn(self, h: torch.Tensor, head_weight: torch.Tensor, temperature: float) -> float:
        """One Adam step on KL(softmax(W h / T) || softmax(U V h / T)); returns the loss. # h: (N, D)"""
        loss = proxy_kl_loss(h, head_weight, self.u, self.v, temperature)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    def state_dict(self) -> dict[str, Any]:
        return {"proxy_u": self.u.detach(), "proxy_v": self.v.detach(), "proxy_opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.u.copy_(state["proxy_u"])
            self.v.copy_(state["proxy_v"])
        self.opt.load_state_dict(state["proxy_opt"])

    def export(self) -> LowRankProxy:
        """The proxy HiRE decodes with: U in int8 (one scale per row), V in float16."""
        u, v = self.u.detach(), self.v.detach()
        return LowRankProxy(QuantizedMatrix.from_weight(u, bits=8, group_size=self.rank), v.half())
