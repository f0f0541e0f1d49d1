"""Development: where the time of peer_experts forward + backward goes (torch.profiler),
the sort and the tables kernel alone (at the launcher's config), and skewed (Zipf) ids;
see bench/NOTES.md (an unrolled-rows variant of the tables kernel measured 1.40-1.48 ms
there and was dropped)."""
import os, sys, torch, triton
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from triton.testing import do_bench
import peer_kernels as pk
from peer_kernels import experts as E
from peer_kernels.segments import sorted_segments
from peer_kernels.csrc_triton import peer_experts_bwd as EB

torch.manual_seed(0)
T, H, k, D, N = 4096, 8, 16, 1024, 1024**2
x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
down = (torch.randn(N, D, device="cuda", dtype=torch.bfloat16) * D**-0.5).requires_grad_()
up = (torch.randn(N, D, device="cuda", dtype=torch.bfloat16) * D**-0.5).requires_grad_()
idx = torch.randint(0, N, (T, H, k), device="cuda")
gates = torch.rand(T, H, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
for validate in (True, "sync", False):
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
# the sort and the tables kernel alone, at the launcher's config
order, offsets, _ = sorted_segments(idx, N)
print(f"sort + csr offsets: {do_bench(lambda: sorted_segments(idx, N), rep=50, return_mode='median'):.4f} ms", flush=True)
xs = x.detach(); dh = torch.randn(T, H * k, device="cuda"); coef = torch.randn_like(dh)
ddown = torch.empty_like(down); dup = torch.empty_like(up)
d_pad, _, warps = E._tile_config(D)
f = lambda: EB.peer_experts_bwd_tables_kernel[(triton.cdiv(N, E.TABLES_ROWS),)](
    order, offsets, xs, dy, dh, coef, ddown, dup, N, D=D, D_PAD=d_pad, HK=H * k, ROWS=E.TABLES_ROWS,
    BLOCK_J=E.TABLES_BLOCK_J, CHUNK=E.LONG_ROW_CHUNK, num_warps=warps)
t = do_bench(f, rep=30, return_mode="median")
print(f"tables kernel (uniform ids): {t:.4f} ms {2 * N * D * 2 / (t * 1e-3) / 1e9:.0f} GB/s written", flush=True)
print(f"zero_ of both tables: {do_bench(lambda: (ddown.zero_(), dup.zero_()), rep=30, return_mode='median'):.4f} ms", flush=True)
# skewed ids (Zipf, s = 1, as the suite's): hot rows summed in chunks of LONG_ROW_CHUNK
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases  # noqa: E402  (bench/cases.py: the suite's Zipf ids)
zidx = cases.zipf_ids((T, H, k), N, 1.0, torch.Generator().manual_seed(0), "cuda")
def zstep():
    for t_ in (x, down, up, gates):
        t_.grad = None
    pk.peer_experts(x, zidx, gates, down, up).backward(dy)
counts = torch.bincount(zidx.reshape(-1), minlength=N)
print(f"Zipf ids: hottest row {counts.max().item()} occurrences, {(counts > E.LONG_ROW_CHUNK).sum().item()} rows "
      f"> {E.LONG_ROW_CHUNK}; fwd+bwd {do_bench(zstep, warmup=5, rep=100, return_mode='median'):.4f} ms", flush=True)
