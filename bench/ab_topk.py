"""Development: A/B of retrieval forward kernels from several checkouts on one GPU, each in its
own process: ids against the reference, max score difference, kernel time by T.

    git archive exp/all | tar -x -C /tmp/all     (any revision, any folder)
    python bench/ab_topk.py . /tmp/all ...        folders holding peer_kernels and csrc_triton

GPU only; bench/NOTES.md."""
import os, subprocess, sys

CHILD = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
from triton.testing import do_bench
import peer_kernels as pk
from peer_kernels import retrieval as R
from peer_kernels import reference as ref
torch.manual_seed(0)
H, n, dk, k = 8, 1024, 128, 16
for T in (2048, 4096, 16384):
    q = torch.randn(T, H, dk, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(H, 2, n, dk // 2, device="cuda", dtype=torch.bfloat16)
    s_ref, i_ref = ref.product_key_topk(q, keys, k, k)
    s, i = R._launch_fwd(q, keys, k, k)
    t = do_bench(lambda: R._launch_fwd(q, keys, k, k), warmup=10, rep=200, return_mode="median")
    print(f"{sys.argv[1]} T={T}: {t:.4f} ms, ids equal {(i == i_ref).float().mean().item():.5f}, "
          f"max|ds| {(s - s_ref.float()).abs().max().item():.2e}", flush=True)
'''

if __name__ == "__main__":
    for folder in sys.argv[1:] or ["."]:
        r = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(folder)], capture_output=True, text=True)
        print(r.stdout.strip() or f"{folder}: FAILED\n{r.stderr[-2000:]}", flush=True)
