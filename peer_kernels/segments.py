"""sorted_segments: the (slot, row) pairs of a backward pass grouped by row, so that one
program can own each gradient row and sum its occurrences in a fixed order (no atomics,
bitwise reproducible). Used by the expert tables' backward (experts.py) and the sub-keys'
backward (retrieval.py); the CSR kernel is csrc_triton/segments.py.
"""
from __future__ import annotations

import torch

from .checks import cdiv
from .csrc_triton.segments import csr_offsets_kernel


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
    csr_offsets_kernel[(cdiv(num_rows + 1, block),)](
        ids, offsets, ids.numel(), num_rows, STEPS=max(1, ids.numel().bit_length()), BLOCK=block, num_warps=4,
    )
    return order, offsets, ids
