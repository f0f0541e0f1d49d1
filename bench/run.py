"""The benchmark suite: every op and the PEER layer, forward / backward / forward +
backward, our Triton path side by side with the PyTorch reference, the reference under
torch.compile and peer-pytorch, on the same inputs, in one run.

    python bench/run.py                       full suite (paper config and sweeps on a GPU)
    python bench/run.py --quick               main configs only
    python bench/run.py --only experts,layer  a subset of cases (retrieval, experts, layer)
    python bench/run.py --compare OLD.json    run, then the change of every row against OLD
    python bench/run.py --compare OLD.json --against NEW.json   compare two files, no run

First the device copy bandwidth is measured; then per case and size every backend and
pass is warmed up once (compiles, autotuning) before any is timed. Each row: median ms
with p20 / p80, useful bytes and GB/s, % of the copy bandwidth, TFLOP/s, peak memory
beyond parameters and gradients (CUDA), speed-up of our rows over each peer; on CUDA, our
rows' forward and forward + backward also as `graph ms`, the same call replayed from a CUDA
graph (the GPU's time without the host's: eager rows of small sizes measure the host,
whose speed differs from machine to machine). Output: a
table on stdout, a JSON file (--json; default bench/out/suite_<device>_<date>.json) and
PNG plots next to it (needs matplotlib, the `bench` extra). A failing row (e.g. out of
memory) is recorded with its error and the suite goes on.

Without CUDA the suite runs tiny sizes on the CPU, with the Triton kernels in the
interpreter: those timings are CPU timings, not the product's numbers.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import harness  # noqa: E402

CPU_NOTE = ("NOTE: no CUDA GPU: these are CPU timings at tiny sizes (reference on the CPU, Triton kernels in the "
            "interpreter), not the product's numbers.")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="main config of each case only (and the Zipf ids)")
    ap.add_argument("--only", default=None, help="comma-separated cases: retrieval, experts, layer")
    ap.add_argument("--backends", default=None,
                    help="comma-separated: triton, triton-atomic, torch, compile, peer-pytorch (default: all; "
                         "compile is left out on the CPU unless named here)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--json", default=None, help="output file (default bench/out/suite_<device>_<date>.json)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--compare", default=None, metavar="OLD.json", help="print the change of every row against OLD")
    ap.add_argument("--against", default=None, metavar="NEW.json",
                    help="with --compare: compare OLD with this file instead of running the suite")
    ap.add_argument("--threshold", type=float, default=5.0, help="regression threshold for --compare, %% (default 5)")
    ap.add_argument("--zipf-exponent", type=float, default=1.0, help="exponent s of the skewed ids (default 1.0)")
    ap.add_argument("--rep-ms", type=float, default=None,
                    help="timing window per row in ms (default 100 on CUDA, 25 on the CPU)")
    args = ap.parse_args(argv)
    if args.against and not args.compare:
        ap.error("--against needs --compare OLD.json")
    return args


def _select(args, device, cases, notes):
    """(case names, backends) from --only / --backends, with notes for what is left out."""
    if args.only:
        names = []
        for w in args.only.split(","):
            w = w.strip().lower()
            if w not in cases.ALIASES:
                raise SystemExit(f"--only: unknown case {w!r}; use {sorted(cases.ALIASES)}")
            names.append(cases.ALIASES[w])
        names = [c for c in cases.CASES if c in names]
    else:
        names = list(cases.CASES)
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",")]
        bad = [b for b in backends if b not in cases.BACKENDS]
        if bad:
            raise SystemExit(f"--backends: unknown {bad}; use {list(cases.BACKENDS)}")
    else:
        backends = list(cases.BACKENDS)
        if device != "cuda":
            backends.remove("compile")
            notes.append("torch.compile rows left out on the CPU (inductor compiles take minutes on a small CPU); "
                         "add them with --backends triton,torch,compile,peer-pytorch")
    if "compile" in backends:
        notes.append("compile rows: torch.compile(dynamic=False) of the reference (a static graph per shape), at the "
                     "main config and the T, D and ids sweeps (each new shape is a recompile)")
    if "peer-pytorch" in backends and cases.PeerPytorch is None:
        backends.remove("peer-pytorch")
        notes.append("peer-pytorch rows skipped: PEER_pytorch is not installed (pip install '.[bench]')")
    return names, backends


def _headline(rows, peers) -> list[str]:
    """Markdown table of the main configs: ms and extra memory per backend."""
    main = [r for r in rows if "main" in r["tags"] and r["pass"] in ("fwd", "fwd+bwd")]
    backends = [b for b in ("triton", *peers) if any(r["backend"] == b for r in main)]
    out = ["| case (main config), pass | " + " | ".join(backends) + " |", "|---" * (len(backends) + 1) + "|"]
    seen = list(dict.fromkeys((r["case"], harness.config_str(r["config"]), r["pass"]) for r in main))
    for case, cfg, p in seen:
        cells = []
        for b in backends:
            hit = [r for r in main if (r["case"], harness.config_str(r["config"]), r["pass"], r["backend"])
                   == (case, cfg, p, b)]
            r = hit[0] if hit else None
            if r is None or r.get("ms") is None:
                cells.append("error" if r else "")
            else:
                mem = f", +{r['peak_extra_mb']:.0f} MB" if r.get("peak_extra_mb") is not None else ""
                graph = f" (CUDA graph {r['graph_ms']:.3f} ms)" if r.get("graph_ms") is not None else ""
                cells.append(f"{r['ms']:.2f} ms{graph}{mem}")
        out.append(f"| {case} {cfg} {p} | " + " | ".join(cells) + " |")
    return out


def _speedups(rows, peers):
    by = {(r["pass"], r["backend"]): r for r in rows if r.get("ms")}
    for r in rows:
        if r["backend"].startswith("triton") and r.get("ms"):
            r["speedup_over"] = {p: by[(r["pass"], p)]["ms"] / r["ms"] for p in peers if (r["pass"], p) in by}


def _free(device):
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _error(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _run_config(cases, case, config, tags, backends, device, dtype, copy_gbps, rep_ms):
    """All rows of one case at one config: warm every (backend, pass) once, then time each.
    A failure (e.g. out of memory) becomes an error row and the others go on."""
    base = dict(case=case, config=config, tags=list(tags), dtype=str(dtype).replace("torch.", ""))
    items = cases.backends_for(case, config, tags, backends)
    rows, errors, warm_s = [], {}, {}
    try:
        state = cases.State(case, config, device, dtype)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory building the tables: every row is an error
        state, errors = None, {item: _error(e) for item in items}
        _free(device)
    for item in items if state is not None else ():
        runner = None
        try:
            t0 = time.perf_counter()
            runner = cases.Runner(state, *item)
            runner.fn()
            harness.sync(device)
            warm_s[item] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            errors[item] = _error(e)
        del runner
        if item in errors:
            _free(device)
    for item in items:
        backend, pass_ = item
        row = dict(base, backend=backend, **{"pass": pass_})
        row["key"] = harness.row_key(row)
        runner = None
        try:
            if item in errors:
                raise RuntimeError(errors[item])
            runner = cases.Runner(state, backend, pass_)  # warm already: compiled, tuned
            t = harness.time_ms(runner.fn, device, rep_ms=rep_ms)
            peak = harness.peak_extra_bytes(runner.fn, device, runner.clear, runner.grad_bytes)
            runner.clear()
            nbytes, flops = cases.pass_bytes_flops(case, config, pass_, dtype)
            row.update(t, bytes=nbytes, gbps=nbytes / (t["ms"] * 1e-3) / 1e9, flops=flops,
                       tflops=flops / (t["ms"] * 1e-3) / 1e12, warmup_s=warm_s[item])
            row["pct_copy"] = 100 * row["gbps"] / copy_gbps
            row["peak_extra_mb"] = None if peak is None else peak / 2**20
            if device == "cuda" and backend.startswith("triton") and pass_ != "bwd":
                # our ops' GPU time without the host's: the same call replayed from a CUDA graph
                # (the "bwd" pass re-runs a kept autograd graph, which a capture cannot take)
                row["graph_ms"], graph_error = harness.graph_time_ms(runner.fn, runner.clear, rep_ms)
                if graph_error:
                    row["graph_error"] = graph_error
        except Exception as e:  # noqa: BLE001 - recorded as an error row, the suite goes on
            row.update(error=errors.get(item) or _error(e), ms=None)
        del runner
        if row.get("error"):
            _free(device)
        rows.append(row)
    del state
    _free(device)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.against:
        lines, changes = harness.compare(harness.load_json(args.compare), harness.load_json(args.against),
                                         args.threshold)
        print("\n".join(lines))
        return 1 if any(c["flag"] == "REGRESSION" for c in changes) else 0
    old = harness.load_json(args.compare) if args.compare else None
    t_start = time.perf_counter()
    device = harness.setup_device(args.device)
    import torch

    import cases  # imports peer_kernels and triton: after the device set-up

    notes = []
    if device != "cuda":
        notes.append(CPU_NOTE)
    names, backends = _select(args, device, cases, notes)
    peers = tuple(p for p in cases.PEERS if p in backends)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rep_ms = args.rep_ms or (100.0 if device == "cuda" else 25.0)
    env = harness.env_info(device)
    env["copy_gbps"] = harness.copy_bandwidth_gbps(device)
    env["zipf_exponent"] = args.zipf_exponent
    path = args.json or os.path.join(HERE, "out", f"suite_{harness.device_slug(env['gpu']) if device == 'cuda' else 'cpu'}_{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    run_args = dict(vars(args), cases=names, backends=backends)
    print(f"peer-kernels bench suite | {env['gpu'] or 'CPU ' + env['cpu']} | driver {env['driver']} | torch "
          f"{env['torch']} | triton {env['triton']} | peer-pytorch {env['peer_pytorch']} | {env['date']}")
    print(f"copy bandwidth (read + write): {env['copy_gbps']:.0f} GB/s | dtype {str(dtype).replace('torch.', '')} | "
          f"cases {', '.join(names)} | backends {', '.join(backends)}")
    for n in notes:
        print(n)
    sys.stdout.flush()

    rows = []
    for case in names:
        for config, tags in cases.plan(case, device, args.quick, args.zipf_exponent):
            t0 = time.perf_counter()
            new = _run_config(cases, case, config, tags, backends, device, dtype, env["copy_gbps"], rep_ms)
            _speedups(new, peers)
            rows += new
            shown = tuple(p for p in peers if any(r["backend"] == p for r in new))
            print("\n".join(harness.format_rows(new, shown)), f"\n  ({time.perf_counter() - t0:.1f} s)", flush=True)
            harness.write_json(path, env, run_args, notes, rows)

    env["wall_s"] = time.perf_counter() - t_start
    harness.write_json(path, env, run_args, notes, rows)
    errors = [r for r in rows if r.get("error")]
    print(f"\nheadline ({env['gpu'] or 'CPU, not the product numbers'}, {env['date'][:10]}; ms and peak memory beyond "
          f"parameters and gradients):")
    print("\n".join(_headline(rows, peers)))
    print(f"\n{len(rows)} rows, {len(errors)} error(s), {env['wall_s']:.0f} s; JSON: {os.path.abspath(path)}")
    if not args.no_plots:
        try:
            import plots

            for p in plots.make_plots(harness.load_json(path), os.path.splitext(path)[0]):
                print(f"plot: {p}")
        except ImportError as e:
            print(f"plots skipped: {e} (pip install '.[bench]' for matplotlib)")
    changes = []
    if old is not None:
        lines, changes = harness.compare(old, harness.load_json(path), args.threshold)
        print("\n" + "\n".join(lines))
    for n in notes:
        print(n)
    # exit status 1 when a row failed or (with --compare) a row regressed
    return 1 if errors or any(c["flag"] == "REGRESSION" for c in changes) else 0


if __name__ == "__main__":
    sys.exit(main())
