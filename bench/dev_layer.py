"""Development: the PEER layer step (paper config, T = 4096 and 1024, bf16) three ways:
eager (median ms), host time per eager call without waiting for the GPU, and the same
step captured in a CUDA graph and replayed (the GPU time, free of launch overhead).
When the host time is above the graph time the eager step is host-bound.

    python bench/dev_layer.py [PACKAGE_PARENT] [TAG]

PACKAGE_PARENT: the folder holding the peer_kernels (and csrc_triton) to measure, e.g. an
older checkout for an A/B on the same host (default: this checkout). PROFILE=1 adds a
torch.profiler table of the kernels of 5 steps at T = 4096. GPU only; bench/NOTES.md."""
import os, sys, torch
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, ".."))
sys.path.insert(1, HERE)
from triton.testing import do_bench
import harness  # noqa: E402  (bench/harness.py)
import peer_kernels as pk

tag = sys.argv[2] if len(sys.argv) > 2 else "this checkout"
torch.manual_seed(0)


for T in (4096, 1024):
    D = 1024
    layer = pk.PEER(D, num_experts=1024**2, heads=8, k=16, dim_key=128, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16)
    params = [x, *layer.parameters()]

    def step():
        for p in params:
            p.grad = None
        layer(x).backward(dy)

    def fwd():
        with torch.no_grad():
            layer(x)

    out = {}
    for name, f in (("fwd", fwd), ("fwd+bwd", step)):
        out[name] = do_bench(f, warmup=5, rep=200, return_mode="median")
        out[name + " cpu"] = harness.host_ms(f)
        g = harness.graphed(f)
        out[name + " graph"] = do_bench(g.replay, warmup=5, rep=200, return_mode="median")
        del g
    print(tag, f"T={T}", " ".join(f"{k}={v:.3f}" for k, v in out.items()), flush=True)
    if T == 4096 and os.environ.get("PROFILE"):
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)
    del layer, x, params
    torch.cuda.empty_cache()
