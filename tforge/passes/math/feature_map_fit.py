"""Fit Hedgehog feature maps (Zhang et al. 2024) so that linear attention mimics softmax attention.

Per layer, each head ``h`` gets two maps, one for queries and one for keys,
``phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))]`` over features
(:func:`tforge.passes.math.linear_attention.hedgehog_features`). They are trained on the query
and key vectors and the softmax attention weights of calibration data, minimising the
cross-entropy ``-sum_j p_ij log a_ij`` between the softmax weights ``p`` and the normalised
linear weights ``a_ij = phi(q_i) . phi(k_j) / sum_j' phi(q_i) . phi(k_j')`` (causal and padding
masks applied to both), averaged over the unpadded query rows. ``W`` starts at the identity
(``m = dim``) or a scaled random projection, ``b`` at zero; Adam on CPU, full batch, stopped
after ``steps`` steps or ``seconds`` of wall time, whichever comes first; the loss can be
estimated on a random subset of query rows per sequence (``queries``). Torch is imported
lazily: only this fitting needs it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

__all__ = ["FitResult", "FitSample", "fit_hedgehog"]


@dataclasses.dataclass
class FitSample:
    """One calibration sample of one layer: ``q``, ``k`` ``[B, H, N, d]`` as the feature map sees
    them (scale applied to ``q``), softmax weights ``p`` ``[B, H, N, N]``, key mask ``[B, N]``."""

    q: np.ndarray
    k: np.ndarray
    p: np.ndarray
    key_mask: np.ndarray | None


@dataclasses.dataclass
class FitResult:
    wq: np.ndarray  # [H, d, m]
    bq: np.ndarray  # [H, m]
    wk: np.ndarray
    bk: np.ndarray
    loss_start: float
    loss_end: float
    steps: int
    seconds: float


def fit_hedgehog(
    samples: Sequence[FitSample],
    *,
    causal: bool,
    features: int,
    steps: int,
    seconds: float,
    lr: float = 0.05,
    queries: int = 0,
    seed: int = 0,
) -> FitResult:
    """Train per-head query and key maps on ``samples``; deterministic for a given ``seed``.

    ``queries`` (0: all) is the number of query positions per sequence the loss is taken on.
    """
    import torch

    if not samples:
        raise ValueError("fit_hedgehog: no calibration samples")
    heads, dim = samples[0].q.shape[1], samples[0].q.shape[3]
    generator = torch.Generator().manual_seed(seed)

    def init_w() -> torch.Tensor:
        if features == dim:
            w = torch.eye(dim).repeat(heads, 1, 1)
        else:
            w = torch.randn(heads, dim, features, generator=generator) / dim**0.5
        return w.clone().requires_grad_(True)

    wq, wk = init_w(), init_w()
    bq = torch.zeros(heads, features, requires_grad=True)
    bk = torch.zeros(heads, features, requires_grad=True)
    params = [wq, bq, wk, bk]
    # All samples padded to the longest into one batch: one einsum per step instead of a Python
    # loop over short sentences (the loop cost more than the arithmetic).
    rows_total = sum(s.q.shape[0] for s in samples)
    n_max = max(s.q.shape[2] for s in samples)
    q_all = np.zeros((rows_total, heads, n_max, dim), np.float32)
    k_all = np.zeros_like(q_all)
    p_all = np.zeros((rows_total, heads, n_max, n_max), np.float32)
    valid = np.zeros((rows_total, n_max), dtype=bool)  # real (unpadded) positions
    at = 0
    for s in samples:
        b, _, n, _ = s.q.shape
        q_all[at : at + b, :, :n] = s.q
        k_all[at : at + b, :, :n] = s.k
        p_all[at : at + b, :, :n, :n] = s.p
        valid[at : at + b, :n] = True if s.key_mask is None else np.asarray(s.key_mask) != 0
        at += b
    allowed_np = valid[:, None, None, :] & valid[:, None, :, None]
    if causal:
        allowed_np = allowed_np & np.tril(np.ones((n_max, n_max), dtype=bool))
    # The loss is a sum over query rows: a random subset of ``queries`` rows per sequence (all
    # keys kept) gives an unbiased estimate at a fraction of the cost, so more steps fit in the
    # time budget. Padded rows are drawn last and weigh nothing.
    if queries and queries < n_max:
        rng = np.random.default_rng(seed)
        order = np.argsort(~valid + rng.random(valid.shape), axis=1, kind="stable")[:, :queries]
        order.sort(axis=1)
        take = order[:, None, :, None]
        q_all = np.take_along_axis(q_all, take, axis=2)
        p_all = np.take_along_axis(p_all, take, axis=2)
        allowed_np = np.take_along_axis(allowed_np, take, axis=2)
        valid_q = np.take_along_axis(valid, order, axis=1)
    else:
        valid_q = valid
    q_t, k_t, p_t = torch.from_numpy(q_all), torch.from_numpy(k_all), torch.from_numpy(p_all)
    allowed = torch.from_numpy(allowed_np.astype(np.float32))
    rows = torch.from_numpy(valid_q)[:, None, :].expand(rows_total, heads, valid_q.shape[1])
    count = max(int(rows.sum()), 1)

    def phi(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        u = torch.einsum("bhnd,hdm->bhnm", x, w) + b[None, :, None, :]
        return torch.cat([torch.softmax(u, dim=-1), torch.softmax(-u, dim=-1)], dim=-1)

    def loss_fn() -> torch.Tensor:
        a = torch.einsum("bhif,bhjf->bhij", phi(q_t, wq, bq), phi(k_t, wk, bk)) * allowed
        a = a / (a.sum(dim=-1, keepdim=True) + 1e-12)
        ce = -(p_t * torch.log(a + 1e-12)).sum(dim=-1)  # [B, H, N]
        return ce[rows].sum() / count

    optimizer = torch.optim.Adam(params, lr=lr)
    started = time.perf_counter()
    with torch.no_grad():
        loss_start = float(loss_fn())
    done = 0
    while done < steps and time.perf_counter() - started < seconds:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        done += 1
    with torch.no_grad():
        loss_end = float(loss_fn())
    return FitResult(
        wq=wq.detach().numpy().astype(np.float64),
        bq=bq.detach().numpy().astype(np.float64),
        wk=wk.detach().numpy().astype(np.float64),
        bk=bk.detach().numpy().astype(np.float64),
        loss_start=loss_start,
        loss_end=loss_end,
        steps=done,
        seconds=time.perf_counter() - started,
    )
