"""Expert usage and unevenness (He 2024, Table 2), one-shot and accumulated.

With z'_i = sum over tokens and heads of the gate of expert i (or the number of times
it is selected, without gates) and z = z' / |z'|_1:
    usage      = fraction of the N experts with z_i > 0
    unevenness = log N + sum_i z_i log z_i   (KL(z || uniform); 0 log 0 = 0)
Uniform use gives unevenness 0; all mass on one expert gives log N.
"""
from __future__ import annotations

import math

import torch

from .checks import check_index_range

__all__ = ["expert_usage", "ExpertUsage"]


def _check(indices, num_experts, gates):
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64, torch.int16,
                                                                      torch.uint8, torch.int8):
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise TypeError(f"indices must be an integer tensor, got {got}")
    check_index_range(indices, num_experts)
    if gates is not None:
        if not isinstance(gates, torch.Tensor) or not gates.is_floating_point():
            got = gates.dtype if isinstance(gates, torch.Tensor) else type(gates).__name__
            raise TypeError(f"gates must be a floating tensor, got {got}")
        if gates.shape != indices.shape:
            raise ValueError(f"gates must have the shape of indices {tuple(indices.shape)}, got {tuple(gates.shape)}")
        if gates.device != indices.device:
            raise ValueError(f"gates and indices must be on one device, got {gates.device} and {indices.device}")
        if gates.numel() and bool((gates < 0).any()):
            raise ValueError("gates must be non-negative (softmax, relu or sigmoid gates) for the usage metrics")


def _counts(indices, num_experts, gates, out=None):
    """z' [num_experts] float64 on indices' device, added into `out` if given.
    index_add_ rather than bincount(weights=): deterministic on CUDA under
    torch.use_deterministic_algorithms (weighted bincount raises there)."""
    if out is None:
        out = torch.zeros(num_experts, dtype=torch.float64, device=indices.device)
    idx = indices.reshape(-1).long()
    w = torch.ones_like(idx, dtype=torch.float64) if gates is None else gates.detach().reshape(-1).double()
    return out.index_add_(0, idx.to(out.device), w.to(out.device))


def _metrics(counts: torch.Tensor) -> dict:
    n = counts.numel()
    total = counts.sum()
    used = int((counts > 0).sum())
    if float(total) <= 0.0:
        # nothing routed (or all gates 0): no distribution to compare with uniform
        return {"usage": used / n, "unevenness": float("nan"), "counts": counts}
    z = counts / total
    nz = z[z > 0]
    return {"usage": used / n, "unevenness": math.log(n) + float((nz * nz.log()).sum()), "counts": counts}


def expert_usage(indices: torch.Tensor, num_experts: int, gates: torch.Tensor | None = None) -> dict:
    """Expert usage and unevenness of one batch of routing decisions (paper Table 2).

    Args:
        indices: [..., H, k] (any shape) integer expert ids in [0, num_experts).
        num_experts: N (heads * N for PEER(separate_experts_per_head=True)).
        gates: optional non-negative weights, same shape as indices: z'_i = sum of the
            gates of expert i; None: z'_i = how often expert i is selected.

    Returns dict(usage=float in [0, 1], unevenness=float >= 0 (nan if z' is all zero),
    counts=z' as a float64 [num_experts] tensor on indices' device).
    """
    _check(indices, num_experts, gates)
    return _metrics(_counts(indices, num_experts, gates))


class ExpertUsage:
    """Accumulates z' over many batches; `compute()` gives what `expert_usage` gives on
    the concatenation of all batches.

        tracker = ExpertUsage(num_experts)
        tracker.update(indices, gates)     # per step, [..., H, k]
        tracker.compute()                  # {"usage", "unevenness", "counts"}
        tracker.reset()

    The float64 vector of size num_experts lives on `device`, or on the device of the
    first indices seen. Use gates in every update or in none (mixing counts with
    gate mass is refused).
    """

    def __init__(self, num_experts: int, device: torch.device | str | None = None):
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        self.num_experts = num_experts
        self.counts = None if device is None else torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.weighted: bool | None = None  # set by the first update
        self.updates = 0

    @torch.no_grad()
    def update(self, indices: torch.Tensor, gates: torch.Tensor | None = None) -> None:
        _check(indices, self.num_experts, gates)
        weighted = gates is not None
        if self.weighted is not None and weighted != self.weighted:
            raise ValueError("ExpertUsage: every update must pass gates, or none must "
                             f"(the first update {'had' if self.weighted else 'had no'} gates)")
        if self.counts is None:
            self.counts = torch.zeros(self.num_experts, dtype=torch.float64, device=indices.device)
        _counts(indices, self.num_experts, gates, out=self.counts)
        self.weighted = weighted
        self.updates += 1

    def compute(self) -> dict:
        """dict(usage, unevenness, counts) over everything since the last reset."""
        counts = self.counts if self.counts is not None else torch.zeros(self.num_experts, dtype=torch.float64)
        return _metrics(counts.clone())

    def reset(self) -> None:
        if self.counts is not None:
            self.counts.zero_()
        self.weighted = None
        self.updates = 0

    def __repr__(self) -> str:
        return f"ExpertUsage(num_experts={self.num_experts}, updates={self.updates})"
