"""Measurement machinery of the benchmark suite (bench/run.py): device set-up, the copy
ceiling, timing, peak memory, the machine record, JSON in and out, the stdout table and
the comparison of two runs. Nothing here knows about PEER; the cases live in cases.py.

Timing on CUDA: triton.testing.do_bench (L2 flushed before every call), median with the
20th and 80th percentiles, after a warm-up call; the repetition window grows with the
call's duration so that slow baselines still get several samples. On the CPU: a
perf_counter loop with the same statistics; these are CPU timings, not the product's.

Memory: peak bytes allocated during one call beyond what was allocated before it, less
the gradients of the leaves that the call creates (inputs, parameters): what the pass
needs on top of its parameters and their gradients. CUDA only.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np

SCHEMA = "peer-kernels-bench/1"
QUANTILES = (0.5, 0.2, 0.8)


def setup_device(requested: str) -> str:
    """'auto' | 'cuda' | 'cpu' -> the device the suite runs on. On the CPU this sets
    TRITON_INTERPRET=1, so it must run before anything imports triton."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    device = "cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError("triton was imported before the CPU set-up; set TRITON_INTERPRET=1 first")
        os.environ["TRITON_INTERPRET"] = "1"  # the 'triton' backend runs in the interpreter
    return device


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ---- timing -----------------------------------------------------------------------

def _quantiles(samples_ms) -> tuple[float, float, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return tuple(float(np.quantile(a, q)) for q in QUANTILES)


def time_ms(fn, device: str, *, rep_ms: float = 100.0, min_samples: int = 8) -> dict:
    """Median / p20 / p80 in ms of fn() (already warmed up), and the sample count."""
    if device == "cuda":
        import torch
        from triton.testing import do_bench

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        est = start.elapsed_time(end)
        rep = max(rep_ms, min_samples * est * 1.1)
        med, p20, p80 = do_bench(fn, warmup=25.0, rep=rep, quantiles=list(QUANTILES),
                                 return_mode="median")
        return dict(ms=med, p20=p20, p80=p80, samples=max(1, int(rep / max(est, 1e-3))))
    times = []
    t_end = time.perf_counter() + rep_ms * 1e-3
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    med, p20, p80 = _quantiles(times)
    return dict(ms=med, p20=p20, p80=p80, samples=len(times))


def host_ms(fn, n: int = 20) -> float:
    """Host time per call (ms) when the GPU is not waited for between calls: the launch
    overhead, wherever the GPU keeps up (dev scripts compare it with the GPU time)."""
    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    return dt * 1e3


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream); replay it with
    .replay(): the GPU time of fn without its launch overhead (dev scripts)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def graph_time_ms(fn, clear=None, rep_ms: float = 100.0) -> tuple[float | None, str | None]:
    """(median ms, None) of fn's GPU work alone: fn captured in a CUDA graph (graphed) and
    each replay timed as time_ms times eager calls (do_bench: the L2 cache flushed before
    every replay), so the host's launch time is left out; (None, the error) if fn cannot be
    captured. `clear` runs first (drops old gradients). CUDA only."""
    import gc

    import torch
    from triton.testing import do_bench

    if clear is not None:
        clear()
    gc.collect()  # (a stale autograd graph of an earlier row would make the capture fail)
    try:
        g = graphed(fn)
        ms = do_bench(g.replay, warmup=25.0, rep=rep_ms, return_mode="median")
    except Exception as e:  # noqa: BLE001 - e.g. a host sync inside fn: recorded, the suite goes on
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    del g
    if clear is not None:
        clear()  # (the gradients in the graph's memory pool)
    return ms, None


def peak_extra_bytes(fn, device: str, clear=None, grad_bytes: int = 0) -> int | None:
    """Peak bytes allocated during fn() beyond the allocation before it, less grad_bytes
    (the gradients fn creates). `clear` runs first (drops old gradients). CUDA only."""
    if device != "cuda":
        return None
    import torch

    if clear is not None:
        clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - base - grad_bytes)


def copy_bandwidth_gbps(device: str) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second, GB/s): the
    ceiling every memory-bound row is compared with. 2 GiB on CUDA, 64 MiB on the CPU."""
    import torch

    nbytes = 2 * 1024**3 if device == "cuda" else 64 * 1024**2
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    ms = time_ms(lambda: b.copy_(a), device)["ms"]
    del a, b
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---- the machine record ----------------------------------------------------------

def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version: nvidia-smi, else the kernel module's /proc file."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        lines = out.stdout.strip().splitlines()
        if out.returncode == 0 and lines:
            return lines[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(\S+)", f.read())
        return m.group(1) if m else None
    except OSError:
        return None


def device_slug(name: str) -> str:
    """A GPU name as a file-name part: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"."""
    s = re.sub(r"^nvidia\s+|geforce\s+", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "gpu"


def env_info(device: str) -> dict:
    import torch
    import triton

    cuda = device == "cuda"
    return dict(
        device=device,
        gpu=torch.cuda.get_device_name() if cuda else None,
        cpu=platform.processor() or platform.machine(),
        driver=_nvidia_driver() if cuda else None,
        cuda=torch.version.cuda if cuda else None,
        torch=torch.__version__,
        triton=triton.__version__,
        peer_pytorch=_package_version("peer-pytorch"),
        python=platform.python_version(),
        torch_threads=torch.get_num_threads(),
        triton_interpreter=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


# ---- rows, JSON --------------------------------------------------------------------

def config_str(config: dict) -> str:
    return ",".join(f"{k}={config[k]}" for k in sorted(config))


def row_key(row: dict) -> str:
    """Stable identity of a row across runs: case, pass, backend and sizes."""
    return f"{row['case']}|{row['pass']}|{row['backend']}|{config_str(row['config'])}"


def write_json(path: str, env: dict, args: dict, notes: list, rows: list) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(schema=SCHEMA, env=env, args=args, notes=notes, rows=rows), f, indent=1)
    os.replace(tmp, path)  # a run stopped midway leaves the last complete file


def load_json(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if data.get("schema") != SCHEMA:
        raise SystemExit(f"{path}: not a bench/run.py result (schema {data.get('schema')!r}, expected {SCHEMA!r})")
    return data


# ---- stdout ------------------------------------------------------------------------

def _fmt(v, width: int) -> str:
    """A number in `width` characters with about three significant digits; '-' for None."""
    if not isinstance(v, (int, float)):
        return f"{'-':>{width}}"
    return f"{v:{width}.{0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2 if abs(v) >= 1 else 3}f}"


def format_rows(rows: list, peers: tuple[str, ...]) -> list[str]:
    """A readable table: one block per case and configuration, one line per pass and
    backend; speed-ups of our rows over each peer."""
    head = (f"  {'pass':8s} {'backend':14s} {'ms':>9s} {'p20-p80':>17s} {'graph ms':>9s} {'GB/s':>8s} {'%copy':>6s} "
            f"{'TFLOP/s':>8s} {'extra MB':>9s}  " + " ".join(f"{'x ' + p:>14s}" for p in peers))
    lines, block = [], None
    for r in rows:
        b = (r["case"], config_str(r["config"]))
        if b != block:
            block = b
            lines += ["", f"{r['case']}  {config_str(r['config'])}", head]
        if r.get("error"):
            lines.append(f"  {r['pass']:8s} {r['backend']:14s} ERROR: {r['error']}")
            continue
        spread = f"{r['p20']:.3f}-{r['p80']:.3f}"
        ups = " ".join(_fmt(r.get("speedup_over", {}).get(p), 14) for p in peers)
        lines.append(f"  {r['pass']:8s} {r['backend']:14s} {r['ms']:9.3f} {spread:>17s} {_fmt(r.get('graph_ms'), 9)} "
                     f"{_fmt(r.get('gbps'), 8)} "
                     f"{_fmt(r.get('pct_copy'), 6)} {_fmt(r.get('tflops'), 8)} "
                     f"{_fmt(r.get('peak_extra_mb'), 9)}  {ups}")
    return lines


# ---- comparison of two runs ---------------------------------------------------------

def compare(old: dict, new: dict, threshold_pct: float = 5.0) -> tuple[list[str], list[dict]]:
    """Rows matched by row_key: old ms, new ms, change %. A row slower by more than
    threshold_pct, or timed before and failing now, is flagged REGRESSION. Returns the
    lines to print and the changes."""
    old_rows = {row_key(r): r for r in old["rows"]}
    lines = [f"comparison: old {old['env'].get('gpu') or old['env'].get('cpu')} {old['env'].get('date')} -> "
             f"new {new['env'].get('gpu') or new['env'].get('cpu')} {new['env'].get('date')} "
             f"(regression: slower by more than {threshold_pct:g}%, or failing now)",
             f"  {'old ms':>10s} {'new ms':>10s} {'change':>8s}  row"]
    changes, missing_old = [], 0
    for r in new["rows"]:
        key = row_key(r)
        o = old_rows.pop(key, None)
        if o is None:
            missing_old += 1
            continue
        if r.get("ms") is None or o.get("ms") is None:
            if r.get("ms") is None and o.get("ms") is not None:
                changes.append(dict(key=key, old_ms=o["ms"], new_ms=None, change_pct=None, flag="REGRESSION"))
                lines.append(f"  {o['ms']:10.3f} {'FAILED':>10s} {'':>8s}  {key}  REGRESSION: {r.get('error')}")
            elif r.get("ms") is not None:
                changes.append(dict(key=key, old_ms=None, new_ms=r["ms"], change_pct=None, flag="fixed"))
                lines.append(f"  {'FAILED':>10s} {r['ms']:10.3f} {'':>8s}  {key}  fixed")
            continue
        pct = 100.0 * (r["ms"] - o["ms"]) / o["ms"]
        flag = "REGRESSION" if pct > threshold_pct else ("faster" if pct < -threshold_pct else "")
        changes.append(dict(key=key, old_ms=o["ms"], new_ms=r["ms"], change_pct=pct, flag=flag))
        lines.append(f"  {o['ms']:10.3f} {r['ms']:10.3f} {pct:+7.1f}%  {key}  {flag}")
    regressions = sum(c["flag"] == "REGRESSION" for c in changes)
    lines.append(f"{len(changes)} rows compared, {regressions} regression(s) beyond {threshold_pct:g}% or failing; "
                 f"{missing_old} new row(s) not in the old run, {len(old_rows)} old row(s) not in the new run")
    return lines, changes
