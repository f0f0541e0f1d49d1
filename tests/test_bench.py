"""The benchmark suite (bench/run.py): its smallest configuration runs on the CPU and
writes a JSON with every case, pass and backend and positive numbers; --compare flags a
slower row; the peer-pytorch row gets our weights; the byte counts match DESIGN.md."""
import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import cases  # noqa: E402
import harness  # noqa: E402

import peer_kernels as pk  # noqa: E402

CASES = ("product_key_topk", "peer_experts", "PEER")
PASSES = ("fwd", "bwd", "fwd+bwd")


def _run(*args, timeout=240):
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "suite.json"
    proc = _run("--device", "cpu", "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return out, json.load(f), proc.stdout


def test_smallest_suite_on_cpu_writes_every_case(suite):
    path, data, stdout = suite
    assert "CPU timings" in stdout and any("CPU timings" in n for n in data["notes"])
    env = data["env"]
    assert env["device"] == "cpu" and env["triton_interpreter"] and env["copy_gbps"] > 0
    for field in ("torch", "triton", "date", "python"):
        assert env[field]
    rows = data["rows"]
    assert rows and not [r for r in rows if r.get("error")]
    for case in CASES:
        got = {(r["backend"], r["pass"]) for r in rows if r["case"] == case}
        want = {"triton", "torch"} | ({"peer-pytorch"} if case == "PEER" and cases.PeerPytorch else set()) \
            | ({"triton-atomic"} if case == "peer_experts" else set())
        assert {b for b, _ in got} == want, case
        for b in want:
            assert {p for bb, p in got if bb == b} == ({"bwd", "fwd+bwd"} if b == "triton-atomic" else set(PASSES))
    assert any(r["config"].get("ids", "").startswith("zipf") for r in rows)
    for r in rows:
        for field in ("ms", "p20", "p80", "bytes", "gbps", "pct_copy", "flops", "tflops"):
            assert r[field] > 0, (r["key"], field)
        assert r["p20"] <= r["ms"] <= r["p80"]
        assert r["key"] == harness.row_key(r)
        assert "graph_ms" not in r  # (CUDA only)
        if r["backend"] == "triton":
            assert set(r["speedup_over"]) == {p for p in ("torch", "peer-pytorch") if
                                              any(o["backend"] == p and o["case"] == r["case"] for o in rows)}
            assert all(v > 0 for v in r["speedup_over"].values())
    assert len({r["key"] for r in rows}) == len(rows)
    # plots when matplotlib is there (the `bench` extra), a note when it is not
    stem = os.path.splitext(str(path))[0]
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("time_vs_T", "pct_copy"):
            assert os.path.getsize(f"{stem}_{name}.png") > 0
    else:
        assert "plots skipped" in stdout


@pytest.mark.gpu
def test_graph_time_of_a_capturable_call_and_the_error_of_another():
    """graph_ms: the GPU time of a call replayed from a CUDA graph; a call that syncs with the
    host cannot be captured and gives its error instead (the suite goes on)."""
    x = torch.randn(1 << 24, device="cuda")
    ms, err = harness.graph_time_ms(lambda: x.mul_(1.0), rep_ms=20)
    assert err is None and 0 < ms < 10
    ms, err = harness.graph_time_ms(lambda: x.sum().item(), rep_ms=20)
    assert ms is None and err
    torch.cuda.synchronize()
    assert torch.isfinite(x.sum())  # the context still works
    lines = harness.format_rows([dict(case="c", config={"T": 1}, tags=[], backend="triton", **{"pass": "fwd"},
                                      ms=1.0, p20=0.9, p80=1.1, graph_ms=0.5)], ())
    assert "graph ms" in lines[2] and "0.500" in lines[3]


def test_compare_flags_regressions(suite, tmp_path):
    _, data, _ = suite
    new = copy.deepcopy(data)
    slower, faster, dropped = new["rows"][0], new["rows"][1], new["rows"].pop(2)
    failing = new["rows"][2]
    slower["ms"] *= 1.5
    faster["ms"] *= 0.5
    failing.update(ms=None, error="OutOfMemoryError: simulated")
    old_path, new_path = tmp_path / "old.json", tmp_path / "new.json"
    old_path.write_text(json.dumps(data))
    new_path.write_text(json.dumps(new))
    proc = _run("--compare", str(old_path), "--against", str(new_path), timeout=60)
    assert proc.returncode == 1, proc.stderr  # regressions -> exit status 1
    lines = proc.stdout.splitlines()
    hit = [ln for ln in lines if slower["key"] in ln]
    assert len(hit) == 1 and "REGRESSION" in hit[0] and "+50.0%" in hit[0]
    hit = [ln for ln in lines if faster["key"] in ln]
    assert len(hit) == 1 and "faster" in hit[0] and "-50.0%" in hit[0]
    hit = [ln for ln in lines if failing["key"] in ln]
    assert len(hit) == 1 and "FAILED" in hit[0] and "REGRESSION" in hit[0] and "simulated" in hit[0]
    assert not [ln for ln in lines if dropped["key"] in ln]
    n = len(data["rows"])
    assert f"{n - 1} rows compared, 2 regression(s) beyond 5% or failing" in proc.stdout
    assert "1 old row(s) not in the new run" in proc.stdout
    # the reverse: failing before, timed now
    proc = _run("--compare", str(new_path), "--against", str(old_path), timeout=60)
    hit = [ln for ln in proc.stdout.splitlines() if failing["key"] in ln]
    assert len(hit) == 1 and "fixed" in hit[0]


def test_compare_refuses_other_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    proc = _run("--compare", str(bad), "--against", str(bad), timeout=60)
    assert proc.returncode != 0 and "not a bench/run.py result" in proc.stderr


def test_failing_row_is_recorded_and_the_suite_goes_on(monkeypatch):
    import run

    real = cases.Runner

    def runner(state, backend, pass_):
        if pass_ == "bwd":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(state, backend, pass_)

    monkeypatch.setattr(cases, "Runner", runner)
    config, tags = cases.plan("product_key_topk", "cpu", True, 1.0)[0]
    rows = run._run_config(cases, "product_key_topk", config, tags, ["torch"], "cpu", torch.float32, 1.0, 5.0)
    assert [r["pass"] for r in rows] == list(PASSES)
    bad = [r for r in rows if r.get("error")]
    assert len(bad) == 1 and bad[0]["pass"] == "bwd" and bad[0]["ms"] is None
    assert bad[0]["error"] == "OutOfMemoryError: CUDA out of memory (simulated)"
    assert all(r["ms"] > 0 for r in rows if r is not bad[0])
    assert "ERROR: OutOfMemoryError" in "\n".join(harness.format_rows(rows, ()))


def test_peer_pytorch_row_skipped_without_peer_pytorch(monkeypatch):
    monkeypatch.setattr(cases, "PeerPytorch", None)
    layer = pk.PEER(16, num_experts=16, heads=2, k=3, dim_key=8, query_norm=None, backend="torch")
    assert cases.build_peer_pytorch(layer, "cpu", torch.float32) is None


def test_peer_pytorch_row_gets_our_weights():
    pytest.importorskip("PEER_pytorch", reason="peer-pytorch (the test extra) is not installed")
    torch.manual_seed(0)
    layer = pk.PEER(16, num_experts=16, heads=2, k=3, dim_key=8, query_norm=None, backend="torch")
    pp = cases.build_peer_pytorch(layer, "cpu", torch.float32)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(pp(x), layer(x), atol=1e-5, rtol=1e-5)
    back = pk.PEER.from_peer_pytorch(pp, backend="torch")
    for a, b in zip(back.parameters(), layer.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_gpu_plan_is_the_paper_config_and_its_sweeps():
    """The sizes the GPU run covers (DESIGN.md sec. 1 and issue 5), without running them."""
    paper = dict(T=4096, H=8, k=16)
    for case in CASES:
        plan = cases.plan(case, "cuda", False, 1.0)
        main, tags = plan[0]
        assert "main" in tags and all("main" not in t for _, t in plan[1:])
        assert {s: main[s] for s in paper} == paper and main.get("n", 1024) == 1024
        assert main.get("N", 1024**2) == 1024**2 and main.get("D", 1024) == 1024 and main.get("Dk", 128) == 128
        assert sorted({c["T"] for c, _ in plan}) == [1024, 4096, 16384]
        rows = [(b, p) for c, t in plan for b, p in cases.backends_for(case, c, t, cases.BACKENDS)]
        assert {b for b, _ in rows} >= {"triton", "torch", "compile"}
        assert ("peer-pytorch" in {b for b, _ in rows}) == (case == "PEER")
        assert {p for _, p in rows} == set(PASSES)
        assert cases.plan(case, "cuda", True, 1.0)[0] == plan[0]
    experts = [c for c, _ in cases.plan("peer_experts", "cuda", False, 1.2)]
    assert sorted({c["D"] for c in experts}) == [1024, 2048]
    assert sorted({c["H"] * c["k"] for c in experts}) == [64, 128, 256]
    assert sorted({c["N"] for c in experts}) == [256**2, 1024**2]
    assert {c["ids"] for c in experts} == {"uniform", "zipf1.2"}
    assert sorted({c["D"] for c, _ in cases.plan("PEER", "cuda", False, 1.0)}) == [1024, 2048]


def test_zipf_ids_are_skewed_and_in_range():
    g = torch.Generator().manual_seed(0)
    ids = cases.zipf_ids((4000, 2, 4), 1024, 1.0, g, "cpu")
    assert ids.shape == (4000, 2, 4) and ids.dtype == torch.int64
    assert 0 <= ids.min() and ids.max() < 1024
    counts = torch.bincount(ids.flatten(), minlength=1024).sort(descending=True).values
    # p(rank 1) = 1 / H_1024 ~ 13% of the 32000 draws; uniform would give ~31 each
    assert counts[0] > 3000 and counts[-1] < 10


def test_useful_bytes_match_design_floors():
    paper = dict(T=4096, D=1024, N=1024**2, H=8, k=16, ids="uniform")
    fwd, flops = cases.pass_bytes_flops("peer_experts", paper, "fwd", torch.bfloat16)
    assert 2.15e9 < fwd < 2.2e9  # DESIGN.md sec. 3: 2.15 GB of gathered rows
    bwd, _ = cases.pass_bytes_flops("peer_experts", paper, "bwd", torch.bfloat16)
    assert 6.4e9 < bwd < 6.5e9  # the rows again and both dense bf16 gradient tables (4.3 GB)
    _, flops = cases.pass_bytes_flops("product_key_topk", dict(T=4096, H=8, k=16, n=1024, Dk=128, shared=False),
                                      "fwd", torch.bfloat16)
    assert abs(flops - 8.6e9) < 0.1e9  # 8.6 GFLOP of sub-key scores
