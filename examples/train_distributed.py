"""Train a small language model with PEER layers under DDP and FSDP2 (torchrun), check it
against a single-process run on the same global batch, and print step time and peak
memory per rank.

    torchrun --standalone --nproc_per_node 2 examples/train_distributed.py              # DDP, then FSDP2
    torchrun --standalone --nproc_per_node 2 examples/train_distributed.py --mode fsdp2
    torchrun --standalone --nproc_per_node 2 examples/train_distributed.py --cpu --query-norm layer

GPUs: NCCL, one GPU per rank. `--cpu`: gloo on the CPU, tiny sizes (what the CPU test runs).

The model: token + position embeddings, `--layers` blocks of
[x + causal self-attention(LN(x)), x + PEER(LN(x))], a final LayerNorm and an output
projection; synthetic sequences x_{t+1} = (5 x_t + 3) mod vocab from random starts, so the
loss falls within a few steps. AdamW, gradient clipping at `--clip`, fp32 parameters.

What runs, on every rank:
  1. reference: the model built from `--seed` trains `--steps` steps in this one process on
     each whole global batch (this is the single-GPU run); its losses, first-step gradients
     and final buffers are kept (on the CPU) and the model is freed;
  2. for each `--mode`: the same model, built again from the same seed, wrapped in DDP (after
     the BatchNorm conversion below), or sharded with FSDP2 (`fully_shard` on each block and
     on the root), trains the same steps, each rank on its slice of the global batch. Its
     first-step gradients (DDP: after the all-reduce; FSDP2: the reduce-scattered shards,
     gathered with `full_tensor()`) and every step's loss (mean over ranks) are compared with
     the reference: relative error ||g - g_ref|| / ||g_ref|| per parameter, |l - l_ref| / l_ref
     per step, both at most `--rtol`. The final BatchNorm running statistics must match too,
     and DDP replicas must end bitwise equal.
  3. rank 0 prints per rank the median step time and the peak memory over the steps after
     `--warmup` (CUDA: torch.cuda.max_memory_allocated, reset after the warm-up, so the
     gradient check of step 1 is left out; CPU: the process's peak RSS so far, which cannot be
     reset), and a last line `RESULT {json}`. Exit status 1 if a check failed.

BatchNorm (PEER's default query_norm="batch", the paper's): its statistics are over the
tokens of one call. Under DDP/FSDP2 each rank sees only its slice, so plain BatchNorm would
normalise with per-rank statistics and the gradients would not be those of the global
batch. With `--query-norm batch` the script converts every BatchNorm to nn.SyncBatchNorm
(statistics over all ranks' tokens: the single-GPU result); SyncBatchNorm is implemented for
CUDA only in PyTorch, so on the CPU use `--query-norm layer` (LayerNorm on each head's query:
no cross-token statistics, so data parallelism is exact without any sync) or `none`.
`--local-batchnorm` keeps plain BatchNorm to show the difference (the checks then fail).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODES = ("ddp", "fsdp2")
# sizes per device kind; any can be overridden on the command line
PRESETS = {
    "cuda": dict(vocab=8192, dim=1024, layers=2, attn_heads=8, experts=512**2, heads=8, k=16, dim_key=128,
                 batch=8, seq=512, steps=10, warmup=3, lr=3e-3),
    "cpu": dict(vocab=64, dim=32, layers=2, attn_heads=2, experts=64, heads=2, k=4, dim_key=16,
                batch=4, seq=8, steps=4, warmup=1, lr=1e-2),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES), help="wrappers to run, in order")
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU (tiny default sizes)")
    ap.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                    help="PEER backend; 'triton' on the CPU runs the kernels in the Triton interpreter")
    ap.add_argument("--query-norm", choices=("batch", "layer", "none"), default="batch")
    ap.add_argument("--local-batchnorm", action="store_true",
                    help="keep plain BatchNorm (per-rank statistics) instead of SyncBatchNorm: NOT the single-GPU "
                         "result, the checks fail; shows why the conversion is needed (works on the CPU)")
    for name, kind in (("vocab", int), ("dim", int), ("layers", int), ("attn-heads", int), ("experts", int),
                       ("heads", int), ("k", int), ("dim-key", int), ("batch", int), ("seq", int), ("steps", int),
                       ("warmup", int)):
        ap.add_argument(f"--{name}", type=kind, default=None, help="default: the preset of the device kind")
    ap.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the preset's)")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    ap.add_argument("--rtol", type=float, default=1e-3, help="tolerance of the checks against the reference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    preset = PRESETS["cpu" if args.cpu else "cuda"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.query_norm == "batch" and args.cpu and not args.local_batchnorm:
        ap.error("--query-norm batch needs nn.SyncBatchNorm, which PyTorch implements for CUDA only; on the CPU "
                 "use --query-norm layer (exact without a sync) or none")
    if not 1 <= args.warmup < args.steps:
        ap.error(f"need 1 <= --warmup ({args.warmup}) < --steps ({args.steps}): step 1 is the checked one")
    return args


class Block(nn.Module):
    """x + causal self-attention(LN(x)), then x + PEER(LN(x)) (PEER in place of the FFN)."""

    def __init__(self, dim, attn_heads, peer_kwargs):
        from peer_kernels import PEER

        super().__init__()
        self.attn_heads = attn_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.peer = PEER(dim, **peer_kwargs)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.attn_heads, d // self.attn_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, heads, s, d/heads]
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.peer(self.norm2(x))


class TinyLM(nn.Module):
    """Embeddings, `args.layers` Blocks, LayerNorm, output projection; `peer_overrides` go to every PEER."""

    def __init__(self, args, **peer_overrides):
        super().__init__()
        peer_kwargs = dict(num_experts=args.experts, heads=args.heads, k=args.k, dim_key=args.dim_key,
                           query_norm=None if args.query_norm == "none" else args.query_norm, backend=args.backend)
        peer_kwargs.update(peer_overrides)
        self.embed = nn.Embedding(args.vocab, args.dim)
        self.pos = nn.Embedding(args.seq, args.dim)
        self.blocks = nn.ModuleList(Block(args.dim, args.attn_heads, peer_kwargs) for _ in range(args.layers))
        self.norm = nn.LayerNorm(args.dim)
        self.head = nn.Linear(args.dim, args.vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_model(args, device, **peer_overrides):
    torch.manual_seed(args.seed)  # same weights on every rank, and for the reference
    with torch.device(device):  # parameters made and initialised on the device
        return TinyLM(args, **peer_overrides)


def global_batch(step, args, device):
    """[batch, seq + 1] tokens of step `step`, the same on every rank."""
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randint(args.vocab, (args.batch, 1), generator=g)
    seqs = [x]
    for _ in range(args.seq):
        x = (5 * x + 3) % args.vocab
        seqs.append(x)
    return torch.cat(seqs, 1).to(device)


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    gc.collect()  # a freed model's memory must not count in the next peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train(model, args, device, batch_slice, grads_of, reduce_loss):
    """`args.steps` AdamW steps. Returns (losses, first-step grads {name: cpu tensor}, median step ms and
    peak memory over the steps after the warm-up, which leaves out the gradient check of step 1)."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    losses, times, first = [], [], None
    for step in range(args.steps):
        if step == args.warmup:
            reset_peak(device)
        tokens = global_batch(step, args, device)[batch_slice]
        sync(device)
        t0 = time.perf_counter()
        loss = lm_loss(model, tokens)
        loss.backward()
        if step == 0:
            first = grads_of(model)  # before clipping and the update
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        losses.append(reduce_loss(loss.detach()))
    return losses, first, statistics.median(times[args.warmup:]), peak_mb(device)


def plain_grads(model):
    return {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters()}


def buffers_of(model):
    return {n: b.detach().float().cpu().clone() for n, b in model.named_buffers()}


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_mode(mode, args, device, ref):
    """Train under `mode`; compare with the reference. Returns this rank's result dict."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = args.batch // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    model = build_model(args, device)
    if args.query_norm == "batch" and not args.local_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # global-batch statistics
    if mode == "ddp":
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      gradient_as_bucket_view=True)  # no second copy of the gradients
        inner = wrapped.module

        def grads_of(m):
            return plain_grads(m.module)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        wrapped = inner = fully_shard(model, mesh=mesh)

        def grads_of(m):  # full_tensor() is a collective: every rank, same order
            return {n: p.grad.full_tensor().detach().float().cpu() for n, p in m.named_parameters()}

    def mean_over_ranks(loss):
        loss = loss.clone()
        dist.all_reduce(loss)
        return loss.item() / world

    losses, grads, step_ms, peak = train(wrapped, args, device, rows, grads_of, mean_over_ranks)

    errs = {n: rel_err(g, ref["grads"][n]) for n, g in grads.items()}
    worst = max(errs, key=errs.get)
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses, ref["losses"]))
    bufs = buffers_of(inner)
    buf_err = max((rel_err(b, ref["buffers"][n]) for n, b in bufs.items() if b.is_floating_point()), default=0.0)
    in_sync = True
    if mode == "ddp":  # every replica must hold the same parameters after the steps
        sums = torch.stack([p.detach().double().sum() for p in inner.parameters()])
        gathered = [torch.empty_like(sums) for _ in range(world)]
        dist.all_gather(gathered, sums)
        in_sync = all(torch.equal(gathered[0], g) for g in gathered)
    ok = errs[worst] <= args.rtol and loss_diff <= args.rtol and buf_err <= args.rtol and in_sync
    del wrapped, inner, model
    return dict(mode=mode, grad_max_rel_err=errs[worst], grad_worst_param=worst, loss_max_rel_diff=loss_diff,
                buffer_max_rel_err=buf_err, replicas_in_sync=in_sync, losses=losses, step_ms=step_ms,
                peak_mem_mb=peak, ok=ok)


def main(argv=None):
    args = parse_args(argv)
    if args.cpu and args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before peer_kernels imports triton
    if args.cpu:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU: run with --cpu (gloo) instead")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 everywhere: comparable with the reference
        dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        sys.exit(f"--batch ({args.batch}) must be divisible by the number of ranks ({world})")

    # 1. the single-process reference on the whole global batch
    model = build_model(args, device)
    ref_losses, ref_grads, ref_ms, ref_peak = train(model, args, device, slice(None), plain_grads,
                                                    lambda loss: loss.item())
    ref = dict(losses=ref_losses, grads=ref_grads, buffers=buffers_of(model))
    n_params = sum(p.numel() for p in model.parameters())
    del model
    reset_peak(device)

    results = [run_mode(mode, args, device, ref) for mode in args.mode]

    # 3. gather every rank's numbers on rank 0 and print them
    per_rank = [None] * world
    dist.all_gather_object(per_rank, [(r["step_ms"], r["peak_mem_mb"], r["ok"]) for r in results])
    if rank == 0:
        import peer_kernels as pk

        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        mem = "peak memory (max_memory_allocated)" if device.type == "cuda" else "peak RSS"
        print(f"peer-kernels {pk.__version__} | torch {torch.__version__} | {world} x {where} | "
              f"{'gloo' if args.cpu else 'nccl'} | PEER backend {args.backend} | query_norm {args.query_norm}")
        print(f"model: {args.layers} blocks, dim {args.dim}, PEER {args.experts} experts x {args.heads} heads x "
              f"k {args.k}, {n_params / 1e6:.1f} M parameters (fp32); global batch {args.batch} x {args.seq} "
              f"tokens, {args.steps} steps, timing = median of steps {args.warmup + 1}..{args.steps}")
        print(f"  single process, global batch: {ref_ms:9.2f} ms/step, {mem} {ref_peak:9.0f} MiB; "
              f"losses {' '.join(f'{v:.4f}' for v in ref_losses)}")
        for i, r in enumerate(results):
            print(f"  {r['mode']:5s} x {world}: losses {' '.join(f'{v:.4f}' for v in r['losses'])}")
            for k, (ms, mb, _) in enumerate(row[i] for row in per_rank):
                print(f"      rank {k}: {ms:9.2f} ms/step, {mem} {mb:9.0f} MiB")
            print(f"      vs single process: first-step gradients max rel. error {r['grad_max_rel_err']:.2e} "
                  f"({r['grad_worst_param']}), losses max rel. diff {r['loss_max_rel_diff']:.2e}, buffers "
                  f"{r['buffer_max_rel_err']:.2e}, replicas in sync {r['replicas_in_sync']} (rtol {args.rtol:g}) "
                  f"-> {'OK' if r['ok'] else 'FAILED'}")
        summary = dict(world_size=world, device=where, torch=torch.__version__, backend=args.backend,
                       query_norm=args.query_norm, config=vars(args), params=n_params,
                       reference=dict(losses=ref_losses, step_ms=ref_ms, peak_mem_mb=ref_peak),
                       modes=[dict(r, step_ms_per_rank=[row[i][0] for row in per_rank],
                                   peak_mem_mb_per_rank=[row[i][1] for row in per_rank])
                              for i, r in enumerate(results)])
        print("RESULT " + json.dumps(summary), flush=True)
    ok = all(all(o for _, _, o in row) for row in per_rank)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
