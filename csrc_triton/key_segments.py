"""The sub-key backward's selections grouped by dC row without a sort: a counting sort whose
in-row ranks come from bitmaps (launcher: peer_kernels/segments.py, bitmap_segments; the
general path is a stable torch.sort + csr_offsets_kernel, csrc_triton/segments.py).

A selection (p, m, h, r) of the retrieval backward sits at flat position
p * MHK + (m*H + h)*K + r and adds to dC row `row` = (set * 2 + p) * n + sub-key (set = h
with per-head sub-keys, else 0), or to no row (row = NUM_ROWS) when it repeats a sub-key
of its (m, h) (pk_topk_bwd_query_kernel merges repeats into the first). Its *unit* is
u = m (per-head sub-keys) or u = m*H + h (shared): within a row the selections are in
ascending u, and one unit adds at most once to a row, so a stable sort by row is the same
as: row start + the number of units u' < u that add to the row.

The query kernel sets bit u of bits[row] ([NUM_ROWS, NP * W] int32, W words = 32 * W units
per part, NP parts) by atomic OR (exact, order-free). Then:
  `bitmap_scan_kernel`: per (row, part) the units of earlier parts (pp) and per row the total.
  `counts_to_offsets_kernel`: the CSR offsets, an exclusive scan of the totals.
  `bitmap_place_kernel`: order[offsets[row] + pp[row, part] + set bits of the part below u]
      = the selection's flat position.
Every step is integer and fixed-order: the order is bit for bit the stable sort's.
"""
import triton
import triton.language as tl


@triton.jit
def selection_unit(offs_m, h, H, PER_HEAD: tl.constexpr):
    """The unit of the selections of tokens offs_m, head h: the token (per-head sub-keys) or
    m*H + h (shared). Used by both writers of the bitmaps' layout: the query kernel (bits)
    and bitmap_place_kernel (ranks)."""
    if PER_HEAD:
        return offs_m
    return offs_m * H + h


@triton.jit
def popcount32(x):
    """Set bits of each 32-bit word (SWAR: the interpreter has no popc), as int32."""
    x = x.to(tl.uint32, bitcast=True)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def bitmap_scan_kernel(bits_ptr, pp_ptr, tot_ptr, num_rows, NP, W: tl.constexpr, RB: tl.constexpr,
                       PB: tl.constexpr):
    """Program: RB rows. pp[row, part] = set bits of bits[row] in parts < part (exclusive
    prefix over the parts, PB parts per step); tot[row] = all set bits of the row."""
    offs_r = tl.program_id(0) * RB + tl.arange(0, RB)
    r_mask = offs_r < num_rows
    rows = offs_r.to(tl.int64) * NP
    offs_w = tl.arange(0, W)
    carry = tl.zeros((RB,), tl.int32)
    for p0 in range(0, NP, PB):
        offs_p = p0 + tl.arange(0, PB)
        mask = r_mask[:, None] & (offs_p < NP)[None, :]
        part = rows[:, None] + offs_p[None, :]  # [RB, PB]
        words = tl.load(bits_ptr + part[:, :, None] * W + offs_w[None, None, :], mask=mask[:, :, None], other=0)
        cnt = tl.sum(popcount32(words), axis=2)  # [RB, PB]
        tl.store(pp_ptr + part, carry[:, None] + tl.cumsum(cnt, axis=1) - cnt, mask=mask)
        carry += tl.sum(cnt, axis=1)
    tl.store(tot_ptr + offs_r, carry, mask=r_mask)


@triton.jit
def counts_to_offsets_kernel(tot_ptr, offsets_ptr, num_rows, BLOCK: tl.constexpr):
    """One program: offsets[r] = sum of tot[:r] for r <= num_rows (CSR starts and end)."""
    carry = tl.zeros((), tl.int32)
    for r0 in range(0, num_rows, BLOCK):
        offs = r0 + tl.arange(0, BLOCK)
        t = tl.load(tot_ptr + offs, mask=offs < num_rows, other=0)
        tl.store(offsets_ptr + offs, carry + tl.cumsum(t, axis=0) - t, mask=offs < num_rows)
        carry += tl.sum(t, axis=0)
    tl.store(offsets_ptr + num_rows, carry)


@triton.jit
def bitmap_place_kernel(rows_ptr, bits_ptr, pp_ptr, offsets_ptr, order_ptr, M, H, MHK, NP, NUM_ROWS, L,
                        K: tl.constexpr, K_PAD: tl.constexpr, PER_HEAD: tl.constexpr, W: tl.constexpr,
                        BLOCK_M: tl.constexpr):
    """Program (m block, h, p): the selections (p, m, h, r) of BLOCK_M tokens (int32 flat
    positions: the launcher keeps them < 2^31). Each that adds to a row goes to its place in
    the row's segment: offsets[row] + pp[row, part] + the part's set bits below its unit
    (< L, the length of order, whenever the bitmaps match the rows; the store is masked to
    it, so that a mismatch gives a wrong order, which the tests see, not a stray write)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    p = tl.program_id(2)
    mh = offs_m * H + h
    offs_k = tl.arange(0, K_PAD)
    sel = p * MHK + mh[:, None] * K + offs_k[None, :]  # [BLOCK_M, K_PAD]
    row = tl.load(rows_ptr + sel, mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=NUM_ROWS).to(tl.int32)
    keep = row < NUM_ROWS
    unit = selection_unit(offs_m, h, H, PER_HEAD)
    part = unit // (32 * W)  # [BLOCK_M]
    word = (unit // 32) % W
    low = (tl.full((BLOCK_M,), 1, tl.uint32) << (unit % 32).to(tl.uint32)) - 1  # the bits of units below
    at = row.to(tl.int64) * NP + part[:, None]  # [BLOCK_M, K_PAD]: (row, part)
    offs_w = tl.arange(0, W)
    words = tl.load(bits_ptr + at[:, :, None] * W + offs_w[None, None, :], mask=keep[:, :, None], other=0)
    ww = offs_w[None, None, :]
    below = tl.where(ww < word[:, None, None], words,
                     tl.where(ww == word[:, None, None], words & low[:, None, None].to(tl.int32, bitcast=True), 0))
    dest = (tl.load(offsets_ptr + row, mask=keep, other=0) + tl.load(pp_ptr + at, mask=keep, other=0)
            + tl.sum(popcount32(below), axis=2))
    tl.store(order_ptr + dest, sel.to(order_ptr.dtype.element_ty), mask=keep & (dest < L) & (dest >= 0))
