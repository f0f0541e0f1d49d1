"""product_key_topk: the Triton kernels (interpreter on CPU, real on GPU) against the
reference and the brute force over all n*n keys, forward and both gradients."""
import types

import pytest
import torch

import peer_kernels as pk
from peer_kernels import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(lead, heads, n, dk, shared, qdtype, kdtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, heads, dk, generator=g).to(device=device, dtype=qdtype)
    shape = (2, n, dk // 2) if shared else (heads, 2, n, dk // 2)
    keys = torch.randn(*shape, generator=g).to(device=device, dtype=kdtype)
    return q, keys


def assert_topk_match(s, i, s_ref, i_ref, tol):
    """Scores within tol; ids equal wherever the reference scores are separated by more
    than tol from their neighbours (near-ties may legitimately swap)."""
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    assert s.shape == s_ref.shape and i.shape == i_ref.shape
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s, s_ref.float(), atol=tol, rtol=0)
    assert (s[..., :-1] >= s[..., 1:]).all(), "scores not sorted descending"
    gap = torch.full_like(s_ref, float("inf"))
    d = (s_ref[..., 1:] - s_ref[..., :-1]).abs()
    gap[..., 1:] = torch.minimum(gap[..., 1:], d)
    gap[..., :-1] = torch.minimum(gap[..., :-1], d)
    gap[..., -1] = 0  # the k-th may tie with the (k+1)-th, which we do not see
    clear = gap > tol
    assert torch.equal(i[clear], i_ref[clear].to(i.dtype))


CASES = [
    # lead, heads, n, dk, k, candidates
    ((1,), 2, 16, 16, 4, 4),
    ((7,), 3, 37, 20, 5, 5),
    ((63,), 1, 64, 32, 8, 12),
    ((2, 5), 2, 33, 16, 1, 3),
    ((3,), 2, 24, 16, 9, 3),  # k = candidates^2
    # n = candidates = 5 < KP = 8: fewer groups hold a score than KP, so the threshold is
    # -inf and the padding columns of the tile must be left out by their mask alone
    ((4,), 2, 5, 16, 3, 5),
    # n = 300: several tiles of sub-keys, the last one partial, so the threshold pass and the
    # survivor slots run across tiles (k = 64: 64 groups and 128 scratch slots per row)
    ((5,), 2, 300, 16, 16, 16),
    ((5,), 2, 300, 16, 64, 64),
    ((5,), 2, 300, 16, 7, 10),
]


def _survivors(q1, keys1, cfg, kp):
    """The forward kernel's threshold model for one half: scores s >= the kp-th largest
    group maximum, groups as the kernel folds them (elementwise max over the tiles of BLOCK_N
    sub-keys, then GROUPS groups of adjacent columns). q1 [M, dh], keys1 [n, dh] -> s [M, n]
    and the survivor mask [M, n]."""
    s = q1 @ keys1.T
    bn, groups = cfg["BLOCK_N"], cfg["GROUPS"]
    g = s.reshape(s.shape[0], -1, bn).amax(1)
    gm = g.reshape(s.shape[0], groups, bn // groups).amax(2)
    return s, s >= gm.topk(kp, 1).values[:, -1:]


def _many_survivors_case(R):
    """Sub-keys in near-copies in the same column of the kernel's tiles (sub-keys j, j + BN
    and j + 2 BN for j < BN / 2, BN as R._fwd_config sets it up; the other half random), so
    that a row whose best groups are copied columns passes up to 3 scores per group through
    the threshold of the first half (any grouping of the columns: a column lies in one
    group); rows picked so that one block of the kernel has a row with more than CAP / 2 = 32
    survivors there and another has none. Returns q, keys (CPU, fp32)."""
    g = torch.Generator().manual_seed(0)
    dh = 8
    bn = R._fwd_config(4096, 16, dh, upcast=True)["BLOCK_N"]
    n, half = 3 * bn, bn // 2
    keys = torch.randn(1, 2, n, dh, generator=g)
    for t in (1, 2):
        keys[0, :, t * bn:t * bn + half] = keys[0, :, :half] * (1 + 1e-3 * torch.randn(2, half, 1, generator=g))
    pool = torch.randn(20000, 1, 2 * dh, generator=g)
    cfg = R._fwd_config(n, 16, dh, upcast=True)  # fp32 inputs: fp32 products
    assert cfg["BLOCK_N"] == bn
    bm = cfg["BLOCK_M"]
    s1, keep = _survivors(pool[:, 0, :dh], keys[0, 0], cfg, 16)
    surv = keep.sum(1)
    few = (surv <= 32).nonzero()[:, 0]
    # a row with > 32 survivors whose best sub-key comes after the 32nd survivor in column
    # order (the slot order of 64-row programs and of the interpreter; the atomics of 16-row
    # programs on a GPU hand out slots in any order): ranking only 32 slots would lose its
    # top expert
    upto_best = keep.cumsum(1).gather(1, s1.argmax(1, keepdim=True))[:, 0]  # survivors up to the best one
    late = ((surv > 32) & (upto_best > 32)).nonzero()[:, 0]
    assert len(few) >= 2 * bm and len(late) > 0
    rows = torch.cat((few[:bm], late[:1], few[bm:2 * bm - 1]))  # block 0: all <= 32; block 1: one row > 32
    blocks = surv[rows].reshape(2, bm).amax(1)
    assert blocks[0] <= 32 < blocks[1]  # both ranking widths run
    return pool[rows], keys


def test_forward_many_survivors(device, monkeypatch):
    """A block whose rows all have <= CAP / 2 = 32 survivors (it ranks CAP / 2 slots) and one
    with a row of more (it ranks all CAP) must both give the exact top k: with the launch
    config of the device, and on a GPU also in 64-row programs (fp32 products take 16 rows
    there), whose survivors are loaded for ranking by inline PTX; the interpreter runs
    64-row programs in the first case already."""
    from peer_kernels import retrieval as R

    forced = [False, True] if device == "cuda" else [False]
    base = R._fwd_config
    for rows64 in forced:
        if rows64:
            monkeypatch.setattr(R, "_fwd_config", lambda *args, **kw: dict(base(*args, **kw), BLOCK_M=64, BLOCK_N=64))
        q, keys = _many_survivors_case(R)
        q, keys = q.to(device), keys.to(device)
        s, i = pk.product_key_topk(q, keys, 16, backend="triton")
        s_ref, i_ref = ref.product_key_topk(q, keys, 16, 16)
        assert torch.equal(i, i_ref), rows64
        assert torch.equal(i, ref.brute_force_topk(q, keys, 16)[1]), rows64
        torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


def test_forward_config_64_rows_only_for_large_grids(monkeypatch):
    """64-row programs only for half-precision products, KP <= 16, Dk/2 <= 64 and at least
    0.75 programs per SM (a 64-row program has a fixed ~0.08 ms latency on the H200)."""
    from peer_kernels import retrieval as R

    monkeypatch.setattr(R, "interpreting", lambda: False)
    monkeypatch.setitem(R._PROPS, 0, types.SimpleNamespace(multi_processor_count=132, major=9))  # an H200
    cuda0 = torch.device("cuda", 0)
    assert R._many_rows(cuda0, 4096, 8) and R._many_rows(cuda0, 1024, 8) and R._many_rows(cuda0, 4096, 2)
    assert not R._many_rows(cuda0, 512, 8) and not R._many_rows(cuda0, 1536, 2)
    assert R._fwd_config(1024, 16, 64, False, True)["BLOCK_M"] == 64
    for args in [(1024, 16, 64, False, False), (1024, 16, 64, True, True), (1024, 32, 64, False, True),
                 (1024, 16, 128, False, True)]:
        assert R._fwd_config(*args)["BLOCK_M"] == 16, args


def test_ties_keep_the_lowest_ids(device):
    """All scores equal (zero sub-keys): every sub-key survives the threshold, the kernel
    takes its exact fallback, and ties go to the lowest ids, in order."""
    q, _ = _inputs((6,), 2, 200, 16, False, torch.float32, torch.float32, device)
    keys = torch.zeros(2, 2, 200, 8, device=device)
    s, i = pk.product_key_topk(q, keys, 5, backend="triton")
    assert torch.equal(s, torch.zeros_like(s))
    # the top 5 of equal pair sums: pairs (a, b) with (a+1)(b+1) <= 5, lowest id i*n + j first
    expect = torch.tensor([0, 1, 2, 3, 4], device=device)
    assert torch.equal(i, expect.expand_as(i))


def test_nan_in_query_is_not_hidden(device):
    q, keys = _inputs((4,), 2, 150, 16, False, torch.float32, torch.float32, device, seed=5)
    q[2, 1, 3] = float("nan")
    s, i = pk.product_key_topk(q, keys, 4, backend="triton")
    assert torch.isnan(s[2, 1]).all()
    assert ((i >= 0) & (i < 150 * 150)).all()
    ok = torch.ones_like(s, dtype=torch.bool)
    ok[2, 1] = False
    _, i_ref = ref.product_key_topk(q, keys, 4, 4)
    assert torch.equal(i[ok], i_ref[ok])


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_forward_fp32_matches_reference_and_brute_force(case, shared, device):
    lead, heads, n, dk, k, cand = case
    q, keys = _inputs(lead, heads, n, dk, shared, torch.float32, torch.float32, device)
    s, i = pk.product_key_topk(q, keys, k, candidates=cand, backend="triton")
    s_ref, i_ref = ref.product_key_topk(q, keys, k, cand)
    assert s.shape == (*lead, heads, k)
    assert torch.equal(i, i_ref), "random fp32 data: ids must match the reference exactly"
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)
    if cand >= k:  # exact search: equals the top-k over all n*n keys
        s_bf, i_bf = ref.brute_force_topk(q, keys, k)
        assert torch.equal(i, i_bf)
        torch.testing.assert_close(s, s_bf, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qdtype,kdtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shared", [False, True])
def test_forward_half_and_mixed(qdtype, kdtype, shared, device):
    q, keys = _inputs((19,), 2, 40, 32, shared, qdtype, kdtype, device, seed=1)
    s, i = pk.product_key_topk(q, keys, 6, candidates=8, backend="triton")
    s_ref, i_ref = ref.product_key_topk(q, keys, 6, 8)
    assert_topk_match(s, i, s_ref, i_ref, tol=1e-4)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("case", [((7,), 3, 37, 20, 5, 5), ((2, 3), 2, 16, 16, 9, 3), ((1,), 1, 20, 16, 1, 2)])
def test_backward_fp32(case, shared, device):
    lead, heads, n, dk, k, cand = case
    q, keys = _inputs(lead, heads, n, dk, shared, torch.float32, torch.float32, device, seed=2)
    q.requires_grad_()
    keys.requires_grad_()
    s, i = pk.product_key_topk(q, keys, k, candidates=cand, backend="triton")
    g = torch.randn_like(s)
    dq, dkeys = torch.autograd.grad(s, (q, keys), g)
    s_ref, i_ref = ref.product_key_topk(q, keys, k, cand)
    assert torch.equal(i, i_ref)
    dq_ref, dkeys_ref = torch.autograd.grad(s_ref, (q, keys), g)
    torch.testing.assert_close(dq, dq_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dkeys, dkeys_ref, atol=1e-5, rtol=1e-5)
    # deterministic: a second run is bitwise equal
    s2, _ = pk.product_key_topk(q, keys, k, candidates=cand, backend="triton")
    dq2, dkeys2 = torch.autograd.grad(s2, (q, keys), g)
    assert torch.equal(dq, dq2) and torch.equal(dkeys, dkeys2)


def test_backward_shared_sub_keys_are_summed(device):
    """Many selected experts share sub-keys (k = candidates^2 uses every candidate c times)."""
    q, keys = _inputs((5,), 2, 12, 16, True, torch.float32, torch.float32, device, seed=3)
    keys.requires_grad_()
    s, _ = pk.product_key_topk(q, keys, 16, candidates=4, backend="triton")
    (dkeys,) = torch.autograd.grad(s.sum(), (keys,))
    s_ref, _ = ref.product_key_topk(q, keys, 16, 4)
    (dkeys_ref,) = torch.autograd.grad(s_ref.sum(), (keys,))
    torch.testing.assert_close(dkeys, dkeys_ref, atol=1e-5, rtol=1e-5)
    assert dkeys.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_half(dtype, device):
    q, keys = _inputs((9,), 2, 30, 32, False, dtype, dtype, device, seed=4)
    q.requires_grad_()
    keys.requires_grad_()
    s, i = pk.product_key_topk(q, keys, 4, backend="triton")
    s_ref, i_ref = ref.product_key_topk(q, keys, 4)
    assert torch.equal(i, i_ref)
    g = torch.randn_like(s)
    dq, dkeys = torch.autograd.grad(s, (q, keys), g)
    dq_ref, dkeys_ref = torch.autograd.grad(s_ref, (q, keys), g)
    assert dq.dtype == dtype and dkeys.dtype == dtype
    for a, b in ((dq, dq_ref), (dkeys, dkeys_ref)):
        err = (a.float() - b.float()).norm() / b.float().norm()
        assert err < 1e-2, err


def _grads_by_score_formula(q, keys, ids, g):
    """dq, dkeys by autograd through s = q1 . c1[i] + q2 . c2[j] on the given ids (i*n + j),
    per-head keys [H, 2, n, Dk/2] or shared [2, n, Dk/2]: the backward's oracle without a
    forward."""
    n, dh = keys.shape[-2], q.shape[-1] // 2
    qr, kr = q.clone().requires_grad_(), keys.clone().requires_grad_()
    if keys.dim() == 4:
        h = torch.arange(q.shape[-2], device=q.device)[None, :, None]
        c1, c2 = kr[h, 0, ids // n], kr[h, 1, ids % n]
    else:
        c1, c2 = kr[0, ids // n], kr[1, ids % n]
    s = (qr[..., None, :dh] * c1).sum(-1) + (qr[..., None, dh:] * c2).sum(-1)
    return torch.autograd.grad(s, (qr, kr), g)


@pytest.mark.parametrize("n", [2048, 40])
def test_backward_repeated_sub_keys_and_wide_rows(n, device):
    """The backward on given ids (no forward): each (token, head) repeats its half-1 sub-keys
    (the dq kernel merges the repeats before the sort) and, at H = 8, n = 2048, has
    H * 2 * n = 2^15 dC rows, past the 16-bit sort keys (int32 keys then). Against autograd
    through the score formula, fp32; deterministic."""
    from peer_kernels import retrieval as R

    gen = torch.Generator().manual_seed(5)
    m, heads, dk, k = 3, 8, 16, 12
    q = torch.randn(m, heads, dk, generator=gen)
    keys = torch.randn(heads, 2, n, dk // 2, generator=gen)
    i1 = torch.randint(0, 3, (m, heads, k), generator=gen)  # 3 distinct half-1 sub-keys per row
    i2 = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(m * heads)]).view(m, heads, k)
    ids = i1 * n + i2  # distinct ids per (token, head), as the forward gives
    g = torch.randn(m, heads, k, generator=gen)
    q, keys, ids, g = (t.to(device) for t in (q, keys, ids, g))
    dq, dkeys = R._launch_bwd(g, q, keys, ids)
    dq_ref, dkeys_ref = _grads_by_score_formula(q, keys, ids, g)
    torch.testing.assert_close(dq, dq_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dkeys, dkeys_ref, atol=1e-5, rtol=1e-5)
    dq2, dkeys2 = R._launch_bwd(g, q, keys, ids)
    assert torch.equal(dq, dq2) and torch.equal(dkeys, dkeys2)


@pytest.mark.parametrize("per_head,m,heads,n,k", [(True, 300, 2, 20, 9), (False, 70, 3, 11, 4), (True, 33, 1, 6, 16)])
def test_backward_bitmap_grouping_matches_the_sort(per_head, m, heads, n, k, device):
    """The backward with its selections grouped by the bitmaps' counting sort against the
    stable-sort grouping: dq and dkeys bitwise equal (the same summation order), and against
    autograd through the score formula. Units (m, or m*H + h with shared keys) span several
    128-unit parts and every bit of a word; sub-keys repeat within a (token, head)."""
    from peer_kernels import retrieval as R

    gen = torch.Generator().manual_seed(m)
    dk = 8
    q = torch.randn(m, heads, dk, generator=gen)
    keys = torch.randn(*((heads,) if per_head else ()), 2, n, dk // 2, generator=gen)
    i1 = torch.randint(0, min(n, 4), (m, heads, k), generator=gen)
    i2 = torch.stack([torch.randperm(n * n, generator=gen)[:k] % n for _ in range(m * heads)]).view(m, heads, k)
    ids = i1 * n + i2
    g = torch.randn(m, heads, k, generator=gen)
    q, keys, ids, g = (t.to(device) for t in (q, keys, ids, g))
    dq, dkeys = R._launch_bwd(g, q, keys, ids, method="bitmap")
    dq_s, dkeys_s = R._launch_bwd(g, q, keys, ids, method="sort")
    assert torch.equal(dq, dq_s) and torch.equal(dkeys, dkeys_s)
    dq_ref, dkeys_ref = _grads_by_score_formula(q, keys, ids, g)
    torch.testing.assert_close(dq, dq_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dkeys, dkeys_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_head,m,heads,n,k,dup", [(True, 300, 2, 5, 4, 0.3), (False, 50, 3, 40, 3, 0.5),
                                                      (True, 6, 2, 7, 16, 1.0)])
def test_bitmap_segments_against_a_stable_sort(per_head, m, heads, n, k, dup, device):
    """bitmap_segments alone, on rows with distinct sub-keys per unit and merged repeats
    (row num_rows, left out; dup = 1: nothing placed), bitmaps built here: the order and the
    CSR offsets of a stable sort of the rows."""
    from peer_kernels.segments import bitmap_segments, new_bitmaps

    gen = torch.Generator().manual_seed(m)
    sets = heads if per_head else 1
    num_rows = 2 * sets * n
    units = m if per_head else m * heads
    sub = torch.stack([torch.randperm(max(n, k), generator=gen)[:k] % n for _ in range(2 * m * heads)])
    sub = sub.view(2, m, heads, k)
    st = torch.arange(heads).view(1, 1, heads, 1) if per_head else torch.zeros(1, 1, heads, 1, dtype=torch.long)
    rows = (st * 2 + torch.arange(2).view(2, 1, 1, 1)) * n + sub
    first = torch.ones_like(rows, dtype=torch.bool)  # a unit adds once to a row: later repeats left out
    for r in range(1, k):
        first[..., r] = (rows[..., r:r + 1] != rows[..., :r]).all(-1)
    rows = torch.where(first & (torch.rand(rows.shape, generator=gen) >= dup), rows, num_rows)
    bits = new_bitmaps(num_rows, units, "cpu")
    unit = (torch.arange(m).view(1, m, 1, 1) * (1 if per_head else heads)
            + (0 if per_head else torch.arange(heads).view(1, 1, heads, 1))).expand_as(rows)
    keep = rows < num_rows
    words = bits.view(-1)
    for r, u in zip(rows[keep].tolist(), unit[keep].tolist()):
        words[r * bits.shape[1] + u // 32] |= (1 << (u % 32)) - (2**32 if u % 32 == 31 else 0)
    order, offsets = bitmap_segments(rows.to(torch.int16).to(device), bits.to(device), num_rows, per_head)
    flat = rows.reshape(-1)
    o_ref = torch.sort(flat, stable=True).indices
    off_ref = torch.searchsorted(flat[o_ref], torch.arange(num_rows + 1))
    assert torch.equal(offsets.cpu().long(), off_ref)
    used = int(off_ref[-1])
    assert torch.equal(order[:used].cpu().long(), o_ref[:used])


def test_bitmap_is_the_default_grouping_at_the_paper_config():
    from peer_kernels import retrieval as R

    assert R._use_bitmap(8 * 2 * 1024, 4096, 4096 * 8 * 16)  # n = 1024, k = 16
    assert not R._use_bitmap(8 * 2 * 4096, 4096, 4096 * 8 * 16)  # n = 4096: dense bitmaps too big
    assert not R._use_bitmap(8 * 2 * 1024, 1, 8 * 16)  # one token: the sort
    q, keys = _inputs((3,), 2, 8, 8, False, torch.float32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="method"):
        R._launch_bwd(torch.zeros(3, 2, 4), q, keys, torch.zeros(3, 2, 4, dtype=torch.long), method="bitmaps")


def test_reference_search_is_exact_against_brute_force():
    torch.manual_seed(5)
    for shared in (False, True):
        q, keys = _inputs((31,), 3, 9, 8, shared, torch.float64, torch.float64, "cpu", seed=5)
        for k, cand in ((1, 1), (5, 5), (7, 9), (9, 9)):
            s, i = ref.product_key_topk(q, keys, k, cand)
            s_bf, i_bf = ref.brute_force_topk(q, keys, k)
            assert torch.equal(i, i_bf)
            torch.testing.assert_close(s, s_bf)


def test_reference_against_loop_implementation():
    """An independent loop over heads and tokens, scoring every expert id i*n+j."""
    q, keys = _inputs((4,), 2, 6, 6, False, torch.float64, torch.float64, "cpu", seed=6)
    k, cand = 5, 3
    s, i = ref.product_key_topk(q, keys, k, cand)
    n = keys.shape[-2]
    for t in range(4):
        for h in range(2):
            q1, q2 = q[t, h, :3], q[t, h, 3:]
            s1 = [float(q1 @ keys[h, 0, a]) for a in range(n)]
            s2 = [float(q2 @ keys[h, 1, b]) for b in range(n)]
            c1 = sorted(range(n), key=lambda a: -s1[a])[:cand]
            c2 = sorted(range(n), key=lambda b: -s2[b])[:cand]
            pairs = sorted(((s1[a] + s2[b], a * n + b) for a in c1 for b in c2), reverse=True)[:k]
            assert [p[1] for p in pairs] == i[t, h].tolist()
            torch.testing.assert_close(s[t, h], torch.tensor([p[0] for p in pairs], dtype=torch.float64))


def test_gradcheck_reference_fp64():
    q, keys = _inputs((3,), 2, 7, 6, False, torch.float64, torch.float64, "cpu", seed=7)
    q.requires_grad_()
    keys.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ref.product_key_topk(a, b, 4, 3)[0], (q, keys))


def test_empty_batch(device):
    q, keys = _inputs((0,), 2, 16, 16, False, torch.float32, torch.float32, device)
    s, i = pk.product_key_topk(q, keys, 3, backend="triton")
    assert s.shape == (0, 2, 3) and i.shape == (0, 2, 3)


def test_compile_fullgraph_no_graph_break(device):
    q, keys = _inputs((5,), 2, 16, 16, False, torch.float32, torch.float32, device)
    keys.requires_grad_()

    def f(a, b):
        s, i = pk.product_key_topk(a, b, 4, backend="triton")
        return s.softmax(-1), i

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, keys)
    expect = f(q, keys)
    torch.testing.assert_close(out[0], expect[0])
    assert torch.equal(out[1], expect[1])
    out[0].sum().backward()
    assert keys.grad is not None and torch.isfinite(keys.grad).all()


def test_opcheck(device):
    from peer_kernels.retrieval import _pk_topk_op

    q, keys = _inputs((3,), 2, 16, 16, False, torch.float32, torch.float32, device)
    q.requires_grad_()
    keys.requires_grad_()
    torch.library.opcheck(_pk_topk_op, (q, keys, 4, 4))


# ---- bad input through the public op --------------------------------------------------

@pytest.mark.parametrize(
    "qshape,kshape,k,cand,match",
    [
        ((4, 2, 15), (2, 2, 8, 7), 2, None, "even"),
        ((4, 2, 16), (3, 2, 8, 8), 2, None, r"\[H, 2, n, Dk//2\]"),
        ((4, 2, 16), (2, 8, 7), 2, None, r"\[2, n, Dk//2\]"),
        ((4, 2, 16), (2, 2, 8, 8), 2, 9, "larger than the number of sub-keys"),
        ((4, 2, 16), (2, 2, 8, 8), 10, 3, r"candidates\^2"),
        ((4, 2, 16), (2, 2, 8, 8), 0, None, "positive"),
        ((16,), (2, 8, 8), 2, None, r"\[\.\.\., H, Dk\]"),
        ((4, 2, 16), (8, 8), 2, None, "sub_keys must have shape"),
    ],
)
def test_bad_input(qshape, kshape, k, cand, match):
    with pytest.raises(ValueError, match=match):
        pk.product_key_topk(torch.randn(qshape), torch.randn(kshape), k, candidates=cand)


def test_bad_dtype_and_backend():
    q, keys = torch.randn(4, 2, 16), torch.randn(2, 2, 8, 8)
    with pytest.raises(TypeError, match="query must have a floating dtype"):
        pk.product_key_topk(q.long(), keys, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        pk.product_key_topk(q, keys, 2, backend="cuda")
    with pytest.raises(TypeError, match="float64"):
        pk.product_key_topk(q.double(), keys, 2, backend="triton")


@pytest.mark.gpu
def test_mismatched_devices():
    with pytest.raises(ValueError, match="one device"):
        pk.product_key_topk(torch.randn(4, 2, 16, device="cuda"), torch.randn(2, 2, 8, 8), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [False, True])
def test_gpu_paper_config(shared):
    """H = 8, n = 1024, Dk = 128, k = 16, bf16, T = 4096, plus n = 4096, Dk = 256, k = 64 fp32."""
    q, keys = _inputs((4096,), 8, 1024, 128, shared, torch.bfloat16, torch.bfloat16, "cuda", seed=8)
    s, i = pk.product_key_topk(q, keys, 16)
    s_ref, i_ref = ref.product_key_topk(q, keys, 16)
    assert_topk_match(s, i, s_ref, i_ref, tol=1e-3)
    assert (i == i_ref).float().mean() > 0.999
    q, keys = _inputs((257,), 2, 4096, 256, shared, torch.float32, torch.float32, "cuda", seed=9)
    s, i = pk.product_key_topk(q, keys, 64, candidates=64)
    s_ref, i_ref = ref.product_key_topk(q, keys, 64, 64)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-5)



@pytest.mark.gpu
@pytest.mark.parametrize("shared,t,cand,scale", [(False, 4096, 16, 1.0), (True, 4095, 16, 1.0), (False, 4096, 11, 1.0),
                                                 (False, 4096, 16, 300.0)])
def test_gpu_quad_lists_need_no_fallback(shared, t, cand, scale):
    """The paper config's threshold, ranking and pair merge run as inline-asm blocks on the
    wgmma register layout that check the layout they assume and send a block to the exact
    fallback on a mismatch. On random data no block needs the fallback: without it
    (fallback=False) the kernel must give the same scores and ids bit for bit, so a layout
    change in a new Triton (every block falling back: correct but slow) fails here; cand =
    11 < k = 16 also leaves lists of the pair merge dead and ends the live ones early; scale
    = 300 puts the scores (~1e5) past fp16's range, where pass B's bf16 compares must still
    keep every survivor and few others."""
    from peer_kernels import retrieval as R

    q, keys = _inputs((t,), 8, 1024, 128, shared, torch.bfloat16, torch.bfloat16, "cuda", seed=11)
    q, keys = q * scale, keys * scale
    assert R._fwd_config(1024, 16, 64, False, R._many_rows(q.device, t, 8))["BLOCK_M"] == 64
    s, i = R._launch_fwd(q, keys, 16, cand)
    s_fast, i_fast = R._launch_fwd(q, keys, 16, cand, fallback=False)
    assert torch.equal(i_fast, i) and torch.equal(s_fast, s)
    s_ref, i_ref = ref.product_key_topk(q, keys, 16, cand)
    assert_topk_match(s, i, s_ref, i_ref, tol=1e-3 * scale**2)
    assert (i == i_ref).float().mean() > 0.999


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [False, True])
def test_gpu_tma_loads_match_pointer_loads(shared, monkeypatch):
    """The forward's main path can load the sub-key tiles by TMA (retrieval._keys_descriptor:
    PEER_KERNELS_TMA=graphs while a CUDA graph is captured, always; the default never): it must
    give the pointer loads' scores and ids bit for bit. Sub-keys that are not 16-byte aligned
    take the pointer loads and stay exact."""
    from peer_kernels import retrieval as R

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA loads need sm_90")
    q, keys = _inputs((4096,), 8, 1024, 128, shared, torch.bfloat16, torch.bfloat16, "cuda", seed=12)
    cfg = R._fwd_config(1024, 16, 64, False, R._many_rows(q.device, 4096, 8))
    assert R.TMA == "never" and R._keys_descriptor(keys, cfg, False) is None  # the default: pointers
    s_ptr, i_ptr = R._launch_fwd(q, keys, 16, 16, fallback=False)
    monkeypatch.setattr(R, "TMA", "graphs")
    assert R._keys_descriptor(keys, cfg, False) is None  # eager: pointers
    taken = []
    spy = R._keys_descriptor
    monkeypatch.setattr(R, "_keys_descriptor", lambda *a: taken.append(spy(*a)) or taken[-1])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        R._launch_fwd(q, keys, 16, 16, fallback=False)  # (warm-up outside the capture)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s, i = R._launch_fwd(q, keys, 16, 16, fallback=False)
    graph.replay()
    assert taken[0] is None and taken[-1] is not None  # the capture took the TMA loads
    assert torch.equal(s, s_ptr) and torch.equal(i, i_ptr)
    monkeypatch.setattr(R, "TMA", "always")
    s_tma, i_tma = R._launch_fwd(q, keys, 16, 16)
    assert taken[-1] is not None and torch.equal(s_tma, s_ptr) and torch.equal(i_tma, i_ptr)
    shifted = torch.empty(keys.numel() + 1, device="cuda", dtype=keys.dtype)[1:].view(keys.shape)
    shifted.copy_(keys)
    assert shifted.data_ptr() % 16 and spy(shifted, cfg, False) is None
    s_sh, i_sh = pk.product_key_topk(q, shifted, 16)
    assert torch.equal(s_sh, s_ptr) and torch.equal(i_sh, i_ptr)
    monkeypatch.setattr(R, "TMA", "sometimes")
    with pytest.raises(ValueError, match="PEER_KERNELS_TMA"):
        R._launch_fwd(q, keys, 16, 16)


def test_quad_lists_sorting_network():
    """The quad lists sort each thread's 8 values per row by the compare-exchange pairs of
    _batcher_pairs (descending: max to the lower index), and the threshold keeps the 8
    largest of 16 by _top8_of_16_ops: every 0/1 input must come out sorted (the 0-1
    principle: then every input does)."""
    from peer_kernels.csrc_triton import product_key_topk as K

    def apply(ops, x):
        for op, a, b in ops:
            x[a], x[b] = max(x[a], x[b]), (min(x[a], x[b]) if op == "ce" else x[b])
        return x

    pairs = K._batcher_pairs(8)
    assert len(pairs) == 19
    for bits in range(256):
        x = apply([("ce", a, b) for a, b in pairs], [(bits >> j) & 1 for j in range(8)])
        assert x == sorted(x, reverse=True), bits
    ops = K._top8_of_16_ops()
    assert len(ops) == 2 * 19 + 8 + 12
    for bits in range(1 << 16):
        x = [(bits >> j) & 1 for j in range(16)]
        assert apply(ops, list(x))[:8] == sorted(x, reverse=True)[:8], bits
    ptx = K._quad_lists_asm(16)
    assert ptx.count("shfl.sync.bfly") == 4 + 2 * 2 * 16 * 2
    assert ptx.count("@!ok mov") == 16


def _run_quad_ptx(ptx, operands, memory=None):
    """A CPU model of one inline-asm block run by the 4 threads of a quad, for the PTX that the
    retrieval kernel's asm blocks emit (_threshold_asm, _lane_append_asm, _lane_gather_asm):
    operands[t] maps operand number -> value for thread t (fp32 values as Python floats,
    integers as Python ints); memory (address -> 32-bit word) is read and written by the
    global loads and stores; returns each thread's outputs (the operands the block writes)."""
    import re
    import struct

    def bits(x):  # a 32-bit word (floats by their IEEE bits)
        return struct.unpack("<I", struct.pack("<f", x))[0] if isinstance(x, float) else x & 0xFFFFFFFF

    def s32(x):
        x = bits(x)
        return x - (1 << 32) if x >> 31 else x

    def s64(x):
        x &= (1 << 64) - 1
        return x - (1 << 64) if x >> 63 else x

    lines = [ln.strip().rstrip(";") for ln in ptx.splitlines()]
    lines = [ln for ln in lines if ln and ln not in ("{", "}") and not ln.startswith(".reg")]
    regs = [dict() for _ in range(4)]
    out = [dict() for _ in range(4)]
    carry = [0] * 4

    def val(t, x):
        if x.startswith("$"):
            return operands[t][int(x[1:])] if int(x[1:]) in operands[t] else out[t][int(x[1:])]
        if x.startswith("0f"):
            return struct.unpack(">f", bytes.fromhex(x[2:]))[0]
        if x.lstrip("-").isdigit() or x.startswith("0x"):
            return int(x, 0)
        if x.startswith("{"):  # a register pair {lo, hi} as one 64-bit value
            lo, hi = x[1:-1].split("|")
            return bits(val(t, lo)) | bits(val(t, hi)) << 32
        return regs[t][x]

    def write(t, dest, v):
        if dest.startswith("{"):
            lo, hi = dest[1:-1].split("|")
            write(t, lo, v & 0xFFFFFFFF)
            write(t, hi, (v >> 32) & 0xFFFFFFFF)
        elif dest.startswith("$"):
            out[t][int(dest[1:])] = v
        else:
            regs[t][dest] = v

    cmp = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
           "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b}
    for ln in lines:
        pred = None
        if ln.startswith("@"):
            pred, ln = ln.split(None, 1)
        ln = re.sub(r"\{\s*([^,}]+?)\s*,\s*([^}]+?)\s*\}", r"{\1|\2}", ln)  # {a, b} -> one argument
        op, rest = ln.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        new = []
        for t in range(4):
            if pred is not None and regs[t][pred.lstrip("@!")] == pred.startswith("@!"):
                new.append(None)
                continue
            if op == "st.global.v2.b32":
                addr = val(t, args[0].strip("[]"))
                lo, hi = args[1][1:-1].split("|")
                memory[addr], memory[addr + 4] = bits(val(t, lo)), bits(val(t, hi))
                new.append(None)
                continue
            if op == "ld.global.b64":
                addr = val(t, args[1].strip("[]"))
                new.append(memory[addr] | memory[addr + 4] << 32)
                continue
            v = [val(t, a) if a != "%laneid" else t for a in args[1:]]
            parts = op.split(".")
            if op in ("mov.u32", "mov.b32", "mov.f32", "mov.b64"):
                r = v[0]
            elif op == "and.b32":
                r = bits(v[0]) & bits(v[1])
            elif op == "or.b32":
                r = bits(v[0]) | bits(v[1])
            elif op == "shl.b32":
                r = (bits(v[0]) << v[1]) & 0xFFFFFFFF
            elif op == "shr.u32":
                r = bits(v[0]) >> v[1]
            elif op in ("add.s32", "add.u32"):
                r = bits(s32(v[0]) + s32(v[1]))
            elif op == "sub.s32":
                r = bits(s32(v[0]) - s32(v[1]))
            elif op == "mul.lo.s32":
                r = bits(s32(v[0]) * s32(v[1]))
            elif op == "mad.lo.s32":
                r = bits(s32(v[0]) * s32(v[1]) + s32(v[2]))
            elif op == "mul.wide.s32":
                r = s32(v[0]) * s32(v[1]) & ((1 << 64) - 1)
            elif op == "mad.wide.s32":
                r = (s32(v[0]) * s32(v[1]) + s64(v[2])) & ((1 << 64) - 1)
            elif op == "add.s64":
                r = (v[0] + v[1]) & ((1 << 64) - 1)
            elif op == "add.cc.u32":
                r = bits(v[0]) + bits(v[1])
                carry[t] = r >> 32
                r &= 0xFFFFFFFF
            elif op == "addc.u32":
                r = (bits(v[0]) + bits(v[1]) + carry[t]) & 0xFFFFFFFF
            elif parts[0] == "setp":  # setp.<cmp>[.and].<type>
                kind = parts[-1]
                conv = {"f32": lambda x: x, "s32": s32}.get(kind, bits)
                a_, b_ = conv(v[0]), conv(v[1])
                r = cmp[parts[1]](a_, b_)
                if parts[2] == "and":
                    r = r and v[2]
            elif op in ("selp.f32", "selp.b32", "selp.u32"):
                r = v[0] if v[2] else v[1]
            elif op == "max.f32":
                r = max(v[0], v[1])
            elif op == "min.f32":
                r = min(v[0], v[1])
            elif op == "shfl.sync.bfly.b32":
                assert args[3] == "0x1c1f", ln  # within the quad
                r = val(t ^ v[1], args[1])
            elif op == "shfl.sync.idx.b32":
                assert args[3] == "0x1c1f", ln
                r = val(v[1], args[1])
            else:
                raise AssertionError(f"the model does not know {op}")
            new.append(r)
        if op == "st.global.v2.b32":
            continue
        for t in range(4):  # all threads read before any writes (shuffles)
            if new[t] is not None:
                write(t, args[0], new[t])
    return out


def test_threshold_block_on_a_cpu_model():
    """_threshold_asm, run by a CPU model of a quad's 4 threads: every output of a row is the
    16th largest of the 32 values that the threads keep (the 8 largest of each thread's 16),
    a lower bound of the row's 16th largest group maximum; with ties and -inf too; and +inf
    (no survivors: the block's fallback) where the rows are not in the assumed layout."""
    import random

    from peer_kernels.csrc_triton import product_key_topk as K

    ptx = K._threshold_asm()
    rng = random.Random(0)
    row_a, row_b = 5, 13
    rows = [row_a if (i // 2) % 2 == 0 else row_b for i in range(32)]
    for case in range(60):
        if case % 3 == 0:
            g = [[rng.gauss(0, 1) for _ in range(32)] for _ in range(4)]
        elif case % 3 == 1:  # many ties
            g = [[float(rng.randint(0, 4)) for _ in range(32)] for _ in range(4)]
        else:  # ties, -inf and large values
            g = [[rng.choice([float("-inf"), 1e30, 2.0, float(rng.randint(-3, 3))]) for _ in range(32)]
                 for _ in range(4)]
        ops = [{32 + i: g[t][i] for i in range(32)} | {64 + i: rows[i] for i in range(32)} for t in range(4)]
        out = _run_quad_ptx(ptx, ops)
        for r in (row_a, row_b):
            mine = [[g[t][i] for i in range(32) if rows[i] == r] for t in range(4)]
            kept = sorted((x for m in mine for x in sorted(m, reverse=True)[:8]), reverse=True)
            expected = kept[15]
            assert expected <= sorted((x for m in mine for x in m), reverse=True)[15]
            for t in range(4):
                got = [out[t][i] for i in range(32) if rows[i] == r]
                assert got == [expected] * 16, (case, r, t, got, expected)
    bad = [list(rows) for _ in range(4)]
    bad[2][0], bad[2][2] = row_b, row_a  # thread 2 holds the rows in another order
    ops = [{32 + i: 1.0 for i in range(32)} | {64 + i: bad[t][i] for i in range(32)} for t in range(4)]
    out = _run_quad_ptx(ptx, ops)
    assert max(out[t][0] for t in range(4)) == float("inf")


def test_lane_lists_on_a_cpu_model():
    """_lane_append_asm and _lane_gather_asm run by the CPU model of a quad over 16 tiles: each
    thread's survivors (s >= tau; not NaN) of its two rows land in its lane's list, entry j at
    slot 4 j + lane of the row as {MAX_ID - id, score bits}, and its counts read
    (row << 20) | (lane << 16) | count; a lane past cap - 4 takes no more (nothing written past
    its cap). The gather's W = 32 and W = 64 slots then hold each survivor of the row once (0
    past the total), and its checks fail for a lane past cap - 4, counts of another row or lane,
    a wrong total or another register layout."""
    import random
    import struct

    from peer_kernels.csrc_triton import product_key_topk as K

    cap = K.LANE_CAP.value
    append = K._lane_append_asm(cap)
    row_a, row_b = 5, 13
    rows = [row_a if (i // 2) % 2 == 0 else row_b for i in range(32)]
    scr, row_bytes = 0x7F00_0000_0000, 4 * cap * 8

    def f32bits(x):
        return struct.unpack("<I", struct.pack("<f", x))[0]

    def gather(n_el, counts, totals, edit=None):
        ops = []
        for t in range(4):
            op = {}
            for i in range(n_el):
                r = rows[i]
                op |= {2 * n_el + i: scr + r * row_bytes, 3 * n_el + i: (t << 16) | counts[r, t], 4 * n_el + i: r,
                       5 * n_el + i: 8 * (i // 4) + 2 * t + i % 2, 6 * n_el + i: totals[r]}
            ops.append(op)
        if edit is not None:
            edit(ops, n_el)
        out = _run_quad_ptx(K._lane_gather_asm(n_el, cap), ops, memory)
        got = {r: [] for r in (row_a, row_b)}
        for t in range(4):
            for i in range(n_el):
                col = 8 * (i // 4) + 2 * t + i % 2
                if col < totals[rows[i]]:
                    got[rows[i]].append(out[t][i])
                else:
                    assert out[t][i] == 0
        return got, [out[t][n_el + i] for t in range(4) for i in range(n_el)]

    rng = random.Random(3)
    overs = []
    for case, p_keep in enumerate((0.01, 0.04, 0.06, 1.0)):
        memory = {}
        tau = {row_a: 0.5, row_b: -0.25}
        cnt = [{i: rows[i] << 20 for i in range(32)} for _ in range(4)]
        lists = {(r, t): [] for r in (row_a, row_b) for t in range(4)}
        for tile in range(16):
            ops = []
            for t in range(4):
                op = {}
                for i in range(32):
                    r, u = rows[i], rng.random()
                    sc = float("nan") if u < 0.01 else tau[r] if u < 0.03 else (
                        tau[r] + rng.random() if rng.random() < p_keep else tau[r] - 0.5 - rng.random())
                    sc = struct.unpack("<f", struct.pack("<f", sc))[0]  # an fp32 value
                    ident = 64 * tile + 8 * (i // 4) + 2 * t + i % 2
                    op |= {32 + i: sc, 64 + i: tau[r], 96 + i: scr + r * row_bytes - (r << 25),
                           128 + i: 16777216 - ident, 160 + i: cnt[t][i]}
                    if i % 8 == 0:  # the block's capacity check, as its rows are at this point
                        ok = {rr: len(lists[rr, t]) <= cap - 4 for rr in (row_a, row_b)}
                    if sc >= tau[r] and ok[r]:
                        lists[r, t].append((16777216 - ident) | f32bits(sc) << 32)
                ops.append(op)
            out = _run_quad_ptx(append, ops, memory)
            for t in range(4):
                for i in range(32):
                    assert out[t][i] == (rows[i] << 20) | (t << 16) | len(lists[rows[i], t]), (case, tile, t, i)
                cnt[t] = out[t]
        counts = {(r, t): len(lists[r, t]) for r in (row_a, row_b) for t in range(4)}
        assert max(counts.values()) <= cap
        for (r, t), entries in lists.items():
            for j, e in enumerate(entries):
                a = scr + r * row_bytes + (4 * j + t) * 8
                assert memory[a] | memory[a + 4] << 32 == e
        written = sorted(memory)
        assert all(any(scr + r * row_bytes <= a < scr + (r * row_bytes) + row_bytes for r in (row_a, row_b))
                   for a in written)
        totals = {r: sum(counts[r, t] for t in range(4)) for r in (row_a, row_b)}
        over = max(counts.values()) > cap - 4
        overs.append(over)
        for n_el in (16, 32):
            got, fail = gather(n_el, counts, totals)
            if over:
                assert max(fail) == 1
                continue
            assert max(fail) == 0
            for r in (row_a, row_b):
                expect = sorted(e for t in range(4) for e in lists[r, t])[: 2 * n_el]
                assert totals[r] > 2 * n_el or sorted(got[r]) == expect, (case, n_el, r)
        if over:
            continue

        def swap_rows(ops, n_el):  # thread 2 holds its rows in another order
            ops[2][4 * n_el], ops[2][4 * n_el + 2] = row_b, row_a

        def other_lane(ops, n_el):  # thread 1 given thread 0's counts
            for i in range(n_el):
                ops[1][3 * n_el + i] = ops[0][3 * n_el + i]

        def other_row(ops, n_el):  # one count of another row (the append saw another layout)
            ops[3][3 * n_el + 5] ^= 1 << 20

        def wrong_total(ops, n_el):
            for t in range(4):
                for i in range(n_el):
                    ops[t][6 * n_el + i] += 1

        for edit in (swap_rows, other_lane, other_row, wrong_total):
            assert max(gather(16, counts, totals, edit)[1]) == 1, edit.__name__
    assert overs[0] is False and overs[1] is False and overs[3] is True, overs


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,cand", [(1000, 16, 16), (5, 3, 5)])
def test_gpu_64_row_programs_partial_tile(n, k, cand):
    """bf16 at T = 4096, H = 8 runs 64-row programs (survivor slots by tensor-core prefix
    counts) with n not a multiple of their 64-sub-key tiles; n = 5 < KP = 8 also makes the
    threshold -inf, so the tile's padding columns are left out by their mask alone."""
    from peer_kernels import retrieval as R

    q, keys = _inputs((4096,), 8, n, 128, False, torch.bfloat16, torch.bfloat16, "cuda", seed=10)
    many = R._many_rows(q.device, 4096, 8)
    assert R._fwd_config(n, R._pow2(cand, 2), 64, False, many)["BLOCK_M"] == 64
    s, i = pk.product_key_topk(q, keys, k, candidates=cand)
    s_ref, i_ref = ref.product_key_topk(q, keys, k, cand)
    assert_topk_match(s, i, s_ref, i_ref, tol=1e-3)
    assert (i == i_ref).float().mean() > 0.999


def test_reference_keeps_fp32_under_autocast():
    """autocast must not turn the reference's fp32 math into bf16 (other experts)."""
    q, keys = _inputs((40,), 2, 64, 32, False, torch.float32, torch.float32, "cpu", seed=9)
    expect = ref.product_key_topk(q, keys, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ref.product_key_topk(q, keys, 8)
    assert got[0].dtype == torch.float32
    assert torch.equal(got[1], expect[1]) and torch.equal(got[0], expect[0])
