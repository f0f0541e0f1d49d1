"""Test set-up. Without CUDA the Triton kernels run in the Triton interpreter
(TRITON_INTERPRET=1, set here before anything imports triton), so the kernel tests
run on the CPU with tiny shapes. Outputs that ops allocate with torch.empty are
poisoned (NaN / a sentinel) so that an element a kernel forgets to write fails."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"
INT_POISON = -(2**40) + 7


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on a GPU machine (tests marked 'gpu')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _poisoned(fn):
    def wrapper(*args, **kwargs):
        t = fn(*args, **kwargs)
        with torch.no_grad():  # torch.empty(..., requires_grad=True) gives a leaf
            if t.is_floating_point():
                t.fill_(float("nan"))
            elif t.dtype in (torch.int64,):
                t.fill_(INT_POISON)
            elif t.dtype == torch.int32:
                t.fill_(-(2**31) + 7)
        return t

    return wrapper


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    # `with torch.device("cuda"):` recognises factory functions by identity, from a set it
    # builds (and caches) on first use: build it from the real torch.empty first, or
    # modules made under that context would land on the CPU
    from torch.utils._device import _device_constructors

    _device_constructors()
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    yield


@pytest.fixture
def device():
    return DEVICE
