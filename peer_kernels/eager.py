"""Eager route of the public ops. Under torch.compile they go through their registered
torch.library custom ops (traced with no graph break; `register_fake` gives the shapes). In
eager mode the custom-op dispatcher is host time spent on every call, and an eager PEER step
is often bound by the host (README), so there the same op bodies and the same autograd
formulas (setup_context, backward) run through a plain torch.autograd.Function. Both routes
launch the same kernels with the same arguments.
"""
from __future__ import annotations

import torch


def eager_function(forward, setup_context, backward):
    """An autograd.Function.apply that runs forward(*inputs), then
    setup_context(ctx, inputs, output) and, for the gradients, backward(ctx, *grads) (None for
    an output without a gradient, as the registered ops' autograd may also pass): a
    custom op's body, its setup_context and a backward that calls the body of the backward
    op instead of the op (the registered backward must call the op: AOT tracers run it on
    fake tensors)."""

    class _Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            # no zero-filled gradients for the unused or non-differentiable outputs (ids, saved
            # activations): a fill kernel and host time per backward; the backwards take None
            ctx.set_materialize_grads(False)
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    _Eager.__name__ = _Eager.__qualname__ = f"Eager_{forward.__name__}"
    return _Eager.apply


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def use_registered_op(*tensors: torch.Tensor) -> bool:
    """True while torch.compile traces, or when an input is a tensor subclass (fake or
    functional tensors of other tracers, e.g. opcheck's): take the registered custom op."""
    return torch.compiler.is_compiling() or any(type(t) not in _PLAIN for t in tensors)
