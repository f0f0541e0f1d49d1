"""Stage 1 of the PEER layer: product-key retrieval (DESIGN.md sec. 1.2), Triton kernels.

Forward (`pk_topk_fwd_kernel`), one program per block of BLOCK_M query rows of one head.
For each half p of the query, s_p = C_p q_p over tiles of BLOCK_N sub-keys (tl.dot, fp32
accumulation), in two passes over the tiles (`_half_topk`):
  A. g = running elementwise max of the tiles (NaN-propagating: a NaN score leaves NaN),
     folded into GROUPS disjoint groups (64-row programs: each of the BLOCK_N columns a
     group); tau = the KP-th largest group maximum (by rounds of row maxima, or by the quad
     lists below in 64-row programs on a GPU; lower with ties). KP groups hold an element
     >= tau, so the whole top KP is >= tau: an exact bound, not a guess.
  B. the scores again; the few >= tau (~18 at KP = 16, n = 1024 on random data) are
     written to scratch as raw score bits << 32 | (MAX_ID - id): in the paper config's
     64-row programs on a GPU (KP = 16, 64-sub-key tiles) each thread appends the survivors
     of its columns to its own list, one per quad lane and row (`_survivors_by_lanes`, the
     "lane lists" below); in other 64-row programs at the slots of a per-row list that
     tensor-core prefix counts of the 0/1 survivor tiles give (`_survivors_by_prefix`; on a
     GPU the 0/1 tiles come from bf16 compares, so a few scores that round to tau may join);
     in 16-row programs at slots from a per-row atomic counter (`_survivors_by_atomics`; the
     order of the slots does not change the result). The top KP of those is taken by KP
     rounds of row maxima (or the quad lists) over CAP / 2 values (CAP where a row of the
     block has more survivors) instead of over all n.
  A row with more than CAP survivors (ties, adversarial data), a lane list past its
  capacity, a NaN score or a register layout the asm blocks did not expect sends its block
  to the exact fallback: KP rounds of row maxima per tile (`_half_topk_rounds`, both halves).
Candidates are packed int64 (order-preserving score bits << 32 | MAX_ID - id: ties go
to the lower id). Then the top K of the pair sums s_1[a] + s_2[b] of the candidates by a
K-way merge of the sorted lists (s_1[a] + s_2[b], b = 0, 1, ...): K rounds of a row maximum
over the CAND list heads (`_pair_topk`; in 64-row programs on a GPU with K = 16, each round
one inline-asm block per thread, `_pair_topk_quad`; only pairs with (a+1)(b+1) <= K are
ever reached, 50 of 256 at K = 16). All rounds run as loops (see below). Writes
scores [M, H, K] fp32 (descending) and expert ids [M, H, K] int64. The [M, H, 2, n]
score matrix never reaches memory; nothing extra is saved for the backward.
Speed and what was tried: bench/NOTES.md.

The forward is deterministic: the atomics of 16-row programs only pick slots.

Backward (deterministic: no floating-point atomics):
  `pk_topk_bwd_query_kernel`: dq_p[m] = sum_r g[m, r] * C_p[sub_p(id[m, r])], a gather; it
  also writes the dC row of each selection, with a (token, head)'s repeats of a sub-key
  merged into the first (summed g), the rest sent past every segment, and (BITMAP) sets the
  selection's bit in its row's bitmap (integer atomic OR: the same bits in any order).
  The selections are then grouped by row, in a fixed order: by a counting sort from those
  bitmaps (csrc_triton/key_segments.py) or, where the bitmaps would be large, by a stable sort.
  `pk_topk_bwd_keys_kernel`: dC_p[c] = sum of g[m, r] * q_p[m] over the selections whose
  half-p sub-key is c: a segmented sum over the selections grouped by sub-key row (as the
  expert tables' backward), each program owning 16 rows of dC, summed side by side.
"""
import triton
import triton.language as tl

from .key_segments import selection_unit

# ids are < n*n <= 2^24; the low word of a packed value is MAX_ID - id (ties -> lower id)
MAX_ID = 16777216


@triton.jit
def _order_key(bits):
    """fp32 bits (as int32) <-> int32 whose signed order is the float order (its own
    inverse): negative floats have their magnitude bits flipped."""
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _raw(score, ids):
    """A survivor as stored in scratch by pass B: raw score bits << 32 | (MAX_ID - id);
    _rank_survivors applies _order_key to the few it loads."""
    return (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (16777216 - ids).to(tl.int64)


@triton.jit
def _pack_low(score, low, valid):
    """fp32 score + a non-negative 32-bit low word -> int64 whose order is (score, low);
    invalid -> minimum. The packed forms below differ only in their low word."""
    key = tl.where(valid, _order_key(score.to(tl.int32, bitcast=True)), -2147483648)
    return (key.to(tl.int64) << 32) + tl.where(valid, low, 0).to(tl.int64)


@triton.jit
def _unpack_low(packed):
    """-> (fp32 score, int64 low word) of _pack_low."""
    key = (packed >> 32).to(tl.int32)
    return _order_key(key).to(tl.float32, bitcast=True), packed - ((packed >> 32) << 32)


@triton.jit
def _pack(score, ids, valid):
    """fp32 score + int id -> int64 whose order is (score, -id); invalid -> minimum."""
    return _pack_low(score, 16777216 - ids, valid)


@triton.jit
def _unpack(packed):
    score, low = _unpack_low(packed)
    return score, (16777216 - low).to(tl.int32)


# The rounds below run as loops, not unrolled: unrolled (K = 16) the kernel was 44K SASS
# instructions, each executed once per program, and Nsight Compute put ~20% of the stall
# samples on instruction fetch (no_inst); as loops it is ~7K and one 64-row program took
# 0.17 -> 0.10 ms on an H200 (bench/NOTES.md). They also compile in seconds for K = 32, 64.


@triton.jit
def _merge_round(best, packed, new, slot, r):
    m = tl.maximum(tl.max(packed, axis=1), tl.max(best, axis=1))  # [BM]
    new = tl.where(slot[None, :] == r, m[:, None], new)
    packed = tl.where(packed == m[:, None], -9223372036854775808, packed)
    best = tl.where(best == m[:, None], -9223372036854775808, best)
    return best, packed, new


@triton.jit
def _merge_topk(best, packed, KP: tl.constexpr):
    """Top-KP (descending) of the union of best [BM, KP] and packed [BM, BN], by KP
    rounds of row maxima: plain reductions and selects, no sorting network.
    Packed values are unique, so each round removes exactly one element."""
    slot = tl.arange(0, KP)
    new = tl.full(best.shape, -9223372036854775808, tl.int64)
    for r in range(KP):
        best, packed, new = _merge_round(best, packed, new, slot, r)
    return new


@triton.jit
def _top_round(packed, new, slot, r):
    m = tl.max(packed, axis=1)  # [BM]
    new = tl.where(slot[None, :] == r, m[:, None], new)
    packed = tl.where(packed == m[:, None], -9223372036854775808, packed)
    return packed, new


@triton.jit
def _top_rounds(packed, KP: tl.constexpr):
    """Top-KP (descending) of packed [BM, C] by KP rounds of row maxima (packed values are
    unique: each round removes one element); rows with fewer than KP valid entries end in
    the minimum value."""
    slot = tl.arange(0, KP)
    new = tl.full((packed.shape[0], KP), -9223372036854775808, tl.int64)
    for r in range(KP):
        packed, new = _top_round(packed, new, slot, r)
    return new


@triton.jit
def _drop_max(x):
    return tl.where(x == tl.max(x, axis=1)[:, None], float("-inf"), x)


@triton.jit
def _kth_largest_bound(x, KP: tl.constexpr):
    """[BM, G] fp32 -> [BM]: the KP-th largest value of each row when its values are
    distinct; with ties a value below it (each of the KP - 1 rounds drops every copy of the
    row maximum), so always a lower bound of the KP-th largest (or -inf)."""
    for _ in range(KP - 1):
        x = _drop_max(x)
    return tl.max(x, axis=1)


# ---- per-thread quad lists (64-row programs on a GPU, KP = 16) -------------------------------
# In a 64 x 64 wgmma accumulator each thread holds parts of two rows (A, B = A + 8) and a row
# spans the 4 threads of a quad. The two per-row selections below (the threshold over 64
# group maxima, the ranking of 32 survivor slots) run as one inline-asm block per thread on
# the thread's values of each row, sorted by a network (the threshold keeps the top 8 of 16):
# the ranking then takes the quad's maximum by 2 butterfly shuffles per round, the threshold
# merges the quad's lists by bitonic steps (_threshold_asm), instead of rounds of tl.max over
# the row (Triton's reductions: ~170-270 SASS instructions per round, bench/NOTES.md); the
# rounds of the pair merge run the same way (_pair_round_asm, further below). Where the
# registers sit is the compiler's choice, so each block also takes the row (and column) of
# every element and checks the order it assumes, and the quad (_layout_check); on any
# mismatch the block takes the exact fallback (slow, never wrong).
def _batcher_pairs(n: int):
    """Compare-exchange pairs of Batcher's odd-even merge sort of n (a power of 2) values."""
    pairs = []

    def merge(lo, hi, r):
        step = r * 2
        if step < hi - lo:
            merge(lo, hi, step)
            merge(lo + r, hi, step)
            pairs.extend((i, i + r) for i in range(lo + r, hi - r, step))
        else:
            pairs.append((lo, lo + r))

    def sort(lo, hi):
        if hi - lo >= 1:
            mid = lo + (hi - lo) // 2
            sort(lo, mid)
            sort(mid + 1, hi)
            merge(lo, hi, 1)

    sort(0, n - 1)
    return pairs


def _bitonic_merge8_pairs():
    """Compare-exchange pairs (max to the first) that sort a bitonic sequence of 8 values
    descending: distances 4, 2, 1."""
    return [(i, i + d) for d in (4, 2, 1) for i in range(8) if i % (2 * d) < d]


def _top8_of_16_ops():
    """(op, i, j) steps that leave the 8 largest of 16 values, sorted descending, in places
    0-7: each half sorted (Batcher), x_i = max(x_i, x_15-i) for i < 8 (the top 8 as a bitonic
    sequence), then the bitonic merge of 8 (distances 4, 2, 1). "ce": max to i, min to j."""
    ops = [("ce", a + h, b + h) for h in (0, 8) for a, b in _batcher_pairs(8)]
    ops += [("max", i, 15 - i) for i in range(8)]
    ops += [("ce", i, j) for i, j in _bitonic_merge8_pairs()]
    return ops


def _layout_check(n_el: int, row: int, col):
    """PTX lines (registers lane, ra, rb, t, t0 and predicate ok declared by the caller) that
    set lane = the thread's place in its quad and ok = the wgmma layout assumed by the asm
    blocks here: operands $row.. (the rows of the thread's n_el elements) in the order A A B B
    per 4 elements with A != B and the same A, B in the whole quad; if col is given, operands
    $col.. (their columns) 8j + 2t + {0, 1} for thread t of the quad (elements 4j .. 4j + 3)."""
    lines = ["mov.u32 lane, %laneid;", "and.b32 lane, lane, 3;",
             f"mov.b32 ra, ${row};", f"mov.b32 rb, ${row + 2};", "setp.ne.s32 ok, ra, rb;"]
    for i in range(n_el):
        lines.append(f"setp.eq.and.s32 ok, ${row + i}, {'ra' if (i // 2) % 2 == 0 else 'rb'}, ok;")
    for r in ("ra", "rb"):
        for d in (1, 2):
            lines += [f"shfl.sync.bfly.b32 t, {r}, {d}, 0x1c1f, 0xffffffff;", f"setp.eq.and.s32 ok, t, {r}, ok;"]
    if col is not None:
        lines.append("shl.b32 t0, lane, 1;")
        for i in range(n_el):
            lines += [f"sub.s32 t, ${col + i}, t0;", f"setp.eq.and.s32 ok, t, {8 * (i // 4) + i % 2}, ok;"]
    return lines


def _ce(x: str, i: int, j: int, cmp: str, b: str) -> list:
    """PTX of a descending compare-exchange of registers x<i>, x<j> (max to i), through h."""
    return [f"max{cmp} h, {x}{i}, {x}{j};", f"min{cmp} {x}{j}, {x}{i}, {x}{j};", f"mov{b} {x}{i}, h;"]


def _slot(i: int):
    """Element i of a thread's wgmma-layout values -> (list, position): rows A A B B per 4."""
    return "xa" if (i // 2) % 2 == 0 else "xb", 2 * (i // 4) + i % 2


def _threshold_asm() -> str:
    """PTX of the threshold block (see above): operands $0-31 out fp32, $32-63 the column
    maxima g [64, 64] of pass A (fp32, each column a group), $64-95 their rows; assumed order
    A A B B per 4 elements. Per row, each thread keeps the 8 largest of its 16 values
    (_top8_of_16_ops, sorted); then two bitonic steps across the quad: threads t, t ^ 1 split
    their 16 kept values into the top 8 (even t) and the next 8 (odd t), each sorted again
    (the bitonic merge of 8); threads t, t ^ 3 take the elementwise maximum of a list and the
    partner's reversed list, which leaves the top 16 of the quad's 32 kept values in threads 0
    and 1. Every output of the row is their minimum, the 16th largest kept value: KP = 16
    group maxima are >= it, so it is a lower bound of the KP-th largest, as
    _kth_largest_bound (keeping 8 of 16 can only lower it: more survivors, never a lost one;
    min and max keep ties as they are). Three shuffle stages instead of 15 dependent rounds of
    a quad maximum (H200, T = 4096: 0.1088 -> 0.1074 ms, bench/NOTES.md). On a layout
    mismatch: +inf (no survivors: fallback)."""
    n_el = 32
    val, row = n_el, 2 * n_el
    lines = ["{", ".reg .pred ok, ev;", ".reg .b32 lane, ra, rb, t, t0;",
             ".reg .f32 xa<16>, xb<16>, ya<8>, yb<8>, h, m, o;"]
    lines += _layout_check(n_el, row, None)
    lines += ["and.b32 t, lane, 1;", "setp.eq.u32 ev, t, 0;"]
    lines += [f"mov.b32 {_slot(i)[0]}{_slot(i)[1]}, ${val + i};" for i in range(n_el)]
    for x in ("xa", "xb"):
        for op, i, j in _top8_of_16_ops():
            lines += _ce(x, i, j, ".f32", ".f32") if op == "ce" else [f"max.f32 {x}{i}, {x}{i}, {x}{j};"]
    for x, y, r in (("xa", "ya", "ra"), ("xb", "yb", "rb")):
        lines += [f"shfl.sync.bfly.b32 {y}{i}, {x}{7 - i}, 1, 0x1c1f, 0xffffffff;" for i in range(8)]
        for i in range(8):  # the top 8 of the pair's 16 (even t) or the next 8 (odd t), bitonic
            lines += [f"max.f32 h, {x}{i}, {y}{i};", f"min.f32 o, {x}{i}, {y}{i};", f"selp.f32 {x}{i}, h, o, ev;"]
        for i, j in _bitonic_merge8_pairs():
            lines += _ce(x, i, j, ".f32", ".f32")
        lines += [f"shfl.sync.bfly.b32 {y}{i}, {x}{7 - i}, 3, 0x1c1f, 0xffffffff;" for i in range(8)]
        lines += [f"max.f32 {x}{i}, {x}{i}, {y}{i};" for i in range(8)]
        lines += [f"min.f32 m, {x}0, {x}1;"] + [f"min.f32 m, m, {x}{i};" for i in range(2, 8)]
        lines += ["shfl.sync.bfly.b32 o, m, 1, 0x1c1f, 0xffffffff;", "min.f32 m, m, o;",
                  "shfl.sync.idx.b32 m, m, 0, 0x1c1f, 0xffffffff;", f"mov.b32 {r}, m;"]
    lines += [f"mov.b32 ${i}, {'ra' if _slot(i)[0] == 'xa' else 'rb'};" for i in range(n_el)]
    lines += [f"@!ok mov.b32 ${i}, 0f7F800000;" for i in range(n_el)] + ["}"]
    return "\n".join(lines)


def _quad_lists_asm(rounds: int) -> str:
    """PTX of the ranking block (see above): $0-15 out int64, $16-31 the packed survivors
    [64, 32] (int64), $32-47 their rows, $48-63 their columns; assumed order A A B B per 4
    elements, thread t of a quad holding columns 8j + 2t + {0, 1}. Each thread sorts its 8
    values per row (_batcher_pairs); then `rounds` rounds each take the quad's maximum head
    (2 butterfly shuffles) and drop it from the thread that holds it. Rank r (< rounds) of a
    row goes to its element in column r, the other columns get the minimum. On a mismatch:
    the maximum int64 (never a packed value: its low word would be 2^32 - 1 > MAX_ID), which
    _half_topk checks."""
    b, cmp = ".b64", ".s64"
    minv, bad = "0x8000000000000000", hex(LAYOUT_MISMATCH.value)
    n_el = 16
    val, row, col = n_el, 2 * n_el, 3 * n_el
    lines = ["{", ".reg .pred p, w, ok;", ".reg .b32 lane, ra, rb, t, t0, t1;",
             f".reg {b} xa<8>, xb<8>, m, o, h;"]
    lines += _layout_check(n_el, row, col)
    for i in range(n_el):
        x, k = _slot(i)
        lines += [f"mov{b} {x}{k}, ${val + i};", f"mov{b} ${i}, {minv};"]
    for x in ("xa", "xb"):  # descending
        for i, j in _batcher_pairs(8):
            lines += _ce(x, i, j, cmp, b)

    def quad_max(x):
        out = [f"mov{b} m, {x}0;"]
        for d in (1, 2):
            out += ["mov.b64 {t0, t1}, m;", f"shfl.sync.bfly.b32 t0, t0, {d}, 0x1c1f, 0xffffffff;",
                    f"shfl.sync.bfly.b32 t1, t1, {d}, 0x1c1f, 0xffffffff;", "mov.b64 o, {t0, t1};",
                    f"max{cmp} m, m, o;"]
        return out

    for r in range(rounds):
        for x, off in (("xa", 0), ("xb", 2)):
            lines += quad_max(x) + [f"setp.eq{cmp} w, {x}0, m;"]
            lines += [f"@w mov{b} {x}{k}, {x}{k + 1};" for k in range(7)] + [f"@w mov{b} {x}7, {minv};"]
            # rank r -> the element of column r
            lines += [f"setp.eq.u32 p, lane, {(r % 8) // 2};", f"@p mov{b} ${4 * (r // 8) + off + r % 2}, m;"]
    lines += [f"@!ok mov{b} ${i}, {bad};" for i in range(n_el)] + ["}"]
    return "\n".join(lines)


LAYOUT_MISMATCH = tl.constexpr(9223372036854775807)  # what RANK_ASM returns on a layout mismatch
TAU_ASM = tl.constexpr(_threshold_asm())
TAU_CONS = tl.constexpr(",".join(["=f"] * 32 + ["f"] * 32 + ["r"] * 32))
RANK_ASM = tl.constexpr(_quad_lists_asm(16))
RANK_CONS = tl.constexpr(",".join(["=l"] * 16 + ["l"] * 16 + ["r"] * 32))


# ---- per-lane survivor lists (pass B of the paper config's 64-row programs on a GPU) ---------
# Each thread appends the survivors of its 16 columns of each of its two rows (A, B) to its own
# list with a running count per row, LANE_CAP entries per row and quad lane, instead of taking
# slots from prefix counts on the tensor cores (_survivors_by_prefix: per tile a 0/1 tile, two
# more products and their waits; H200, T = 4096: 0.101 -> 0.083 ms, bench/NOTES.md). The lists
# of a row are interleaved, entry j of lane t at slot 4 j + t, so that the lanes' first entries
# share sectors. The counts carry their row and lane, (row << 20) | (lane << 16) | count, so
# that the ranking's loads (_lane_gather_asm) can check that the appends saw the register order
# they assume; a count past LANE_CAP - 4 sends the block to the exact fallback.
LANE_CAP = tl.constexpr(24)


def _lane_append_asm(cap: int) -> str:
    """PTX of one pass-B tile per thread (pack = 32 on [64, 64] tiles): operands $0-31 out the
    counts (int32, as above); in $32-63 the scores (fp32), $64-95 tau of their rows, $96-127
    the scratch row base less row << 25 (int64, bytes: the count's row field times 32),
    $128-159 the low words MAX_ID - id, $160-191 the counts. Assumed order A A B B per 4
    elements (checked through the row carried in every count). Each score s >= tau goes to
    [row base + lane * 8 + count * 32] (slot 4 count + lane) as {low, score bits}, and its row's
    count grows; every 8 elements (4 of each row) a row whose count is past cap - 4 stops taking
    survivors, so no count passes cap, and the ranking sends its block to the fallback."""
    n = 32
    S, TAU, BASE, LOW, CNT = n, 2 * n, 3 * n, 4 * n, 5 * n
    lines = ["{", ".reg .pred p, okA, okB;",
             ".reg .b32 lane, t, cA, cB, thA, thB, v, lo, hi, blA, bhA, blB, bhB;", ".reg .b64 off, a;",
             "mov.u32 lane, %laneid;", "and.b32 lane, lane, 3;",
             f"mul.wide.s32 off, lane, {8 - (1 << 21)};",  # lane * 8 less the lane field's (lane << 16) * 32
             f"add.s64 a, ${BASE}, off;", "mov.b64 {blA, bhA}, a;", f"add.s64 a, ${BASE + 2}, off;",
             "mov.b64 {blB, bhB}, a;",
             "shl.b32 t, lane, 16;", f"or.b32 cA, ${CNT}, t;", f"or.b32 cB, ${CNT + 2}, t;",
             "and.b32 thA, cA, 0xFFFF0000;", f"add.s32 thA, thA, {cap - 4};",
             "and.b32 thB, cB, 0xFFFF0000;", f"add.s32 thB, thB, {cap - 4};"]
    for i in range(n):
        r = "A" if (i // 2) % 2 == 0 else "B"
        if i % 8 == 0:
            lines += ["setp.le.s32 okA, cA, thA;", "setp.le.s32 okB, cB, thB;"]
        lines += [f"setp.ge.and.f32 p, ${S + i}, ${TAU + i}, ok{r};", f"shl.b32 v, c{r}, 5;",
                  f"add.cc.u32 lo, bl{r}, v;", f"addc.u32 hi, bh{r}, 0;", "mov.b64 a, {lo, hi};",
                  f"mov.b32 v, ${S + i};", f"@p st.global.v2.b32 [a], {{${LOW + i}, v}};", f"@p add.s32 c{r}, c{r}, 1;"]
    lines += [f"mov.b32 ${i}, c{'A' if (i // 2) % 2 == 0 else 'B'};" for i in range(n)]
    return "\n".join(lines + ["}"])


def _lane_gather_asm(n_el: int, cap: int) -> str:
    """PTX of the ranking's loads from the lane lists (pack = n_el = W / 2 on [64, W]): the
    row's slots v = 0 .. W - 1 are its survivors in lane order (lane 0's list, then lane 1's,
    ...), slot v read by the thread holding column v. Operands: $0.. out the raw entries
    (int64, 0 where v >= the row's total), then out 1 where a check failed (else 0); in: the
    scratch row base (int64), the counts XOR row << 20 (int32: (lane << 16) | count of the
    thread's lane where the appends saw the assumed order), rows, columns, the row totals.
    Checks: the quad layout (_layout_check), every count's lane and row, each lane's count
    <= cap - 4 and the quad's total equal to the total given; no load unless they pass."""
    n = n_el
    BASE, CW, ROW, COL, TOT = 2 * n, 3 * n, 4 * n, 5 * n, 6 * n
    regs = ", ".join(f"{x}{r}" for r in "AB" for x in ("P1", "P2", "P3", "tot", "d1", "d2", "d3"))
    lines = ["{", ".reg .pred ok, p, q;", ".reg .b32 lane, ra, rb, t, t0, x, c, adj, idx;", f".reg .b32 {regs};",
             ".reg .b64 a;"]
    lines += _layout_check(n, ROW, COL)
    for i in range(n):
        lines += [f"shr.u32 x, ${CW + i}, 16;", "setp.eq.and.u32 ok, x, lane, ok;"]
    for r, e in (("A", 0), ("B", 2)):  # the quad's counts: lane L's list holds slots P_L .. P_(L+1) - 1
        lines += [f"and.b32 c, ${CW + e}, 0xFFFF;", f"setp.le.and.u32 ok, c, {cap - 4}, ok;",
                  f"shfl.sync.idx.b32 P1{r}, c, 0, 0x1c1f, 0xffffffff;",
                  "shfl.sync.idx.b32 x, c, 1, 0x1c1f, 0xffffffff;", f"add.s32 P2{r}, P1{r}, x;",
                  "shfl.sync.idx.b32 x, c, 2, 0x1c1f, 0xffffffff;", f"add.s32 P3{r}, P2{r}, x;",
                  "shfl.sync.idx.b32 x, c, 3, 0x1c1f, 0xffffffff;", f"add.s32 tot{r}, P3{r}, x;",
                  f"setp.eq.and.s32 ok, tot{r}, ${TOT + e}, ok;",
                  # slot 4 (v - P_L) + L of lane L's entry v - P_L: 4 v + d_L
                  f"mul.lo.s32 d1{r}, P1{r}, -4;", f"add.s32 d1{r}, d1{r}, 1;",
                  f"mul.lo.s32 d2{r}, P2{r}, -4;", f"add.s32 d2{r}, d2{r}, 2;",
                  f"mul.lo.s32 d3{r}, P3{r}, -4;", f"add.s32 d3{r}, d3{r}, 3;"]
    for i in range(n):
        r = "A" if (i // 2) % 2 == 0 else "B"
        v = f"${COL + i}"
        lines += [f"setp.lt.and.s32 q, {v}, tot{r}, ok;",
                  f"setp.ge.s32 p, {v}, P1{r};", f"selp.b32 adj, d1{r}, 0, p;",
                  f"setp.ge.s32 p, {v}, P2{r};", f"selp.b32 adj, d2{r}, adj, p;",
                  f"setp.ge.s32 p, {v}, P3{r};", f"selp.b32 adj, d3{r}, adj, p;",
                  f"mad.lo.s32 idx, {v}, 4, adj;", f"mad.wide.s32 a, idx, 8, ${BASE + i};",
                  f"mov.b64 ${i}, 0;", f"@q ld.global.b64 ${i}, [a];"]
    lines += [f"selp.u32 ${n + i}, 0, 1, ok;" for i in range(n)]
    return "\n".join(lines + ["}"])


LANE_APPEND_ASM = tl.constexpr(_lane_append_asm(LANE_CAP.value))
LANE_APPEND_CONS = tl.constexpr(",".join(["=r"] * 32 + ["f"] * 64 + ["l"] * 32 + ["r"] * 64))
LANE_GATHER32_ASM = tl.constexpr(_lane_gather_asm(16, LANE_CAP.value))
LANE_GATHER32_CONS = tl.constexpr(",".join(["=l"] * 16 + ["=r"] * 16 + ["l"] * 16 + ["r"] * 64))
LANE_GATHER64_ASM = tl.constexpr(_lane_gather_asm(32, LANE_CAP.value))
LANE_GATHER64_CONS = tl.constexpr(",".join(["=l"] * 32 + ["=r"] * 32 + ["l"] * 32 + ["r"] * 128))


@triton.jit
def _fold_to(x, W: tl.constexpr):
    """[BM, N] -> [BM, W] (W divides N): the maximum of columns c, c + W, ...; each thread keeps
    its own values, so on the wgmma layout the result keeps the quad layout the asm blocks
    assume (column 8 j + 2 t + {0, 1} in thread t of the quad)."""
    if W < x.shape[1]:
        x = tl.max(tl.reshape(x, (x.shape[0], x.shape[1] // W, W)), axis=1)
    return x


@triton.jit
def _rank_raw(raw, used, rows, slots, KP: tl.constexpr, QUAD_RANK: tl.constexpr):
    """Top-KP (packed, descending) of the scratch entries raw [BM, W] (score bits << 32 | low)
    where used: by the quad lists (RANK_ASM, W = 32, on the layout of rows and slots) where
    QUAD_RANK, else by rounds of row maxima. The shared tail of _rank_survivors and
    _rank_lane_lists."""
    score = (raw >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    packed = _pack_low(score, raw & 0xFFFFFFFF, used)  # the low word is MAX_ID - id already
    if QUAD_RANK:  # quad lists (above); the columns >= KP hold the minimum
        ranked = tl.inline_asm_elementwise(RANK_ASM, RANK_CONS, [packed, rows, slots], dtype=tl.int64, is_pure=True,
                                           pack=16)
        return tl.max(tl.reshape(ranked, (ranked.shape[0], ranked.shape[1] // KP, KP)), axis=1)
    return _top_rounds(packed, KP)


@triton.jit
def _survivors_by_lanes(q, keys_ptr, keys_desc, desc_row, scr_row_ptr, tau, n, offs_d, d_mask, DH: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Pass B by per-lane lists (above, _lane_append_asm): returns the counts [BLOCK_M, BLOCK_N]
    int32, each element (row << 20) | (lane << 16) | the entries in its thread's list of its row."""
    rows = tl.arange(0, BLOCK_M)
    base = tl.broadcast_to((scr_row_ptr.to(tl.int64) - (rows.to(tl.int64) << 25))[:, None], (BLOCK_M, BLOCK_N))
    taub = tl.broadcast_to(tau[:, None], (BLOCK_M, BLOCK_N))
    cnt = tl.broadcast_to((rows << 20)[:, None], (BLOCK_M, BLOCK_N))
    for n0 in range(0, n, BLOCK_N):
        s, offs_n, n_mask = _score_tile(q, keys_ptr, n0, n, offs_d, d_mask, DH, BLOCK_N, EVEN_N, UPCAST, PRECISION,
                                        keys_desc, desc_row, TMA)
        if not EVEN_N:  # NaN is never >= tau
            s = tl.where(n_mask[None, :], s, float("nan"))
        low = tl.broadcast_to(16777216 - offs_n[None, :], (BLOCK_M, BLOCK_N))
        cnt = tl.inline_asm_elementwise(LANE_APPEND_ASM, LANE_APPEND_CONS, [s, taub, base, low, cnt], dtype=tl.int32,
                                        is_pure=False, pack=32)
    return cnt


@triton.jit
def _rank_lane_lists(scr_row_ptr, cnt, total, W: tl.constexpr, KP: tl.constexpr):
    """Top-KP (packed, descending) of the first min(total, W) survivors of each row in its lane
    lists (cnt: _survivors_by_lanes' counts), and per row 1 where _lane_gather_asm's checks
    failed (else 0). The loads take the layout of the counts (reshaped to [BM, W] as in
    _rank_survivors); W = 32: the quad lists (RANK_ASM), W = 64: rounds of row maxima."""
    rows = tl.arange(0, cnt.shape[0])[:, None]
    # (lane << 16) | count where the row field is right, else >= 2^20 (also after the fold)
    cw = _fold_to(cnt ^ (rows << 20), W)
    z = _fold_to(tl.where(cnt < -1, 1, 0), W)  # zeros (the counts are >= 0) in the counts' layout, [BM, W]
    slots = tl.arange(0, W)[None, :] + z
    base = tl.broadcast_to(scr_row_ptr.to(tl.int64)[:, None], slots.shape)
    tot = tl.broadcast_to(total[:, None], slots.shape)
    if W == 32:
        raw, fail = tl.inline_asm_elementwise(LANE_GATHER32_ASM, LANE_GATHER32_CONS, [base, cw, rows + z, slots, tot],
                                              dtype=(tl.int64, tl.int32), is_pure=False, pack=16)
    else:
        raw, fail = tl.inline_asm_elementwise(LANE_GATHER64_ASM, LANE_GATHER64_CONS, [base, cw, rows + z, slots, tot],
                                              dtype=(tl.int64, tl.int32), is_pure=False, pack=32)
    return _rank_raw(raw, slots < tot, rows + z, slots, KP, W == 32), tl.max(fail, axis=1)


@triton.jit
def _rank_survivors(scr_row_ptr, cnt, tile, W: tl.constexpr, KP: tl.constexpr, IN_TILE: tl.constexpr,
                    QUAD: tl.constexpr):
    """Top-KP (packed, descending) of the first min(cnt, W) scratch entries of each row.
    IN_TILE (64-row programs on a GPU): tile is pass B's last accumulator [BM, BLOCK_N] and
    the entries are loaded by inline PTX in a layout derived from it (W <= BLOCK_N), where
    a row's W values span the 4 threads of a quad; a tl.load gets the coalesced layout, in
    which a row spans 16 threads (4 shuffle steps for each of 8 rows per thread in every
    round, and Triton 3.6 moved each round's maximum through shared memory: ~370
    instructions per round, 27% of the H200 kernel's, bench/NOTES.md). QUAD: _half_topk's
    condition for the quad lists; with W = 32 the ranking is RANK_ASM, whose layout-mismatch
    value _half_topk checks under the same condition."""
    if IN_TILE:
        z = _fold_to(tl.where(tile < -1.0, 1, 0), W)  # zeros (the counts are >= 0) in the tile's layout, [BM, W]
        slots = tl.arange(0, W)[None, :] + z
        rows = tl.arange(0, z.shape[0])[:, None] + z
        used = slots < cnt[:, None]
        raw = tl.inline_asm_elementwise(
            """{
            .reg .pred p;
            .reg .b64 a;
            setp.lt.s32 p, $2, $3;
            mad.wide.s32 a, $2, 8, $1;
            mov.b64 $0, 0;
            @p ld.global.b64 $0, [a];
            }""",
            "=l,l,r,r",
            [tl.broadcast_to(scr_row_ptr[:, None], slots.shape).to(tl.int64), slots,
             tl.broadcast_to(cnt[:, None], slots.shape)],
            dtype=tl.int64, is_pure=False, pack=1)
    else:
        slots = tl.arange(0, W)[None, :]
        used = slots < cnt[:, None]
        raw = tl.load(scr_row_ptr[:, None] + slots, mask=used, other=0)  # [BLOCK_M, W]: bits << 32 | low
        rows = tl.arange(0, cnt.shape[0])[:, None]  # (the quad lists need IN_TILE)
    return _rank_raw(raw, used, rows, slots, KP, IN_TILE and QUAD and W == 32)


@triton.jit
def _score_tile(q, keys_ptr, n0, n, offs_d, d_mask, DH: tl.constexpr, BLOCK_N: tl.constexpr,
                EVEN_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, keys_desc=None, desc_row=0,
                TMA: tl.constexpr = False):
    """Scores of one tile of BLOCK_N sub-keys: q [BM, DH_PAD] . C[n0:n0+BLOCK_N]^T -> fp32.
    EVEN_N (n % BLOCK_N == 0) and DH == DH_PAD drop the masks that are all true (their
    compares and selects were ~8% of the paper-config kernel's instructions, bench/NOTES.md).
    TMA (pk_topk_fwd_kernel's main path where EVEN_N and DH == DH_PAD): the tile comes by a
    TMA load of rows desc_row + n0 .. of keys_desc (the sub-keys as [sets * 2 * n, DH])
    instead of per-thread copies; the tensor cores then read it with no proxy fence per tile."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    ptrs = keys_ptr + offs_n[:, None].to(tl.int64) * DH + offs_d[None, :]
    if TMA:
        n_mask = tl.full((BLOCK_N,), True, tl.int1)
        c = keys_desc.load([desc_row + n0, 0])
    elif EVEN_N:
        n_mask = tl.full((BLOCK_N,), True, tl.int1)
        if DH == offs_d.shape[0]:
            c = tl.load(ptrs)
        else:
            c = tl.load(ptrs, mask=d_mask[None, :], other=0.0)
    else:
        n_mask = offs_n < n
        if DH == offs_d.shape[0]:
            c = tl.load(ptrs, mask=n_mask[:, None], other=0.0)
        else:
            c = tl.load(ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, DH_PAD]
    if UPCAST:
        c = c.to(tl.float32)
    else:
        c = c.to(q.dtype)
    s = tl.dot(q, tl.trans(c), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N] fp32
    return s, offs_n, n_mask


@triton.jit
def _store_survivors(scr_row_ptr, acc, s, offs_n, CAP: tl.constexpr, NATIVE: tl.constexpr):
    """scratch[row, v] = raw score bits << 32 | (MAX_ID - id) where v < CAP, element by
    element in the layout of the score tile; v = acc (an exact integer in fp32) is a
    survivor's slot, and >= PREFIX_BIAS for a score below the threshold
    (_survivors_by_prefix), so one unsigned compare decides. On a GPU by inline PTX: v from
    the bits of acc + 2^23 (0x4B000000 + v: an exact fp32 add instead of a conversion, whose
    pipe is a quarter as fast), the bias folded into the row pointer; compare, address and
    store per element. A tl.store here gets a coalesced layout of its own (its addresses
    are data-dependent), and converting the scores, 64-bit addresses and mask to it through
    shared memory cost more than the rest of pass B (sm_90 SASS)."""
    if NATIVE:  # the two words of _raw: {MAX_ID - id, score bits}
        tl.inline_asm_elementwise(
            """{
            .reg .pred p;
            .reg .b64 a;
            .reg .b32 v, f;
            add.f32 f, $2, 0f4B000000;
            mov.b32 v, f;
            setp.lt.u32 p, v, $5;
            mad.wide.s32 a, v, 8, $1;
            mov.b32 f, $3;
            @p st.global.v2.b32 [a], {$4, f};
            mov.b32 $0, 0;
            }""",
            "=r,l,f,f,r,r",
            [tl.broadcast_to(scr_row_ptr[:, None], acc.shape).to(tl.int64) - 0x4B000000 * 8, acc, s,
             tl.broadcast_to(16777216 - offs_n[None, :], acc.shape), tl.full(acc.shape, 0x4B000000 + CAP, tl.int32)],
            dtype=tl.int32, is_pure=False, pack=1)
    else:
        v = acc.to(tl.int32)
        tl.store(scr_row_ptr[:, None] + v, _raw(s, offs_n[None, :]), mask=v < CAP)


# pass B's prefix counts carry PREFIX_BIAS: a score below the threshold gets a slot value >=
# it, one above gets its slot (< CAP <= PREFIX_BIAS); the 0/1 matrices hold -PREFIX_BIAS and
# 1 + PREFIX_BIAS on their diagonals (exact in bf16: 129 has 8 significant bits)
PREFIX_BIAS = tl.constexpr(128)


@triton.jit
def _survivors_by_prefix(q, keys_ptr, keys_desc, desc_row, scr_row_ptr, tau, n, offs_d, d_mask, DH: tl.constexpr,
                         CAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr, NATIVE: tl.constexpr, TMA: tl.constexpr):
    """Pass B for 64-row (wgmma) tiles: the scores s >= tau go to their row's scratch in
    column order; returns the survivors per row (counts past CAP are kept, slots past CAP
    not). A survivor's slot = survivors of its row in earlier tiles + in earlier columns of
    this tile, counted by tensor-core products of the 0/1 survivor tile kf (integer-exact in
    fp32): acc holds PREFIX_BIAS + the survivors of earlier tiles in every column; + kf @
    strict (c' < c: the exclusive prefix count along the row, and -PREFIX_BIAS on the
    diagonal) gives the slots of the survivors and slots + PREFIX_BIAS elsewhere (one
    unsigned compare in the store: survivor and slot < CAP); + kf @ rest (c' >= c, and
    +PREFIX_BIAS on the diagonal) adds the rest of the row's count, so acc = PREFIX_BIAS +
    survivors so far again, without a copy.
    No atomics and no scans (H200, T = 4096, with the NaN-propagating pass A: 0.28 -> 0.19
    ms kernel; bench/NOTES.md)."""
    cols = tl.arange(0, BLOCK_N)
    diag = tl.where(cols[:, None] == cols[None, :], PREFIX_BIAS, 0.0)
    upper = tl.where(cols[:, None] < cols[None, :], 1.0, 0.0)  # [BLOCK_N, BLOCK_N]: c' < c
    strict = upper - diag
    rest = 1.0 - upper + diag
    tl.static_assert(CAP <= PREFIX_BIAS)
    if NATIVE:  # bf16 tensor cores (these integers: exact); the interpreter's half dots are unreliable
        strict = strict.to(tl.bfloat16)
        rest = rest.to(tl.bfloat16)
    acc = tl.full((BLOCK_M, BLOCK_N), PREFIX_BIAS, tl.float32)
    # on a GPU the 0/1 tile comes from bf16 compares, two scores per instruction: rn(s) >=
    # rn(tau) whenever s >= tau (rounding is monotone), so every survivor stays one; the few
    # scores below tau that round to rn(tau) join them, which the ranking of the exact fp32
    # scores does not see (bf16 has fp32's range: no overflow)
    tau_bf = tl.broadcast_to(tau.to(tl.bfloat16)[:, None], (BLOCK_M, BLOCK_N))
    for n0 in range(0, n, BLOCK_N):
        s, offs_n, n_mask = _score_tile(q, keys_ptr, n0, n, offs_d, d_mask, DH, BLOCK_N, EVEN_N, UPCAST, PRECISION,
                                        keys_desc, desc_row, TMA)
        if not EVEN_N:  # NaN is never >= tau, also where tau is -inf (n < KP)
            s = tl.where(n_mask[None, :], s, float("nan"))
        if NATIVE:
            kf = tl.inline_asm_elementwise(
                "{ .reg .b32 a; cvt.rn.bf16x2.f32 a, $2, $1; set.ge.bf16x2.bf16x2 $0, a, $3; }", "=r,f,f,r",
                [s, tau_bf], dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            kf = (s >= tau[:, None]).to(strict.dtype)
        acc = tl.dot(kf, strict, acc=acc, input_precision="ieee")  # survivors: their slot; others: + PREFIX_BIAS
        _store_survivors(scr_row_ptr, acc, s, offs_n, CAP, NATIVE)
        acc = tl.dot(kf, rest, acc=acc, input_precision="ieee")
    return acc  # every column holds PREFIX_BIAS + the row's survivor count


@triton.jit
def _survivors_by_atomics(q, keys_ptr, scr_row_ptr, cnt_row_ptr, tau, n, offs_d, d_mask, DH: tl.constexpr,
                          CAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Pass B for 16-row tiles (mma.sync, where the 0/1 products of _survivors_by_prefix
    doubled the kernel time: a row's 128 columns span the 4 warps): each survivor takes the
    slot its row's int32 counter (cnt_row_ptr, zero on entry) hands out; the slot order
    varies run to run, which the ranking does not see (packed values are unique). Returns
    the survivors per row (counts past CAP are kept, slots past CAP not)."""
    for n0 in range(0, n, BLOCK_N):
        s, offs_n, n_mask = _score_tile(q, keys_ptr, n0, n, offs_d, d_mask, DH, BLOCK_N, EVEN_N, UPCAST, PRECISION)
        keep = (s >= tau[:, None]) & n_mask[None, :]
        pos = tl.atomic_add(tl.broadcast_to(cnt_row_ptr[:, None], (BLOCK_M, BLOCK_N)), 1, mask=keep, sem="relaxed")
        tl.store(scr_row_ptr[:, None] + pos, _raw(s, offs_n[None, :]), mask=keep & (pos < CAP))
    tl.debug_barrier()
    return tl.atomic_add(cnt_row_ptr, 0, sem="relaxed")


@triton.jit
def _half_topk(
    q_row_ptr, keys_ptr, keys_desc, desc_row, scr_row_ptr, cnt_row_ptr, offs_m, m_mask, n,
    DH: tl.constexpr, DH_PAD: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, CAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, PREFIX_SLOTS: tl.constexpr, NATIVE: tl.constexpr, QUAD: tl.constexpr, TMA: tl.constexpr,
    LANES: tl.constexpr,
):
    """Top-KP (packed, descending) of s = C q over all n sub-keys of one half, and 1 where
    the block needs the exact fallback (else 0).

    Pass A: scores tile by tile; g = running elementwise max over tiles, so column j of g
    is the maximum of the sub-keys j, j + BLOCK_N, ...; folded to GROUPS disjoint groups.
    tau = the KP-th largest group maximum: KP distinct groups hold an element >= tau, so
    every element of the top KP is >= tau (exact, not a heuristic).
    Pass B: the same scores again; the few elements >= tau (~1.3 KP on random data) are
    written to scratch (scr_row_ptr: pk_topk_row_slots per row; cnt_row_ptr: the row's int32
    counter, used by 16-row programs) by `_survivors_by_lanes` (LANES: the paper config's
    64-row programs on a GPU), `_survivors_by_prefix` (other 64-row programs) or
    `_survivors_by_atomics` (16 rows), and ranked there.
    If a row has more than CAP survivors (ties, adversarial data), a lane list past its
    capacity or a NaN score, or the asm blocks found another register layout than they
    assume, the block needs the exact fallback, which pk_topk_fwd_kernel runs for both
    halves (one copy of its code: two inlined here made ptxas spill in the main path's
    loops, bench/NOTES.md)."""
    offs_d = tl.arange(0, DH_PAD)
    d_mask = offs_d < DH
    q = tl.load(q_row_ptr[:, None] + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    # pass A: group maxima; the NaN-propagating max leaves NaN in g where a score was NaN
    g = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)  # [BLOCK_M, BLOCK_N]
    for n0 in range(0, n, BLOCK_N):
        s, offs_n, n_mask = _score_tile(q, keys_ptr, n0, n, offs_d, d_mask, DH, BLOCK_N, EVEN_N, UPCAST, PRECISION,
                                        keys_desc, desc_row, TMA)
        g = tl.maximum(g, tl.where(n_mask[None, :], s, float("-inf")), propagate_nan=tl.PropagateNan.ALL)
    nan = tl.max((g != g).to(tl.int32), axis=1)  # [BLOCK_M]
    if GROUPS == BLOCK_N:  # each column a group
        gm = g
    else:
        gm = tl.max(tl.reshape(g, (BLOCK_M, GROUPS, BLOCK_N // GROUPS)), axis=2)  # [BLOCK_M, GROUPS]
    if QUAD:  # quad lists (above); +inf on a layout mismatch
        rows = tl.broadcast_to(tl.arange(0, BLOCK_M)[:, None], gm.shape)
        tau = tl.max(tl.inline_asm_elementwise(TAU_ASM, TAU_CONS, [gm, rows], dtype=tl.float32, is_pure=True, pack=32),
                     axis=1)
    else:
        tau = _kth_largest_bound(gm, KP)  # [BLOCK_M]
    # pass B: the survivors s >= tau, appended to their row's scratch
    tau_m = tl.where(m_mask, tau, float("inf"))  # rows past M keep nothing (their s is 0 or NaN)
    if LANES:
        tile = _survivors_by_lanes(q, keys_ptr, keys_desc, desc_row, scr_row_ptr, tau_m, n, offs_d, d_mask, DH,
                                   BLOCK_M, BLOCK_N, EVEN_N, UPCAST, PRECISION, TMA)
        cnt = tl.sum(tile & 0xFFFF, axis=1) // (BLOCK_N // 4)  # each lane's count stands in BLOCK_N / 4 elements
    elif PREFIX_SLOTS:
        tile = _survivors_by_prefix(q, keys_ptr, keys_desc, desc_row, scr_row_ptr, tau_m, n, offs_d, d_mask, DH, CAP,
                                    BLOCK_M, BLOCK_N, EVEN_N, UPCAST, PRECISION, NATIVE, TMA)
        cnt = tl.max(tile, axis=1).to(tl.int32) - PREFIX_BIAS
    else:
        cnt = _survivors_by_atomics(q, keys_ptr, scr_row_ptr, cnt_row_ptr, tau_m, n, offs_d, d_mask, DH, CAP,
                                    BLOCK_M, BLOCK_N, EVEN_N, UPCAST, PRECISION)
        tile = cnt  # (unused)
    tl.debug_barrier()
    # rank the survivors: over CAP // 2 slots when every row has that few (most blocks)
    IN_TILE: tl.constexpr = PREFIX_SLOTS and NATIVE and CAP <= BLOCK_N  # (W <= BLOCK_N)
    few = tl.max(tl.where(m_mask, cnt, 0), axis=0) <= CAP // 2
    fail = tl.zeros_like(cnt)  # (the lane lists' checks)
    if LANES:
        if few:
            best, fail = _rank_lane_lists(scr_row_ptr, tile, cnt, CAP // 2, KP)  # [BLOCK_M, KP]
        else:
            best, fail = _rank_lane_lists(scr_row_ptr, tile, cnt, CAP, KP)
    elif few:
        best = _rank_survivors(scr_row_ptr, cnt, tile, CAP // 2, KP, IN_TILE, QUAD)  # [BLOCK_M, KP]
    else:
        best = _rank_survivors(scr_row_ptr, cnt, tile, CAP, KP, IN_TILE, QUAD)
    tl.debug_barrier()  # the other half reuses the scratch
    need = tl.minimum(n, KP)
    bad = tl.where(m_mask, (cnt > CAP) | (cnt < need), False) | (nan > 0) | (fail > 0)
    if QUAD:  # the ranking's layout check (a tau mismatch left no survivors: cnt < need)
        bad = bad | (tl.max(best, axis=1) == LAYOUT_MISMATCH)
    return best, tl.max(bad.to(tl.int32), axis=0)


@triton.jit
def _half_topk_rounds(q, keys_ptr, n, offs_d, d_mask, DH: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Fallback: running top-KP merged tile by tile by KP rounds of row maxima (exact, slow)."""
    best = tl.full((BLOCK_M, KP), -9223372036854775808, tl.int64)
    for n0 in range(0, n, BLOCK_N):
        s, offs_n, n_mask = _score_tile(q, keys_ptr, n0, n, offs_d, d_mask, DH, BLOCK_N, EVEN_N, UPCAST, PRECISION)
        best = _merge_topk(best, _pack(s, offs_n[None, :], n_mask[None, :]), KP)
    return best


@triton.jit
def _pack_pair(score, ids, b, valid):
    """A pair as int64: order-preserving score bits << 32 | (MAX_ID - id) << 6 | b, where b
    (< 64) is the pair's place in its list (_pair_topk): it never decides the order, as the
    ids of pairs are unique. Invalid -> the minimum."""
    return _pack_low(score, ((16777216 - ids) << 6) | b, valid)


@triton.jit
def _unpack_pair(packed):
    score, low = _unpack_low(packed)
    return score, (16777216 - (low >> 6)).to(tl.int32)


@triton.jit
def _first_heads(best1, best2, s1, i1, n, CAND: tl.constexpr, KP: tl.constexpr):
    """The K-way merge's list heads (_pair_topk): list a starts at pair (a, 0), packed."""
    live = (tl.arange(0, KP)[None, :] < CAND) & (best1 != -9223372036854775808)  # [BM, KP] lists
    top2 = tl.max(best2, axis=1)  # best2[:, 0]
    s2, i2 = _unpack(top2)
    return _pack_pair(s1 + s2[:, None], i1 * n + i2[:, None], 0, live & (top2 != -9223372036854775808)[:, None])


@triton.jit
def _pair_topk(best1, best2, n, K: tl.constexpr, K_PAD: tl.constexpr, CAND: tl.constexpr, KP: tl.constexpr):
    """Top K (packed pairs, descending) of s1[a] + s2[b], expert id i1[a] * n + i2[b], over
    the candidates a, b < CAND of the halves (best1, best2 [BM, KP], packed, descending),
    by a K-way merge: list a = (s1[a] + s2[b] for b = 0, 1, ...) is sorted, so the best
    remaining pair is the best list head; each of K rounds takes it and moves that list
    to its next b (s2[b] picked from best2 in registers; b rides in the low bits of the
    packed pair). The rounds run over KP heads per row, not over the up to CAND^2 pairs;
    pair (a, b) comes after the (a+1)(b+1) - 1 pairs (a' <= a, b' <= b) that beat it, so
    only pairs with (a+1)(b+1) <= K are ever taken. Pair sums that tie only through
    rounding (s2[b] > s2[b'] but equal sums) come in list order rather than by id."""
    cols = tl.arange(0, KP)
    s1, i1 = _unpack(best1)
    live = (cols[None, :] < CAND) & (best1 != -9223372036854775808)  # [BM, KP] lists
    heads = _first_heads(best1, best2, s1, i1, n, CAND, KP)
    slot = tl.arange(0, K_PAD)
    out = tl.full((best1.shape[0], K_PAD), -9223372036854775808, tl.int64)
    for r in range(K):
        m = tl.max(heads, axis=1)  # [BM] the best head
        out = tl.where(slot[None, :] == r, m[:, None], out)
        b = (m & 63).to(tl.int32) + 1  # the next place in the winning list
        nxt = tl.max(tl.where(cols[None, :] == b[:, None], best2, -9223372036854775808), axis=1)  # best2[:, b]
        sn, i_n = _unpack(nxt)
        ok = live & ((b < CAND) & (nxt != -9223372036854775808))[:, None]
        heads = tl.where(heads == m[:, None], _pack_pair(s1 + sn[:, None], i1 * n + i_n[:, None], b[:, None], ok), heads)
    return out


def _pair_round_asm() -> str:
    """PTX of one round of _pair_topk_quad's merge, one block per thread (pack = 8) on [64, 16]
    tensors in the wgmma layout that PAIR_CHECK_ASM checks (rows A A B B per 4 elements,
    thread t of a quad holding columns 8j + 2t + {0, 1}): each row's 16 list heads
    (packed as _pack_pair) lie 4 per thread of its quad. The round takes the quad's best
    head (the maximum of the thread's 4, then 2 butterfly shuffles), writes it to the element
    of column r, fetches the next place b of the winning list from best2 (one indexed
    shuffle per word, from the thread holding column b) and packs the one new head of that
    list, instead of row reductions and a pack of every head (_pair_topk).
    Operands: $0-7 heads out, $8-15 pairs out (int64); in: $16-23 heads, $24-31 pairs,
    $32-39 s1 (fp32), $40-47 i1 * n, $48-55 s2 (fp32), $56-63 i2 (-1: no candidate),
    $64-71 r, $72-79 CAND (the last two the same in every element)."""
    minv = "0x8000000000000000"
    elems = {"a": (0, 1, 4, 5), "b": (2, 3, 6, 7)}  # row A / B: list i in element elems[X][i]

    def pick4(dst, v, lo, hi, upper):  # dst = upper ? (hi ? v3 : v2) : (lo ? v1 : v0); uses y
        return [f"selp.b32 {dst}, {v[1]}, {v[0]}, {lo};", f"selp.b32 y, {v[3]}, {v[2]}, {hi};",
                f"selp.b32 {dst}, y, {dst}, {upper};"]

    lines = ["{", ".reg .pred p, v, p1, p8, u, w<4>;",
             ".reg .b32 lane, t, t0, t1, key, low, b, lb, x, y, s2b, i2b, s1w, n1w, sum, rr;",
             ".reg .b64 m, o, nw;", "mov.u32 lane, %laneid;", "and.b32 lane, lane, 3;", "shl.b32 t0, lane, 1;",
             "sub.s32 rr, $64, t0;"]  # column r is element e of this thread where rr = 8 (e // 4) + e % 2
    lines += [f"mov.b64 ${e}, ${16 + e};" for e in range(8)] + [f"mov.b64 ${8 + e}, ${24 + e};" for e in range(8)]
    for x, es in elems.items():
        h = [f"${e}" for e in es]
        lines += [f"max.s64 m, {h[0]}, {h[1]};", f"max.s64 o, {h[2]}, {h[3]};", "max.s64 m, m, o;"]
        for d in (1, 2):
            lines += ["mov.b64 {t0, t1}, m;", f"shfl.sync.bfly.b32 t0, t0, {d}, 0x1c1f, 0xffffffff;",
                      f"shfl.sync.bfly.b32 t1, t1, {d}, 0x1c1f, 0xffffffff;", "mov.b64 o, {t0, t1};",
                      "max.s64 m, m, o;"]
        for e in es:
            lines += [f"setp.eq.s32 p, rr, {8 * (e // 4) + e % 2};", f"@p mov.b64 ${8 + e}, m;"]
        # the winning list's next place b: best2[b] from the thread of the quad holding column b
        s2, i2 = [f"${48 + e}" for e in es], [f"${56 + e}" for e in es]
        lines += ["mov.b64 {low, key}, m;", "and.b32 b, low, 63;", "add.s32 b, b, 1;",
                  "and.b32 t, b, 1;", "setp.ne.u32 p1, t, 0;", "setp.ge.u32 p8, b, 8;"]
        lines += pick4("x", s2, "p1", "p1", "p8") + pick4("t0", i2, "p1", "p1", "p8")
        lines += ["bfe.u32 lb, b, 1, 2;", "shfl.sync.idx.b32 s2b, x, lb, 0x1c1f, 0xffffffff;",
                  "shfl.sync.idx.b32 i2b, t0, lb, 0x1c1f, 0xffffffff;"]
        s1, n1 = [f"${32 + e}" for e in es], [f"${40 + e}" for e in es]
        lines += [f"setp.eq.s64 w{i}, {h[i]}, m;" for i in range(4)] + ["or.pred u, w2, w3;"]
        lines += pick4("s1w", s1, "w1", "w3", "u") + pick4("n1w", n1, "w1", "w3", "u")
        lines += ["add.f32 sum, s1w, s2b;", "add.s32 t1, n1w, i2b;",
                  # _pack_pair: order-preserving score bits << 32 | (MAX_ID - id) << 6 | b
                  "mov.b32 key, sum;", "shr.s32 t, key, 31;", "and.b32 t, t, 0x7FFFFFFF;", "xor.b32 key, key, t;",
                  "sub.s32 low, 16777216, t1;", "shl.b32 low, low, 6;", "or.b32 low, low, b;",
                  "mov.b64 nw, {low, key};",
                  "setp.lt.s32 v, b, $72;", "setp.ge.and.s32 v, i2b, 0, v;", f"setp.ne.and.s64 v, m, {minv}, v;",
                  f"@!v mov.b64 nw, {minv};"]
        lines += [f"@w{i} mov.b64 {h[i]}, nw;" for i in range(4)]
    return "\n".join(lines + ["}"])


PAIR_ROUND_ASM = tl.constexpr(_pair_round_asm())
PAIR_ROUND_CONS = tl.constexpr(",".join(["=l"] * 16 + ["l"] * 16 + ["f"] * 8 + ["r"] * 8 + ["f"] * 8 + ["r"] * 24))
# operands: $0-7 out (1: the layout _pair_round_asm assumes), $8-15 best1 (unused: it ties the
# block to best1's layout; rows and columns alone may get another), $16-23 rows, $24-31 columns
PAIR_CHECK_ASM = tl.constexpr("\n".join(["{", ".reg .pred ok;", ".reg .b32 lane, ra, rb, t, t0;"]
                                         + _layout_check(8, 16, 24) + [f"selp.s32 ${e}, 1, 0, ok;" for e in range(8)]
                                         + ["}"]))
PAIR_CHECK_CONS = tl.constexpr(",".join(["=r"] * 8 + ["l"] * 8 + ["r"] * 16))


@triton.jit
def _pair_topk_quad(best1, best2, n, K: tl.constexpr, CAND: tl.constexpr, KP: tl.constexpr,
                    FALLBACK: tl.constexpr):
    """_pair_topk for 64-row programs on a GPU (K = KP = 16): the same merge, each round one
    asm block per thread (_pair_round_asm); if the register layout is not the one it assumes
    (PAIR_CHECK_ASM), _pair_topk instead (FALLBACK=False: not)."""
    s1, i1 = _unpack(best1)
    s2, i2 = _unpack(best2)
    i2 = tl.where(best2 != -9223372036854775808, i2, -1)
    heads = _first_heads(best1, best2, s1, i1, n, CAND, KP)
    pairs = tl.full(best1.shape, -9223372036854775808, tl.int64)
    for r in range(K):
        heads, pairs = tl.inline_asm_elementwise(
            PAIR_ROUND_ASM, PAIR_ROUND_CONS, [heads, pairs, s1, i1 * n, s2, i2, tl.zeros(best1.shape, tl.int32) + r,
                                              tl.full(best1.shape, CAND, tl.int32)],
            dtype=(tl.int64, tl.int64), is_pure=True, pack=8)
    if FALLBACK:
        rows = tl.broadcast_to(tl.arange(0, best1.shape[0])[:, None], best1.shape)
        cols = tl.broadcast_to(tl.arange(0, KP)[None, :], best1.shape)
        ok = tl.inline_asm_elementwise(PAIR_CHECK_ASM, PAIR_CHECK_CONS, [best1, rows, cols], dtype=tl.int32,
                                       is_pure=True, pack=8)
        if tl.min(tl.min(ok, axis=1), axis=0) == 0:
            pairs = _pair_topk(best1, best2, n, K, KP, CAND, KP)
    return pairs


def pk_topk_lanes(native: bool, block_m: int, block_n: int, groups: int, kp: int) -> bool:
    """Whether pk_topk_fwd_kernel's pass B appends to per-lane lists (its LANES): the paper
    config's 64-row programs on a GPU, where the quad lists rank (the kernel's QUAD)."""
    return native and block_m == 64 and block_n == 64 and groups == 64 and kp == 16


def pk_topk_row_slots(lanes: bool, cap: int) -> int:
    """int64 scratch slots per query row and head that pk_topk_fwd_kernel needs: the lane lists
    (4 lanes x LANE_CAP), else CAP survivor slots and the 16-row programs' two counters."""
    return 4 * LANE_CAP.value if lanes else cap + 2


@triton.jit
def pk_topk_fwd_kernel(
    q_ptr, keys_ptr, keys_desc, scores_ptr, ids_ptr, scratch_ptr,
    M, n, H,
    DK: tl.constexpr, DH_PAD: tl.constexpr, PER_HEAD: tl.constexpr,
    K: tl.constexpr, K_PAD: tl.constexpr, CAND: tl.constexpr, KP: tl.constexpr,
    GROUPS: tl.constexpr, CAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, PREFIX_SLOTS: tl.constexpr, NATIVE: tl.constexpr, FALLBACK: tl.constexpr = True,
    TMA: tl.constexpr = False, LANES: tl.constexpr = False,
):
    """keys_desc: with TMA, a TMA descriptor of the sub-keys as [sets * 2 * n, DK // 2] with
    [BLOCK_N, DK // 2] blocks, for the main path's score tiles (_score_tile); else unused."""
    DH: tl.constexpr = DK // 2
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    row = offs_m.to(tl.int64) * H + h  # [BLOCK_M] row of (token, head)
    q_row_ptr = q_ptr + row * DK
    ROW_SLOTS: tl.constexpr = 4 * LANE_CAP if LANES else CAP + 2  # scratch per row: pk_topk_row_slots
    scr_row_ptr = scratch_ptr + (pid_m.to(tl.int64) * H + h) * (BLOCK_M * ROW_SLOTS) + tl.arange(0, BLOCK_M) * ROW_SLOTS
    cnt_row_ptr = (scr_row_ptr + CAP).to(tl.pointer_type(tl.int32), bitcast=True)  # survivor counters of the 2 halves
    if not PREFIX_SLOTS:
        tl.store(cnt_row_ptr, 0)
        tl.store(cnt_row_ptr + 1, 0)
        tl.debug_barrier()
    if PER_HEAD:
        kbase = keys_ptr + h.to(tl.int64) * (2 * n * DH)
    else:
        kbase = keys_ptr
    # the paper config's 64-row programs on a GPU: the threshold, the ranking and the pair merge
    # run as inline-asm blocks on the wgmma register layout ("quad lists" above, _pair_round_asm)
    QUAD: tl.constexpr = NATIVE and PREFIX_SLOTS and BLOCK_M == 64 and BLOCK_N == 64 and GROUPS == 64 and KP == 16
    tl.static_assert(QUAD or not LANES, "LANES needs the paper config's 64-row programs on a GPU (pk_topk_lanes)")
    desc_row = h * (2 * n) if PER_HEAD else 0  # the first row of this head's sub-keys in keys_desc
    best1, bad1 = _half_topk(q_row_ptr, kbase, keys_desc, desc_row, scr_row_ptr, cnt_row_ptr, offs_m, m_mask, n, DH,
                             DH_PAD, KP, GROUPS, CAP, BLOCK_M, BLOCK_N, EVEN_N, UPCAST, PRECISION, PREFIX_SLOTS, NATIVE,
                             QUAD, TMA, LANES)
    best2, bad2 = _half_topk(q_row_ptr + DH, kbase + n * DH, keys_desc, desc_row + n, scr_row_ptr, cnt_row_ptr + 1,
                             offs_m, m_mask, n, DH, DH_PAD, KP, GROUPS, CAP, BLOCK_M, BLOCK_N, EVEN_N, UPCAST, PRECISION,
                             PREFIX_SLOTS, NATIVE, QUAD, TMA, LANES)
    # the exact fallback (FALLBACK=False, tests: never; the fast path alone must be exact on
    # random data), one copy for both halves in a loop: inlined in each half, its code made
    # ptxas spill in the main path's loops (H200, T = 4096: 0.1101 -> 0.1083 ms as here)
    if FALLBACK:
        if (bad1 + bad2) > 0:
            offs_d = tl.arange(0, DH_PAD)
            d_mask = offs_d < DH
            for p in range(2):
                q = tl.load(q_row_ptr[:, None] + p * DH + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                            other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                b = _half_topk_rounds(q, kbase + p * n * DH, n, offs_d, d_mask, DH, KP, BLOCK_M, BLOCK_N, EVEN_N,
                                      UPCAST, PRECISION)
                if p == 0:
                    best1 = b
                else:
                    best2 = b
    if QUAD and K == 16:
        pairs = _pair_topk_quad(best1, best2, n, K, CAND, KP, FALLBACK)
    else:
        pairs = _pair_topk(best1, best2, n, K, K_PAD, CAND, KP)
    sc, ids = _unpack_pair(pairs)  # [BLOCK_M, K_PAD]
    offs_k = tl.arange(0, K_PAD)
    out = row[:, None] * K + offs_k[None, :]
    o_mask = m_mask[:, None] & (offs_k[None, :] < K)
    tl.store(scores_ptr + out, sc, mask=o_mask)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=o_mask)


@triton.jit
def pk_topk_bwd_query_kernel(
    dscores_ptr, ids_ptr, keys_ptr, dq_ptr, rows_ptr, gsum_ptr, bits_ptr,
    M, n, H, MHK, NUM_ROWS, WORDS,
    DK: tl.constexpr, DH_PAD: tl.constexpr, PER_HEAD: tl.constexpr,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BITMAP: tl.constexpr,
):
    """dq_p[m] = sum_r g[m, r] * C_p[sub_p(id[m, r])] (a gather of the selected sub-keys), and
    what the keys kernel needs per selection (p, m, h, r), flat p * MHK + (m*H + h)*K + r:
    rows [2, M, H, K] (int16 or int32), the dC row (set * 2 + p) * n + sub-key (set = h with
    per-head keys, else 0), the sort key; gsum [2, M, H, K] fp32, the sum of g over the
    selections r' of the same (m, h) with the same half-p sub-key. Only the first of those
    (lowest r) keeps its row and gsum; the others get the row NUM_ROWS (sorted past every
    segment) and 0, and are not gathered here. With k = 16 of 16 candidates a (m, h) picks
    ~7 distinct sub-keys per half, so the keys kernel walks ~2.3x fewer selections (H200,
    paper config, T = 4096: 56 -> 22 us; bench/NOTES.md). BITMAP: each first selection also
    sets the bit of its unit (m, or m*H + h with shared keys) in its row's bitmap (bits
    [NUM_ROWS, WORDS] int32, atomic OR), from which bitmap_segments groups the selections
    by row without a sort (csrc_triton/key_segments.py)."""
    DH: tl.constexpr = DK // 2
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    row = offs_m.to(tl.int64) * H + h
    offs_k = tl.arange(0, K_PAD)
    offs_d = tl.arange(0, DH_PAD)
    k_mask = m_mask[:, None] & (offs_k[None, :] < K)  # [BLOCK_M, K_PAD]
    sel = row[:, None] * K + offs_k[None, :]
    g = tl.load(dscores_ptr + sel, mask=k_mask, other=0.0)  # [BLOCK_M, K_PAD]
    e = tl.load(ids_ptr + sel, mask=k_mask, other=0)
    if PER_HEAD:
        kbase = keys_ptr + h.to(tl.int64) * (2 * n * DH)
        kset = h
    else:
        kbase = keys_ptr
        kset = 0
    for p in tl.static_range(2):
        if p == 0:
            sub = (e // n).to(tl.int32)
        else:
            sub = (e % n).to(tl.int32)
        key = (kset * 2 + p) * n + sub
        ptrs = rows_ptr + p * MHK + sel
        tl.store(ptrs, key.to(rows_ptr.dtype.element_ty), mask=k_mask)
        tl.debug_barrier()  # (the columns below are read back by other threads of the program)
        gsum = g
        first = k_mask
        for r2 in tl.static_range(K):  # compare every selection with selection r2 of its (m, h)
            key2 = tl.load(rows_ptr + p * MHK + row * K + r2, mask=m_mask, other=-1).to(tl.int32)
            g2 = tl.load(dscores_ptr + row * K + r2, mask=m_mask, other=0.0)
            same = key2[:, None] == key
            first = first & ~(same & (offs_k[None, :] > r2))
            gsum += tl.where(same & (offs_k[None, :] < r2), g2[:, None], 0.0)
        gsum = tl.where(first, gsum, 0.0)
        tl.debug_barrier()
        tl.store(ptrs, tl.where(first, key, NUM_ROWS).to(rows_ptr.dtype.element_ty), mask=k_mask)
        tl.store(gsum_ptr + p * MHK + sel, gsum, mask=k_mask)
        if BITMAP:
            unit = selection_unit(offs_m, h, H, PER_HEAD)
            word = key.to(tl.int64) * WORDS + (unit // 32)[:, None]
            tl.atomic_or(bits_ptr + word, (1 << (unit % 32))[:, None] + tl.zeros_like(key), mask=first, sem="relaxed")
        c = tl.load(kbase + p * n * DH + sub[:, :, None].to(tl.int64) * DH + offs_d[None, None, :],
                    mask=first[:, :, None] & (offs_d < DH)[None, None, :], other=0.0)
        dq = tl.sum(gsum[:, :, None] * c.to(tl.float32), axis=1)  # [BLOCK_M, DH_PAD]
        tl.store(dq_ptr + row[:, None] * DK + p * DH + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & (offs_d < DH)[None, :])


@triton.jit
def pk_topk_bwd_keys_kernel(
    order_ptr, offsets_ptr, gsum_ptr, q_ptr, dkeys_ptr,
    num_rows, MHK,
    DK: tl.constexpr, DH_PAD: tl.constexpr, K: tl.constexpr, ROWS: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """dC[row] = sum over the selections that use sub-key row `row` of gsum * q_p (the query
    kernel's per-(m, h) sums: each (m, h) adds once per sub-key), one program per ROWS rows
    of dC viewed as [num_rows, DH] (row = (set * 2 + p) * n + c), each row written once
    (zeros where unused). The selections (p, m, h, r), flat p * MHK + (m*H + h)*K + r, come
    sorted by row (order, CSR offsets: stable, so a fixed summation order). The ROWS rows
    are summed side by side, BLOCK_J selections of each per step, so that ROWS * BLOCK_J
    gathers of q are in flight together (one row at a time took 0.091 ms at the paper
    config, T = 4096: latency-bound; bench/NOTES.md)."""
    DH: tl.constexpr = DK // 2
    offs_d = tl.arange(0, DH_PAD)
    d_mask = offs_d < DH
    offs_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_mask = offs_r < num_rows
    start = tl.load(offsets_ptr + offs_r, mask=r_mask, other=0)  # [ROWS]
    end = tl.load(offsets_ptr + offs_r + 1, mask=r_mask, other=0)
    offs_j = tl.arange(0, BLOCK_J)
    acc = tl.zeros((ROWS, DH_PAD), tl.float32)
    for j0 in range(0, tl.max(end - start, axis=0), BLOCK_J):
        pos = start[:, None] + j0 + offs_j[None, :]  # [ROWS, BLOCK_J]
        j_mask = pos < end[:, None]
        sel = tl.load(order_ptr + pos, mask=j_mask, other=0).to(tl.int64)  # p * MHK + (m*H + h)*K + r
        g = tl.load(gsum_ptr + sel, mask=j_mask, other=0.0)
        p = (sel >= MHK).to(tl.int64)
        qrow = (sel - p * MHK) // K
        q = tl.load(q_ptr + (qrow * DK + p * DH)[:, :, None] + offs_d[None, None, :],
                    mask=j_mask[:, :, None] & d_mask[None, None, :], other=0.0)  # [ROWS, BLOCK_J, DH_PAD]
        acc += tl.sum(g[:, :, None] * q.to(tl.float32), axis=1)
    tl.store(dkeys_ptr + offs_r[:, None].to(tl.int64) * DH + offs_d[None, :], acc.to(dkeys_ptr.dtype.element_ty),
             mask=r_mask[:, None] & d_mask[None, :])
