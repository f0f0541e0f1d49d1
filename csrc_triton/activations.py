"""Expert activations and their derivatives, shared by the expert kernels.

ACT codes: 0 gelu (erf form), 1 relu, 2 silu, 3 identity. All math in fp32.
"""
import triton
import triton.language as tl

ACT_CODES = {"gelu": 0, "relu": 1, "silu": 2, "identity": 3}


@triton.jit
def act_fwd(h, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 1:
        return tl.where(h > 0, h, 0.0)
    elif ACT == 2:
        return h / (1.0 + tl.exp(-h))
    else:
        return h


@triton.jit
def act_grad(h, ACT: tl.constexpr):
    """d act(h) / dh."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
        return cdf + h * pdf
    elif ACT == 1:
        return tl.where(h > 0, 1.0, 0.0)
    elif ACT == 2:
        sig = 1.0 / (1.0 + tl.exp(-h))
        return sig * (1.0 + h * (1.0 - sig))
    else:
        return h * 0.0 + 1.0
