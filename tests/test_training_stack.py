"""PEER inside the PyTorch training stack (issue 7): torch.compile (fullgraph, dynamic
shapes, CUDA graphs), autocast bf16 with fp32 parameters, activation checkpointing,
gradient accumulation, DDP and FSDP2, and opcheck of every registered op.

Where each point runs (tests marked `gpu` are skipped without CUDA, with the reason):
  - torch.compile fullgraph + dynamic sequence length, outputs and grads == eager:
    CPU (aot_eager backend, Triton kernels in the interpreter); GPU: inductor and
    mode="reduce-overhead" (CUDA graphs). Inductor on the CPU is not run here: its first
    compile of a PEER model took 25-40 s on the 2-core CI machine (C++ codegen), and the
    kernels it would wrap are the same opaque ops that aot_eager traces.
  - autocast bf16 with fp32 parameters: CPU and GPU.
  - torch.utils.checkpoint: same grads on CPU; lower memory on the GPU.
  - gradient accumulation: CPU (and on the GPU through the `device` fixture).
  - opcheck of the four ops, forward and backward: CPU (GPU through the fixture).
  - DDP and FSDP2 (examples/train_distributed.py under torchrun): 2 CPU processes over gloo
    with query_norm="layer" (SyncBatchNorm is CUDA-only in PyTorch); 2 GPUs over NCCL with
    the default BatchNorm converted to SyncBatchNorm, when two GPUs are present.

Tests that need no kernel for their point (the distributed wrapping on the CPU) use
backend="torch"; the others force backend="triton" (the interpreter on the CPU).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.checkpoint import checkpoint

import peer_kernels as pk
from peer_kernels import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_distributed.py")
DIM = 32
gpu = pytest.mark.gpu


def _example():
    spec = importlib.util.spec_from_file_location("train_distributed", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_lm(device, seed=0, **overrides):
    """The example's end-to-end model (attention + PEER blocks) at the CPU preset sizes."""
    ex = _example()
    args = SimpleNamespace(**{**ex.PRESETS["cpu"], "seq": 12, "query_norm": "batch", "backend": "triton",
                              "seed": seed})
    peer = {k: overrides.pop(k) for k in list(overrides) if k not in vars(args)}
    vars(args).update(overrides)
    return ex.build_model(args, device, **peer), args


def layer(device, seed=0, **kw):
    cfg = dict(num_experts=64, heads=2, k=4, dim_key=16, backend="triton", device=device)
    cfg.update(kw)
    torch.manual_seed(seed)
    return pk.PEER(DIM, **cfg)


def run(module, x, dy, params, dynamic_dim=None):
    """Output and grads of (out * dy).sum() w.r.t. x (if float) and `params`; `dynamic_dim`:
    marked dynamic for torch.compile on the tensor that is passed in."""
    inputs = [x.detach().requires_grad_()] if x.is_floating_point() else [x.clone()]
    if dynamic_dim is not None:
        torch._dynamo.mark_dynamic(inputs[0], dynamic_dim)
    out = module(inputs[0])
    wrt = (inputs if x.is_floating_point() else []) + list(params)
    return out.detach(), torch.autograd.grad((out.float() * dy).sum(), wrt)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_all_close(got, want, tol, names):
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype, f"{name}: {a.dtype} vs {b.dtype}"
        err = rel(a, b)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:g}"


def assert_same_run(a, b, device, seed, shape=(2, 5, DIM), out_tol=0.0, grad_tol=1e-6):
    """Modules `a` and `b` (same parameter layout) on one seeded input: outputs equal within
    out_tol (0: bitwise), grads of x and of every parameter within grad_tol (relative)."""
    torch.manual_seed(seed)
    x = torch.randn(*shape, device=device)
    dy = torch.randn(*shape, device=device)
    y_a, g_a = run(a, x, dy, a.parameters())
    y_b, g_b = run(b, x, dy, b.parameters())
    torch.testing.assert_close(y_a, y_b, atol=out_tol, rtol=out_tol)
    assert_all_close(g_a, g_b, grad_tol, ["x"] + [n for n, _ in b.named_parameters()])


def check_compiled(eager, model, compiled, batches, tol, before_each=None):
    """For each (x, dy) of `batches`: the compiled module (`compiled`, wrapping `model`, a
    copy of `eager`) gives eager's output and grads (of a float x and of every parameter)
    within `tol` (relative). Dim 1 (the sequence) of its input is marked dynamic, and from
    the second batch on a recompilation raises (error_on_recompile)."""
    names = [n for n, _ in eager.named_parameters()]
    for i, (x, dy) in enumerate(batches):
        y_e, g_e = run(eager, x, dy, eager.parameters())
        if before_each is not None:
            before_each()
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            y_c, g_c = run(compiled, x, dy, model.parameters(), dynamic_dim=1)
        assert rel(y_c, y_e) <= tol, f"output: relative error {rel(y_c, y_e):.2e}"
        assert_all_close(g_c, g_e, tol, (["x"] if x.is_floating_point() else []) + names)


def token_batches(vocab, lengths, device, batch=2):
    """(tokens [batch, L], dy [batch, L, vocab]) for each length L, seeded by L."""
    out = []
    for seq in lengths:
        g = torch.Generator().manual_seed(seq)
        out.append((torch.randint(vocab, (batch, seq), generator=g).to(device),
                    torch.randn(batch, seq, vocab, generator=g).to(device)))
    return out


# ---- torch.compile ---------------------------------------------------------------------

COMPILE_CASES = {
    "batchnorm": dict(query_norm="batch"),
    "layernorm-shared-separate": dict(query_norm="layer", shared_keys=True, separate_experts_per_head=True,
                                      gate="sigmoid", activation="silu"),
    "torch-backend": dict(query_norm="batch", backend="torch"),
}


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compile_fullgraph_dynamic_matches_eager(device, case):
    """fullgraph=True (a graph break raises), one compile for three sequence lengths
    (error_on_recompile), outputs, all grads and the BatchNorm running statistics equal
    eager's. One compile for three lengths: the first is compiled with the sequence dim
    marked dynamic, the next two must reuse that graph."""
    torch._dynamo.reset()
    eager = layer(device, **COMPILE_CASES[case])
    model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    torch.manual_seed(11)
    batches = [(torch.randn(2, seq, DIM, device=device), torch.randn(2, seq, DIM, device=device))
               for seq in (3, 4, 7)]
    check_compiled(eager, model, compiled, batches, 1e-5)
    assert counter.frame_count == 1
    for (name, b_e), (_, b_c) in zip(eager.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(b_c, b_e, atol=1e-6, rtol=1e-6, msg=lambda s: f"buffer {name}: {s}")
    torch._dynamo.reset()


def test_compile_end_to_end_model(device):
    """The example's model (attention + a PEER block, BatchNorm query norm) under
    torch.compile(fullgraph=True): no graph break, one compile for two sequence lengths,
    same logits and gradients as eager."""
    torch._dynamo.reset()
    eager, args = tiny_lm(device, layers=1)
    model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    check_compiled(eager, model, compiled, token_batches(args.vocab, (5, 12), device), 1e-5)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def _gpu_lm(seed=0, **peer):
    """A mid-size model for the GPU tests: PEER with 128^2 experts, 4 heads, k = 8."""
    ex = _example()
    args = SimpleNamespace(**{**ex.PRESETS["cpu"], "vocab": 512, "dim": 256, "attn_heads": 4, "experts": 128**2,
                              "heads": 4, "k": 8, "dim_key": 64, "seq": 256, "query_norm": "batch",
                              "backend": "triton", "seed": seed})
    return ex.build_model(args, "cuda", **peer), args


@gpu
def test_compile_inductor_gpu():
    """Inductor (Triton code generation around the PEER kernels), fullgraph, dynamic
    sequence length without recompiling, same logits and grads as eager."""
    torch._dynamo.reset()
    eager, args = _gpu_lm()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    check_compiled(eager, model, compiled, token_batches(args.vocab, (128, 192, 256), "cuda", batch=4), 1e-4)
    torch._dynamo.reset()


def _reduce_overhead_training(backward):
    """torch.compile(mode="reduce-overhead"): forward and backward captured in CUDA graphs
    and replayed. Three training iterations per sequence length (warm-up, record, replay),
    two lengths; the grads of every iteration must equal eager's, no graph may be skipped."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, args = _gpu_lm(backward=backward)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    batches = token_batches(args.vocab, (128, 256), "cuda", batch=4)
    check_compiled(eager, model, compiled, [b for b in batches for _ in range(3)], 1e-4,
                   before_each=torch.compiler.cudagraph_mark_step_begin)
    with torch.no_grad():  # inference through the same compiled module, graphs of its own
        for tokens, _ in batches:
            want = eager(tokens)
            for _ in range(3):
                torch.compiler.cudagraph_mark_step_begin()
                assert rel(compiled(tokens), want) < 1e-4
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch._dynamo.reset()


@gpu
def test_compile_reduce_overhead_gpu_atomic_backward():
    """CUDA graphs with PEER(backward="atomic"): no host sync anywhere in the layer."""
    _reduce_overhead_training("atomic")


@gpu
def test_compile_reduce_overhead_gpu_sorted_backward():
    """The same with the default (sorted) backward. Its id sort and CSR offsets must not
    sync with the host (torch.bincount does: illegal during capture). In a child process,
    so that a failed capture cannot leave this process's CUDA context in a bad state."""
    code = ("import sys; sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r}); "
            "import test_training_stack as t; t._reduce_overhead_training('sorted')").format(
        tests=os.path.dirname(os.path.abspath(__file__)), root=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---- autocast ------------------------------------------------------------------------

@pytest.mark.parametrize("backend,query_norm,x_dtype", [
    ("triton", "batch", torch.float32), ("triton", "layer", torch.bfloat16),
    ("torch", "batch", torch.bfloat16), ("torch", "layer", torch.float32)])
def test_autocast_bf16_close_to_fp32(device, backend, query_norm, x_dtype):
    """autocast(bfloat16) with fp32 parameters: output in x's dtype within bf16 error of the
    fp32 run, parameter grads fp32. k = N = 16 so that the bf16 query cannot change which
    experts are picked (then outputs could differ by a whole expert): only the numbers."""
    m = layer(device, num_experts=16, k=16, candidates=4, query_norm=query_norm, backend=backend)
    torch.manual_seed(3)
    x = torch.randn(2, 5, DIM, device=device)
    dy = torch.randn(2, 5, DIM, device=device)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    y32, g32 = run(m, x, dy, m.parameters())
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        y, g = run(m, x.to(x_dtype), dy, m.parameters())
    assert y.dtype == x_dtype and g[0].dtype == x_dtype
    assert all(p.dtype == torch.float32 and gp.dtype == torch.float32 for p, gp in zip(m.parameters(), g[1:]))
    assert rel(y, y32) < 3e-2
    for name, a, b in zip(names, g, g32):
        assert rel(a, b) < 3e-2, name


def _fp32_math_on_query(m, x, q):
    """The layer after the query, written with the reference ops in fp32 (autocast off),
    from the given query (here: the query that autocast made)."""
    dev = x.device.type
    with torch.autocast(dev, enabled=False):
        scores, idx = ref.product_key_topk(q.float(), m.sub_keys, m.k, m.candidates)
        return ref.peer_experts(x.float(), idx, scores.softmax(-1), m.down, m.up, m.activation).to(x.dtype)


@pytest.mark.parametrize("query_norm", ["batch", "layer"])
def test_autocast_kernels_are_fp32_math_on_the_bf16_query(device, query_norm):
    """Under autocast only the query path runs in bf16 (with LayerNorm on CUDA autocast keeps
    it fp32); the kernels take that query with fp32 keys and tables and accumulate in fp32.
    With k < N: the layer's output and grads equal the fp32 reference math applied to the
    same query that autocast made."""
    m = layer(device, query_norm=query_norm)
    torch.manual_seed(4)
    x = torch.randn(3, 7, DIM, device=device)
    dy = torch.randn(3, 7, DIM, device=device)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    dev = x.device.type
    # autocast's own policy: CUDA runs layer_norm in fp32 (then the query is fp32), the CPU in bf16
    want = torch.float32 if (dev == "cuda" and query_norm == "layer") else torch.bfloat16
    with torch.autocast(dev, dtype=torch.bfloat16):
        y, g = run(m, x, dy, m.parameters())
        assert m._queries(x).dtype == want

    def oracle(x):
        with torch.autocast(dev, dtype=torch.bfloat16):
            q = m._queries(x)
        return _fp32_math_on_query(m, x, q)

    y_o, g_o = run(oracle, x, dy, m.parameters())
    torch.testing.assert_close(y, y_o, atol=1e-5, rtol=1e-5)
    # grads flowing back into the bf16 query are rounded to bf16 on both sides (the
    # interpreter truncates where PyTorch rounds): bf16-level tolerance upstream of it
    assert_all_close(g, g_o, 1e-2, names)


@gpu
def test_autocast_bf16_model_gpu():
    """A training step of the end-to-end model under autocast(bfloat16) on the GPU: finite
    loss close to the fp32 loss, every grad fp32 and finite, then one AdamW step."""
    model, args = _gpu_lm()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(args.vocab, (4, args.seq), generator=g).cuda()
    with torch.no_grad():
        logits32 = model(tokens)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(tokens)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    loss32 = F.cross_entropy(logits32.flatten(0, 1), tokens.flatten())
    assert abs(loss.item() - loss32.item()) < 2e-2 * loss32.item()
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- activation checkpointing ---------------------------------------------------------

class Stack(nn.Module):
    """x + PEER(x), `n` times, each layer optionally under torch.utils.checkpoint."""

    def __init__(self, layers, use_checkpoint):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        for lay in self.layers:
            x = x + (checkpoint(lay, x, use_reentrant=False) if self.use_checkpoint else lay(x))
        return x


def test_checkpoint_same_grads(device):
    """checkpoint(use_reentrant=False) around each of two layers: the recomputed forward picks
    the same experts, so outputs and grads equal the plain run. BatchNorm: the recomputation
    updates the running statistics a second time (as for any BatchNorm under checkpoint)."""
    layers = [layer(device, seed=s, query_norm="batch") for s in range(2)]
    plain = Stack(layers, use_checkpoint=False)
    ckpt = Stack(copy.deepcopy(layers), use_checkpoint=True)
    assert_same_run(ckpt, plain, device, seed=5, shape=(2, 6, DIM))
    assert [int(lay.query_norm.num_batches_tracked) for lay in plain.layers] == [1, 1]
    assert [int(lay.query_norm.num_batches_tracked) for lay in ckpt.layers] == [2, 2]


def _memory(model, x):
    """(bytes held for backward after the forward, peak bytes of forward + backward), both
    above what was allocated before (parameters, x)."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = model(x)
    held = torch.cuda.memory_allocated() - base - y.numel() * y.element_size()
    y.float().square().mean().backward()
    torch.cuda.synchronize()
    return held, torch.cuda.max_memory_allocated() - base


@gpu
def test_checkpoint_lower_memory_gpu():
    """4 PEER layers (dim 512, 64^2 experts, 8 heads, k 16, Dk 128) on 8192 tokens: the
    activations kept for the backward and the fwd + bwd peak are lower with checkpoint, and
    the grads are the same."""
    kw = dict(num_experts=64**2, heads=8, k=16, dim_key=128, backend="triton")
    torch.manual_seed(0)
    layers = [pk.PEER(512, device="cuda", **kw) for _ in range(4)]
    plain = Stack(layers, use_checkpoint=False)
    ckpt = Stack(copy.deepcopy(layers), use_checkpoint=True)
    x = torch.randn(8192, 512, device="cuda")
    held, peak = _memory(plain, x)
    held_c, peak_c = _memory(ckpt, x)
    print(f"\ncheckpoint: held for backward {held / 2**20:.0f} -> {held_c / 2**20:.0f} MiB, "
          f"fwd+bwd peak {peak / 2**20:.0f} -> {peak_c / 2**20:.0f} MiB (above parameters and input)")
    assert held_c < 0.5 * held
    assert peak_c < peak
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert rel(q.grad, p.grad) < 1e-6, n


# ---- gradient accumulation ------------------------------------------------------------

def _accumulated_grads(m, x, dy, chunks):
    """Grads of sum(out * dy) / tokens, from `chunks` micro-batches (each loss scaled by the
    same 1 / tokens, so their sum is the full loss) accumulated in .grad."""
    m.zero_grad(set_to_none=True)
    tokens = x.shape[0] * x.shape[1]
    for xc, dc in zip(x.chunk(chunks), dy.chunk(chunks)):
        ((m(xc) * dc).sum() / tokens).backward()
    return [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("query_norm,training", [("layer", True), ("batch", False)])
def test_grad_accumulation_equals_one_batch(device, query_norm, training):
    """3 micro-batches accumulated == 1 batch of all 6 sequences. BatchNorm in training mode
    is left out on purpose (see the next test); in eval mode it uses running statistics.
    (query_norm=None has no statistics either: it is covered by the "layer" case.)"""
    m = layer(device, query_norm=query_norm).train(training)
    torch.manual_seed(6)
    x = torch.randn(6, 5, DIM, device=device)
    dy = torch.randn(6, 5, DIM, device=device)
    whole = _accumulated_grads(m, x, dy, 1)
    micro = _accumulated_grads(m, x, dy, 3)
    assert_all_close(micro, whole, 1e-5, [n for n, _ in m.named_parameters()])


def test_grad_accumulation_batchnorm_uses_micro_batch_statistics(device):
    """Query BatchNorm in training mode normalises each micro-batch with its own statistics,
    so accumulated grads are those of the micro-batches, not of the whole batch (as for any
    BatchNorm): compare against one batch only with query_norm="layer" / None, or eval mode.
    The point is the module's statistics, not the kernels: backend="torch"."""
    m = layer(device, query_norm="batch", backend="torch")
    torch.manual_seed(6)
    x = torch.randn(6, 5, DIM, device=device)
    dy = torch.randn(6, 5, DIM, device=device)
    whole = _accumulated_grads(m, x, dy, 1)
    micro = _accumulated_grads(m, x, dy, 3)
    errs = {n: rel(a, b) for (n, _), a, b in zip(m.named_parameters(), micro, whole)}
    assert errs["query_norm.weight"] > 1e-2 and errs["sub_keys"] > 1e-2, errs


# ---- opcheck: every registered op, forward and backward --------------------------------

def _pk_case(device, shared, q_dtype):
    torch.manual_seed(7)
    q = torch.randn(5, 2, 16, device=device).to(q_dtype)
    keys = torch.randn(*(() if shared else (2,)), 2, 8, 8, device=device)
    return q, keys


def _experts_case(device, x_dtype, idx_dtype):
    torch.manual_seed(8)
    x = torch.randn(5, 16, device=device).to(x_dtype)
    idx = torch.randint(0, 10, (5, 4), device=device).to(idx_dtype)
    idx[0] = 3  # the same expert in every slot of a token
    gates = torch.rand(5, 4, device=device)
    down, up = torch.randn(10, 16, device=device), torch.randn(10, 16, device=device)
    return x, idx, gates, down, up


OPCHECK_CASES = [
    ("topk", dict(shared=True, q_dtype=torch.float32)),
    ("topk", dict(shared=False, q_dtype=torch.bfloat16)),  # autocast: bf16 query, fp32 keys
    ("topk_backward", dict(shared=False, q_dtype=torch.float32)),
    ("topk_backward", dict(shared=True, q_dtype=torch.bfloat16)),
    ("experts", dict(x_dtype=torch.float32, idx_dtype=torch.int32, mode="atomic", validate="off")),
    ("experts", dict(x_dtype=torch.bfloat16, idx_dtype=torch.int64, mode="sorted", validate="async")),
    ("experts_backward", dict(x_dtype=torch.float32, idx_dtype=torch.int64, mode="sorted")),
    ("experts_backward", dict(x_dtype=torch.float32, idx_dtype=torch.int32, mode="atomic")),
]


@pytest.mark.parametrize("op,case", OPCHECK_CASES, ids=[f"{o}-{i}" for i, (o, _) in enumerate(OPCHECK_CASES)])
def test_opcheck(device, op, case):
    """torch.library.opcheck (schema, fake tensor, autograd registration, AOT dispatch with
    dynamic shapes) of peer_kernels::product_key_topk, ::product_key_topk_backward,
    ::peer_experts and ::peer_experts_backward, on cases the op files' own opchecks leave
    out (shared keys, bf16 query with fp32 keys, int32 ids, the atomic backward, validate
    off, both backward ops)."""
    from peer_kernels.experts import _experts_bwd_op, _experts_op
    from peer_kernels.retrieval import _pk_topk_bwd_op, _pk_topk_op

    assert {o._qualname for o in (_pk_topk_op, _pk_topk_bwd_op, _experts_op, _experts_bwd_op)} == {
        "peer_kernels::product_key_topk", "peer_kernels::product_key_topk_backward",
        "peer_kernels::peer_experts", "peer_kernels::peer_experts_backward"}
    if op.startswith("topk"):
        q, keys = _pk_case(device, case["shared"], case["q_dtype"])
        if op == "topk":
            torch.library.opcheck(_pk_topk_op, (q.requires_grad_(), keys.requires_grad_(), 4, 3))
        else:
            scores, ids = _pk_topk_op(q, keys, 4, 3)
            torch.library.opcheck(_pk_topk_bwd_op, (torch.randn_like(scores), q, keys, ids))
        return
    x, idx, gates, down, up = _experts_case(device, case["x_dtype"], case["idx_dtype"])
    if op == "experts":
        args = [t.requires_grad_() for t in (x, gates, down, up)]
        torch.library.opcheck(_experts_op, (args[0], idx, args[1], args[2], args[3], "gelu", case["mode"],
                                            case["validate"]))
    else:
        y, pre = _experts_op(x, idx, gates, down, up, "silu", case["mode"], "sync")
        torch.library.opcheck(_experts_bwd_op, (torch.randn_like(y), x, idx, gates, down, up, pre, "silu",
                                                case["mode"]))


# ---- PEER options used by the training stack -------------------------------------------

def test_atomic_backward_option_matches_sorted(device):
    """PEER(backward="atomic") (the CUDA-graph-safe expert backward) gives the grads of the
    default sorted backward; it is refused together with deterministic=True."""
    a = layer(device, backward="atomic")
    assert_same_run(a, layer(device), device, seed=9)
    assert "backward='atomic'" in repr(a)
    with pytest.raises(ValueError, match="not deterministic"):
        layer(device, backward="atomic", deterministic=True)
    with pytest.raises(ValueError, match="backward must be None or one of"):
        layer(device, backward="fast")


def test_sync_batchnorm_conversion(device):
    """nn.SyncBatchNorm.convert_sync_batchnorm swaps the query BatchNorm for a SyncBatchNorm
    with the same parameters and statistics; outside a process group it computes what
    BatchNorm does, and PEER.reset_parameters still resets it."""
    m = layer(device, query_norm="batch")
    with torch.no_grad():
        m.query_norm.weight.uniform_(0.5, 1.5)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(m))
    assert type(synced.query_norm) is nn.SyncBatchNorm
    assert_same_run(synced, m, device, seed=10, out_tol=1e-6)
    synced.reset_parameters()
    assert torch.equal(synced.query_norm.weight, torch.ones_like(synced.query_norm.weight))


# ---- distributed: examples/train_distributed.py under torchrun -------------------------

def _torchrun(args, timeout):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", EXAMPLE, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT "):]) if lines else None
    return proc, result


def _check_modes(proc, result, modes, tol, flip_tol=None, later_loss_tol=None):
    """Every mode passed the script's checks, and: the median first-step gradient error, the
    step-1 loss and the buffers after step 1 within `tol`; every parameter's gradient within
    `flip_tol` and the later steps' losses within `later_loss_tol` (default: `tol`)."""
    assert proc.returncode == 0 and result is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["mode"] for r in result["modes"]] == modes
    for r in result["modes"]:
        assert r["ok"] and r["replicas_in_sync"] and r["int_buffers_equal"], r
        assert r["grad_median_rel_err"] <= tol and r["loss_first_rel_diff"] <= tol, r
        assert r["buffer_max_rel_err"] <= tol, r
        assert r["grad_max_rel_err"] <= (tol if flip_tol is None else flip_tol), r
        assert r["loss_later_max_rel_diff"] <= (tol if later_loss_tol is None else later_loss_tol), r
        assert len(r["step_ms_per_rank"]) == 2 and all(t > 0 for t in r["step_ms_per_rank"]), r
        assert r["losses"][-1] < r["losses"][0], r["losses"]  # it trains


def test_distributed_ddp_fsdp2_cpu():
    """2 processes, gloo, PEER backend torch, query_norm="layer": DDP and FSDP2 first-step
    grads (PEER layers included) and every step's loss equal the single-process run on the
    global batch within 1e-5 (the tiny CPU run has no near-tie expert flips; it gets ~2e-7)."""
    proc, result = _torchrun(["--cpu", "--backend", "torch", "--query-norm", "layer"], timeout=240)
    _check_modes(proc, result, ["ddp", "fsdp2"], 1e-5)


def test_distributed_local_batchnorm_fails_the_check_cpu():
    """Plain BatchNorm under DDP normalises with per-rank statistics: the script's check
    against the global batch must catch it (this is why BatchNorm is converted)."""
    proc, result = _torchrun(["--cpu", "--backend", "torch", "--query-norm", "batch", "--local-batchnorm",
                              "--mode", "ddp"], timeout=240)
    assert proc.returncode == 1 and result is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = result["modes"][0]
    # caught by the tight checks (median gradient error, buffers), not only by the loose per-parameter one
    assert not r["ok"] and not r["grad_ok"] and not r["buffer_ok"], r
    assert r["grad_median_rel_err"] > 1e-2 and r["buffer_max_rel_err"] > 1e-2, r
    assert r["grad_max_rel_err"] > r["grad_flip_rtol"], r


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs on one host (NCCL)")
def test_distributed_ddp_fsdp2_two_gpus():
    """2 GPUs, NCCL, Triton kernels, query BatchNorm converted to SyncBatchNorm, the default
    GPU preset (2 blocks, 512^2 experts, dim 1024, batch 8 x 512, 8 heads, k 16): first-step
    grads (median over the parameters), the step-1 loss and the BatchNorm buffers after step 1
    equal the single-GPU run within 1e-3; every parameter's grad within 4 sqrt(2 / 524288) =
    7.8e-3 (fp32 reduction order flips near-tie expert choices: ~2e-3 per flip on a table,
    ~1e-3 on the query projection and the LayerNorm before PEER, ~1 flip per run);
    the later losses within 1e-2 (AdamW drift); FSDP2 needs less memory
    per GPU than DDP."""
    proc, result = _torchrun([], timeout=900)
    print("\n" + "\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("RESULT ")))
    _check_modes(proc, result, ["ddp", "fsdp2"], 1e-3, flip_tol=4 * (2 / (8 * 512 * 8 * 16)) ** 0.5,
                 later_loss_tol=1e-2)
    ddp, fsdp = result["modes"]
    assert max(fsdp["peak_mem_mb_per_rank"]) < min(ddp["peak_mem_mb_per_rank"]), result["modes"]
