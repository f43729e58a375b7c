"""Truncated matrix entropy and the calibration probes built on it (method §2).

TME of Z [n, D]: centre the rows, take the smaller Gram matrix (ZᵀZ if n >= D else ZZᵀ; both share the non-zero
spectrum), keep the top-k eigenvalues, normalise them to a distribution p and return H1 = -Σ p ln p in nats.
Rank 1 -> 0; k equal eigenvalues -> ln k.

Interpretation (README §Interpretation): the reference clips the Gram matrix at 0 elementwise before the
eigendecomposition; that breaks the shared spectrum and the two identities above, so it is off by default and
available as `clip_gram=True` for reproducing the authors' curves.
"""

from __future__ import annotations

import math

import torch

DEFAULT_K = 50


def truncated_entropy(z: torch.Tensor, k: int = DEFAULT_K, clip_gram: bool = False) -> float:
    """H1 (nats) of the top-k normalised Gram spectrum of z [n, D], in float64; NaN for an (almost) zero matrix."""
    z = z.reshape(-1, z.shape[-1]).double()
    if z.shape[0] < 2:
        return math.nan
    z = z - z.mean(dim=0, keepdim=True)
    gram = z.T @ z if z.shape[0] >= z.shape[1] else z @ z.T  # [d, d], d = min(n, D)
    if clip_gram:
        gram = gram.clamp(min=0)
    eig = torch.linalg.eigvalsh(gram).clamp(min=0).flip(0)  # descending
    if float(eig.sum()) <= 1e-12:
        return math.nan
    top = eig[: min(max(1, k), eig.numel())]
    p = (top / top.sum()).clamp(min=1e-12)
    return float(-(p * p.log()).sum())


def kl_last_token(logits_probe: torch.Tensor, logits_full: torch.Tensor) -> torch.Tensor:
    """KL(softmax(probe) || softmax(full)) per sample, [B, V] -> [B], in float64 (the layer-redundancy probe)."""
    lp = logits_probe.double().log_softmax(-1)
    lf = logits_full.double().log_softmax(-1)
    return (lp.exp() * (lp - lf)).sum(-1)
