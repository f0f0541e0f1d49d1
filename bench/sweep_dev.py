"""Development sweep: block sizes of the expert kernels' token-parallel passes (forward and
the backward's token kernel). Prints one line per variant; used to pick the launch configs
(see bench/NOTES.md). The retrieval kernels are timed by bench/dev_topk.py, the backward's
sort, CSR offsets and tables kernel by bench/dev_experts.py."""
import os, sys, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from triton.testing import do_bench
from peer_kernels.csrc_triton import peer_experts_fwd as EF, peer_experts_bwd as EB

def ms(f, rep=50):
    return do_bench(f, warmup=10, rep=rep, return_mode="median")

torch.manual_seed(0)
T, H, k = 4096, 8, 16
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
