"""Development: where the time of peer_experts forward + backward goes (torch.profiler),
and the tables-kernel configs; see bench/NOTES.md."""
import os, sys, torch, triton
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from triton.testing import do_bench
import peer_kernels as pk
from peer_kernels import experts as E
from peer_kernels.csrc_triton import peer_experts_bwd as EB
import triton.language as tl


@triton.jit
def tables_static(order_ptr, offsets_ptr, x_ptr, dy_ptr, dh_ptr, coef_ptr, ddown_ptr, dup_ptr, N,
                  D: tl.constexpr, D_PAD: tl.constexpr, HK: tl.constexpr, ROWS: tl.constexpr, BLOCK_J: tl.constexpr):
    """Variant: rows unrolled, offsets of all rows loaded first, masked stores (no branch)."""
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < D
    e0 = tl.program_id(0).to(tl.int64) * ROWS
    offs_r = tl.arange(0, 2 * ROWS)  # ROWS + 1 bounds, padded to a power of two
    bounds = tl.load(offsets_ptr + tl.minimum(e0 + offs_r, N), mask=offs_r <= ROWS, other=0)
    for r in tl.static_range(ROWS):
        e = e0 + r
        start = tl.sum(tl.where(offs_r == r, bounds, 0))
        end = tl.sum(tl.where(offs_r == r + 1, bounds, 0))
        acc_down = tl.zeros((D_PAD,), tl.float32)
        acc_up = tl.zeros((D_PAD,), tl.float32)
        for j0 in range(start, end, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            j_mask = offs_j < end
            slot = tl.load(order_ptr + offs_j, mask=j_mask, other=0).to(tl.int64)
            tok = slot // HK
            dh = tl.load(dh_ptr + slot, mask=j_mask, other=0.0)
            c = tl.load(coef_ptr + slot, mask=j_mask, other=0.0)
            m2 = j_mask[:, None] & d_mask[None, :]
            xs = tl.load(x_ptr + tok[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
            dys = tl.load(dy_ptr + tok[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
            acc_down += tl.sum(dh[:, None] * xs, axis=0)
            acc_up += tl.sum(c[:, None] * dys, axis=0)
        tl.store(ddown_ptr + e * D + offs_d, acc_down.to(ddown_ptr.dtype.element_ty), mask=d_mask & (e < N))
        tl.store(dup_ptr + e * D + offs_d, acc_up.to(dup_ptr.dtype.element_ty), mask=d_mask & (e < N))

torch.manual_seed(0)
T, H, k, D, N = 4096, 8, 16, 1024, 1024**2
x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
down = (torch.randn(N, D, device="cuda", dtype=torch.bfloat16) * D**-0.5).requires_grad_()
up = (torch.randn(N, D, device="cuda", dtype=torch.bfloat16) * D**-0.5).requires_grad_()
idx = torch.randint(0, N, (T, H, k), device="cuda")
gates = torch.rand(T, H, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
for validate in (True, False):
    def step():
        for t in (x, down, up, gates):
            t.grad = None
        pk.peer_experts(x, idx, gates, down, up, validate=validate).backward(dy)
    print(f"fwd+bwd validate={validate}: {do_bench(step, warmup=5, rep=100, return_mode='median'):.4f} ms", flush=True)
    print(f"fwd validate={validate}: {do_bench(lambda: pk.peer_experts(x, idx, gates, down, up, validate=validate), warmup=5, rep=100, return_mode='median'):.4f} ms", flush=True)
if os.environ.get("PROFILE"):
    from torch.profiler import profile, ProfilerActivity
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)
    prof.export_chrome_trace(os.path.join(os.environ.get("OUT", "/tmp"), "experts_trace.json"))
# tables kernel configs
flat = idx.reshape(T, H * k)
order, offsets = E._sorted_slots(flat, N)
print(f"sort + csr offsets: {do_bench(lambda: E._sorted_slots(flat, N), rep=50, return_mode='median'):.4f} ms", flush=True)
xs = x.detach(); dh = torch.randn(T, H * k, device="cuda"); coef = torch.randn_like(dh)
ddown = torch.empty_like(down); dup = torch.empty_like(up)
for rows, bj, w in [(16, 2, 4), (4, 4, 4)]:
    f = lambda: EB.peer_experts_bwd_tables_kernel[(triton.cdiv(N, rows),)](order, offsets, xs, dy, dh, coef, ddown, dup, N,
        D=D, D_PAD=1024, HK=H * k, ROWS=rows, BLOCK_J=bj, num_warps=w)
    t = do_bench(f, rep=30, return_mode="median")
    print(f"tables kernel ROWS={rows} BJ={bj} warps={w}: {t:.4f} ms {2*N*D*2/t/1e9:.0f} GB/s written", flush=True)
ref_down, ref_up = ddown.clone(), dup.clone()
for rows, bj in [(2, 4), (4, 4), (8, 4), (16, 2), (8, 2)]:
    f = lambda: tables_static[(triton.cdiv(N, rows),)](order, offsets, xs, dy, dh, coef, ddown, dup, N,
        D=D, D_PAD=1024, HK=H * k, ROWS=rows, BLOCK_J=bj, num_warps=4)
    ddown.fill_(float("nan")); f(); same = torch.equal(ddown, ref_down) and torch.equal(dup, ref_up)
    t = do_bench(f, rep=30, return_mode="median")
    print(f"tables static variant ROWS={rows} BJ={bj}: {t:.4f} ms {2*N*D*2/t/1e9:.0f} GB/s written, equal to product kernel: {same}", flush=True)
print(f"zero_ of both tables: {do_bench(lambda: (ddown.zero_(), dup.zero_()), rep=30, return_mode='median'):.4f} ms", flush=True)
