"""Stage 2 of the PEER layer, forward: the gathered single-neuron experts.

y[t] = sum_s gates[t, s] * act(down[e_s] . x[t]) * up[e_s],  e_s = idx[t, s], s < HK = H*k.

One program per token: x[t] stays in registers (fp32), the HK selected rows of `down`
and `up` are gathered BLOCK_S at a time ([BLOCK_S, D_PAD] tiles, several rows in
flight), dotted, activated, gated and summed in fp32. Nothing of size [T, HK, D] is
written. Saved for the backward: the pre-activations h[t, s] = down[e_s] . x[t]
(fp32, [T, HK]). All row addresses in int64 (N * D may pass 2^31).
"""
import triton
import triton.language as tl

from .activations import act_fwd


@triton.jit
def peer_experts_fwd_kernel(
    x_ptr, idx_ptr, gates_ptr, down_ptr, up_ptr, y_ptr, pre_ptr,
    D: tl.constexpr, D_PAD: tl.constexpr, HK: tl.constexpr, BLOCK_S: tl.constexpr, ACT: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < D
    x = tl.load(x_ptr + t * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)  # [D_PAD]
    acc = tl.zeros((D_PAD,), tl.float32)  # [D_PAD]
    for s0 in range(0, HK, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < HK
        e = tl.load(idx_ptr + t * HK + offs_s, mask=s_mask, other=0).to(tl.int64)  # [BLOCK_S]
        g = tl.load(gates_ptr + t * HK + offs_s, mask=s_mask, other=0.0).to(tl.float32)
        rows = e[:, None] * D + offs_d[None, :]  # [BLOCK_S, D_PAD] int64
        m2 = s_mask[:, None] & d_mask[None, :]
        w_down = tl.load(down_ptr + rows, mask=m2, other=0.0).to(tl.float32)  # [BLOCK_S, D_PAD]
        w_up = tl.load(up_ptr + rows, mask=m2, other=0.0).to(tl.float32)  # [BLOCK_S, D_PAD]
        h = tl.sum(w_down * x[None, :], axis=1)  # [BLOCK_S]
        tl.store(pre_ptr + t * HK + offs_s, h, mask=s_mask)
        c = g * act_fwd(h, ACT)
        acc += tl.sum(c[:, None] * w_up, axis=0)
    tl.store(y_ptr + t * D + offs_d, acc.to(y_ptr.dtype.element_ty), mask=d_mask)
