"""Input check of stage 2 on the GPU: every expert id in [0, N), without a host sync.

`expert_ids_in_range_kernel` is compiled with debug=True so that its `tl.device_assert`
is live (Triton drops device asserts otherwise): an id outside [0, N) stops the kernel
with the message below (printed by the device, with the block and thread), and the CUDA
error "device-side assert triggered" surfaces at the next synchronisation, as with
PyTorch's own indexing (`torch.index_select`, `nn.Embedding`). The CUDA context is then
unusable; `validate="sync"` raises a catchable IndexError instead, at the cost of a sync.
"""
import triton
import triton.language as tl


@triton.jit(debug=True)
def expert_ids_in_range_kernel(ids_ptr, L, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    e = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int64)
    ok = ((e >= 0) & (e < N)) | ~mask
    tl.device_assert(ok, "peer_kernels.peer_experts: expert id (indices) outside [0, N), N = rows of down/up")
