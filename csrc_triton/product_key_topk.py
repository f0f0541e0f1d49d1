"""Stage 1 of the PEER layer: product-key retrieval (DESIGN.md sec. 1.2), Triton kernels.

Forward (`pk_topk_fwd_kernel`), one program per block of BLOCK_M query rows of one head:
  for each half p of the query, s_p = C_p q_p over tiles of BLOCK_N sub-keys (tl.dot,
  fp32 accumulation) and a running top-KP of s_p kept in registers as packed int64
  (order-preserving score bits << 32 | index), merged tile by tile by KP rounds of
  row maxima (no sorting network: tl.topk's bitonic network was slower, see
  bench/NOTES.md), then the pair sums s_1[a] + s_2[b] of the candidates (only pairs
  with (a+1)(b+1) <= K can reach the top K), and the final top-K. Writes scores
  [M, H, K] fp32 (descending) and expert ids [M, H, K] int64. The [M, H, 2, n]
  score matrix never reaches memory. Saves nothing extra for the backward: the
  ids are enough.

Backward (both deterministic, no atomics):
  `pk_topk_bwd_query_kernel`: dq_p[m] = sum_r g[m, r] * C_p[sub_p(id[m, r])], a gather.
  `pk_topk_bwd_keys_kernel`: one program per (tile of BLOCK_N sub-key rows, half,
  key set, split of the rows): builds the sparse selection matrix S[m, c] =
  sum_r g[m, r] [sub_p(id[m, r]) == c] tile by tile and accumulates S^T Q_p with tl.dot.
  Partial sums over row splits are written to a buffer and summed in a fixed order.
"""
import triton
import triton.language as tl

# ids are < n*n <= 2^24; the low word of a packed value is MAX_ID - id (ties -> lower id)
MAX_ID = 16777216


@triton.jit
def _pack(score, ids, valid):
    """fp32 score + int id -> int64 whose order is (score, -id); invalid -> minimum."""
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(valid, key, -2147483648)
    low = tl.where(valid, 16777216 - ids, 0)
    return (key.to(tl.int64) << 32) + low.to(tl.int64)


@triton.jit
def _unpack(packed):
    key = (packed >> 32).to(tl.int32)
    low = packed - ((packed >> 32) << 32)
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), (16777216 - low).to(tl.int32)


@triton.jit
def _merge_topk(best, packed, KP: tl.constexpr):
    """Top-KP (descending) of the union of best [BM, KP] and packed [BM, BN], by KP
    rounds of row maxima: plain reductions and selects, no sorting network.
    Packed values are unique, so each round removes exactly one element."""
    slot = tl.arange(0, KP)
    new = tl.full(best.shape, -9223372036854775808, tl.int64)
    for r in tl.static_range(KP):
        m = tl.maximum(tl.max(packed, axis=1), tl.max(best, axis=1))  # [BM]
        new = tl.where(slot[None, :] == r, m[:, None], new)
        packed = tl.where(packed == m[:, None], -9223372036854775808, packed)
        best = tl.where(best == m[:, None], -9223372036854775808, best)
    return new


@triton.jit
def _half_topk(
    q_row_ptr, keys_ptr, offs_m, m_mask, n,
    DH: tl.constexpr, DH_PAD: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Running top-KP (packed, descending) of C q over all n sub-keys of one half."""
    offs_d = tl.arange(0, DH_PAD)
    d_mask = offs_d < DH
    q = tl.load(q_row_ptr[:, None] + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, DH_PAD]
    if UPCAST:
        q = q.to(tl.float32)
    best = tl.full((BLOCK_M, KP), -9223372036854775808, tl.int64)  # [BLOCK_M, KP]
    for n0 in range(0, n, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n
        c = tl.load(keys_ptr + offs_n[:, None].to(tl.int64) * DH + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, DH_PAD]
        if UPCAST:
            c = c.to(tl.float32)
        else:
            c = c.to(q.dtype)
        s = tl.dot(q, tl.trans(c), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        best = _merge_topk(best, _pack(s, offs_n[None, :], n_mask[None, :]), KP)
    return best


@triton.jit
def pk_topk_fwd_kernel(
    q_ptr, keys_ptr, scores_ptr, ids_ptr,
    M, n, H,
    DK: tl.constexpr, DH_PAD: tl.constexpr, PER_HEAD: tl.constexpr,
    K: tl.constexpr, K_PAD: tl.constexpr, CAND: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    DH: tl.constexpr = DK // 2
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    row = offs_m.to(tl.int64) * H + h  # [BLOCK_M] row of (token, head)
    q_row_ptr = q_ptr + row * DK
    if PER_HEAD:
        kbase = keys_ptr + h.to(tl.int64) * (2 * n * DH)
    else:
        kbase = keys_ptr
    best1 = _half_topk(q_row_ptr, kbase, offs_m, m_mask, n, DH, DH_PAD, KP, BLOCK_M, BLOCK_N, UPCAST, PRECISION)
    best2 = _half_topk(q_row_ptr + DH, kbase + n * DH, offs_m, m_mask, n, DH, DH_PAD, KP, BLOCK_M, BLOCK_N,
                       UPCAST, PRECISION)
    s1, i1 = _unpack(best1)  # [BLOCK_M, KP], sorted descending
    s2, i2 = _unpack(best2)
    # pair sums; pair (a, b) is dominated by (a+1)(b+1)-1 others, so needs (a+1)(b+1) <= K
    a = tl.arange(0, KP)
    ok = (a[:, None] < CAND) & (a[None, :] < CAND) & ((a[:, None] + 1) * (a[None, :] + 1) <= K)  # [KP, KP]
    ps = s1[:, :, None] + s2[:, None, :]  # [BLOCK_M, KP, KP]
    pid = i1[:, :, None] * n + i2[:, None, :]
    packed = tl.reshape(_pack(ps, pid, ok[None, :, :]), (BLOCK_M, KP * KP))
    top = _merge_topk(tl.full((BLOCK_M, K_PAD), -9223372036854775808, tl.int64), packed, K_PAD)  # [BLOCK_M, K_PAD]
    sc, ids = _unpack(top)
    offs_k = tl.arange(0, K_PAD)
    out = row[:, None] * K + offs_k[None, :]
    o_mask = m_mask[:, None] & (offs_k[None, :] < K)
    tl.store(scores_ptr + out, sc, mask=o_mask)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=o_mask)


@triton.jit
def pk_topk_bwd_query_kernel(
    dscores_ptr, ids_ptr, keys_ptr, dq_ptr,
    M, n, H,
    DK: tl.constexpr, DH_PAD: tl.constexpr, PER_HEAD: tl.constexpr,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    DH: tl.constexpr = DK // 2
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    row = offs_m.to(tl.int64) * H + h
    offs_k = tl.arange(0, K_PAD)
    offs_d = tl.arange(0, DH_PAD)
    k_mask = m_mask[:, None] & (offs_k[None, :] < K)  # [BLOCK_M, K_PAD]
    g = tl.load(dscores_ptr + row[:, None] * K + offs_k[None, :], mask=k_mask, other=0.0)  # [BLOCK_M, K_PAD]
    e = tl.load(ids_ptr + row[:, None] * K + offs_k[None, :], mask=k_mask, other=0)
    if PER_HEAD:
        kbase = keys_ptr + h.to(tl.int64) * (2 * n * DH)
    else:
        kbase = keys_ptr
    mask3 = k_mask[:, :, None] & (offs_d < DH)[None, None, :]
    for p in tl.static_range(2):
        if p == 0:
            sub = e // n
        else:
            sub = e % n
        c = tl.load(kbase + p * n * DH + sub[:, :, None] * DH + offs_d[None, None, :], mask=mask3, other=0.0)
        dq = tl.sum(g[:, :, None] * c.to(tl.float32), axis=1)  # [BLOCK_M, DH_PAD]
        tl.store(dq_ptr + row[:, None] * DK + p * DH + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & (offs_d < DH)[None, :])


@triton.jit
def pk_topk_bwd_keys_kernel(
    dscores_ptr, sub_ptr, q_ptr, part_ptr,
    M, n, H, rows_per_split,
    DK: tl.constexpr, DH_PAD: tl.constexpr, PER_HEAD: tl.constexpr,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """part[split, set, p, c, :] = sum over rows of this split of S[row, c] * q_p[row].
    sub_ptr: int32 [2, M*H, K], the sub-key id of each selected expert in half p."""
    DH: tl.constexpr = DK // 2
    pid_n = tl.program_id(0)
    pid_sp = tl.program_id(1)  # set * 2 + p
    split = tl.program_id(2)
    kset = pid_sp // 2
    p = pid_sp % 2
    num_sets = tl.num_programs(1) // 2
    # rows: per-head keys -> (token, head=kset) for token in [0, M); shared -> all M*H rows
    if PER_HEAD:
        total = M
    else:
        total = M * H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DH_PAD)
    acc = tl.zeros((BLOCK_N, DH_PAD), tl.float32)  # [BLOCK_N, DH_PAD]
    r_start = split * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, total)
    for r0 in range(r_start, r_end, BLOCK_M):
        offs_r = r0 + tl.arange(0, BLOCK_M)
        r_mask = offs_r < r_end
        if PER_HEAD:
            row = offs_r.to(tl.int64) * H + kset
        else:
            row = offs_r.to(tl.int64)
        sel = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)  # [BLOCK_M, BLOCK_N] sparse S tile
        sub_base = sub_ptr + p * (M * H * K)
        for r in tl.static_range(K):
            sub = tl.load(sub_base + row * K + r, mask=r_mask, other=-1)  # [BLOCK_M] int32
            g = tl.load(dscores_ptr + row * K + r, mask=r_mask, other=0.0)
            sel += tl.where(sub[:, None] == offs_n[None, :], g[:, None], 0.0)
        q = tl.load(q_ptr + row[:, None] * DK + p * DH + offs_d[None, :],
                    mask=r_mask[:, None] & (offs_d < DH)[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, DH_PAD]
        acc += tl.dot(tl.trans(sel), q, input_precision=PRECISION)
    base = ((split.to(tl.int64) * num_sets + kset) * 2 + p) * n * DH
    tl.store(part_ptr + base + offs_n[:, None] * DH + offs_d[None, :], acc,
             mask=(offs_n < n)[:, None] & (offs_d < DH)[None, :])
