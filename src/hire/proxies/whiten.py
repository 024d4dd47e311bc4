"""The activation-aware fit's shared part: second moments of the layer's inputs, W^T W, and the
whitened eigendecomposition every rank's factors are slices of (``LowRankProxy.fit_ranks``)."""

from __future__ import annotations

from typing import NamedTuple

import torch

FIT_ROWS = 4096  # rows of W (or states) read at a time, in float64: 29 MB a slice at D = 896


def head_gram(weight) -> torch.Tensor:
    """W^T W in float64, W read ``FIT_ROWS`` rows at a time.  # weight: (n, D) -> (D, D)"""
    width = weight.shape[1]
    gram = torch.zeros(width, width, dtype=torch.float64)
    for start in range(0, weight.shape[0], FIT_ROWS):
        w = weight[start : start + FIT_ROWS].detach().double()
        gram.addmm_(w.t(), w)
    return gram


def second_moment(states: torch.Tensor) -> torch.Tensor:
    """E[x x^T] over the rows of ``states`` in float64, a slice of rows at a time.  # (N, D) -> (D, D)"""
    width = states.shape[1]
    sigma = torch.zeros(width, width, dtype=torch.float64)
    for start in range(0, states.shape[0], FIT_ROWS):
        s = states[start : start + FIT_ROWS].detach().double()
        sigma.addmm_(s.t(), s)
    return sigma / states.shape[0]


class Whitening(NamedTuple):
    """``whitened``'s result: L (Sigma + ridge = L L^T) and the eigendecomposition of (W L)^T (W L),
    float64; every rank's fit under that Sigma is a slice of the eigenvectors."""

    chol: torch.Tensor  # (D, D) lower
    eigvals: torch.Tensor  # (D,) ascending
    eigvecs: torch.Tensor  # (D, D), columns as eigvals


def whitened(weight, states: torch.Tensor | None = None, ridge: float = 1e-4, *,
             sigma: torch.Tensor | None = None, gram: torch.Tensor | None = None) -> Whitening:
    """What every rank's fit under one second moment shares (``LowRankProxy.fit_ranks``' ``whitening``):
    L, with Sigma + ridge = L L^T, and the eigendecomposition of (W L)^T (W L). ``states``, ``sigma`` and
    ``gram`` as in ``LowRankProxy.fit_ranks``; neither states nor sigma: a plain SVD (L = I).
    # weight: (n, D) -> L (D, D), eigenvalues (D,) ascending, eigenvectors (D, D), float64"""
    width = weight.shape[1]
    if sigma is not None:
        if states is not None or sigma.shape != (width, width):
            raise ValueError(f"give states or their second moment sigma ({width}, {width}), not both")
        sigma = sigma + ridge * sigma.diagonal().mean() * torch.eye(width, dtype=torch.float64)
        chol = torch.linalg.cholesky(sigma)
    elif states is None:
        chol = torch.eye(width, dtype=torch.float64)
    else:
        if states.dim() != 2 or states.shape[1] != width:
            raise ValueError(f"calibration states must be (N, {width}), got {tuple(states.shape)}")
        if states.shape[0] < width:
            raise ValueError(
                f"need at least {width} calibration states to whiten a width-{width} layer, got {states.shape[0]}"
            )
        sigma = second_moment(states)  # (D, D)
        sigma += ridge * sigma.diagonal().mean() * torch.eye(width, dtype=torch.float64)
        chol = torch.linalg.cholesky(sigma)  # (D, D) lower
    gram = head_gram(weight) if gram is None else gram
    eigvals, eigvecs = torch.linalg.eigh(chol.t() @ gram @ chol)  # (W L)^T (W L), ascending eigenvalues
    return Whitening(chol, eigvals, eigvecs)
