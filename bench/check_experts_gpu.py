"""Quick GPU sanity check of peer_experts against the reference (used while developing)."""
import os, sys, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import peer_kernels as pk
from peer_kernels import reference as ref
torch.manual_seed(0)
for (T, H, k, D, N, dt) in [(63, 8, 16, 1000, 5000, torch.bfloat16), (100, 4, 4, 2048, 3000, torch.float32),
                            (7, 8, 16, 4096, 300, torch.float16), (513, 8, 16, 1024, 1024**2, torch.bfloat16)]:
    x = torch.randn(T, D, device="cuda", dtype=dt, requires_grad=True)
    idx = torch.randint(0, N, (T, H, k), device="cuda")
    g = torch.randn(T, H, k, device="cuda", dtype=dt, requires_grad=True)
    down = (torch.randn(N, D, device="cuda") / D**0.5).to(dt).requires_grad_()
    up = torch.randn(N, D, device="cuda").to(dt).requires_grad_()
    for mode in ("sorted", "atomic"):
        y = pk.peer_experts(x, idx, g, down, up, backward=mode)
        dy = torch.randn_like(y)
        gr = torch.autograd.grad(y, (x, g, down, up), dy)
        y0 = ref.peer_experts(x, idx, g, down, up)
        gr0 = torch.autograd.grad(y0, (x, g, down, up), dy)
        errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip((y,) + gr, (y0,) + gr0)]
        print(T, H, k, D, N, dt, mode, ["%.1e" % e for e in errs], flush=True)
