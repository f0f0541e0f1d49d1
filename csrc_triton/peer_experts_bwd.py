"""Stage 2 of the PEER layer, backward: dx, dgates, d_down, d_up.

With a = act(h), c = gates * a and dc[t, s] = dy[t] . up[e_s]:
  dgates[t, s] = dc * a
  dh[t, s]     = dc * gates * act'(h)
  dx[t]        = sum_s dh[t, s] * down[e_s]
  d_down[e]    = sum_{(t, s): e_s = e} dh[t, s] * x[t]
  d_up[e]      = sum_{(t, s): e_s = e} c[t, s] * dy[t]

`peer_experts_bwd_token_kernel`: one program per token, reads the HK rows of up and
down again (as the forward), writes dgates and dx, and dh and c ([T, HK] fp32) for
the table gradients. With ATOMIC it also adds the table gradients into fp32 tables
with atomics (non-deterministic order).

`peer_experts_bwd_tables_kernel` (deterministic): the (token, slot) pairs sorted by
expert id (stable) with CSR offsets per row; one program owns ROWS consecutive rows of
both tables and writes each row exactly once (zeros for unselected rows), summing its
occurrences BLOCK_J at a time in a fixed order: bitwise reproducible, no atomics, no
fp32 scratch tables. x and dy are re-read from L2. A row with more than CHUNK
occurrences (a hot expert) would leave one program summing it alone, so the tables kernel
skips those long rows: `peer_experts_bwd_chunks_kernel` sums their occurrences CHUNK per
program into fp32 partials and `peer_experts_bwd_long_rows_kernel` adds each long row's
partials in chunk order (still a fixed order) and writes the row. The two run on a side
stream while the tables kernel runs: the tables kernel never waits for them.
"""
import triton
import triton.language as tl

from .activations import act_fwd, act_grad


@triton.jit
def peer_experts_bwd_token_kernel(
    dy_ptr, x_ptr, idx_ptr, gates_ptr, pre_ptr, down_ptr, up_ptr,
    dx_ptr, dgates_ptr, dh_ptr, coef_ptr, ddown_ptr, dup_ptr,
    D: tl.constexpr, D_PAD: tl.constexpr, HK: tl.constexpr, BLOCK_S: tl.constexpr, ACT: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < D
    dy = tl.load(dy_ptr + t * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)  # [D_PAD]
    if ATOMIC:
        x = tl.load(x_ptr + t * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)  # [D_PAD]
    dx = tl.zeros((D_PAD,), tl.float32)  # [D_PAD]
    for s0 in range(0, HK, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < HK
        e = tl.load(idx_ptr + t * HK + offs_s, mask=s_mask, other=0).to(tl.int64)  # [BLOCK_S]
        g = tl.load(gates_ptr + t * HK + offs_s, mask=s_mask, other=0.0).to(tl.float32)
        h = tl.load(pre_ptr + t * HK + offs_s, mask=s_mask, other=0.0)
        rows = e[:, None] * D + offs_d[None, :]  # [BLOCK_S, D_PAD] int64
        m2 = s_mask[:, None] & d_mask[None, :]
        w_up = tl.load(up_ptr + rows, mask=m2, other=0.0).to(tl.float32)  # [BLOCK_S, D_PAD]
        w_down = tl.load(down_ptr + rows, mask=m2, other=0.0).to(tl.float32)  # [BLOCK_S, D_PAD]
        dc = tl.sum(w_up * dy[None, :], axis=1)  # [BLOCK_S]
        a = act_fwd(h, ACT)
        dh = dc * g * act_grad(h, ACT)
        c = g * a
        tl.store(dgates_ptr + t * HK + offs_s, (dc * a).to(dgates_ptr.dtype.element_ty), mask=s_mask)
        dx += tl.sum(dh[:, None] * w_down, axis=0)
        if ATOMIC:
            tl.atomic_add(ddown_ptr + rows, dh[:, None] * x[None, :], mask=m2, sem="relaxed")
            tl.atomic_add(dup_ptr + rows, c[:, None] * dy[None, :], mask=m2, sem="relaxed")
        else:
            tl.store(dh_ptr + t * HK + offs_s, dh, mask=s_mask)
            tl.store(coef_ptr + t * HK + offs_s, c, mask=s_mask)
    tl.store(dx_ptr + t * D + offs_d, dx.to(dx_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _segment_sum(order_ptr, x_ptr, dy_ptr, dh_ptr, coef_ptr, lo, hi, offs_d, d_mask,
                 D: tl.constexpr, D_PAD: tl.constexpr, HK: tl.constexpr, BLOCK_J: tl.constexpr):
    """sum over sorted positions [lo, hi) of dh * x[tok] and c * dy[tok] (fp32, in order)."""
    acc_down = tl.zeros((D_PAD,), tl.float32)  # [D_PAD]
    acc_up = tl.zeros((D_PAD,), tl.float32)  # [D_PAD]
    for j0 in range(lo, hi, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_mask = offs_j < hi
        slot = tl.load(order_ptr + offs_j, mask=j_mask, other=0).to(tl.int64)  # [BLOCK_J] flat t*HK+s
        tok = slot // HK
        dh = tl.load(dh_ptr + slot, mask=j_mask, other=0.0)  # [BLOCK_J]
        c = tl.load(coef_ptr + slot, mask=j_mask, other=0.0)
        m2 = j_mask[:, None] & d_mask[None, :]
        xs = tl.load(x_ptr + tok[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        dys = tl.load(dy_ptr + tok[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        acc_down += tl.sum(dh[:, None] * xs, axis=0)
        acc_up += tl.sum(c[:, None] * dys, axis=0)
    return acc_down, acc_up


@triton.jit
def peer_experts_bwd_chunks_kernel(
    order_ptr, ids_ptr, offsets_ptr, x_ptr, dy_ptr, dh_ptr, coef_ptr, part_ptr,
    L,
    D: tl.constexpr, D_PAD: tl.constexpr, HK: tl.constexpr, CHUNK: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Long rows (more than CHUNK occurrences, e.g. hot experts of skewed routing) are summed
    in parallel: program c takes the sorted positions [c*CHUNK, (c+1)*CHUNK) and, for the
    long rows among them, writes the partial sums to part[c, slot] (fp32, [2 tables, D]);
    slot 0 is the range's first row, slot 1 its last. A long row never lies strictly inside
    one range, so no other row of the range can be long. The long-rows kernel adds the partials."""
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < D
    c = tl.program_id(0).to(tl.int64)
    lo = c * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    first = tl.load(ids_ptr + lo).to(tl.int64)
    last = tl.load(ids_ptr + hi - 1).to(tl.int64)
    _chunk_partial(order_ptr, offsets_ptr, x_ptr, dy_ptr, dh_ptr, coef_ptr, part_ptr + (c * 2) * (2 * D),
                   first, lo, hi, offs_d, d_mask, D, D_PAD, HK, CHUNK, BLOCK_J)
    if last != first:
        _chunk_partial(order_ptr, offsets_ptr, x_ptr, dy_ptr, dh_ptr, coef_ptr, part_ptr + (c * 2 + 1) * (2 * D),
                       last, lo, hi, offs_d, d_mask, D, D_PAD, HK, CHUNK, BLOCK_J)


@triton.jit
def _chunk_partial(order_ptr, offsets_ptr, x_ptr, dy_ptr, dh_ptr, coef_ptr, out_ptr, e, lo, hi, offs_d, d_mask,
                   D: tl.constexpr, D_PAD: tl.constexpr, HK: tl.constexpr, CHUNK: tl.constexpr,
                   BLOCK_J: tl.constexpr):
    """If row e is long, its part of positions [lo, hi) -> out_ptr ([2 tables, D] fp32)."""
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    if end - start > CHUNK:
        acc_down, acc_up = _segment_sum(order_ptr, x_ptr, dy_ptr, dh_ptr, coef_ptr, tl.maximum(lo, start),
                                        tl.minimum(hi, end), offs_d, d_mask, D, D_PAD, HK, BLOCK_J)
        tl.store(out_ptr + offs_d, acc_down, mask=d_mask)
        tl.store(out_ptr + D + offs_d, acc_up, mask=d_mask)


@triton.jit
def peer_experts_bwd_long_rows_kernel(
    ids_ptr, offsets_ptr, part_ptr, ddown_ptr, dup_ptr,
    L,
    D: tl.constexpr, D_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    """Writes the long rows (more than CHUNK occurrences): program c finalizes the long rows
    that start in the sorted range [c*CHUNK, (c+1)*CHUNK) (its first and/or last row), each
    the sum of its chunks' partials (peer_experts_bwd_chunks_kernel) in chunk order."""
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < D
    c = tl.program_id(0).to(tl.int64)
    lo = c * CHUNK
    first = tl.load(ids_ptr + lo).to(tl.int64)
    last = tl.load(ids_ptr + tl.minimum(lo + CHUNK, L) - 1).to(tl.int64)
    _long_row(ids_ptr, offsets_ptr, part_ptr, ddown_ptr, dup_ptr, first, c, offs_d, d_mask, D, D_PAD, CHUNK)
    if last != first:
        _long_row(ids_ptr, offsets_ptr, part_ptr, ddown_ptr, dup_ptr, last, c, offs_d, d_mask, D, D_PAD, CHUNK)


@triton.jit
def _long_row(ids_ptr, offsets_ptr, part_ptr, ddown_ptr, dup_ptr, e, c, offs_d, d_mask,
              D: tl.constexpr, D_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """If row e is long and starts in chunk c: its partials summed in chunk order -> row e."""
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    if (end - start > CHUNK) & (start // CHUNK == c):
        acc_down = tl.zeros((D_PAD,), tl.float32)
        acc_up = tl.zeros((D_PAD,), tl.float32)
        for j in range(c, (end - 1) // CHUNK + 1):
            k = (tl.load(ids_ptr + j * CHUNK).to(tl.int64) != e).to(tl.int64)  # 0: first row of chunk j
            base = part_ptr + (j * 2 + k) * (2 * D)
            acc_down += tl.load(base + offs_d, mask=d_mask, other=0.0)
            acc_up += tl.load(base + D + offs_d, mask=d_mask, other=0.0)
        tl.store(ddown_ptr + e * D + offs_d, acc_down.to(ddown_ptr.dtype.element_ty), mask=d_mask)
        tl.store(dup_ptr + e * D + offs_d, acc_up.to(dup_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def peer_experts_bwd_tables_kernel(
    order_ptr, offsets_ptr, x_ptr, dy_ptr, dh_ptr, coef_ptr, ddown_ptr, dup_ptr,
    N,
    D: tl.constexpr, D_PAD: tl.constexpr, HK: tl.constexpr, ROWS: tl.constexpr, BLOCK_J: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Rows [pid*ROWS, (pid+1)*ROWS) of both gradient tables, each written once (zeros where
    unselected), except the long rows (more than CHUNK occurrences), which
    peer_experts_bwd_long_rows_kernel writes."""
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < D
    for r in range(ROWS):
        e = tl.program_id(0).to(tl.int64) * ROWS + r
        if e < N:
            start = tl.load(offsets_ptr + e)
            end = tl.load(offsets_ptr + e + 1)
            if end - start <= CHUNK:
                acc_down, acc_up = _segment_sum(order_ptr, x_ptr, dy_ptr, dh_ptr, coef_ptr, start, end,
                                                offs_d, d_mask, D, D_PAD, HK, BLOCK_J)
                tl.store(ddown_ptr + e * D + offs_d, acc_down.to(ddown_ptr.dtype.element_ty), mask=d_mask)
                tl.store(dup_ptr + e * D + offs_d, acc_up.to(dup_ptr.dtype.element_ty), mask=d_mask)
