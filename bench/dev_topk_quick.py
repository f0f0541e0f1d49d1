"""Development: the public product_key_topk at the paper config (fwd, fwd+bwd, id match)."""
import os, sys, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from triton.testing import do_bench
import peer_kernels as pk
torch.manual_seed(0)
T, H, n, dk, k = 4096, 8, 1024, 128, 16
q = torch.randn(T, H, dk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
keys = torch.randn(H, 2, n, dk // 2, device="cuda", dtype=torch.bfloat16, requires_grad=True)
s, i = pk.product_key_topk(q, keys, k)
s_ref, i_ref = pk.product_key_topk(q, keys, k, backend="torch")
print(f"id match {(i == i_ref).float().mean().item():.5f}", flush=True)
print(f"fwd {do_bench(lambda: pk.product_key_topk(q, keys, k), rep=50, return_mode='median'):.4f} ms", flush=True)
def fb():
    q.grad = None; keys.grad = None
    pk.product_key_topk(q, keys, k)[0].sum().backward()
print(f"fwd+bwd {do_bench(fb, rep=50, return_mode='median'):.4f} ms", flush=True)
