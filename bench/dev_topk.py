"""Development sweep of the retrieval forward kernel (configs, old vs new); see bench/NOTES.md."""
import os, sys, torch, triton
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from triton.testing import do_bench
import peer_kernels as pk
from peer_kernels import retrieval as R
from peer_kernels.csrc_triton import product_key_topk as K

def ms(f, rep=50):
    return do_bench(f, warmup=10, rep=rep, return_mode="median")

torch.manual_seed(0)
for T in (4096,):
    H, n, dk, k = 8, 1024, 128, 16
    q = torch.randn(T, H, dk, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(H, 2, n, dk // 2, device="cuda", dtype=torch.bfloat16)
    s_ref, i_ref = pk.product_key_topk(q, keys, k, backend="torch")
    sc = torch.empty(T, H, k, device="cuda"); ids = torch.empty(T, H, k, device="cuda", dtype=torch.int64)
    for bm, bn, gr, cap, w, mr in [(16, 128, 32, 64, 4, None), (16, 128, 32, 64, 4, 128), (16, 128, 32, 64, 4, 96)]:
        scr = torch.empty(triton.cdiv(T, bm) * H * bm * cap, device="cuda", dtype=torch.int64)
        f = lambda: K.pk_topk_fwd_kernel[(triton.cdiv(T, bm), H)](q, keys, sc, ids, scr, T, n, H, DK=dk, DH_PAD=64,
            PER_HEAD=True, K=k, K_PAD=16, CAND=16, KP=16, GROUPS=gr, CAP=cap, BLOCK_M=bm, BLOCK_N=bn, UPCAST=False,
            PRECISION="tf32", num_warps=w, **({"maxnreg": mr} if mr else {}))
        try:
            sc.fill_(float("nan")); f()
            ok = (ids == i_ref).float().mean().item(); err = (sc - s_ref).abs().max().item()
            print(f"T={T} new BM={bm} BN={bn} G={gr} CAP={cap} w={w} maxnreg={mr}: {ms(f):.4f} ms id-match {ok:.5f} max|ds| {err:.2e}", flush=True)
        except Exception as e:
            print(f"T={T} new BM={bm} BN={bn} G={gr} CAP={cap} w={w} maxnreg={mr}: FAILED {type(e).__name__} {str(e)[:300]}", flush=True)
    print(f"T={T} public op fwd: {ms(lambda: pk.product_key_topk(q, keys, k)):.4f} ms", flush=True)
    qg = q.clone().requires_grad_(); kg = keys.clone().requires_grad_()
    def fb():
        s, _ = pk.product_key_topk(qg, kg, k); s.sum().backward(); qg.grad = None; kg.grad = None
    print(f"T={T} public op fwd+bwd: {ms(fb):.4f} ms", flush=True)
# fallback cost: zero keys (all ties) -> every block takes the slow exact path
T = 4096; q = torch.randn(T, 8, 128, device="cuda", dtype=torch.bfloat16); keys = torch.zeros(8, 2, 1024, 64, device="cuda", dtype=torch.bfloat16)
print(f"all-ties (fallback path) fwd: {ms(lambda: pk.product_key_topk(q, keys, 16)):.4f} ms", flush=True)
