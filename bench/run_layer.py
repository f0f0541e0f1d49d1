"""Times the PEER layer forward and forward + backward per backend (the README's main
command until the full suite lands). On CUDA: the paper config (N = 1024^2, H = 8, k = 16,
Dk = 128, d = 1024, T = 4096, bf16), Triton kernels vs the PyTorch reference. Without
CUDA: a small config on the CPU, reference and Triton-interpreter paths; those timings
are CPU timings, not the product's numbers.

    python bench/run_layer.py [--tokens T] [--dim D] [--experts N] [--json OUT]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the 'triton' backend run on the CPU

import triton  # noqa: E402

import peer_kernels as pk  # noqa: E402


def _time(fn, cuda, reps):
    fn()
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=max(20, reps * 10), return_mode="median")
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096 if cuda else 64)
    ap.add_argument("--dim", type=int, default=1024 if cuda else 64)
    ap.add_argument("--experts", type=int, default=1024**2 if cuda else 32**2)
    ap.add_argument("--heads", type=int, default=8 if cuda else 4)
    ap.add_argument("--k", type=int, default=16 if cuda else 4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    where = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    print(f"peer-kernels {pk.__version__} | torch {torch.__version__} | triton {triton.__version__} | {where}")
    if not cuda:
        print("NOTE: no CUDA GPU: these are CPU timings of the reference and of the Triton interpreter, "
              "not the product's numbers.")
    print(f"PEER(dim={args.dim}, num_experts={args.experts}, heads={args.heads}, k={args.k}), "
          f"T={args.tokens}, {str(dtype).replace('torch.', '')}")
    rows = []
    backends = ("triton", "torch")
    for backend in backends:
        torch.manual_seed(0)
        layer = pk.PEER(args.dim, num_experts=args.experts, heads=args.heads, k=args.k,
                        dim_key=128 if cuda else 16, backend=backend).to(device=device, dtype=dtype)
        x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)

        def fwd():
            with torch.no_grad():
                layer(x)

        def fwd_bwd():
            layer.zero_grad(set_to_none=True)
            layer(x).float().square().mean().backward()

        reps = args.reps if (cuda or backend == "torch") else 1
        f_ms = _time(fwd, cuda, reps)
        fb_ms = _time(fwd_bwd, cuda, reps)
        peak = None
        if cuda:
            layer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fwd_bwd()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        rows.append(dict(backend=backend, fwd_ms=f_ms, fwd_bwd_ms=fb_ms, peak_mb=peak))
        mem = f", peak {peak:.0f} MiB (params + grads included)" if peak is not None else ""
        print(f"  {backend:7s} forward {f_ms:9.3f} ms   forward+backward {fb_ms:9.3f} ms{mem}", flush=True)
        del layer, x
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=where, torch=torch.__version__, triton=triton.__version__,
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(), config=vars(args),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
