"""PNG plots of a suite run (bench/run.py), written next to its JSON file:

    <stem>_time_vs_T.png    ms vs tokens T per backend; one panel per case and pass
    <stem>_pct_copy.png     % of the measured copy bandwidth per backend, main config
    <stem>_memory.png       peak memory beyond parameters and gradients, main config (CUDA only)

Needs matplotlib (the `bench` extra); make_plots raises ImportError without it.
"""
from __future__ import annotations

import os

PASSES = ("fwd", "bwd", "fwd+bwd")


def _ok(rows):
    return [r for r in rows if r.get("ms") is not None]


def _main_bars(plt, rows, cases, backends, value, ylabel, title, path, log=False):
    """Grouped bars: one panel per case, one group per pass, one bar per backend."""
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
    width = 0.8 / max(1, len(backends))
    for ax, case in zip(axes[0], cases):
        for i, b in enumerate(backends):
            ys = []
            for p in PASSES:
                hit = [r for r in rows if r["case"] == case and r["pass"] == p and r["backend"] == b
                       and "main" in r["tags"] and value(r) is not None]
                v = value(hit[0]) if hit else float("nan")
                ys.append(max(v, 0.01) if log else v)
            ax.bar([j + (i - (len(backends) - 1) / 2) * width for j in range(len(PASSES))], ys, width, label=b)
        ax.set_xticks(range(len(PASSES)), PASSES)
        ax.set_title(case)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_plots(data: dict, stem: str) -> list[str]:
    """The PNGs of one run; returns their paths. stem: the JSON path without '.json'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, env = _ok(data["rows"]), data["env"]
    where = f"{env.get('gpu') or 'CPU (not the product numbers)'}, {env.get('date', '')[:10]}"
    cases = list(dict.fromkeys(r["case"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    written = []
    if not cases:
        return written

    # time vs T (rows of the T sweep: everything else at the main config)
    fig, axes = plt.subplots(len(cases), len(PASSES), figsize=(13, 3.6 * len(cases)), squeeze=False)
    for ci, case in enumerate(cases):
        for pi, p in enumerate(PASSES):
            ax = axes[ci][pi]
            for b in backends:
                pts = sorted((r["config"]["T"], r["ms"]) for r in rows
                             if r["case"] == case and r["pass"] == p and r["backend"] == b and "T" in r["tags"])
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=b)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens T")
            ax.set_ylabel("ms")
            ax.set_title(f"{case} {p}")
            ax.grid(alpha=0.3, which="both")
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle(f"time vs tokens, median ms ({where})")
    fig.tight_layout()
    path = f"{stem}_time_vs_T.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    path = f"{stem}_pct_copy.png"
    _main_bars(plt, rows, cases, backends, lambda r: r.get("pct_copy"), "% of copy bandwidth",
               f"useful bytes / time as % of the measured copy bandwidth, main config ({where})", path)
    written.append(path)

    if any(r.get("peak_extra_mb") is not None for r in rows):
        path = f"{stem}_memory.png"
        _main_bars(plt, rows, cases, backends, lambda r: r.get("peak_extra_mb"), "MB (log)",
                   f"peak memory beyond parameters and gradients, main config ({where})", path, log=True)
        written.append(path)
    return [os.path.abspath(p) for p in written]
