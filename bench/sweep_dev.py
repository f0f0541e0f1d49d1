"""Development sweep: block sizes of the expert kernels and a time split of the backward passes.
Prints one line per variant; used to pick the launch configs (see bench/NOTES.md)."""
import os, sys, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from triton.testing import do_bench
import peer_kernels as pk
from peer_kernels import retrieval as R
from peer_kernels.csrc_triton import peer_experts_fwd as EF, peer_experts_bwd as EB

def ms(f, rep=50):
    return do_bench(f, warmup=10, rep=rep, return_mode="median")

torch.manual_seed(0)
T, H, n, dk, k = 4096, 8, 1024, 128, 16
q = torch.randn(T, H, dk, device="cuda", dtype=torch.bfloat16)
keys = torch.randn(H, 2, n, dk // 2, device="cuda", dtype=torch.bfloat16)
_, i_ref = pk.product_key_topk(q, keys, k, backend="torch")
# forward kernel configs: bench/dev_topk.py
g = torch.randn(T, H, k, device="cuda")
print(f"pk bwd total: {ms(lambda: R._launch_bwd(g, q, keys, i_ref)):.4f} ms", flush=True)
# the backward kernels' configs (the dq kernel, the segmented dC kernel) are the ones timed
# by bench/dev_topk.py; the block/split sweep of the old dense dC kernel that was here is gone
# with that kernel
D, N = 1024, 1024**2
x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
down = torch.randn(N, D, device="cuda", dtype=torch.bfloat16) * D**-0.5
up = torch.randn(N, D, device="cuda", dtype=torch.bfloat16) * D**-0.5
idx = torch.randint(0, N, (T, H * k), device="cuda")
gates = torch.rand(T, H * k, device="cuda", dtype=torch.bfloat16)
y = torch.empty_like(x); pre = torch.empty(T, H * k, device="cuda")
for bs, w in [(4, 4), (8, 4), (16, 4), (8, 8), (16, 8), (32, 8)]:
    f = lambda: EF.peer_experts_fwd_kernel[(T,)](x, idx, gates, down, up, y, pre, D=D, D_PAD=1024, HK=H * k, BLOCK_S=bs, ACT=0, num_warps=w)
    t = ms(f); print(f"experts fwd BS={bs} warps={w}: {t:.4f} ms  {2*T*H*k*D*2/t/1e9:.0f} GB/s", flush=True)
dy = torch.randn_like(x)
dx = torch.empty_like(x); dg = torch.empty_like(gates); dh = torch.empty(T, H * k, device="cuda"); coef = torch.empty_like(dh)
ddown = torch.empty_like(down); dup = torch.empty_like(up)
for bs, w in [(8, 4), (16, 4), (16, 8)]:
    f = lambda: EB.peer_experts_bwd_token_kernel[(T,)](dy, x, idx, gates, pre, down, up, dx, dg, dh, coef, ddown, dup,
        D=D, D_PAD=1024, HK=H * k, BLOCK_S=bs, ACT=0, ATOMIC=False, num_warps=w)
    print(f"experts bwd token kernel BS={bs} warps={w}: {ms(f):.4f} ms", flush=True)
# sort, CSR offsets, tables-kernel configs and the write floor: bench/dev_experts.py
dk2 = torch.zeros(2, H, n, dk // 2, device="cuda")
hh = torch.arange(H, device="cuda")[None, :, None]
def torch_dkeys():
    dk2.zero_()
    for p, sub, qp in ((0, i_ref // n, q[..., : dk // 2]), (1, i_ref % n, q[..., dk // 2:])):
        contrib = g[..., None] * qp.float()[:, :, None, :]
        dk2[p].view(H * n, dk // 2).index_add_(0, (hh * n + sub).reshape(-1), contrib.reshape(-1, dk // 2))
print(f"pk bwd keys via torch index_add_ (atomics, for comparison): {ms(torch_dkeys):.4f} ms", flush=True)
