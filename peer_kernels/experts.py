"""peer_experts: launchers of the expert kernels (csrc_triton/peer_experts_{fwd,bwd}.py),
their registered torch ops with autograd, and the public function.

Chain: peer_experts_fwd_kernel -> _launch_fwd -> peer_kernels::peer_experts (custom op,
backward peer_kernels::peer_experts_backward -> peer_experts_bwd_*_kernel; in eager mode the
same bodies through an autograd.Function, eager.py) -> peer_experts() -> PEER.
"""
from __future__ import annotations

import torch

from . import reference
from .checks import cdiv, check_expert_args, check_index_range, next_pow2, resolve_backend
from .csrc_triton.activations import ACT_CODES
from .csrc_triton.peer_experts_bwd import (
    peer_experts_bwd_chunks_kernel,
    peer_experts_bwd_long_rows_kernel,
    peer_experts_bwd_tables_kernel,
    peer_experts_bwd_token_kernel,
)
from .csrc_triton.index_check import expert_ids_in_range_kernel
from .csrc_triton.peer_experts_fwd import peer_experts_fwd_kernel
from .eager import eager_function, use_registered_op
from .launch import fast_launch
from .segments import sorted_segments

__all__ = ["peer_experts", "BACKWARD_MODES", "VALIDATE_MODES"]

BACKWARD_MODES = ("sorted", "atomic")
DEFAULT_BACKWARD = "sorted"
VALIDATE_MODES = ("off", "sync", "async")
# a table row selected more than this many times (a hot expert) is summed by several programs
# (CHUNK occurrences each, partials added in a fixed order) instead of one
LONG_ROW_CHUNK = 512
# tables kernel: rows of a gradient table per program, occurrences per step (H200 sweep in
# bench/dev_experts.py: 16 rows x 2 occurrences 1.42 ms, 4 x 4 1.45 ms)
TABLES_ROWS, TABLES_BLOCK_J = 16, 2


def _validate_mode(validate, device: torch.device) -> str:
    """validate= of peer_experts -> one of VALIDATE_MODES. True: "async" on CUDA (a
    device assert, no host sync), "sync" elsewhere (the CPU has nothing to overlap)."""
    if validate is True:
        return "async" if device.type == "cuda" else "sync"
    if validate is False:
        return "off"
    if validate in ("sync", "async"):
        return validate if device.type == "cuda" else "sync"
    raise ValueError(f"validate must be True, False, 'sync' or 'async', got {validate!r}")


def _check_ids(idx: torch.Tensor, num_rows: int, mode: str) -> None:
    if mode == "sync" or (mode == "async" and not idx.is_cuda):
        check_index_range(idx, num_rows)
    elif mode == "async" and idx.numel() > 0:
        block = 1024
        fast_launch(expert_ids_in_range_kernel)[(cdiv(idx.numel(), block),)](
            idx, idx.numel(), num_rows, BLOCK=block)


def _tile_config(d: int):
    """(D_PAD, BLOCK_S, num_warps): about 8K elements per gathered tile."""
    d_pad = max(16, next_pow2(d))
    block_s = max(1, min(16, 8192 // d_pad))
    num_warps = 4 if d_pad <= 1024 else 8
    return d_pad, block_s, num_warps


def _launch_fwd(x, idx, gates, down, up, activation):
    """x [T, D], idx/gates [T, HK] -> y [T, D] (x's dtype), pre [T, HK] fp32."""
    t, d = x.shape
    hk = idx.shape[1]
    y = torch.empty_like(x)
    pre = torch.empty((t, hk), device=x.device, dtype=torch.float32)
    if t > 0:
        d_pad, block_s, warps = _tile_config(d)
        fast_launch(peer_experts_fwd_kernel)[(t,)](
            x, idx, gates, down, up, y, pre,
            D=d, D_PAD=d_pad, HK=hk, BLOCK_S=block_s, ACT=ACT_CODES[activation], num_warps=warps,
        )
    return y, pre


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return side


def _beside(device: torch.device, side_work, work):
    """side_work() on a side stream while work() runs on the current stream, then joins
    (tensors made by the current stream before the call may be used by both). CPU: in turn."""
    if device.type != "cuda":
        side_work()
        work()
        return
    main = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        side_work()
    work()
    main.wait_stream(side)


def _sorted_segments_overlapped(idx: torch.Tensor, num_rows: int, work):
    """sorted_segments(idx) on a side stream while `work()` (the token kernel) runs on the
    current stream: the sort only needs the ids."""
    out = []
    _beside(idx.device, lambda: out.extend(sorted_segments(idx, num_rows)), work)
    if idx.is_cuda:
        for t in out:  # allocated on the side stream, used (and freed) on the current one
            t.record_stream(torch.cuda.current_stream(idx.device))
    return tuple(out)


def _launch_bwd(dy, x, idx, gates, down, up, pre, activation, mode):
    t, d = x.shape
    hk = idx.shape[1]
    n_rows = down.shape[0]
    d_pad, block_s, warps = _tile_config(d)
    act = ACT_CODES[activation]
    dx = torch.empty_like(x)
    dgates = torch.empty_like(gates)
    if mode == "atomic":
        acc_dtype = torch.float32
        ddown = torch.zeros(down.shape, device=down.device, dtype=acc_dtype)
        dup = torch.zeros(up.shape, device=up.device, dtype=acc_dtype)
        if t > 0:
            fast_launch(peer_experts_bwd_token_kernel)[(t,)](
                dy, x, idx, gates, pre, down, up, dx, dgates, pre, pre, ddown, dup,
                D=d, D_PAD=d_pad, HK=hk, BLOCK_S=block_s, ACT=act, ATOMIC=True, num_warps=warps,
            )
        return dx, dgates, ddown.to(down.dtype), dup.to(up.dtype)
    dh = torch.empty((t, hk), device=x.device, dtype=torch.float32)
    coef = torch.empty((t, hk), device=x.device, dtype=torch.float32)
    ddown = torch.empty_like(down)
    dup = torch.empty_like(up)

    def token_kernel():
        if t > 0:
            fast_launch(peer_experts_bwd_token_kernel)[(t,)](
                dy, x, idx, gates, pre, down, up, dx, dgates, dh, coef, ddown, dup,
                D=d, D_PAD=d_pad, HK=hk, BLOCK_S=block_s, ACT=act, ATOMIC=False, num_warps=warps,
            )

    order, offsets, ids = _sorted_segments_overlapped(idx, n_rows, token_kernel)
    occurrences = t * hk
    chunk = LONG_ROW_CHUNK
    # the long rows (hot experts) on a side stream: partials [chunks, first/last row, 2 tables, D]
    # fp32 summed CHUNK occurrences per program, then added per row in chunk order
    part = torch.empty((cdiv(occurrences, chunk), 2, 2, d), device=x.device, dtype=torch.float32)

    def long_rows():
        if occurrences > 0:
            fast_launch(peer_experts_bwd_chunks_kernel)[(part.shape[0],)](
                order, ids, offsets, x, dy, dh, coef, part, occurrences,
                D=d, D_PAD=d_pad, HK=hk, CHUNK=chunk, BLOCK_J=4, num_warps=warps,
            )
            fast_launch(peer_experts_bwd_long_rows_kernel)[(part.shape[0],)](
                ids, offsets, part, ddown, dup, occurrences, D=d, D_PAD=d_pad, CHUNK=chunk, num_warps=warps,
            )

    def other_rows():
        fast_launch(peer_experts_bwd_tables_kernel)[(cdiv(n_rows, TABLES_ROWS),)](
            order, offsets, x, dy, dh, coef, ddown, dup, n_rows,
            D=d, D_PAD=d_pad, HK=hk, ROWS=TABLES_ROWS, BLOCK_J=TABLES_BLOCK_J, CHUNK=chunk, num_warps=warps,
        )

    _beside(x.device, long_rows, other_rows)
    return dx, dgates, ddown, dup


# ---- registered ops ---------------------------------------------------------------

def _experts_fwd(x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                 activation: str, backward_mode: str, validate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D], indices/gates [T, HK] -> (y [T, D], pre-activations [T, HK] fp32).
    validate: one of VALIDATE_MODES (see peer_experts)."""
    indices = indices.contiguous()
    _check_ids(indices, down.shape[0], validate)
    return _launch_fwd(x.contiguous(), indices, gates.contiguous(), down.contiguous(), up.contiguous(), activation)


_experts_op = torch.library.custom_op("peer_kernels::peer_experts", mutates_args=())(_experts_fwd)


@_experts_op.register_fake
def _(x, indices, gates, down, up, activation, backward_mode, validate):
    return torch.empty_like(x), x.new_empty(indices.shape, dtype=torch.float32)


def _experts_bwd(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor,
                 down: torch.Tensor, up: torch.Tensor, pre: torch.Tensor, activation: str,
                 backward_mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(dy.contiguous(), x.contiguous(), indices.contiguous(), gates.contiguous(),
                       down.contiguous(), up.contiguous(), pre.contiguous(), activation, backward_mode)


_experts_bwd_op = torch.library.custom_op("peer_kernels::peer_experts_backward", mutates_args=())(_experts_bwd)


@_experts_bwd_op.register_fake
def _(dy, x, indices, gates, down, up, pre, activation, backward_mode):
    return torch.empty_like(x), torch.empty_like(gates), torch.empty_like(down), torch.empty_like(up)


def _setup_context(ctx, inputs, output):
    x, indices, gates, down, up, activation, backward_mode, _ = inputs
    ctx.save_for_backward(x, indices, gates, down, up, output[1])
    ctx.activation = activation
    ctx.backward_mode = backward_mode
    ctx.mark_non_differentiable(output[1])


def _backward_by(bwd):
    def backward(ctx, dy, _dpre):
        if dy is None:
            return (None,) * 8
        x, indices, gates, down, up, pre = ctx.saved_tensors
        dx, dgates, ddown, dup = bwd(dy, x, indices, gates, down, up, pre, ctx.activation, ctx.backward_mode)
        return dx, None, dgates, ddown, dup, None, None, None
    return backward


_experts_op.register_autograd(_backward_by(_experts_bwd_op), setup_context=_setup_context)
_experts_eager = eager_function(_experts_fwd, _setup_context, _backward_by(_experts_bwd))  # eager.py


# ---- public function --------------------------------------------------------------

def peer_experts(x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, down: torch.Tensor,
                 up: torch.Tensor, *, activation: str = "gelu", backend: str = "auto",
                 deterministic: bool | None = None, backward: str | None = None, validate: bool | str = True):
    """The PEER expert mix: y = sum_{h,j} gates * act(down[idx] . x) * up[idx].

    Args:
        x: [..., D] float32 / float16 / bfloat16 (float64: torch backend).
        indices: [..., H, k] int32 or int64 expert ids in [0, N).
        gates: [..., H, k] float.
        down, up: [N, D] expert tables (same dtype; may differ from x's, e.g. fp32
            master weights under autocast; their gradients come back in their dtype).
        activation: "gelu" (erf), "relu", "silu" or "identity".
        backend: "auto" (Triton on CUDA, reference elsewhere), "triton" or "torch".
        deterministic: bitwise-reproducible table gradients. None: follows
            torch.are_deterministic_algorithms_enabled(). The default backward
            ("sorted") is deterministic already; see `backward`.
        backward: "sorted" (default: pairs sorted by expert id, one program owns each
            table row, no atomics, no scratch tables; rows selected more than
            LONG_ROW_CHUNK times are summed in chunks by several programs, partials added
            in a fixed order) or "atomic" (fp32 atomics into fp32 scratch tables of N x D
            each, then cast; non-deterministic, 2 x N x D x 4 bytes more memory).
            "sorted" is the faster: on an H200 at N = 1024^2, D = 1024, T = 4096, H*k = 128,
            bf16, forward + backward 2.58 ms vs 8.69 ms (3.4x). deterministic=True refuses
            "atomic".
        validate: check that every index is in [0, N) (with True or "sync" an id outside is never read).
            True (default): on CUDA a device-side assert in a small kernel, no host sync
            (also inside CUDA graphs): a bad id prints "peer_kernels.peer_experts: expert
            id (indices) outside [0, N)" from the device and the CUDA error
            "device-side assert triggered" surfaces at the next sync; the CUDA context is
            lost, as with PyTorch's own indexing. On the CPU the same as "sync".
            "sync": one reduction and a host sync, raises IndexError with the range
            found (skipped during CUDA-graph capture, where a sync is illegal).
            False: no check (the ids must be valid, e.g. from product_key_topk).

    Returns y [..., D] in x's dtype (fp32 accumulation). Gradients to x, gates, down, up.
    Saves only O(tokens * H * k) values for the backward (ids, gates, pre-activations).
    """
    check_expert_args(x, indices, gates, down, up, activation)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    mode = DEFAULT_BACKWARD if backward is None else backward
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
    if deterministic and mode == "atomic":
        raise ValueError("backward='atomic' is not deterministic; use backward='sorted' with deterministic=True")
    vmode = _validate_mode(validate, x.device)
    kernel_ok = all(t.dtype != torch.float64 for t in (x, gates, down, up))
    if resolve_backend(backend, x.device, kernel_ok) == "torch":
        if vmode != "off":
            check_index_range(indices, down.shape[0])
        return reference.peer_experts(x, indices, gates, down, up, activation)
    lead = x.shape[:-1]
    hk = indices.shape[-2] * indices.shape[-1]
    op = _experts_op if use_registered_op(x, indices, gates, down, up) else _experts_eager
    y, _ = op(x.reshape(-1, x.shape[-1]), indices.reshape(-1, hk), gates.reshape(-1, hk), down, up, activation, mode,
              vmode)
    return y.reshape(*lead, x.shape[-1])
