"""Development: the retrieval forward kernel at the paper config (T=4096, H=8, n=1024,
Dk=128, k=16, bf16): launch configs, the time split (scores vs selection) and the
fallback path; the backward's kernels (GPU time per kernel, both groupings by dC row,
keys-kernel launch configs).
See bench/NOTES.md. GPU only."""
import os, sys, torch, triton
import triton.language as tl
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(1, HERE)
from triton.testing import do_bench
import harness  # noqa: E402  (bench/harness.py)
import peer_kernels as pk
from peer_kernels import retrieval as R
from peer_kernels.segments import sorted_segments
from peer_kernels.csrc_triton.product_key_topk import _score_tile


@triton.jit
def scores_only_kernel(q_ptr, keys_ptr, out_ptr, M, n, H, DK: tl.constexpr, DH_PAD: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The score work of pk_topk_fwd_kernel alone: both passes of tl.dot over all sub-keys
    of both halves (elementwise running max), no selection; writes one value per row."""
    DH: tl.constexpr = DK // 2
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    m_mask = offs_m < M
    row = offs_m.to(tl.int64) * H + h
    offs_d = tl.arange(0, DH_PAD)
    d_mask = offs_d < DH
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for p in tl.static_range(2):
        q = tl.load(q_ptr + row[:, None] * DK + p * DH + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        kb = keys_ptr + (h.to(tl.int64) * 2 + p) * n * DH
        for _ in tl.static_range(2):  # pass A and pass B
            for n0 in range(0, n, BLOCK_N):
                s, offs_n, n_mask = _score_tile(q, kb, n0, n, offs_d, d_mask, DH, BLOCK_N, True, False, "tf32")
                acc = tl.maximum(acc, s)
    tl.store(out_ptr + row, tl.max(acc, axis=1), mask=m_mask)


def ms(f, rep=100):
    return do_bench(f, warmup=10, rep=rep, return_mode="median")


def cpu_us(f):
    return harness.host_ms(f, 50) * 1e3


def kernel_us(f, calls=20):
    """GPU time per call of each kernel that f launches (torch.profiler), in us."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            f()
        torch.cuda.synchronize()
    return {e.key[:40]: round(e.device_time_total / calls, 2) for e in prof.key_averages() if e.device_time_total > 0}


def with_config(**over):
    """_fwd_config with some entries replaced (the dev variants)."""
    return lambda *args, **kw: dict(base(*args, **kw), **over)


torch.manual_seed(0)
H, n, dk, k = 8, 1024, 128, 16
base = R._fwd_config
base_keys = R._bwd_keys_config
for T in (4096, 16384):
    q = torch.randn(T, H, dk, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(H, 2, n, dk // 2, device="cuda", dtype=torch.bfloat16)
    s_ref, i_ref = pk.product_key_topk(q, keys, k, backend="torch")
    # measured 2026-11-30 (bench/NOTES.md): 16 rows + cumsum compaction 0.397 ms, + atomic slots 0.358,
    # 64 rows x 64 sub-keys + atomic slots + tau by tl.sort 0.279 (8 warps 0.279), the same with the
    # cumsum 0.399, 32 rows + atomic slots + sort 0.409; earlier: maxnreg 160 0.479, no maxnreg 0.582
    variants = [("default", {}), ("16 rows", {"BLOCK_M": 16, "BLOCK_N": 128}), ("BN 128", {"BLOCK_N": 128}),
                ("maxnreg 168", {"maxnreg": 168}), ("maxnreg 96", {"maxnreg": 96})] if T == 4096 else [("default", {})]
    for name, over in variants:
        R._fwd_config = with_config(**over)
        try:
            s, i = R._launch_fwd(q, keys, k, k)
            ok = (i == i_ref).float().mean().item(); err = (s - s_ref).abs().max().item()
            print(f"T={T} fwd kernel [{name}]: {ms(lambda: R._launch_fwd(q, keys, k, k)):.4f} ms "
                  f"id-match {ok:.5f} max|ds| {err:.2e}", flush=True)
        except Exception as e:
            print(f"T={T} fwd kernel [{name}]: FAILED {type(e).__name__} {str(e)[:300]}", flush=True)
    R._fwd_config = base
    out = torch.empty(T * H, device="cuda")
    for bm, bn in ((16, 128), (64, 64)):
        so = lambda: scores_only_kernel[(triton.cdiv(T, bm), H)](q, keys, out, T, n, H, DK=dk, DH_PAD=64, BLOCK_M=bm,
                                                                 BLOCK_N=bn, num_warps=4, maxnreg=128)
        print(f"T={T} scores only, {bm} x {bn} tiles (2 passes x 2 halves of tl.dot, "
              f"{2 * 2 * T * H * n * dk / 1e9:.1f} GFLOP): {ms(so):.4f} ms", flush=True)
    print(f"T={T} public op fwd: {ms(lambda: pk.product_key_topk(q, keys, k)):.4f} ms", flush=True)
    qg = q.clone().requires_grad_(); kg = keys.clone().requires_grad_()
    def fb():
        s, _ = pk.product_key_topk(qg, kg, k); s.sum().backward(); qg.grad = None; kg.grad = None
    print(f"T={T} public op fwd+bwd: {ms(fb):.4f} ms", flush=True)
    print(f"T={T} CPU time per call (no sync): fwd op {cpu_us(lambda: pk.product_key_topk(q, keys, k)):.0f} us, "
          f"fwd+bwd {cpu_us(fb):.0f} us", flush=True)
    s, ids = pk.product_key_topk(q, keys, k)
    gs = torch.randn_like(s)
    def fb_graph():
        qg.grad = None; kg.grad = None
        s, _ = pk.product_key_topk(qg, kg, k); s.backward(gs)
    g = harness.graphed(fb_graph)
    print(f"T={T} public op fwd+bwd as a CUDA graph (GPU time, no launch overhead): {ms(g.replay):.4f} ms", flush=True)
    del g
    for method in ("bitmap", "sort"):  # the selections grouped by row: counting sort from bitmaps / torch.sort
        bwd = lambda: R._launch_bwd(gs, q, keys, ids, method=method)
        print(f"T={T} backward launcher, {method} grouping: {ms(bwd):.4f} ms, CPU {cpu_us(bwd):.0f} us; "
              f"kernels, us per call: {kernel_us(bwd)}", flush=True)
    # keys kernel launch configs (measured 2026-11-30, bench/NOTES.md "Seventh session")
    for cfg in ((16, 16, 4), (16, 32, 4), (16, 8, 4), (32, 8, 4)) if T == 4096 else ():
        R._bwd_keys_config = lambda: dict(ROWS=cfg[0], BLOCK_J=cfg[1], num_warps=cfg[2])
        times = kernel_us(lambda: R._launch_bwd(gs, q, keys, ids))
        print(f"T={T} keys kernel ROWS, BLOCK_J, warps = {cfg}: {times.get('pk_topk_bwd_keys_kernel')} us", flush=True)
    R._bwd_keys_config = base_keys
    rows = ((torch.arange(H, device="cuda").view(1, 1, H, 1) * 2 + torch.arange(2, device="cuda").view(2, 1, 1, 1)) * n
            + torch.stack((ids // n, ids % n))).to(torch.int32)  # every selection (the dq kernel merges repeats)
    print(f"T={T} sorted_segments of the {rows.numel()} selections (16-bit keys, as the launcher): "
          f"{ms(lambda: sorted_segments(rows, H * 2 * n, narrow_ids=True)):.4f} ms", flush=True)
    if T == 4096:
        dk2 = torch.zeros(2, H * n, dk // 2, device="cuda")
        def torch_dkeys():
            dk2.zero_()
            for p, sub in ((0, ids // n), (1, ids % n)):
                contrib = gs[..., None] * q[..., p * dk // 2:(p + 1) * dk // 2].float()[:, :, None, :]
                dk2[p].index_add_(0, (torch.arange(H, device="cuda")[None, :, None] * n + sub).reshape(-1),
                                  contrib.reshape(-1, dk // 2))
        print(f"T={T} sub-key grads by torch index_add_ (atomics, for comparison): {ms(torch_dkeys):.4f} ms", flush=True)
# 64- vs 16-row programs by T (the default picks 64 rows from 0.75 programs per SM)
for T in (512, 1024, 2048, 3072, 4096):
    q = torch.randn(T, H, dk, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(H, 2, n, dk // 2, device="cuda", dtype=torch.bfloat16)
    R._fwd_config = base
    res = [f"default: {ms(lambda: R._launch_fwd(q, keys, k, k)):.4f}"]
    for bm, bn in ((64, 64), (16, 128)):
        R._fwd_config = with_config(BLOCK_M=bm, BLOCK_N=bn)
        res.append(f"BM{bm}: {ms(lambda: R._launch_fwd(q, keys, k, k)):.4f}")
    print(f"T={T} programs(BM64)={-(-T // 64) * H}", *res, flush=True)
R._fwd_config = base
# fallback cost: zero keys (all ties) -> every block takes the slow exact path
T = 4096; q = torch.randn(T, 8, 128, device="cuda", dtype=torch.bfloat16); keys = torch.zeros(8, 2, 1024, 64, device="cuda", dtype=torch.bfloat16)
print(f"all-ties (fallback path) fwd: {ms(lambda: pk.product_key_topk(q, keys, 16)):.4f} ms", flush=True)
