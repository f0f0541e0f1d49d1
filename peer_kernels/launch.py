"""Kernel launches with less host time: `fast_launch(kernel)[grid](*args, **meta)` launches
like `kernel[grid](*args, **meta)`, the same compiled kernel with the same arguments.

Why: a launch through Triton's `JITFunction[grid]` binds every argument, builds the
specialization and the cache key and checks the kernel's globals on every call. The
retrieval forward kernel's launch took 28.5 us of host time that way and 15.7 us here (H200
host, Triton 3.6, median of 7 x 200 launches; the backward's launcher, 5 kernels, 202 ->
153 us; bench/NOTES.md). Eager PEER steps are bound by the host (README).

How: the first launch of each specialization goes through Triton (which compiles and
launches), and keeps the compiled kernel under a key that is at least as fine as Triton's
own (`_spec`: per tensor its dtype and 16-byte alignment; per int its 1-, 16-divisibility and
width; per TMA descriptor its dtype, block, padding and the specs of its shape and strides;
every other argument and every keyword by value; the current device). Later calls
with the same key call that kernel's launcher directly, as `JITFunction.run` itself does
(`kernel.run(grid, stream, function, packed_metadata, launch_metadata, hooks, *all
arguments)`, the same in Triton 3.6 to 3.9).

Device: each launch runs on the device of its first tensor argument (Triton's own launch
uses the current device: with tensors on cuda:1 while cuda:0 is current it would run the
kernel on the wrong device); a device guard is entered only when the two differ.

Plain Triton launches instead: in the interpreter (TRITON_INTERPRET=1), while launch hooks
are set (profilers such as proton), for a callable grid, and with PEER_KERNELS_FAST_LAUNCH=0.
Triton settings that change which kernel it compiles (TRITON_DEBUG, instrumentation) are
read by the first launch of each key: set them before the first call, as for Triton's own
cache of loaded kernels.
PEER_KERNELS_CHECK_LAUNCH=1 (GPU tests): every fast launch also asks Triton which kernel
it would launch and raises if that is not the cached one.
"""
from __future__ import annotations

import os

import torch
from triton import knobs
from triton.runtime.jit import JITFunction

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # an older Triton
    TensorDescriptor = None

__all__ = ["fast_launch", "FastLaunch"]

# read once, at import (tests may set these attributes)
ENABLED = os.environ.get("PEER_KERNELS_FAST_LAUNCH", "1") != "0"
CHECK = os.environ.get("PEER_KERNELS_CHECK_LAUNCH", "0") not in ("", "0")


def _int_spec(x: int):
    width = 0 if -2**31 <= x < 2**31 else (1 if -2**63 <= x < 2**63 else 2)
    return (int, x == 1, x % 16 == 0, width)


def _hook_active(hook) -> bool:
    """A launch hook is set: a callable (Triton 3.6), or a HookChain holding calls (3.9)."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or len(calls) > 0


def _spec(x):
    """What Triton may specialize a runtime argument on, or more (a finer key only costs a
    compile per distinct value)."""
    t = type(x)
    if t is int:
        return _int_spec(x)
    if isinstance(x, torch.Tensor):
        return (x.dtype, x.data_ptr() % 16 == 0)
    if t is float:
        return float
    if t is TensorDescriptor:  # the kernel is compiled for its dtype and block; its shape and strides are runtime ints
        return (t, x.base.dtype, tuple(x.block_shape), tuple(map(_int_spec, x.shape)), tuple(map(_int_spec, x.strides)),
                x.padding, getattr(x, "round_f32_to_tf32", False))
    return (t, x)  # bool, None, strings, dtypes: by value


class FastLaunch:
    """`kernel[grid](...)` with a cache of the compiled kernels by the arguments' key."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.native = isinstance(kernel, JITFunction)  # not the interpreter's InterpretedFunction
        params = kernel.params if self.native else []
        self.params = [p.name for p in params]
        self.defaults = {p.name: p.default for p in params if p.has_default}
        self.cache: dict = {}

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launch(grid, args, meta)

    def launch(self, grid, args, meta):
        if not self.native:  # the interpreter
            return self.kernel[grid](*args, **meta)
        current = torch.cuda.current_device()
        device = _tensor_device(args)
        if device is not None and device != current:
            with torch.cuda.device(device):
                return self._launch(grid, args, meta, device)
        return self._launch(grid, args, meta, current)

    def _launch(self, grid, args, meta, device: int):
        if not ENABLED or callable(grid) or _hook_active(knobs.runtime.launch_enter_hook) \
                or _hook_active(knobs.runtime.launch_exit_hook):
            return self.kernel[grid](*args, **meta)
        key = (device, tuple(map(_spec, args)), tuple(meta.items()))
        hit = self.cache.get(key)
        if hit is None:
            compiled = self.kernel[grid](*args, **meta)  # compiles if needed, and launches
            if hasattr(compiled, "result") and not hasattr(compiled, "packed_metadata"):
                compiled = compiled.result()  # (an asynchronous compile's future)
            if all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
                # the parameters after the positional ones, in signature order: each call
                # passes all of them, as JITFunction.run does (the launcher skips constexprs)
                self.cache[key] = (compiled, self.params[len(args):])
            return compiled
        compiled, names = hit
        if CHECK:
            expected = self.kernel.warmup(*args, grid=grid, **meta)
            if expected is not compiled:
                raise RuntimeError(f"fast_launch({self.kernel.__name__}): the cached kernel is not the one Triton "
                                   f"would launch for this call (key {key})")
        full = list(args)
        full += [meta[n] if n in meta else self.defaults[n] for n in names]
        g0 = grid[0]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        compiled.run(g0, g1, g2, _stream(device), compiled.function, compiled.packed_metadata, None, None, None,
                     *full)
        return compiled


_LAUNCHERS: dict = {}


def fast_launch(kernel) -> FastLaunch:
    """The FastLaunch of a kernel (one per kernel, so one cache per kernel)."""
    launcher = _LAUNCHERS.get(kernel)
    if launcher is None:
        launcher = _LAUNCHERS[kernel] = FastLaunch(kernel)
    return launcher


def _tensor_device(args):
    """The CUDA device index of the first tensor argument (None: no CUDA tensor first)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.index if a.is_cuda else None
    return None


def _stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)
