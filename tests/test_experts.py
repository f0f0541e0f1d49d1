"""peer_experts: the Triton kernels (interpreter on CPU, real on GPU) against the
reference, forward and all four gradients, both backward modes."""
import os
import subprocess
import sys

import pytest
import torch

import peer_kernels as pk
from peer_kernels import reference as ref

from conftest import HAS_CUDA

ACTS = ["gelu", "relu", "silu", "identity"]
# relative-error tolerance by dtype (fp32 elementwise-tight; half by relative error)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _inputs(lead, heads, k, d, n, dtype, table_dtype=None, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    table_dtype = table_dtype or dtype
    x = torch.randn(*lead, d, generator=g).to(device=device, dtype=dtype)
    idx = torch.randint(0, n, (*lead, heads, k), generator=g).to(device)
    gates = torch.randn(*lead, heads, k, generator=g).to(device=device, dtype=dtype)
    down = (torch.randn(n, d, generator=g) * d**-0.5).to(device=device, dtype=table_dtype)
    up = torch.randn(n, d, generator=g).to(device=device, dtype=table_dtype)
    return x, idx, gates, down, up


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_against_reference(x, idx, gates, down, up, activation="gelu", backward="sorted", tol=None):
    tol = tol or TOL[x.dtype]
    leaves = [t.detach().clone().requires_grad_() for t in (x, gates, down, up)]
    y = pk.peer_experts(leaves[0], idx, leaves[1], leaves[2], leaves[3], activation=activation, backend="triton",
                        backward=backward)
    assert y.dtype == x.dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    leaves_ref = [t.detach().clone().requires_grad_() for t in (x, gates, down, up)]
    y_ref = ref.peer_experts(leaves_ref[0], idx, leaves_ref[1], leaves_ref[2], leaves_ref[3], activation)
    grads_ref = torch.autograd.grad(y_ref, leaves_ref, dy)
    assert torch.isfinite(y).all()
    assert rel_err(y, y_ref) < tol, ("y", rel_err(y, y_ref))
    for name, a, b, leaf in zip(("dx", "dgates", "ddown", "dup"), grads, grads_ref, leaves):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    return y, grads


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_activations_and_dtypes(activation, dtype, device):
    x, idx, gates, down, up = _inputs((7,), 3, 2, 48, 40, dtype, device=device, seed=1)
    check_against_reference(x, idx, gates, down, up, activation)


@pytest.mark.parametrize("lead,d", [((1,), 100), ((63,), 48), ((2, 3), 1000)])
@pytest.mark.parametrize("backward", ["sorted", "atomic"])
def test_odd_sizes_both_backward_modes(lead, d, backward, device):
    x, idx, gates, down, up = _inputs(lead, 2, 3, d, 50, torch.float32, device=device, seed=2)
    check_against_reference(x, idx, gates, down, up, "gelu", backward)


def test_duplicates_within_and_across_tokens(device):
    x, idx, gates, down, up = _inputs((9,), 2, 3, 32, 6, torch.float32, device=device, seed=3)
    idx[:, 0, :] = 4  # same expert in every slot of head 0, in every token
    idx[:, 1, 0] = 4  # and again from the other head
    check_against_reference(x, idx, gates, down, up, "silu")


@pytest.mark.parametrize("backward", ["sorted", "atomic"])
def test_all_tokens_to_one_expert(backward, device):
    x, idx, gates, down, up = _inputs((17,), 2, 2, 40, 8, torch.float32, device=device, seed=4)
    idx.fill_(5)
    _, grads = check_against_reference(x, idx, gates, down, up, "gelu", backward)
    other = torch.ones(8, dtype=torch.bool)
    other[5] = False
    assert (grads[2][other] == 0).all() and (grads[3][other] == 0).all()


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_long_rows_summed_in_chunks(chunk, device, monkeypatch):
    """Rows selected more than LONG_ROW_CHUNK times (hot experts) are summed in chunks by
    several programs, partials added in order: same grads as the reference, bitwise the
    same run after run. Hot rows first, last and in the middle of the sorted order, a row of
    exactly `chunk` occurrences, and chunk boundaries falling inside and between rows."""
    import peer_kernels.experts as E

    monkeypatch.setattr(E, "LONG_ROW_CHUNK", chunk)
    x, idx, gates, down, up = _inputs((16,), 2, 3, 40, 12, torch.float32, device=device, seed=7)
    others = torch.tensor([1, 2, 4, 5, 7, 8, 9, 10], device=idx.device)
    idx[:, 1, 1:] = others[idx[:, 1, 1:] % len(others)]  # the rows below get only their own occurrences
    idx[:, 0, :] = 0  # 48 occurrences of row 0
    idx[:, 1, 0] = 11  # 16 of the last row
    idx[:5, 1, 1] = 6  # 5 of a middle row
    idx[5:5 + chunk, 1, 2] = 3  # exactly `chunk` of row 3 (not long)
    counts = torch.bincount(idx.reshape(-1).cpu(), minlength=12)
    assert (counts[0], counts[11], counts[6], counts[3]) == (48, 16, 5, chunk)
    torch.manual_seed(0)  # the same dy both times
    _, grads = check_against_reference(x, idx, gates, down, up, "gelu")
    torch.manual_seed(0)
    _, again = check_against_reference(x, idx, gates, down, up, "gelu")
    for a, b in zip(grads, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("ids", ["uniform", "one_row", "first_and_last", "empty"])
def test_sorted_segments_csr(ids, narrow, device):
    """sorted_segments (the sort of both backwards: expert tables and sub-keys, the latter
    with 16-bit keys): stable order of the slots by id, the sorted ids and the CSR row
    starts, against argsort + bincount, for spread, all-equal, extreme and empty ids."""
    from peer_kernels.segments import sorted_segments

    n = 2**15 if narrow else 50  # the largest row count that takes 16-bit keys
    g = torch.Generator().manual_seed(1)
    idx = {"uniform": torch.randint(0, n, (37, 6), generator=g),
           "one_row": torch.full((9, 4), 17),
           "first_and_last": torch.tensor([[n - 1, 0, n - 1], [0, 0, n - 1]]),
           "empty": torch.zeros(0, 4, dtype=torch.int64)}[ids].to(device)
    order, offsets, sorted_ids = sorted_segments(idx, n, narrow_ids=narrow)
    assert sorted_ids.dtype == (torch.int16 if narrow else torch.int32)
    flat = idx.reshape(-1).cpu()
    expect_order = torch.argsort(flat, stable=True)
    assert torch.equal(order.cpu(), expect_order)
    assert torch.equal(sorted_ids.cpu().long(), flat[expect_order])
    expect = torch.zeros(n + 1, dtype=torch.int64)
    expect[1:] = torch.bincount(flat, minlength=n).cumsum(0)
    assert torch.equal(offsets.cpu(), expect)


def test_zero_gates_and_int32_indices(device):
    x, idx, gates, down, up = _inputs((5,), 2, 4, 24, 30, torch.float32, device=device, seed=5)
    gates[:, 1] = 0
    check_against_reference(x, idx.int(), gates, down, up, "relu")
    y = pk.peer_experts(x, idx, torch.zeros_like(gates), down, up, backend="triton")
    assert (y == 0).all()


def test_mixed_dtypes_autocast_style(device):
    """bf16 activations with fp32 master tables: y in bf16, table gradients in fp32."""
    x, idx, gates, down, up = _inputs((11,), 2, 3, 64, 20, torch.bfloat16, torch.float32, device=device, seed=6)
    _, grads = check_against_reference(x, idx, gates, down, up, "gelu")
    assert grads[2].dtype == torch.float32 and grads[3].dtype == torch.float32


def test_nan_in_x_propagates(device):
    x, idx, gates, down, up = _inputs((4,), 2, 2, 16, 10, torch.float32, device=device, seed=7)
    x[2, 3] = float("nan")
    y = pk.peer_experts(x, idx, gates, down, up, backend="triton")
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3]]).all()


def test_deterministic_bitwise(device):
    x, idx, gates, down, up = _inputs((31,), 2, 4, 40, 12, torch.float32, device=device, seed=8)
    dy = torch.randn(31, 40, generator=torch.Generator().manual_seed(9)).to(device)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, gates, down, up)]
        y = pk.peer_experts(leaves[0], idx, leaves[1], leaves[2], leaves[3], backend="triton", deterministic=True)
        runs.append(torch.autograd.grad(y, leaves, dy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_deterministic_follows_torch_flag():
    x, idx, gates, down, up = _inputs((3,), 1, 2, 16, 5, torch.float32)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(ValueError, match="not deterministic"):
            pk.peer_experts(x, idx, gates, down, up, backward="atomic")
    finally:
        torch.use_deterministic_algorithms(prev)


def test_gradcheck_reference_fp64():
    x, idx, gates, down, up = _inputs((3,), 2, 2, 5, 4, torch.float64, seed=10)
    idx[0, 0, 1] = idx[0, 1, 0]
    for act in ACTS:
        args = [t.requires_grad_() for t in (x.clone(), gates.clone(), down.clone(), up.clone())]
        assert torch.autograd.gradcheck(
            lambda a, g, dn, u: ref.peer_experts(a, idx, g, dn, u, act), args)


def test_reference_against_loop():
    x, idx, gates, down, up = _inputs((4,), 2, 3, 6, 7, torch.float64, seed=11)
    y = ref.peer_experts(x, idx, gates, down, up, "silu")
    for t in range(4):
        acc = torch.zeros(6, dtype=torch.float64)
        for h in range(2):
            for j in range(3):
                e = int(idx[t, h, j])
                hpre = float(down[e] @ x[t])
                acc += float(gates[t, h, j]) * (hpre / (1 + torch.exp(torch.tensor(-hpre)).item())) * up[e]
        torch.testing.assert_close(y[t], acc)


def test_compile_fullgraph_and_opcheck(device):
    from peer_kernels.experts import _experts_op

    x, idx, gates, down, up = _inputs((5,), 2, 2, 16, 10, torch.float32, device=device, seed=12)
    down.requires_grad_()

    def f(a, i, g, dn, u):
        return pk.peer_experts(a, i, g.softmax(-1), dn, u, backend="triton") * 2

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, idx, gates, down, up)
    torch.testing.assert_close(out, f(x, idx, gates, down, up))
    out.sum().backward()
    assert down.grad is not None and torch.isfinite(down.grad).all()
    args = [t.detach().clone().requires_grad_() for t in (x, gates.reshape(5, 4), down, up)]
    torch.library.opcheck(_experts_op, (args[0], idx.reshape(5, 4), args[1], args[2], args[3], "gelu", "sorted", "sync"))


# ---- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("validate", ["sync", True, "async"])
def test_out_of_range_ids_raise(device, validate):
    """validate="sync" raises IndexError everywhere; the default (True) and "async" are
    the same on the CPU (the device assert of CUDA: test_out_of_range_ids_device_assert_gpu)."""
    if device == "cuda" and validate != "sync":
        pytest.skip("on CUDA validate=True/'async' is a device assert: test_out_of_range_ids_device_assert_gpu")
    x, idx, gates, down, up = _inputs((3,), 2, 2, 16, 10, torch.float32, device=device)
    for bad in (10, -1):
        idx2 = idx.clone()
        idx2[1, 0, 1] = bad
        for backend in ("triton", "torch"):
            with pytest.raises(IndexError, match=r"indices must lie in \[0, 10\)"):
                pk.peer_experts(x, idx2, gates, down, up, backend=backend, validate=validate)


def test_validate_false_skips_our_check():
    x, idx, gates, down, up = _inputs((3,), 2, 2, 16, 10, torch.float32)
    idx[0, 0, 0] = 10  # validate=False: no check of ours (the torch backend's own F.embedding fails)
    with pytest.raises(IndexError, match="index out of range in self"):  # F.embedding
        pk.peer_experts(x, idx, gates, down, up, backend="torch", validate=False)


_DEVICE_ASSERT_CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
import peer_kernels as pk
x = torch.randn(4, 16, device="cuda")
down = torch.randn(10, 16, device="cuda"); up = torch.randn(10, 16, device="cuda")
idx = torch.randint(0, 10, (4, 2, 3), device="cuda"); gates = torch.rand(4, 2, 3, device="cuda")
y = pk.peer_experts(x, idx, gates, down, up)  # valid ids: the check passes, no sync
torch.cuda.synchronize()
print("VALID OK", flush=True)
idx[2, 1, 0] = {bad}
y = pk.peer_experts(x, idx, gates, down, up)
torch.cuda.synchronize()
print("NOT CAUGHT", flush=True)
"""


@pytest.mark.gpu  # the device-side id check needs CUDA
@pytest.mark.parametrize("bad", [10, -1])
def test_out_of_range_ids_device_assert_gpu(bad):
    """The default validate=True on CUDA: an out-of-range id stops the check kernel with
    its message and a device-side assert (in a child process: the CUDA context is lost)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _DEVICE_ASSERT_CHILD.format(root=root, bad=bad)],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert "VALID OK" in proc.stdout and "NOT CAUGHT" not in proc.stdout, out[-3000:]
    assert proc.returncode != 0, out[-3000:]
    assert "expert id (indices) outside [0, N)" in out and "device-side assert" in out, out[-3000:]


@pytest.mark.parametrize(
    "mutate,err,match",
    [
        (lambda a: a.update(x=a["x"][:, :15]), ValueError, "x must have shape"),
        (lambda a: a.update(indices=a["indices"].float()), TypeError, "indices must be an int32 or int64"),
        (lambda a: a.update(gates=a["gates"][..., :1]), ValueError, "gates must have the shape of indices"),
        (lambda a: a.update(up=a["up"][:5]), ValueError, "same shape"),
        (lambda a: a.update(up=a["up"].half()), TypeError, "same dtype"),
        (lambda a: a.update(indices=a["indices"][0]), ValueError, "indices must have shape"),
        (lambda a: a.update(activation="tanh"), ValueError, "activation must be one of"),
        (lambda a: a.update(x=a["x"].int()), TypeError, "x must have a floating dtype"),
        (lambda a: a.update(backward="scatter"), ValueError, "backward must be one of"),
        (lambda a: a.update(validate="yes"), ValueError, "validate must be"),
    ],
)
def test_bad_input(mutate, err, match):
    x, idx, gates, down, up = _inputs((3,), 2, 2, 16, 10, torch.float32)
    a = dict(x=x, indices=idx, gates=gates, down=down, up=up, activation="gelu")
    mutate(a)
    with pytest.raises(err, match=match):
        pk.peer_experts(**a)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only error of backend='triton' without the interpreter")
def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, idx, gates, down, up = _inputs((3,), 2, 2, 16, 10, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        pk.peer_experts(x, idx, gates, down, up, backend="triton")


@pytest.mark.gpu
def test_gpu_mismatched_devices():
    x, idx, gates, down, up = _inputs((3,), 2, 2, 16, 10, torch.float32)
    with pytest.raises(ValueError, match="one device"):
        pk.peer_experts(x.cuda(), idx, gates, down, up)


@pytest.mark.gpu
def test_gpu_table_past_int32_elements():
    """2.2M x 1024 bf16 (2.25e9 elements > 2^31): rows near the end are read and written."""
    n, d = 2_200_000, 1024
    down = torch.randn(n, d, device="cuda", dtype=torch.bfloat16) * d**-0.5
    up = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, d, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(n - 5000, n, (64, 4, 4), device="cuda")
    gates = torch.rand(64, 4, 4, device="cuda", dtype=torch.bfloat16)
    dn, u = down.requires_grad_(), up.requires_grad_()
    y = pk.peer_experts(x, idx, gates, dn, u)
    y_ref = ref.peer_experts(x, idx, gates, down.detach(), up.detach())
    assert rel_err(y, y_ref) < 1e-2
    y.float().square().sum().backward()
    lo = n - 5000  # reference on the slice of the tables that holds every selected row
    dn_s = down.detach()[lo:].clone().requires_grad_()
    u_s = up.detach()[lo:].clone().requires_grad_()
    ref.peer_experts(x, idx - lo, gates, dn_s, u_s).float().square().sum().backward()
    assert rel_err(dn.grad[lo:], dn_s.grad) < 1e-2 and rel_err(u.grad[lo:], u_s.grad) < 1e-2
    assert (dn.grad[:lo] == 0).all() and (u.grad[:lo] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("t,d", [(1024, 1024), (513, 2048)])
def test_gpu_paper_sizes(t, d):
    x, idx, gates, down, up = _inputs((t,), 8, 16, d, 1024**2 // 4, torch.bfloat16, device="cuda", seed=13)
    gates = gates.softmax(-1)
    for backward in ("sorted", "atomic"):
        check_against_reference(x, idx, gates, down, up, "gelu", backward)


def test_reference_keeps_fp32_under_autocast():
    x, idx, gates, down, up = _inputs((9,), 2, 3, 40, 30, torch.float32, seed=4)
    expect = ref.peer_experts(x, idx, gates, down, up)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ref.peer_experts(x, idx, gates, down, up)
    assert got.dtype == torch.float32 and torch.equal(got, expect)
