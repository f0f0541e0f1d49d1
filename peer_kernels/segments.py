"""sorted_segments: the (slot, row) pairs of a backward pass grouped by row, so that one
program can own each gradient row and sum its occurrences in a fixed order (no atomics,
bitwise reproducible). Used by the expert tables' backward (experts.py) and the sub-keys'
backward (retrieval.py); the CSR kernel is csrc_triton/segments.py.

bitmap_segments: the same grouping for the sub-keys' backward without a sort, from bitmaps
of the units that add to each row (csrc_triton/key_segments.py).
"""
from __future__ import annotations

import torch

from .checks import cdiv, next_pow2
from .csrc_triton import key_segments as ks
from .csrc_triton.segments import csr_offsets_kernel
from .launch import fast_launch

BITMAP_WORDS = 4  # 32-bit words per part of a row's bitmap: 128 units


def sorted_segments(rows: torch.Tensor, num_rows: int, narrow_ids: bool = False):
    """rows: any-shape int tensor of row ids in [0, num_rows). Returns (order, offsets, ids):
    order [L] int64, the flat positions sorted by row id (stable: ascending position
    within a row); offsets [num_rows + 1] int64, CSR starts (row e owns
    order[offsets[e]:offsets[e + 1]]); ids [L], the sorted row ids (int32 when num_rows
    < 2^31; int16 when narrow_ids and num_rows <= 2^15: a radix sort of half the passes,
    for callers that do not index with ids). No host sync (usable in CUDA graphs)."""
    flat = rows.reshape(-1)
    if narrow_ids and num_rows <= 2**15:
        flat = flat.to(torch.int16)
    elif num_rows < 2**31:
        flat = flat.to(torch.int32)  # a 32-bit radix sort is about twice as fast
    ids, order = torch.sort(flat, stable=True)
    offsets = torch.empty(num_rows + 1, device=rows.device, dtype=torch.int64)
    block = 1024
    fast_launch(csr_offsets_kernel)[(cdiv(num_rows + 1, block),)](
        ids, offsets, ids.numel(), num_rows, STEPS=max(1, ids.numel().bit_length()), BLOCK=block, num_warps=4,
    )
    return order, offsets, ids


def bitmap_parts(units: int) -> int:
    """Parts of BITMAP_WORDS words in a row's bitmap of `units` units."""
    return max(1, cdiv(units, 32 * BITMAP_WORDS))


def bitmap_bytes(num_rows: int, units: int) -> int:
    """Scratch of bitmap_segments: the bitmaps, the per-part prefixes and the totals."""
    return num_rows * (bitmap_parts(units) * (BITMAP_WORDS + 1) + 1) * 4


def new_bitmaps(num_rows: int, units: int, device) -> torch.Tensor:
    """Zeroed bitmaps [num_rows, parts * BITMAP_WORDS] int32: bit u of row r says that unit u
    adds to row r (set by atomic OR: pk_topk_bwd_query_kernel)."""
    return torch.zeros((num_rows, bitmap_parts(units) * BITMAP_WORDS), device=device, dtype=torch.int32)


def bitmap_segments(rows: torch.Tensor, bits: torch.Tensor, num_rows: int, per_head: bool):
    """The retrieval backward's selections grouped by dC row, as sorted_segments groups them,
    by a counting sort (csrc_triton/key_segments.py). rows: [2, M, H, K] int16 / int32, the
    dC row of selection (p, m, h, r) or num_rows (a merged repeat: left out); its unit is m
    (per_head) or m*H + h, and a unit adds at most once to a row. bits: new_bitmaps(num_rows,
    units) with bit u of row r set iff unit u adds to row r. Returns (order [2*M*H*K] int32,
    of which the first offsets[num_rows] entries are the flat positions sorted by row,
    stable; offsets [num_rows + 1] int32, CSR starts). No host sync."""
    _, m, heads, k = rows.shape
    total = rows.numel()
    if total >= 2**31:
        raise ValueError("bitmap_segments: more than 2^31 - 1 selections (use sorted_segments)")
    units = m if per_head else m * heads
    parts = bitmap_parts(units)
    if bits.shape != (num_rows, parts * BITMAP_WORDS) or bits.dtype != torch.int32:
        raise ValueError(f"bitmap_segments: bits {tuple(bits.shape)} {bits.dtype}, expected "
                         f"{(num_rows, parts * BITMAP_WORDS)} torch.int32 (new_bitmaps)")
    dev = rows.device
    pp = torch.empty((num_rows, parts), device=dev, dtype=torch.int32)
    tot = torch.empty(num_rows, device=dev, dtype=torch.int32)
    offsets = torch.empty(num_rows + 1, device=dev, dtype=torch.int32)
    order = torch.empty(total, device=dev, dtype=torch.int32)
    rb, pb = 32, min(32, next_pow2(parts))
    fast_launch(ks.bitmap_scan_kernel)[(cdiv(num_rows, rb),)](
        bits, pp, tot, num_rows, parts, W=BITMAP_WORDS, RB=rb, PB=pb, num_warps=4)
    # H200, paper config, T = 4096 (bench/NOTES.md): offsets 4096 per step with 8 warps 4.2
    # us, 16384 with 16 warps 3.4; place 1024 selections per program 13.6 us, 2048 with 8
    # warps 11.8 (T = 16384: 52 -> 49)
    fast_launch(ks.counts_to_offsets_kernel)[(1,)](tot, offsets, num_rows, BLOCK=16384, num_warps=16)
    k_pad = next_pow2(k)
    block_m = max(1, 2048 // k_pad)
    fast_launch(ks.bitmap_place_kernel)[(cdiv(m, block_m), heads, 2)](
        rows, bits, pp, offsets, order, m, heads, m * heads * k, parts, num_rows, total,
        K=k, K_PAD=k_pad, PER_HEAD=per_head, W=BITMAP_WORDS, BLOCK_M=block_m, num_warps=8,
    )
    return order, offsets
