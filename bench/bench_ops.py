"""Microbenchmarks of the two fused ops against the pure-PyTorch reference, on one GPU.

    python bench/bench_ops.py [--quick] [--json OUT.json]

Measures the device copy ceiling first, then for each case: median ms (p20, p80) by
triton.testing.do_bench, useful bytes / GB/s / % of the copy ceiling, and peak memory
beyond the inputs (and parameter gradients for backward rows).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import peer_kernels as pk  # noqa: E402
from peer_kernels import reference as ref  # noqa: E402


def timeit(fn, warmup=25, rep=100):
    q = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8], return_mode="median")
    return tuple(q)


def peak_extra(fn):
    """Peak bytes allocated during fn beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_ceiling():
    a = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = timeit(lambda: b.copy_(a))[0]
    del a, b
    return 2 * 2 * 1024**3 / (ms * 1e-3) / 1e9


def bench_retrieval(t, heads=8, n=1024, dk=128, k=16, dtype=torch.bfloat16, shared=False):
    q = torch.randn(t, heads, dk, device="cuda", dtype=dtype)
    keys = torch.randn(*((2, n, dk // 2) if shared else (heads, 2, n, dk // 2)), device="cuda", dtype=dtype)
    flops = 2 * t * heads * n * dk
    rows = []
    for backend in ("triton", "torch"):
        f = lambda: pk.product_key_topk(q, keys, k, backend=backend)  # noqa: E731
        med, p20, p80 = timeit(f)
        rows.append(dict(op="product_key_topk", pass_="fwd", backend=backend, T=t, H=heads, n=n, Dk=dk, k=k,
                         dtype=str(dtype), shared=shared, ms=med, p20=p20, p80=p80,
                         tflops=flops / (med * 1e-3) / 1e12))
        qq = q.clone().requires_grad_()
        kk = keys.clone().requires_grad_()

        def fb():
            qq.grad = kk.grad = None
            s, _ = pk.product_key_topk(qq, kk, k, backend=backend)
            s.backward(torch.ones_like(s))

        med, p20, p80 = timeit(fb)
        rows.append(dict(op="product_key_topk", pass_="fwd+bwd", backend=backend, T=t, H=heads, n=n, Dk=dk, k=k,
                         dtype=str(dtype), shared=shared, ms=med, p20=p20, p80=p80,
                         peak_mb=peak_extra(fb) / 2**20))
    return rows


def bench_experts(t, d=1024, n_exp=1024**2, heads=8, k=16, dtype=torch.bfloat16, backends=("triton", "torch"),
                  modes=("sorted", "atomic"), zipf=False):
    x = torch.randn(t, d, device="cuda", dtype=dtype)
    down = (torch.randn(n_exp, d, device="cuda", dtype=dtype) * d**-0.5)
    up = torch.randn(n_exp, d, device="cuda", dtype=dtype) * d**-0.5
    if zipf:
        r = torch.arange(1, n_exp + 1, device="cuda", dtype=torch.float64)
        p = (1.0 / r) / (1.0 / r).sum()
        idx = torch.multinomial(p.float(), t * heads * k, replacement=True).view(t, heads, k)
    else:
        idx = torch.randint(0, n_exp, (t, heads, k), device="cuda")
    gates = torch.softmax(torch.randn(t, heads, k, device="cuda"), -1).to(dtype)
    esz = torch.tensor([], dtype=dtype).element_size()
    gathered = 2 * t * heads * k * d * esz  # rows of down and up
    rows = []
    for backend in backends:
        f = lambda: pk.peer_experts(x, idx, gates, down, up, backend=backend)  # noqa: E731
        med, p20, p80 = timeit(f)
        rows.append(dict(op="peer_experts", pass_="fwd", backend=backend, T=t, D=d, N=n_exp, H=heads, k=k,
                         dtype=str(dtype), zipf=zipf, ms=med, p20=p20, p80=p80, bytes=gathered,
                         gbps=gathered / (med * 1e-3) / 1e9, peak_mb=peak_extra(f) / 2**20))
        for mode in (modes if backend == "triton" else ("-",)):
            xx = x.clone().requires_grad_()
            gg = gates.clone().requires_grad_()
            dd = down.clone().requires_grad_()
            uu = up.clone().requires_grad_()

            def fb():
                for p in (xx, gg, dd, uu):  # as after optimizer.zero_grad(): no accumulation
                    p.grad = None
                kw = dict(backward=mode) if backend == "triton" else {}
                y = pk.peer_experts(xx, idx, gg, dd, uu, backend=backend, **kw)
                y.backward(torch.ones_like(y))

            fb()
            dd.grad = uu.grad = None  # parameter gradients are counted in the peak (4 GB at N=1M, D=1024)
            med, p20, p80 = timeit(fb, warmup=5, rep=30)
            moved = 2 * gathered + 2 * n_exp * d * esz  # rows read fwd + bwd, dense grad tables written
            peak = peak_extra(fb)
            rows.append(dict(op="peer_experts", pass_="fwd+bwd", backend=backend, mode=mode, T=t, D=d, N=n_exp,
                             H=heads, k=k, dtype=str(dtype), zipf=zipf, ms=med, p20=p20, p80=p80, bytes=moved,
                             gbps=moved / (med * 1e-3) / 1e9, peak_mb=peak / 2**20))
            del xx, gg, dd, uu
    return rows


def env_info():
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), date=datetime.datetime.now(datetime.timezone.utc).isoformat())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-torch-experts", action="store_true")
    args = ap.parse_args()
    info = env_info()
    info["copy_gbps"] = copy_ceiling()
    print(info, flush=True)
    rows = []
    for t in ((4096,) if args.quick else (4096, 16384)):
        rows += bench_retrieval(t)
    rows += bench_retrieval(4096, shared=True)
    for t, d in (((4096, 1024),) if args.quick else ((1024, 1024), (4096, 1024), (16384, 1024), (4096, 2048))):
        backends = ("triton",) if (args.skip_torch_experts or t > 4096 or d > 1024) else ("triton", "torch")
        rows += bench_experts(t, d, backends=backends)
    rows += bench_experts(4096, 1024, backends=("triton",), zipf=True, modes=("sorted",))
    for r in rows:
        r["pct_copy"] = 100 * r["gbps"] / info["copy_gbps"] if "gbps" in r else None
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=info, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
