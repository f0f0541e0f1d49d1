"""Where the retrieval forward kernel spends its time: an Nsight Compute profile split by
code region (the loops of pass A, pass B, the ranking and the pair merge, and the straight
code between them). bench/NOTES.md ("Sixth session") has what it showed.

On the GPU machine (H200 runtime with ncu; paper config, T tokens, 64-row programs forced
with "64"):

    ncu --clock-control none -k regex:pk_topk_fwd --launch-skip 2 --launch-count 1 --set full \\
        --import-source yes --warp-sampling-interval 0 -f -o OUT python bench/ncu_topk.py run 4096
    ncu -i OUT.ncu-rep --page source --csv --print-source sass > OUT.csv

Anywhere (no GPU needed):

    python bench/ncu_topk.py split OUT.csv

prints, per region between loop boundaries (backward branches of the SASS), the
instructions executed per warp, the share of the warp-stall samples and the main stall
reasons (no_inst = instruction fetch, wait = fixed-latency dependency, short_sb = shared
memory / shuffles, long_sb = global or local memory, barrier = bar.sync).
"""
import collections
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sass_topk import loops  # noqa: E402


def run(T: int, force_64_rows: bool) -> None:
    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from peer_kernels import retrieval as R
    if force_64_rows:
        R._many_rows = lambda *args: True
    torch.manual_seed(0)
    H, n, dk, k = 8, 1024, 128, 16
    q = torch.randn(T, H, dk, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(H, 2, n, dk // 2, device="cuda", dtype=torch.bfloat16)
    for _ in range(4):  # the profiler skips the first launches (compile, warm-up)
        R._launch_fwd(q, keys, k, k)
    torch.cuda.synchronize()


def split(path: str) -> None:
    rows = list(csv.reader(open(path)))
    header, data = rows[1], rows[2:]
    col = {name: i for i, name in enumerate(header)}
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    base = int(data[0][0], 16)
    ins = []  # (offset, text, executed, samples, {stall: samples})
    for r in data:
        ins.append((int(r[0], 16) - base, r[1].strip(), int(r[col["Instructions Executed"]] or 0),
                    int(r[col["Warp Stall Sampling (All Samples)"]] or 0), {s: int(r[col[s]] or 0) for s in stalls}))
    warps = ins[0][2] or 1  # the first instruction runs once per warp
    total = sum(i[3] for i in ins) or 1
    print(f"{sum(i[2] for i in ins) / warps:.0f} instructions executed per warp, {total} samples")
    cuts = {0, ins[-1][0] + 16}
    for start, end in loops([(off + base, text) for off, text, *_ in ins]):
        cuts |= {start - base, end - base + 16}  # a loop: [start, end]
    cuts = sorted(cuts)
    for lo, hi in zip(cuts, cuts[1:]):
        seg = [i for i in ins if lo <= i[0] < hi]
        samples, executed = sum(i[3] for i in seg), sum(i[2] for i in seg)
        if samples * 200 < total:  # under 0.5%
            continue
        why = collections.Counter()
        for i in seg:
            why.update(i[4])
        top = ", ".join(f"{s[6:]} {100 * v // max(samples, 1)}%" for s, v in why.most_common(3))
        print(f"{lo:#07x}-{hi:#07x} {len(seg):5d} instr  {executed / warps:7.0f} per warp  "
              f"{100 * samples / total:5.1f}% of samples  {top}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        run(int(sys.argv[2]), len(sys.argv) > 3 and sys.argv[3] == "64")
    elif len(sys.argv) == 3 and sys.argv[1] == "split":
        split(sys.argv[2])
    else:
        sys.exit(__doc__)
