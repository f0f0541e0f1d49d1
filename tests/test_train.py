"""bench/train.py, the end-to-end training benchmark, on the CPU with tiny configs:
the loss goes down, resume continues the same curve, the Triton kernels (interpreter)
and peer-pytorch train the same model as the reference, and the report is complete."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
train = importlib.util.module_from_spec(_spec)
sys.modules["bench_train"] = train  # dataclasses look their module up by name
_spec.loader.exec_module(train)

# pinned to the CPU and fp32: on a GPU machine the defaults would be CUDA and bf16
TINY = ["--device", "cpu", "--dtype", "fp32", "--dim", "32", "--layers", "2", "--attn-heads", "2", "--seq-len", "16", "--batch", "4", "--experts", "256",
        "--peer-heads", "2", "--k", "4", "--dim-key", "16", "--eval-batches", "1", "--warmup", "2"]


@pytest.fixture
def text_file(tmp_path):
    """A small corpus for --data: this test file and train.py, a few times over."""
    path = tmp_path / "corpus.txt"
    path.write_bytes(((ROOT / "bench" / "train.py").read_bytes() + Path(__file__).read_bytes()) * 2)
    return path


def run(argv, out):
    rc = train.main([*argv, "--out", str(out)])
    with open(out) as f:
        return rc, json.load(f)


def test_default_corpus_loss_decreases_and_report(tmp_path, capsys):
    rc, res = run([*TINY, "--steps", "30", "--lr", "3e-3", "--log-every", "10"], tmp_path / "run.json")
    assert rc == 0
    row = res["backends"]["torch"]
    losses = row["loss"]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - math.log(256)) < 0.1  # starts near uniform over bytes
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0  # and learns
    assert math.isfinite(row["eval_loss"]) and row["eval_loss"] < losses[0] - 1.0
    # the embedded corpus: the running interpreter's standard library
    assert res["data"]["source"] == "python-stdlib" and res["data"]["files"] > 100
    assert res["data"]["bytes"] > 10**6 and len(res["data"]["sha256"]) == 64
    assert res["config"]["peer_layers"] == [1] and res["config"]["dtype"] == "fp32"
    assert res["torch"] == torch.__version__ and res["triton"] and res["date"]
    assert row["tokens_per_s"] > 0 and row["step_ms_median"] > 0 and len(row["step_ms"]) == 30
    assert row["timed_steps"] < 30  # the first steps are left out of the timing
    (usage,) = row["expert_usage"]
    assert usage["layer"] == 1 and 0 < usage["usage"] <= 1 and 0 <= usage["unevenness"] <= math.log(256)
    out = capsys.readouterr().out
    for text in ("[torch] step    10/30", "tok/s", "ETA", "held-out loss", "summary", "unevenness"):
        assert text in out
    assert (tmp_path / "run.png").exists() == ("plot: " in out)


def test_resume_continues_the_same_curve(tmp_path, text_file):
    base = [*TINY, "--data", str(text_file), "--steps", "6"]
    rc, straight = run(base, tmp_path / "straight.json")
    assert rc == 0
    ck = tmp_path / "ck"
    rc, first = run([*base, "--backends", "torch:3", "--save", str(ck)], tmp_path / "first.json")
    assert rc == 0 and len(first["backends"]["torch"]["loss"]) == 3
    state = torch.load(ck / "torch.pt", weights_only=True)
    assert state["step"] == 3 and state["data"]["drawn"] == 3 and len(state["history"]["loss"]) == 3
    rc, resumed = run(["--resume", str(ck), "--eval-batches", "1"], tmp_path / "resumed.json")
    assert rc == 0
    row = resumed["backends"]["torch"]
    assert row["steps_this_session"] == 3
    # fp32 on the CPU: the interrupted run gives exactly the uninterrupted losses
    assert row["loss"] == straight["backends"]["torch"]["loss"]
    assert row["eval_loss"] == straight["backends"]["torch"]["eval_loss"]
    assert row["lr"] == straight["backends"]["torch"]["lr"]
    # the config is the checkpoint's: a different value on the command line is refused
    with pytest.raises(SystemExit, match="--lr"):
        train.main(["--resume", str(ck), "--lr", "0.5", "--out", str(tmp_path / "x.json")])


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only machines run the kernels in the Triton interpreter; "
                    "with CUDA the kernels are covered by the GPU tests and the H200 training run")
def test_triton_interpreter_trains_like_the_reference(tmp_path, text_file):
    rc, res = run([*TINY, "--data", str(text_file), "--steps", "2", "--backends", "torch,triton"],
                  tmp_path / "run.json")
    assert rc == 0
    a, b = res["backends"]["triton"]["loss"], res["backends"]["torch"]["loss"]
    assert len(a) == len(b) == 2
    check = res["agreement"]["triton_vs_torch"]
    assert check["ok"] and check["steps"] == 2
    assert check["max_abs_diff"] == max(abs(x - y) for x, y in zip(a, b)) <= 1e-4
    assert "triton_vs_torch" in res["speedup"]


def test_peer_pytorch_backend_is_the_same_model(text_file):
    pytest.importorskip("PEER_pytorch", reason="peer-pytorch not installed (pip install '.[test]')")
    cfg = train.make_config(train.build_parser().parse_args(TINY), torch.device("cpu"), None)
    ours = train.build_model(cfg, "torch", torch.device("cpu"))
    theirs = train.build_model(cfg, "peer-pytorch", torch.device("cpu"))
    assert type(theirs.blocks[1].ffn).__module__.startswith("PEER_pytorch")
    data, _ = train.load_corpus(str(text_file))
    x, y = train.Batches(data, cfg.batch, cfg.seq_len, 0).next("cpu")
    for mode in (True, False):  # BatchNorm on batch statistics, then on running statistics
        ours.train(mode)
        theirs.train(mode)
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)
    ours.train()
    theirs.train()
    for model in (ours, theirs):
        torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).backward()
    torch.testing.assert_close(theirs.blocks[1].ffn.weight_up_embed.weight.grad, ours.blocks[1].ffn.up.grad,
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(theirs.tok.weight.grad, ours.tok.weight.grad, atol=1e-6, rtol=1e-5)
    # the routing that the usage report sees is the same too
    feats = ours.blocks[1].norm2(ours.tok(x) + ours.pos.weight[: x.shape[1]])
    (i1, g1), (i2, g2) = train.route(ours.blocks[1].ffn, feats), train.route(theirs.blocks[1].ffn, feats)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(g1, g2)


def test_batches_are_deterministic_and_resumable(text_file):
    data, info = train.load_corpus(str(text_file))
    trn, val = train.split_corpus(data, 16)
    assert trn.numel() + val.numel() == data.numel() == info["bytes"]
    assert 0.03 < val.numel() / data.numel() < 0.07
    a = train.Batches(trn, 4, 16, seed=5)
    b = train.Batches(trn, 4, 16, seed=5)
    x1, y1 = a.next("cpu")
    x2, _ = b.next("cpu")
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    state = a.state_dict()
    nxt, _ = a.next("cpu")
    c = train.Batches(trn, 4, 16, seed=0)
    c.load_state_dict(state)
    assert torch.equal(c.next("cpu")[0], nxt) and c.drawn == 2
    with pytest.raises(SystemExit, match="too small"):
        train.split_corpus(data[:200], 16)


def test_compare_curves_rules():
    # fp32: step by step over the first 20 steps, then the level of the last steps
    early = [5.0, 4.0, 3.0]
    same = train.compare_curves(early, [5.0, 4.0005, 3.0002], fp32=True)
    assert same["ok"] and abs(same["max_abs_diff_early"] - 5e-4) < 1e-9 and same["early_steps"] == 3
    assert not train.compare_curves(early, [5.0, 4.01, 3.0], fp32=True)["ok"]
    a = [3.0 + 0.1 * (-1) ** i for i in range(60)]
    b = a[:20] + [3.0 - 0.1 * (-1) ** i for i in range(40)]  # chaotic after step 20, same level
    check = train.compare_curves(a, b, fp32=True)
    assert check["ok"] and check["max_abs_diff"] > 0.1 and check["max_abs_diff_early"] == 0
    assert not train.compare_curves(a, a[:20] + [v * 1.02 for v in b[20:]], fp32=True)["ok"]
    # bf16: the level of the last steps counts, not step-by-step noise
    assert train.compare_curves(a, b, fp32=False)["ok"]
    assert train.compare_curves(a, [v * 1.015 for v in b], fp32=False)["ok"]
    assert not train.compare_curves(a, [v * 1.03 for v in b], fp32=False)["ok"]


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = {"config": {}, "backends": {}, "device": "cpu"}
    assert train.plot(result, tmp_path / "run.png") is False
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "run.png").exists()
