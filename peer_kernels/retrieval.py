"""product_key_topk: launchers of the retrieval kernels (csrc_triton/product_key_topk.py),
their registered torch ops with autograd, and the public function.

Chain: pk_topk_fwd_kernel -> _launch_fwd (launches through launch.fast_launch) ->
peer_kernels::product_key_topk (custom op,
backward peer_kernels::product_key_topk_backward; in eager mode the same bodies through an
autograd.Function, eager.py) -> product_key_topk() -> PEER.
"""
from __future__ import annotations

import os

import torch

from . import reference
from .checks import cdiv, check_product_key_args, interpreting, next_pow2, resolve_backend
from .csrc_triton import product_key_topk as kernels
from .eager import eager_function, use_registered_op
from .launch import TensorDescriptor, fast_launch  # (TensorDescriptor: None in an older Triton)
from .segments import bitmap_bytes, bitmap_segments, new_bitmaps, sorted_segments

__all__ = ["product_key_topk"]

_HALF = (torch.float16, torch.bfloat16)


def _pow2(x: int, lo: int = 1) -> int:
    return max(lo, next_pow2(x))


def _dot_config(query: torch.Tensor, sub_keys: torch.Tensor):
    """(UPCAST, PRECISION) for the score products. Same half dtype on a GPU: native
    tensor-core dot (exact products, fp32 accumulation). Anything with fp32: fp32
    'ieee' so the ids match an fp32 reference. The interpreter cannot do half dots."""
    same_half = query.dtype in _HALF and sub_keys.dtype == query.dtype
    if same_half and not interpreting():
        return False, "tf32"
    return True, ("tf32" if same_half else "ieee")


def _fwd_config(n: int, kp: int, dh: int = 64, upcast: bool = False, many_rows: bool = True) -> dict:
    """Launch config of pk_topk_fwd_kernel. GROUPS >= KP group maxima give the threshold;
    CAP scratch slots per row hold the survivors (~1.3 KP on random data, see the kernel).
    Half-precision products with KP <= 16 and Dk/2 <= 64 (the paper config), when there are
    many rows (many_rows: see _many_rows): 64 rows per program, so the tile products are
    wgmma-sized, a row's reductions stay inside one warp and pass B counts the survivor
    slots on tensor cores (H200, T = 2048: 0.094 ms vs 0.167 ms with 16 rows,
    bench/NOTES.md). Otherwise 16 rows: a 64-row program takes ~0.08 ms however few there
    are (T = 512: 16 rows are faster), and larger KP, Dk or fp32 products would spill
    heavily at 64 (ptxas on sm_90: 2-3.5 KB of stack).
    The interpreter (always fp32 products) takes the 64-row config wherever KP and Dk allow,
    so that the CPU tests cover it."""
    big = kp <= 16 and dh <= 64 and (interpreting() or (not upcast and many_rows))
    block_m, block_n = (64, 64) if big else (16, 128)
    block_n = max(kp, min(block_n, _pow2(n, 16)))
    # 64-row programs: every column of pass A's running maximum is a group (64 groups of 16
    # sub-keys at n = 1024: ~18 survivors per row on random data, at most 26 in 20K rows;
    # 32 groups of 32 left ~21 and 10% of the blocks with a row of more than CAP / 2,
    # ranked by the slower full-width rounds, bench/NOTES.md)
    groups = block_n if big else max(kp, min(32, block_n))
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, GROUPS=groups, CAP=max(64, 2 * kp), num_warps=4)
    if not interpreting():
        # ptxas takes ~193 registers unasked (2 blocks per SM); capped at 128 (some spills)
        # more blocks fit and the H200 forward dropped from 0.92 to 0.72 ms (bench/NOTES.md)
        cfg["maxnreg"] = 128
    return cfg


_PROPS: dict = {}


def _props(device: torch.device):
    """torch.cuda.get_device_properties of a CUDA device, cached (SM count, compute capability)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PROPS:
        _PROPS[idx] = torch.cuda.get_device_properties(idx)
    return _PROPS[idx]


# When the forward's main path loads its sub-key tiles by TMA (_keys_descriptor): "never" (the
# default), "graphs" (while a CUDA graph is being captured) or "always". With the lane lists the
# pointer loads are the faster ones (H200, paper config, T = 4096: 0.0834 vs 0.0844 ms warm,
# 0.0897 vs 0.0912 ms with a cold L2; with the tensor-core prefix slots before them the TMA loads
# were 1.8% faster); the descriptor also costs ~27-33 us of host time per launch (building it,
# and Triton encoding it at every launch), which a captured graph pays once (bench/NOTES.md).
# Both paths give the same scores and ids, bit for bit (tests).
TMA = os.environ.get("PEER_KERNELS_TMA", "never")


def _keys_descriptor(sub_keys: torch.Tensor, cfg: dict, upcast: bool):
    """A TMA descriptor of the sub-keys as [sets * 2 * n, Dk/2] with [BLOCK_N, Dk/2] blocks for the
    forward's main path (pk_topk_fwd_kernel's TMA: each score tile by one TMA load instead of
    per-thread copies), or None where that path is not taken (TMA above) or does not apply:
    not a Hopper (or newer) GPU, the interpreter, fp32 products, 16-row programs, tiles of
    other than 64 sub-keys (the measured and GPU-tested case; n <= 32 has smaller tiles), a
    ragged last tile (n % 64) or a padded Dk/2, keys not contiguous or not 16-byte aligned."""
    if TMA not in ("graphs", "always", "never"):
        raise ValueError(f"PEER_KERNELS_TMA must be never, graphs or always, got {TMA!r}")
    n, dh = sub_keys.shape[-2], sub_keys.shape[-1]
    if (TMA == "never" or TensorDescriptor is None or interpreting() or upcast or cfg["BLOCK_M"] < 64
            or cfg["BLOCK_N"] != 64 or n % 64 or dh != _pow2(dh, 16) or not sub_keys.is_contiguous()
            or sub_keys.data_ptr() % 16):
        return None
    if TMA == "graphs" and not torch.cuda.is_current_stream_capturing():
        return None
    if _props(sub_keys.device).major < 9:
        return None
    return TensorDescriptor.from_tensor(sub_keys.view(-1, dh), [cfg["BLOCK_N"], dh])


def _many_rows(device: torch.device, m: int, heads: int) -> bool:
    """Enough 64-row programs to fill the GPU: at least 0.75 per SM (H200, 132 SMs, H = 8:
    16 rows are faster at T = 512 (0.066 vs 0.079 ms), 64 rows from T = 1024 (0.079 vs
    0.095 ms; T = 2048: 0.094 vs 0.167; T = 3072: 0.119 vs 0.246); below T = 2048 these
    timings include some of the launcher's ~0.09 ms of host time; bench/NOTES.md)."""
    if device.type != "cuda":
        return True
    return cdiv(m, 64) * heads >= 0.75 * _props(device).multi_processor_count


def _launch_fwd(query: torch.Tensor, sub_keys: torch.Tensor, k: int, candidates: int, fallback: bool = True):
    """fallback=False (tests, benchmarks): blocks never take the kernel's exact fallback, so
    the result is wrong wherever they needed it (ties, NaN, or a register layout that the
    quad lists did not expect: the tests check that random data never needs it)."""
    heads, dk = query.shape[-2], query.shape[-1]
    q = query.reshape(-1, heads, dk)
    m = q.shape[0]
    n = sub_keys.shape[-2]
    scores = torch.empty((m, heads, k), device=query.device, dtype=torch.float32)
    ids = torch.empty((m, heads, k), device=query.device, dtype=torch.int64)
    if m > 0:
        kp = _pow2(candidates, 2)
        upcast, precision = _dot_config(query, sub_keys)
        cfg = _fwd_config(n, kp, dk // 2, upcast, _many_rows(query.device, m, heads))
        grid = (cdiv(m, cfg["BLOCK_M"]), heads)
        # per row the survivors of a half (reused by the second half): the lane lists, or CAP
        # slots and the int32 survivor counters of both halves (16-row programs)
        lanes = kernels.pk_topk_lanes(not interpreting(), cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["GROUPS"], kp)
        row_slots = kernels.pk_topk_row_slots(lanes, cfg["CAP"])
        scratch = torch.empty(grid[0] * heads * cfg["BLOCK_M"] * row_slots, device=query.device, dtype=torch.int64)
        desc = _keys_descriptor(sub_keys, cfg, upcast)
        fast_launch(kernels.pk_topk_fwd_kernel)[grid](
            q, sub_keys, sub_keys if desc is None else desc, scores, ids, scratch, m, n, heads,
            DK=dk, DH_PAD=_pow2(dk // 2, 16), PER_HEAD=sub_keys.dim() == 4,
            K=k, K_PAD=_pow2(k, 2), CAND=candidates, KP=kp,
            EVEN_N=n % cfg["BLOCK_N"] == 0, UPCAST=upcast, PRECISION=precision,
            PREFIX_SLOTS=cfg["BLOCK_M"] >= 64, NATIVE=not interpreting(), FALLBACK=fallback, TMA=desc is not None,
            LANES=lanes,
            **cfg,
        )
    return scores.reshape(*query.shape[:-1], k), ids.reshape(*query.shape[:-1], k)


def _bwd_keys_config() -> dict:
    """Launch config of pk_topk_bwd_keys_kernel: ROWS rows of dC side by side per program,
    BLOCK_J selections of each per step. H200, paper config (repeats merged by the query
    kernel), T = 4096 / 16384: 22 / 85 us (ROWS, BLOCK_J = 16, 32: 24 / 85; 16, 8: 25 / 110;
    32, 8: 30 / 131; without the merging 16, 16: 57 / 240, 8, 16: 148 / 560, 16 rows with 8
    warps: 189 / 748; the old loop over one row at a time 91 / 354; bench/NOTES.md)."""
    return dict(ROWS=16, BLOCK_J=16, num_warps=4)


def _use_bitmap(num_rows: int, units: int, selections_per_half: int) -> bool:
    """bitmap_segments where its scratch (dense bitmaps: n bits per unit and row set) takes at
    most 16 bytes per selection, about what the sort path needs (keys, int64 values, CUB
    buffers): n <= ~100 * k. H200, paper config (n = 1024, k = 16), T = 4096: see bench/NOTES.md."""
    selections = 2 * selections_per_half
    return selections < 2**31 and bitmap_bytes(num_rows, units) <= 16 * selections


def _launch_bwd(grad_scores, query, sub_keys, ids, method: str | None = None):
    """dq, dkeys. method: None (by _use_bitmap), "bitmap" or "sort" (the grouping by row)."""
    if method not in (None, "bitmap", "sort"):
        raise ValueError(f"method must be None, 'bitmap' or 'sort', got {method!r}")
    heads, dk = query.shape[-2], query.shape[-1]
    k = ids.shape[-1]
    q = query.reshape(-1, heads, dk)
    g = grad_scores.reshape(-1, heads, k).contiguous().float()
    e = ids.reshape(-1, heads, k).contiguous()
    m = q.shape[0]
    n = sub_keys.shape[-2]
    dh_pad = _pow2(dk // 2, 16)
    dq = torch.empty_like(q)
    per_head = sub_keys.dim() == 4
    num_sets = heads if per_head else 1
    if m == 0:
        return dq.reshape(query.shape), torch.zeros_like(sub_keys)
    # dC: the selections grouped by the dC row they add to (row = (set * 2 + p) * n + sub-key;
    # a (m, h)'s repeats of a sub-key merged into its first, the rest sent to row num_rows),
    # then one program per ROWS rows sums their segments (fixed order, no atomics). The
    # grouping: bitmap_segments (a counting sort from bitmaps the query kernel fills) where
    # its scratch is small, else a stable sort (16-bit keys when they fit: half the passes)
    num_rows = num_sets * 2 * n
    units = m if per_head else m * heads
    bitmap = _use_bitmap(num_rows, units, m * heads * k) if method is None else method == "bitmap"
    narrow = num_rows < 2**15
    rows = torch.empty((2, m, heads, k), device=e.device, dtype=torch.int16 if narrow else torch.int32)
    gsum = torch.empty((2, m, heads, k), device=e.device, dtype=torch.float32)
    bits = new_bitmaps(num_rows, units, e.device) if bitmap else rows  # (rows: an unused stand-in)
    block_m = 16
    fast_launch(kernels.pk_topk_bwd_query_kernel)[(cdiv(m, block_m), heads)](
        g, e, sub_keys, dq, rows, gsum, bits, m, n, heads, m * heads * k, num_rows, bits.shape[-1],
        DK=dk, DH_PAD=dh_pad, PER_HEAD=per_head, K=k, K_PAD=_pow2(k, 2), BLOCK_M=block_m, BITMAP=bitmap,
        num_warps=4,
    )
    if bitmap:
        order, offsets = bitmap_segments(rows, bits, num_rows, per_head)
    else:
        order, offsets, _ = sorted_segments(rows, num_rows + 1, narrow_ids=narrow)
    dkeys = torch.empty(sub_keys.shape, device=sub_keys.device, dtype=sub_keys.dtype)
    cfg = _bwd_keys_config()
    fast_launch(kernels.pk_topk_bwd_keys_kernel)[(cdiv(num_rows, cfg["ROWS"]),)](
        order, offsets, gsum, q, dkeys, num_rows, m * heads * k, DK=dk, DH_PAD=dh_pad, K=k, **cfg,
    )
    return dq.reshape(query.shape), dkeys


# ---- registered ops ---------------------------------------------------------------

def _topk_fwd(query: torch.Tensor, sub_keys: torch.Tensor, k: int, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(query.contiguous(), sub_keys.contiguous(), k, candidates)


_pk_topk_op = torch.library.custom_op("peer_kernels::product_key_topk", mutates_args=())(_topk_fwd)


@_pk_topk_op.register_fake
def _(query, sub_keys, k, candidates):
    shape = (*query.shape[:-1], k)
    return query.new_empty(shape, dtype=torch.float32), query.new_empty(shape, dtype=torch.int64)


def _topk_bwd(grad_scores: torch.Tensor, query: torch.Tensor, sub_keys: torch.Tensor,
              ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_bwd(grad_scores.contiguous(), query.contiguous(), sub_keys.contiguous(), ids.contiguous())


_pk_topk_bwd_op = torch.library.custom_op("peer_kernels::product_key_topk_backward", mutates_args=())(_topk_bwd)


@_pk_topk_bwd_op.register_fake
def _(grad_scores, query, sub_keys, ids):
    return torch.empty_like(query), torch.empty_like(sub_keys)


def _setup_context(ctx, inputs, output):
    query, sub_keys, _, _ = inputs
    ctx.save_for_backward(query, sub_keys, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward_by(bwd):
    def backward(ctx, grad_scores, _grad_ids):
        query, sub_keys, ids = ctx.saved_tensors
        if grad_scores is None:
            return None, None, None, None
        dq, dkeys = bwd(grad_scores, query, sub_keys, ids)
        return dq, dkeys, None, None
    return backward


_pk_topk_op.register_autograd(_backward_by(_pk_topk_bwd_op), setup_context=_setup_context)
_pk_topk_eager = eager_function(_topk_fwd, _setup_context, _backward_by(_topk_bwd))  # eager.py


# ---- public function --------------------------------------------------------------

def product_key_topk(query: torch.Tensor, sub_keys: torch.Tensor, k: int, *, candidates: int | None = None,
                     backend: str = "auto"):
    """Product-key top-k retrieval (He 2024), per head.

    Args:
        query: [..., H, Dk] float32 / float16 / bfloat16 (float64: torch backend), Dk even.
        sub_keys: [H, 2, n, Dk//2] (one set per head) or [2, n, Dk//2] (shared by all heads).
        k: experts to keep per head (1 <= k <= candidates**2).
        candidates: sub-keys kept per half before pairing (default k; k <= candidates**2,
            candidates <= n). With candidates >= k the result is the exact top-k over all
            n*n keys [c1_i ; c2_j].
        backend: "auto" (Triton on CUDA, reference elsewhere), "triton" or "torch".

    Returns:
        scores [..., H, k] float32, sorted descending: q1.c1_i + q2.c2_j.
        indices [..., H, k] int64, index = i * n + j.
        Gradients flow to query and sub_keys through scores (deterministic kernels).
    """
    candidates = check_product_key_args(query, sub_keys, k, candidates)
    kernel_ok = query.dtype != torch.float64 and sub_keys.dtype != torch.float64
    if resolve_backend(backend, query.device, kernel_ok) == "torch":
        return reference.product_key_topk(query, sub_keys, k, candidates)
    op = _pk_topk_op if use_registered_op(query, sub_keys) else _pk_topk_eager
    return op(query, sub_keys, k, candidates)
