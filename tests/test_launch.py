"""peer_kernels.launch.fast_launch: the same compiled kernel as Triton's own launch, with
less host time. On the GPU every cached launch is checked against the kernel Triton picks
for the same arguments (launch.CHECK); on the CPU (interpreter) it is the plain launch."""
import pytest
import torch
import triton
import triton.language as tl

import peer_kernels as pk
from peer_kernels import launch


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, n, a, BLOCK: tl.constexpr, NEG: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = x.to(tl.float32) * a
    if NEG:
        y = -y
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _axpy(x, a, neg=None, block=128):
    y = torch.empty_like(x)
    meta = dict(BLOCK=block) if neg is None else dict(BLOCK=block, NEG=neg)
    launch.fast_launch(_axpy_kernel)[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), a, **meta)
    return y


def test_spec_separates_what_triton_specializes_on():
    base = torch.zeros(64)
    assert launch._spec(base) != launch._spec(base[1:])  # 16-byte alignment
    assert launch._spec(base) != launch._spec(base.half())  # dtype
    assert launch._spec(base[4:]) == launch._spec(base)  # 16 bytes further: same specialization
    ints = [launch._spec(v) for v in (1, 2, 16, 2**31, 2**63, -1)]
    assert len(set(ints)) == len(ints) - 1 and launch._spec(2) == launch._spec(-1)  # 1, %16, widths
    assert launch._spec(True) != launch._spec(1) and launch._spec(True) != launch._spec(False)
    assert launch._spec(2.0) == launch._spec(3.5)


def test_spec_of_tma_descriptors():
    """A TMA descriptor (the retrieval forward's sub-keys) is keyed by its dtype, block and
    padding and the specs of its shape and strides, not by its address."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    a, b = torch.zeros(256, 64), torch.zeros(256, 64)
    spec = launch._spec(TensorDescriptor.from_tensor(a, [64, 64]))
    assert spec == launch._spec(TensorDescriptor.from_tensor(b, [64, 64]))
    assert spec != launch._spec(TensorDescriptor.from_tensor(a, [32, 64]))  # block
    assert spec != launch._spec(TensorDescriptor.from_tensor(a.half(), [64, 64]))  # dtype
    assert spec != launch._spec(TensorDescriptor.from_tensor(torch.zeros(255, 64), [64, 64]))  # shape % 16
    assert spec == launch._spec(TensorDescriptor.from_tensor(torch.zeros(272, 64), [64, 64]))


def test_interpreter_takes_the_plain_launch(device):
    if device == "cuda":
        pytest.skip("the interpreter's path (CPU)")
    x = torch.randn(300)
    torch.testing.assert_close(_axpy(x, 2.0, neg=True), -2.0 * x)
    assert not launch.fast_launch(_axpy_kernel).native and not launch.fast_launch(_axpy_kernel).cache


def test_missing_argument_is_a_clear_error(device):
    x = torch.randn(32, device=device)
    with pytest.raises(TypeError):
        launch.fast_launch(_axpy_kernel)[(1,)](x, x, 32, 1.0)  # BLOCK missing


@pytest.mark.gpu
def test_cached_kernel_is_tritons_for_every_specialization(monkeypatch):
    monkeypatch.setattr(launch, "CHECK", True)  # each cached launch asks Triton for its kernel
    fl = launch.fast_launch(_axpy_kernel)
    fl.cache.clear()
    buf = torch.randn(4096, device="cuda")
    cases = [(buf, 2.0, None), (buf[1:], 2.0, None), (buf[:1], 3.0, None), (buf[:16], 1.5, True),
             (buf[3:20], -1.0, False), (buf.half(), 0.5, None), (buf[1:].half(), 0.5, True)]
    for rep in range(2):
        for x, a, neg in cases:
            expected = (-a if neg else a) * x.float()
            torch.testing.assert_close(_axpy(x, a, neg).float(), expected, rtol=1e-3, atol=1e-3)
            key = next(k for k in fl.cache if k[1][0] == launch._spec(x) and k[1][2] == launch._spec(x.numel())
                       and dict(k[2]).get("NEG") == neg)
            triton_kernel = _axpy_kernel.warmup(x, torch.empty_like(x), x.numel(), a, grid=(1,), BLOCK=128,
                                                **({} if neg is None else dict(NEG=neg)))
            assert fl.cache[key][0] is triton_kernel
        if rep == 0:
            size = len(fl.cache)
    assert len(fl.cache) == size  # the second round: all hits


@pytest.mark.gpu
def test_launch_hooks_take_the_plain_launch(monkeypatch):
    from triton import knobs
    fl = launch.fast_launch(_axpy_kernel)
    fl.cache.clear()
    seen = []

    def hook(metadata):
        seen.append(metadata)

    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):  # a HookChain (later Triton versions)
        chain.add(hook)
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
    try:
        x = torch.randn(1000, device="cuda")
        torch.testing.assert_close(_axpy(x, 2.0), 2.0 * x)
    finally:
        if hasattr(chain, "remove"):
            chain.remove(hook)
    assert seen and not fl.cache
    torch.testing.assert_close(_axpy(x, 3.0), 3.0 * x)  # no hook: cached
    assert len(fl.cache) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [False, True])
def test_retrieval_launches_checked(monkeypatch, shared):
    """The retrieval's six kernels (forward, dq, bitmaps, offsets, place, dkeys) through the
    fast launch, each cached launch checked against Triton's choice, and equal to the plain
    launches' results."""
    monkeypatch.setattr(launch, "CHECK", True)
    torch.manual_seed(0)
    outs = []
    for enabled in (False, True, True):  # plain, fast (first: compiles), fast (cached)
        monkeypatch.setattr(launch, "ENABLED", enabled)
        q = torch.randn(333, 4, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).bfloat16()
        keys = torch.randn(*([] if shared else [4]), 2, 96, 32, device="cuda",
                           generator=torch.Generator("cuda").manual_seed(2)).bfloat16()
        q.requires_grad_(True)
        keys.requires_grad_(True)
        scores, ids = pk.product_key_topk(q, keys, 8)
        (scores * torch.arange(8, device="cuda")).sum().backward()
        outs.append((scores, ids, q.grad, keys.grad))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_retrieval_tma_launch_checked(monkeypatch):
    """The forward's TMA path (64-row programs, bf16, n % 64 == 0, on sm_90+) through the fast
    launch: the descriptor's launches are checked against Triton's choice and equal the plain
    launch's results."""
    from peer_kernels import retrieval as R

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA loads need sm_90")
    monkeypatch.setattr(launch, "CHECK", True)
    monkeypatch.setattr(R, "TMA", "always")
    gen = torch.Generator("cuda")
    q = torch.randn(4096, 8, 128, device="cuda", generator=gen.manual_seed(1)).bfloat16()
    keys = torch.randn(8, 2, 192, 64, device="cuda", generator=gen.manual_seed(2)).bfloat16()
    cfg = R._fwd_config(192, 16, 64, False, R._many_rows(q.device, 4096, 8))
    assert R._keys_descriptor(keys, cfg, False) is not None
    outs = []
    for enabled in (False, True, True):  # plain, fast (first: compiles), fast (cached)
        monkeypatch.setattr(launch, "ENABLED", enabled)
        outs.append(R._launch_fwd(q, keys, 16, 16))
    for s, i in outs[1:]:
        assert torch.equal(s, outs[0][0]) and torch.equal(i, outs[0][1])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_layer_on_a_device_that_is_not_current():
    """A PEER layer (every kernel: retrieval, experts, the id check, the side stream) on cuda:1
    while cuda:0 is current gives what it gives with cuda:1 current: each launch runs on its
    tensors' device."""
    outs = []
    for current in (0, 1):
        with torch.cuda.device(current):
            torch.manual_seed(0)
            layer = pk.PEER(64, num_experts=64**2, heads=4, k=8, dim_key=32, device="cuda:1")
            x = torch.randn(2, 37, 64, device="cuda:1", requires_grad=True)
            y = layer(x)
            y.backward(torch.randn_like(y))
            torch.cuda.synchronize(1)
            outs.append([y, x.grad] + [p.grad for p in layer.parameters() if p.grad is not None])
    assert torch.cuda.current_device() == 0
    assert len(outs[0]) == len(outs[1]) > 4
    for a, b in zip(*outs):
        assert a.device == torch.device("cuda:1")
        assert torch.equal(a, b)
