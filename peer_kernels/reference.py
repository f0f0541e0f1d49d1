"""Plain-PyTorch reference of the two PEER ops: the oracle for the tests, the CPU
fallback of the public ops, and the baseline of the benchmarks.

Both functions have exactly the contracts of the public ops (DESIGN.md sec. 2) and
are differentiable through autograd. They compute in fp32 (fp64 if given fp64) and
materialise the gathered [..., H, k, D] rows: simple and slow on purpose.

    product_key_topk(query, sub_keys, k, candidates=None) -> (scores, indices)
    peer_experts(x, indices, gates, down, up, activation="gelu") -> y
    brute_force_topk(query, sub_keys, k)  top-k over all n*n product keys (tests only)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["product_key_topk", "peer_experts", "brute_force_topk", "activation_fn", "ACTIVATIONS"]

ACTIVATIONS = ("gelu", "relu", "silu", "identity")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def activation_fn(name: str):
    """The expert activation by name: gelu (erf form), relu, silu or identity."""
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu
    if name == "identity":
        return lambda h: h
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def _fp32_math(t: torch.Tensor):
    """The reference's fp32 contract holds under torch.autocast too (autocast would run
    the einsums in bf16 and change the selected experts)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _per_head_keys(query: torch.Tensor, sub_keys: torch.Tensor) -> torch.Tensor:
    """[H, 2, n, Dk/2] view of the sub-keys (shared keys broadcast over heads)."""
    if sub_keys.dim() == 3:
        return sub_keys.unsqueeze(0).expand(query.shape[-2], *sub_keys.shape)
    return sub_keys


def product_key_topk(query: torch.Tensor, sub_keys: torch.Tensor, k: int, candidates: int | None = None):
    """Product-key top-k (He 2024, sec. 2): per head, the top `candidates` sub-keys
    of each query half, then the top `k` of the candidates^2 pair sums.

    query [..., H, Dk]; sub_keys [H, 2, n, Dk//2] or [2, n, Dk//2].
    Returns scores [..., H, k] float32 (float64 for fp64 inputs), sorted descending,
    and indices [..., H, k] int64, index = i * n + j.
    """
    candidates = k if candidates is None else candidates
    cdt = _compute_dtype(query, sub_keys)
    keys = _per_head_keys(query, sub_keys).to(cdt)  # [H, 2, n, Dh]
    n, dh = keys.shape[-2], keys.shape[-1]
    q = query.to(cdt).unflatten(-1, (2, dh))  # [..., H, 2, Dh]
    with _fp32_math(query):
        s = torch.einsum("...hpd,hpnd->...hpn", q, keys)  # [..., H, 2, n]
    top_s, top_i = s.topk(candidates, dim=-1)  # [..., H, 2, c]
    pair_s = top_s[..., 0, :, None] + top_s[..., 1, None, :]  # [..., H, c, c]
    pair_i = top_i[..., 0, :, None] * n + top_i[..., 1, None, :]
    scores, which = pair_s.flatten(-2).topk(k, dim=-1)  # [..., H, k]
    indices = pair_i.flatten(-2).gather(-1, which)
    return scores, indices


def brute_force_topk(query: torch.Tensor, sub_keys: torch.Tensor, k: int):
    """Top-k over all n*n keys [c1_i ; c2_j] by an explicit full score matrix.
    Exponential in memory; only for small n in tests. Same outputs as above."""
    cdt = _compute_dtype(query, sub_keys)
    keys = _per_head_keys(query, sub_keys).to(cdt)
    n, dh = keys.shape[-2], keys.shape[-1]
    full = torch.cat(
        [keys[:, 0, :, None, :].expand(-1, n, n, dh), keys[:, 1, None, :, :].expand(-1, n, n, dh)], dim=-1
    ).reshape(keys.shape[0], n * n, 2 * dh)  # [H, n*n, Dk], row i*n + j
    with _fp32_math(query):
        s = torch.einsum("...hd,hed->...he", query.to(cdt), full)
    return s.topk(k, dim=-1)


def peer_experts(x, indices, gates, down, up, activation: str = "gelu"):
    """y[t] = sum_{h,j} gates[t,h,j] * act(down[e] . x[t]) * up[e], e = indices[t,h,j].

    x [..., D]; indices [..., H, k] int; gates [..., H, k]; down, up [N, D].
    Returns y [..., D] in x's dtype; accumulates in fp32 (fp64 for fp64 inputs).
    """
    act = activation_fn(activation)
    cdt = _compute_dtype(x, gates, down, up)
    idx = indices.long()
    w_down = F.embedding(idx, down).to(cdt)  # [..., H, k, D]
    w_up = F.embedding(idx, up).to(cdt)
    with _fp32_math(x):
        h = torch.einsum("...d,...hkd->...hk", x.to(cdt), w_down)
        coef = act(h) * gates.to(cdt)
        y = torch.einsum("...hk,...hkd->...d", coef, w_up)
    return y.to(x.dtype)
