"""Segments of ids sorted by row, shared by the deterministic backward kernels of both
stages (expert tables: peer_experts_bwd.py; sub-keys: product_key_topk.py): after a
stable sort of the row ids, offsets[e] .. offsets[e + 1] is the segment of row e.
"""
import triton
import triton.language as tl


@triton.jit
def csr_offsets_kernel(sorted_ptr, offsets_ptr, L, N, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """offsets[e] = number of sorted ids < e, for e in [0, N] (CSR row starts), by a
    binary search per e over the L sorted ids (STEPS >= ceil(log2(L + 1)) halvings).
    One launch, no atomics; any id distribution."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    lo = tl.zeros((BLOCK,), tl.int64)
    hi = tl.zeros((BLOCK,), tl.int64) + L  # the answer lies in [lo, hi]
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(sorted_ptr + mid, mask=active, other=0).to(tl.int64)
        right = active & (v < e)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    tl.store(offsets_ptr + e, lo, mask=e <= N)
