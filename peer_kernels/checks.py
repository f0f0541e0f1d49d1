"""Argument checks at the public boundary: a clear error naming the argument and
what was expected, before any kernel (or torch) sees a bad input."""
from __future__ import annotations

import math
import os

import torch

BACKENDS = ("auto", "triton", "torch")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Host-side integer helpers of the launchers. triton.cdiv and triton.next_power_of_2 are
# ConstexprFunctions: ~4 us per call on the host (2-core CPU machine), paid on every launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, x - 1).bit_length()


def check_float(name: str, t: torch.Tensor, kernel: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = _FLOATS[:3] if kernel else _FLOATS
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have a floating dtype ({names}), got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")


def resolve_backend(backend: str, device: torch.device, kernel_dtypes_ok: bool) -> str:
    """'auto' -> 'triton' on CUDA tensors, 'torch' elsewhere (and for fp64, which the
    kernels do not take). 'triton' on CPU needs TRITON_INTERPRET=1."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and kernel_dtypes_ok else "torch"
    if backend == "triton":
        if not kernel_dtypes_ok:
            raise TypeError("backend='triton' takes float32, float16 and bfloat16 tensors only (use 'torch' for float64)")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device}); on the CPU set TRITON_INTERPRET=1 "
                "before importing peer_kernels to run the kernels in the Triton interpreter"
            )
    return backend


def check_product_key_args(query, sub_keys, k, candidates):
    check_float("query", query)
    check_float("sub_keys", sub_keys)
    check_same_device(query=query, sub_keys=sub_keys)
    if query.dim() < 2:
        raise ValueError(f"query must have shape [..., H, Dk], got {tuple(query.shape)}")
    heads, dk = query.shape[-2], query.shape[-1]
    if dk % 2:
        raise ValueError(f"query's last dim Dk must be even (two halves), got Dk={dk}")
    if sub_keys.dim() == 4:
        if sub_keys.shape[0] != heads or sub_keys.shape[1] != 2 or sub_keys.shape[3] != dk // 2:
            raise ValueError(
                f"sub_keys must have shape [H, 2, n, Dk//2] = [{heads}, 2, n, {dk // 2}] or [2, n, {dk // 2}], "
                f"got {tuple(sub_keys.shape)}"
            )
    elif sub_keys.dim() == 3:
        if sub_keys.shape[0] != 2 or sub_keys.shape[2] != dk // 2:
            raise ValueError(
                f"shared sub_keys must have shape [2, n, Dk//2] = [2, n, {dk // 2}], got {tuple(sub_keys.shape)}"
            )
    else:
        raise ValueError(f"sub_keys must have shape [H, 2, n, Dk//2] or [2, n, Dk//2], got {tuple(sub_keys.shape)}")
    n = sub_keys.shape[-2]
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    candidates = k if candidates is None else candidates
    if not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be a positive int, got {candidates!r}")
    if candidates > n:
        raise ValueError(f"candidates={candidates} is larger than the number of sub-keys n={n}")
    if k > candidates * candidates:
        raise ValueError(f"k={k} is larger than candidates^2={candidates * candidates}")
    return candidates


def check_expert_args(x, indices, gates, down, up, activation):
    from .reference import ACTIVATIONS

    check_float("x", x)
    check_float("gates", gates)
    check_float("down", down)
    check_float("up", up)
    if not isinstance(indices, torch.Tensor) or indices.dtype not in _INTS:
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise TypeError(f"indices must be an int32 or int64 tensor, got {got}")
    check_same_device(x=x, indices=indices, gates=gates, down=down, up=up)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if down.dim() != 2 or up.dim() != 2:
        raise ValueError(f"down and up must have shape [N, D], got {tuple(down.shape)} and {tuple(up.shape)}")
    if down.shape != up.shape:
        raise ValueError(f"down and up must have the same shape [N, D], got {tuple(down.shape)} and {tuple(up.shape)}")
    if down.dtype != up.dtype:
        raise TypeError(f"down and up must have the same dtype, got {down.dtype} and {up.dtype}")
    if x.dim() < 1 or x.shape[-1] != down.shape[1]:
        raise ValueError(f"x must have shape [..., D] with D={down.shape[1]} (the tables' width), got {tuple(x.shape)}")
    lead = tuple(x.shape[:-1])
    if indices.dim() != x.dim() + 1 or tuple(indices.shape[:-2]) != lead:
        raise ValueError(f"indices must have shape [*x.shape[:-1], H, k] = [{', '.join(map(str, lead + ('H', 'k')))}], "
                         f"got {tuple(indices.shape)}")
    if gates.shape != indices.shape:
        raise ValueError(f"gates must have the shape of indices {tuple(indices.shape)}, got {tuple(gates.shape)}")


def check_index_range(indices: torch.Tensor, num_rows: int, name: str = "indices") -> None:
    """Raise if any index is outside [0, num_rows). One small reduction and a host sync;
    skipped while a CUDA graph is being captured (a sync is illegal there)."""
    if indices.numel() == 0:
        return
    if indices.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = torch.aminmax(indices)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_rows:
        raise IndexError(f"{name} must lie in [0, {num_rows}) (the tables' rows), got values in [{lo}, {hi}]")


def is_perfect_square(n: int) -> bool:
    r = math.isqrt(n)
    return r * r == n
