"""End-to-end training benchmark: a small decoder-only byte-level language model whose
middle FFN (or several, --peer-layers) is a PEER layer, trained with AdamW, once per
backend with the same seed, the same initial weights and the same batches:

    triton        PEER(backend="triton"): peer-kernels' Triton kernels
    torch         PEER(backend="torch"): the plain-PyTorch reference (peer_kernels.reference)
    peer-pytorch  peer-pytorch 0.2.x's PEER with the same weights (skipped with a note if
                  it is not installed). It has no query norm; the same BatchNorm1d is put
                  between its query projection and its retrieval, so all backends train
                  the same model.

Data: by default the source files of the running interpreter's standard library
(byte tokens, no download; site-packages excluded); --data FILE trains on any file.
One block of every 20 is held out for the evaluation at the end.

Reports per backend: loss per step, tokens/s, step time, peak memory, and at the end the
held-out loss and expert usage / unevenness per PEER layer (paper Table 2, from
peer_kernels.ExpertUsage with gate weights). Writes a JSON of the run and a PNG of loss
and throughput (the PNG needs matplotlib, the `bench` extra; without it a note is printed;
`--plot-only RUN.json` draws it later). The Triton and reference loss curves must agree
(`compare_curves`): fp32, |dloss| <= 1e-3 over the first 20 steps and the mean loss of the
last steps within 1%; bf16 autocast, the mean loss of the last steps within 2%. Exit
status 1 if they do not.

    python bench/train.py                  # CPU: small config, torch backend (about a minute)
    python bench/train.py                  # CUDA: d=1024, N=1024^2, T=8192, all backends
    python bench/train.py --backends torch,triton:3      # CPU: 3 steps in the Triton interpreter too
    python bench/train.py --steps 400 --backends torch:200 --save ck && python bench/train.py --resume ck

Defaults (CUDA / CPU): 4 / 3 blocks, d = 1024 / 128, PEER in block 2 / 1 with
N = 1024^2 / 64^2 experts, 8 / 4 heads, k = 16 / 8, Dk = 128 / 32; 8 sequences of
1024 / 128 bytes per step; 200 / 300 steps, AdamW lr 1e-3; bf16 autocast with fp32
master weights on CUDA, fp32 on the CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the 'triton' backend run on the CPU

import triton  # noqa: E402

import peer_kernels as pk  # noqa: E402
import harness  # noqa: E402  (bench/harness.py: device_slug)
import cases  # noqa: E402  (bench/cases.py: our weights into peer-pytorch's layer)

BACKENDS = ("triton", "torch", "peer-pytorch")
VOCAB = 256  # byte tokens
FP32_ATOL = 1e-3  # fp32: max |loss_a - loss_b| over the first FP32_EARLY_STEPS steps
FP32_EARLY_STEPS = 20
FP32_LEVEL_RTOL = 0.01  # fp32: relative difference of the mean loss over the last steps
BF16_RTOL = 0.02  # bf16 autocast: relative difference of the mean loss over the last steps
CKPT_FORMAT = 1


# ---- configuration ------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    """Everything that defines the training run (saved in checkpoints and the JSON)."""
    dim: int
    layers: int
    attn_heads: int
    seq_len: int
    batch: int
    peer_layers: tuple
    experts: int
    peer_heads: int
    k: int
    dim_key: int
    mlp_mult: int
    steps: int
    lr: float
    warmup: int
    min_lr_frac: float
    weight_decay: float
    clip: float
    seed: int
    dtype: str
    data: str | None

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


GPU_DEFAULTS = dict(dim=1024, layers=4, attn_heads=8, seq_len=1024, batch=8, peer_layers=None, experts=1024**2,
                    peer_heads=8, k=16, dim_key=128, mlp_mult=4, steps=200, lr=1e-3, warmup=20, min_lr_frac=0.1,
                    weight_decay=0.1, clip=1.0, seed=0, dtype="bf16", data=None)
CPU_DEFAULTS = dict(GPU_DEFAULTS, dim=128, layers=3, attn_heads=4, seq_len=128, batch=8, experts=64**2, peer_heads=4,
                    k=8, dim_key=32, steps=300, lr=1e-3, warmup=10, dtype="fp32")


def parse_peer_layers(text: str, layers: int) -> tuple:
    """'2' | '1,3' | 'all' | 'none' -> sorted tuple of block indices."""
    if text in ("all", "none"):
        return tuple(range(layers)) if text == "all" else ()
    try:
        idx = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise SystemExit(f"--peer-layers must be block indices like '1' or '0,2', 'all' or 'none', got {text!r}")
    bad = [i for i in idx if not 0 <= i < layers]
    if bad:
        raise SystemExit(f"--peer-layers {bad} out of range for {layers} blocks")
    return tuple(idx)


def parse_backends(text: str) -> list:
    """'triton,torch:50' -> [('triton', None), ('torch', 50)]: name[:steps to stop at]."""
    out = []
    for item in text.split(","):
        name, _, stop = item.strip().partition(":")
        if name not in BACKENDS:
            raise SystemExit(f"--backends: unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        if stop and (not stop.isdigit() or int(stop) < 1):
            raise SystemExit(f"--backends: the step count after ':' must be a positive int, got {item!r}")
        out.append((name, int(stop) if stop else None))
    return out


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up over cfg.warmup steps, then cosine decay to min_lr_frac * lr at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- data ---------------------------------------------------------------------------

def stdlib_corpus() -> tuple[bytes, dict]:
    """The .py files of the running interpreter's standard library, in sorted path order,
    joined with blank lines (site-packages and dist-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.rglob("*.py")
                    if p.relative_to(root).parts[0] not in ("site-packages", "dist-packages") and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    data = b"\n\n".join(p.read_bytes() for p in files)
    return data, dict(source="python-stdlib", path=str(root), files=len(files),
                      python=platform.python_version())


def load_corpus(path: str | None) -> tuple[torch.Tensor, dict]:
    if path is None:
        data, info = stdlib_corpus()
    else:
        data = Path(path).read_bytes()
        info = dict(source="file", path=str(path))
    if not data:
        raise SystemExit(f"the corpus {info['path']} is empty")
    info.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), info


def split_corpus(data: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the corpus in blocks of min(64 KiB, 1% of it); every 20th block
    is held out. Both parts must hold one sequence of seq_len + 1 bytes."""
    block = max(1, min(1 << 16, data.numel() // 100))
    blocks = torch.arange(data.numel()) // block
    held = blocks % 20 == 19
    train, val = data[~held], data[held]
    if min(train.numel(), val.numel()) < seq_len + 1:
        raise SystemExit(f"the corpus ({data.numel()} bytes) is too small for --seq-len {seq_len}: its held-out "
                         f"part has {val.numel()} bytes, need at least {seq_len + 1} (about 20x more data)")
    return train, val


class Batches:
    """Random windows of seq_len + 1 bytes from one part of the corpus, drawn with a
    private CPU generator: the same batches on every device and backend for one seed.
    Its state (the data position) goes into checkpoints."""

    def __init__(self, data: torch.Tensor, batch: int, seq_len: int, seed: int):
        self.data, self.batch, self.seq_len = data, batch, seq_len
        self.gen = torch.Generator().manual_seed(seed)
        self.drawn = 0

    def next(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.data.numel() - self.seq_len, (self.batch,), generator=self.gen)
        chunk = self.data[starts[:, None] + torch.arange(self.seq_len + 1)].long()  # [B, S+1]
        self.drawn += 1
        chunk = chunk.to(device, non_blocking=True)
        return chunk[:, :-1], chunk[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.drawn = state["drawn"]


# ---- model --------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise SystemExit(f"--dim {dim} must be a multiple of --attn-heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [B, h, S, dh]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class MLP(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.fc = nn.Linear(dim, mult * dim, bias=False)
        self.proj = nn.Linear(mult * dim, dim, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); ffn is an MLP or a PEER."""

    def __init__(self, dim: int, heads: int, ffn: nn.Module):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.RMSNorm(dim)
        self.ffn = ffn

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class ByteLM(nn.Module):
    """Decoder-only byte-level LM: token + learned position embeddings, `layers` blocks,
    final RMSNorm, untied head. Blocks in cfg.peer_layers get PEER(backend) as FFN.
    Dense weights ~ N(0, 0.02), residual projections scaled by 1/sqrt(2 layers); PEER
    keeps its own documented initialisation."""

    def __init__(self, cfg: Config, peer_backend: str):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, cfg.dim)
        self.pos = nn.Embedding(cfg.seq_len, cfg.dim)
        blocks = []
        for i in range(cfg.layers):
            if i in cfg.peer_layers:
                ffn = pk.PEER(cfg.dim, num_experts=cfg.experts, heads=cfg.peer_heads, k=cfg.k, dim_key=cfg.dim_key,
                              backend=peer_backend)
            else:
                ffn = MLP(cfg.dim, cfg.mlp_mult)
            blocks.append(Block(cfg.dim, cfg.attn_heads, ffn))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, VOCAB, bias=False)
        with torch.no_grad():
            dense = [self.tok.weight, self.pos.weight, self.head.weight]
            for blk in self.blocks:
                dense += [blk.attn.qkv.weight, blk.attn.proj.weight]
                if isinstance(blk.ffn, MLP):
                    dense += [blk.ffn.fc.weight, blk.ffn.proj.weight]
            for w in dense:
                w.normal_(0.0, 0.02)
            for blk in self.blocks:
                resid = [blk.attn.proj.weight] + ([blk.ffn.proj.weight] if isinstance(blk.ffn, MLP) else [])
                for w in resid:
                    w.mul_((2 * cfg.layers) ** -0.5)

    def forward(self, idx):  # idx [B, S] int64 -> logits [B, S, 256]
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


# ---- peer-pytorch with the same weights ---------------------------------------------

class TokenBatchNorm(nn.Module):
    """BatchNorm1d over the last dim of [..., C], statistics over all tokens: PEER's
    query norm, for peer-pytorch's query projection (which has none)."""

    def __init__(self, bn: nn.BatchNorm1d):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def to_peer_pytorch(layer: pk.PEER) -> nn.Module:
    """peer-pytorch's PEER computing what `layer` computes, with its weights (the inverse
    of PEER.from_peer_pytorch) and its query BatchNorm inserted after the projection.
    Its query features are ordered (p, h, d), ours (h, p, d): rows and BN channels are
    permuted accordingly; its dim_key is one half of ours."""
    if layer.shared_keys or layer.separate_experts_per_head or layer.gate != "softmax" or layer.pre_rmsnorm \
            or layer.activation != "gelu" or layer.query_norm_type != "batch":
        raise ValueError(f"to_peer_pytorch: unsupported config {layer.extra_repr()}")
    pp = cases.build_peer_pytorch(layer, layer.down.device, layer.down.dtype)
    if pp is None:
        raise ImportError("to_peer_pytorch: peer-pytorch (PEER_pytorch) is not installed")
    bn = nn.BatchNorm1d(layer.heads * layer.dim_key, device=layer.down.device, dtype=layer.down.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(cases.hpd_to_phd(layer, getattr(layer.query_norm, name)))
        bn.num_batches_tracked.copy_(layer.query_norm.num_batches_tracked)
    pp.to_queries = nn.Sequential(pp.to_queries[0], TokenBatchNorm(bn), pp.to_queries[1])
    return pp


def peer_pytorch_version() -> str | None:
    try:
        import PEER_pytorch  # noqa: F401
    except Exception:  # noqa: BLE001  (any import failure: skip the backend)
        return None
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("peer-pytorch")
    except PackageNotFoundError:
        return "unknown"


def build_model(cfg: Config, backend: str, device: torch.device) -> ByteLM:
    """The same initial weights for every backend: seeded construction on `device`
    (peer-pytorch: our layer built first, its weights copied into peer-pytorch's)."""
    torch.manual_seed(cfg.seed)
    with device:
        model = ByteLM(cfg, "torch" if backend == "peer-pytorch" else backend)
    if backend == "peer-pytorch":
        for i in cfg.peer_layers:
            model.blocks[i].ffn = to_peer_pytorch(model.blocks[i].ffn)
    return model


def is_peer(m: nn.Module) -> bool:
    return isinstance(m, pk.PEER) or (type(m).__name__ == "PEER" and hasattr(m, "weight_down_embed"))


@torch.no_grad()
def route(ffn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing of a PEER FFN (ours or peer-pytorch's) for its input x [..., D]:
    (expert ids, gates), each [..., H, k], recomputed the way its forward does."""
    if isinstance(ffn, pk.PEER):
        q = ffn._queries(ffn.norm(x))  # [..., H, Dk]
        scores, idx = pk.product_key_topk(q, ffn.sub_keys, ffn.k, candidates=ffn.candidates, backend=ffn.backend)
        return idx, ffn._gates(scores)
    q = ffn.to_queries(ffn.norm(x))  # [2, ..., H, d]
    q = q.movedim(0, -2).flatten(-2)  # [..., H, 2d]
    scores, idx = pk.product_key_topk(q, ffn.keys.transpose(1, 2), ffn.num_experts_per_head_topk,
                                      candidates=ffn.product_key_topk, backend="torch")
    return idx, ffn.score_activation(scores)


# ---- training -----------------------------------------------------------------------

def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on nn.Linear weights only (not on embeddings, norms, sub-keys
    or expert tables: a decayed table row would shrink even while no token uses it)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = list(model.parameters())
    groups = [dict(params=[p for p in params if id(p) in decay], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if id(p) not in decay], weight_decay=0.0)]
    extra = dict(fused=True) if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, **extra)


def autocast(cfg: Config, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")


def train_step(model, opt, x, y, lr: float, cfg: Config, device) -> float:
    for g in opt.param_groups:
        g["lr"] = lr
    with autocast(cfg, device):
        logits = model(x)
    loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
    loss.backward()
    if cfg.clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def evaluate(model, cfg: Config, val: torch.Tensor, batches: int, device) -> dict:
    """Held-out loss and expert usage / unevenness per PEER layer (eval mode: the query
    BatchNorm uses its running statistics), on the same held-out batches for every backend."""
    model.eval()
    trackers, hooks = {}, []
    for i, blk in enumerate(model.blocks):
        if is_peer(blk.ffn):
            rows = cfg.experts
            trackers[i] = pk.ExpertUsage(rows)
            hooks.append(blk.ffn.register_forward_hook(
                lambda m, inp, out, t=trackers[i]: t.update(*route(m, inp[0]))))
    sampler = Batches(val, cfg.batch, cfg.seq_len, cfg.seed + 1)
    losses = []
    try:
        for _ in range(batches):
            x, y = sampler.next(device)
            with autocast(cfg, device):
                logits = model(x)
            losses.append(F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1)).item())
    finally:
        for h in hooks:
            h.remove()
        model.train()
    usage = []
    for i, t in trackers.items():
        m = t.compute()
        usage.append(dict(layer=i, usage=m["usage"], unevenness=m["unevenness"],
                          tokens=batches * cfg.tokens_per_step))
    return dict(eval_loss=statistics.fmean(losses) if losses else float("nan"), expert_usage=usage)


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return n


def checkpoint_path(folder: str, backend: str) -> Path:
    return Path(folder) / f"{backend}.pt"


def save_checkpoint(folder, backend, cfg, data_info, model, opt, sampler, hist, device) -> Path:
    path = checkpoint_path(folder, backend)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(format=CKPT_FORMAT, backend=backend, config=dataclasses.asdict(cfg), data_sha256=data_info["sha256"],
                 step=len(hist["loss"]), model=model.state_dict(), optimizer=opt.state_dict(),
                 data=sampler.state_dict(), history=hist,
                 rng=dict(torch=torch.get_rng_state(),
                          cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None))
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint
    return path


def load_checkpoint(folder: str, backend: str) -> dict:
    path = checkpoint_path(folder, backend)
    if not path.exists():
        raise SystemExit(f"--resume: no checkpoint for backend {backend!r} at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CKPT_FORMAT:
        raise SystemExit(f"--resume: {path} has checkpoint format {state.get('format')}, expected {CKPT_FORMAT}")
    return state


def cuda_sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def run_backend(backend: str, stop: int, cfg: Config, train: torch.Tensor, val: torch.Tensor, data_info: dict,
                device: torch.device, args, resume_state: dict | None) -> dict:
    """Trains one backend from step 0 (or the checkpoint's step) up to `stop`, then
    evaluates. Returns its result row (losses, timings, memory, usage)."""
    release(device)
    model = build_model(cfg, backend, device)
    opt = make_optimizer(model, cfg, device)
    if device.type == "cuda":  # the peak from here on: the model's weights count, building it does not
        torch.cuda.reset_peak_memory_stats(device)
    sampler = Batches(train, cfg.batch, cfg.seq_len, cfg.seed)
    hist = dict(loss=[], lr=[], step_ms=[])
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        sampler.load_state_dict(resume_state["data"])
        hist = {k: list(v) for k, v in resume_state["history"].items()}
        torch.set_rng_state(resume_state["rng"]["torch"])
        if device.type == "cuda" and resume_state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(resume_state["rng"]["cuda"], device)
        del resume_state
    start = len(hist["loss"])
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{backend}] {n_params / 1e6:.1f} M parameters; steps {start} -> {stop} of {cfg.steps}"
          + (" (resumed)" if start else ""), flush=True)
    log_every = args.log_every or max(1, cfg.steps // 20)
    session_ms = []
    t_begin = time.perf_counter()
    for step in range(start, stop):
        t0 = time.perf_counter()
        x, y = sampler.next(device)
        lr = lr_at(step, cfg)
        loss = train_step(model, opt, x, y, lr, cfg, device)  # .item() synchronises
        ms = (time.perf_counter() - t0) * 1e3
        session_ms.append(ms)
        hist["loss"].append(loss)
        hist["lr"].append(lr)
        hist["step_ms"].append(ms)
        if not math.isfinite(loss):
            print(f"[{backend}] step {step + 1}: loss is {loss}; stopping this backend", flush=True)
            break
        done = step + 1
        if done % log_every == 0 or done == stop or done == start + 1:
            recent = session_ms[-log_every:]
            tok_s = cfg.tokens_per_step * len(recent) / (sum(recent) * 1e-3)
            eta = (stop - done) * statistics.fmean(recent) * 1e-3
            print(f"[{backend}] step {done:5d}/{stop}  loss {loss:.4f}  lr {lr:.2e}  {tok_s:12,.0f} tok/s  "
                  f"{statistics.fmean(recent):9.1f} ms/step  ETA {fmt_time(eta)}", flush=True)
        if args.save and args.save_every and done % args.save_every == 0 and done < stop:
            save_checkpoint(args.save, backend, cfg, data_info, model, opt, sampler, hist, device)
    cuda_sync(device)
    wall = time.perf_counter() - t_begin
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    saved = None
    if args.save:
        saved = str(save_checkpoint(args.save, backend, cfg, data_info, model, opt, sampler, hist, device))
        print(f"[{backend}] checkpoint at step {len(hist['loss'])}: {saved}", flush=True)
    # steady state: leave out the first steps of this session (compilation, allocator warm-up)
    skip = min(len(session_ms) - 1, max(1, min(10, len(session_ms) // 10))) if session_ms else 0
    steady = session_ms[skip:]
    row = dict(backend=backend, steps=len(hist["loss"]), steps_this_session=len(session_ms),
               timed_steps=len(steady), loss=hist["loss"], lr=hist["lr"], step_ms=hist["step_ms"],
               step_ms_median=statistics.median(steady) if steady else None,
               step_ms_p20_p80=(statistics.quantiles(steady, n=5)[0::3] if len(steady) >= 2 else None),
               tokens_per_s=(cfg.tokens_per_step * len(steady) / (sum(steady) * 1e-3)) if steady else None,
               wall_s=wall, peak_mem_mb=peak_mb, state_mb=state_bytes(model, opt) / 2**20,
               params_m=n_params / 1e6, checkpoint=saved)
    t0 = time.perf_counter()
    row.update(evaluate(model, cfg, val, args.eval_batches, device))
    usage = "  ".join(f"block {u['layer']}: usage {100 * u['usage']:.1f}% unevenness {u['unevenness']:.3f}"
                      for u in row["expert_usage"])
    print(f"[{backend}] held-out loss {row['eval_loss']:.4f} ({args.eval_batches} batches, "
          f"{time.perf_counter() - t0:.1f} s)  {usage}", flush=True)
    del model, opt
    release(device)
    return row


# ---- report -------------------------------------------------------------------------

def compare_curves(a: list, b: list, fp32: bool) -> dict | None:
    """Agreement of two loss curves (same weights, same batches) over their common steps.

    Two runs of one model that differ only in rounding are chaotic: a near-tie in a
    top-k flips, another expert learns, and the difference grows by about 10x every
    10-20 steps (measured, CPU default config in fp32, torch vs peer-pytorch: |dloss| = 0
    for 10 steps, 4e-6 at step 20, 1e-4 at 40, 2e-3 at 60, then 3e-3 - 3e-2 with the same
    level). So the curves must agree step by step at first and in level after that:

    fp32: |dloss| <= FP32_ATOL = 1e-3 over the first FP32_EARLY_STEPS = 20 steps (the
      backends differ only in summation order, ~1e-7 relative per operation; a wrong
      gradient shows at step 2), and the mean loss of the last max(10, n/10) steps within
      FP32_LEVEL_RTOL = 1% (measured 0.02% after 300 steps).
    bf16 autocast: the mean loss of the last max(10, n/10) steps within BF16_RTOL = 2%.
      bf16 keeps 8 significant bits (0.4% per rounding) and the backends round at other
      places (the reference rounds gathered rows and products to bf16 in its einsums, the
      kernels accumulate in fp32), so the trajectories separate from the first steps; on
      the same batches the batch noise is common to both, and the level the model reaches
      must be the same to a few percent."""
    n = min(len(a), len(b))
    if n == 0:
        return None
    diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    early = min(n, FP32_EARLY_STEPS)
    last = min(n, max(10, n // 10))
    ma, mb = statistics.fmean(a[n - last:n]), statistics.fmean(b[n - last:n])
    rel = abs(ma - mb) / max(abs(mb), 1e-12)
    if fp32:
        ok = max(diffs[:early]) <= FP32_ATOL and rel <= FP32_LEVEL_RTOL
        rule = (f"fp32: |loss difference| <= {FP32_ATOL} over the first {early} steps and the mean loss of the "
                f"last {last} steps within {FP32_LEVEL_RTOL:.0%}")
    else:
        ok = rel <= BF16_RTOL
        rule = f"bf16: the mean loss of the last {last} steps within {BF16_RTOL:.0%}"
    return dict(steps=n, max_abs_diff=max(diffs), early_steps=early, max_abs_diff_early=max(diffs[:early]),
                mean_last_steps=last, mean_last=[ma, mb], rel_diff_mean_last=rel, rule=rule,
                ok=bool(ok) and all(map(math.isfinite, (ma, mb))))


def plot(result: dict, png: Path) -> bool:
    """Loss per step and throughput per step, one line per backend. False (with a
    printed note) if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install '.[bench]'); no plot. "
              f"Draw it later with: python bench/train.py --plot-only {png.with_suffix('.json')}")
        return False
    cfg = result["config"]
    tokens = cfg["batch"] * cfg["seq_len"]
    rows = result["backends"]
    ref = rows.get("torch")
    others = [n for n in rows if n != "torch"] if ref else []
    fig, axes = plt.subplots(1, 3 if others else 2, figsize=(18 if others else 12, 4.5))
    ax1, ax2 = axes[0], axes[1]
    styles = {"triton": "-", "torch": "--", "peer-pytorch": ":"}
    colors = {"triton": "C0", "torch": "C1", "peer-pytorch": "C2"}
    for name, row in rows.items():
        steps = range(1, len(row["loss"]) + 1)
        ax1.plot(steps, row["loss"], styles[name], color=colors[name], label=name, lw=1)
        w = 5  # moving average over w steps for the throughput
        ms = row["step_ms"]
        smooth = [sum(ms[max(0, i - w + 1):i + 1]) / len(ms[max(0, i - w + 1):i + 1]) for i in range(len(ms))]
        ax2.plot(steps, [tokens / (m * 1e-3) for m in smooth], styles[name], color=colors[name],
                 label=f"{name} ({row['tokens_per_s'] or 0:,.0f} tok/s)", lw=1)
    ax1.set(xlabel="step", ylabel="training loss (nats / byte)", title="loss")
    ax2.set(xlabel="step", ylabel="tokens / s", title=f"throughput ({tokens} tokens / step, mean of 5 steps)")
    ax2.set_yscale("log")
    for name in others:
        n = min(len(rows[name]["loss"]), len(ref["loss"]))
        axes[2].plot(range(1, n + 1), [a - b for a, b in zip(rows[name]["loss"][:n], ref["loss"][:n])],
                     styles[name], color=colors[name], label=name, lw=1)
    if others:
        axes[2].axhline(0.0, color="k", lw=0.5)
        axes[2].set(xlabel="step", ylabel="loss - torch loss", title="difference from the reference (torch)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    peer = f"PEER N={cfg['experts']}, H={cfg['peer_heads']}, k={cfg['k']} in blocks {list(cfg['peer_layers'])}"
    fig.suptitle(f"{result['device']}: byte LM d={cfg['dim']}, {cfg['layers']} blocks, {peer}, {cfg['dtype']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"plot: {png}")
    return True


def summarize(result: dict) -> None:
    print("\nsummary (tokens/s and step time over the steady steps of this session; memory is the peak of "
          "training, parameters, gradients and AdamW states included)")
    print(f"{'backend':13s} {'steps':>5s} {'loss(last10)':>12s} {'held-out':>8s} {'tokens/s':>12s} "
          f"{'step ms':>9s} {'peak MiB':>9s}  expert usage / unevenness per PEER block")
    for name, r in result["backends"].items():
        last = statistics.fmean(r["loss"][-10:]) if r["loss"] else float("nan")
        usage = ", ".join(f"{u['layer']}: {100 * u['usage']:.1f}% / {u['unevenness']:.3f}"
                          for u in r["expert_usage"])
        tok = f"{r['tokens_per_s']:12,.0f}" if r["tokens_per_s"] else f"{'-':>12s}"
        ms = f"{r['step_ms_median']:9.1f}" if r["step_ms_median"] else f"{'-':>9s}"
        mem = f"{r['peak_mem_mb']:9.0f}" if r["peak_mem_mb"] is not None else f"{'n/a':>9s}"
        print(f"{name:13s} {r['steps']:5d} {last:12.4f} {r['eval_loss']:8.4f} {tok} {ms} {mem}  {usage}")
    for pair, s in result["speedup"].items():
        print(f"speed-up {pair}: {s:.2f}x tokens/s")
    for pair, c in result["agreement"].items():
        print(f"loss curves {pair}: {'OK' if c['ok'] else 'DISAGREE'} over {c['steps']} steps: max |diff| "
              f"{c['max_abs_diff_early']:.2e} over the first {c['early_steps']}, {c['max_abs_diff']:.2e} over all; "
              f"mean of the last {c['mean_last_steps']} {c['mean_last'][0]:.4f} vs {c['mean_last'][1]:.4f} "
              f"({100 * c['rel_diff_mean_last']:.2f}%); rule: {c['rule']}")


# ---- main ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model and training (defaults depend on CUDA / CPU; saved in checkpoints)")
    g.add_argument("--dim", type=int)
    g.add_argument("--layers", type=int, help="transformer blocks")
    g.add_argument("--attn-heads", type=int)
    g.add_argument("--seq-len", type=int)
    g.add_argument("--batch", type=int, help="sequences per step (tokens per step = batch * seq-len)")
    g.add_argument("--peer-layers", help="blocks whose FFN is PEER: '2', '1,3', 'all' or 'none' (default: middle)")
    g.add_argument("--experts", type=int, help="N, a perfect square")
    g.add_argument("--peer-heads", type=int)
    g.add_argument("--k", type=int, help="experts per PEER head")
    g.add_argument("--dim-key", type=int, help="PEER query size per head (both halves)")
    g.add_argument("--mlp-mult", type=int, help="hidden width of the dense FFNs / dim")
    g.add_argument("--steps", type=int, help="length of the run (the learning-rate schedule ends there)")
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup", type=int)
    g.add_argument("--min-lr-frac", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--clip", type=float, help="gradient-norm clip (0: none)")
    g.add_argument("--seed", type=int)
    g.add_argument("--dtype", choices=("bf16", "fp32"), help="bf16: autocast with fp32 master weights")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when available (its sizes, dtype and backends are the defaults)")
    g.add_argument("--data", help="train on this file instead of the Python standard library's sources")
    r = ap.add_argument_group("run")
    r.add_argument("--backends", help="comma list of triton, torch, peer-pytorch; 'name:S' stops that backend "
                                      "at step S (default: all three on CUDA, torch on the CPU)")
    r.add_argument("--eval-batches", type=int, default=None, help="held-out batches for loss and expert usage")
    r.add_argument("--log-every", type=int, default=0)
    r.add_argument("--save", help="folder: one checkpoint per backend (<backend>.pt) at the end of its steps")
    r.add_argument("--save-every", type=int, default=0, help="also save every this many steps")
    r.add_argument("--resume", help="checkpoint folder: continue each backend saved there (the config comes from "
                                    "the checkpoint)")
    r.add_argument("--out", help="JSON of the run (default bench/out/train_<device>_<date>.json, git-ignored; PNG beside)")
    r.add_argument("--plot-only", metavar="RUN.json", help="only draw the PNG of an existing JSON")
    return ap


def make_config(args, device: torch.device, resume_cfg: dict | None) -> Config:
    fields = [f.name for f in dataclasses.fields(Config)]
    given = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if resume_cfg is not None:
        base = dict(resume_cfg)
        base["peer_layers"] = tuple(base["peer_layers"])
        if "peer_layers" in given:
            given["peer_layers"] = parse_peer_layers(given["peer_layers"], given.get("layers", base["layers"]))
        clash = {f: (v, base[f]) for f, v in given.items() if v != base[f]}
        if clash:
            desc = ", ".join(f"--{f.replace('_', '-')} {v} (checkpoint: {c})" for f, (v, c) in clash.items())
            raise SystemExit(f"--resume: the run's config comes from the checkpoint; these options differ: {desc}")
        return Config(**base)
    base = dict(GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS)
    base.update(given)
    base["peer_layers"] = parse_peer_layers(base["peer_layers"] or str(base["layers"] // 2), base["layers"])
    return Config(**base)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), Path(args.plot_only).with_suffix(".png"))
        return 0
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if use_cuda else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    # backends: from --backends, else the checkpoint folder's, else the device default
    if args.backends:
        plan = parse_backends(args.backends)
    elif args.resume:
        plan = [(b, None) for b in BACKENDS if checkpoint_path(args.resume, b).exists()]
        if not plan:
            raise SystemExit(f"--resume: no checkpoint (<backend>.pt) in {args.resume}")
    else:
        plan = parse_backends("triton,torch,peer-pytorch" if device.type == "cuda" else "torch")
    pp_version = peer_pytorch_version()
    if any(b == "peer-pytorch" for b, _ in plan) and pp_version is None:
        print("note: peer-pytorch is not installed (pip install '.[bench]'); skipping the peer-pytorch backend")
        plan = [(b, s) for b, s in plan if b != "peer-pytorch"]
    if not plan:
        raise SystemExit("no backend to run")

    resume_states = {b: load_checkpoint(args.resume, b) for b, _ in plan} if args.resume else {}
    cfgs = {json.dumps(s["config"], sort_keys=True) for s in resume_states.values()}
    if len(cfgs) > 1:
        raise SystemExit(f"--resume: the checkpoints in {args.resume} have different configs")
    cfg = make_config(args, device, json.loads(cfgs.pop()) if cfgs else None)
    if args.eval_batches is None:
        args.eval_batches = 8 if device.type == "cuda" else 4

    data, data_info = load_corpus(cfg.data)
    for b, s in resume_states.items():
        if s["data_sha256"] != data_info["sha256"]:
            raise SystemExit(f"--resume: the corpus differs from the one {b}'s checkpoint was trained on "
                             f"(sha256 {s['data_sha256'][:12]} vs {data_info['sha256'][:12]})")
    train, val = split_corpus(data, cfg.seq_len)

    print(f"peer-kernels {pk.__version__} | torch {torch.__version__} | triton {triton.__version__} | "
          f"peer-pytorch {pp_version or 'not installed'} | {where}")
    src = f"{data_info['files']} stdlib files of Python {data_info['python']}" if cfg.data is None else cfg.data
    print(f"data: {src}, {data_info['bytes'] / 2**20:.1f} MiB ({train.numel():,} train / {val.numel():,} held-out "
          f"bytes), byte tokens")
    print(f"model: {cfg.layers} blocks, d={cfg.dim}, {cfg.attn_heads} attention heads, seq {cfg.seq_len}; PEER "
          f"(N={cfg.experts}, H={cfg.peer_heads}, k={cfg.k}, Dk={cfg.dim_key}) in blocks {list(cfg.peer_layers)}, "
          f"dense MLP x{cfg.mlp_mult} elsewhere")
    print(f"training: {cfg.steps} steps of {cfg.tokens_per_step} tokens, AdamW lr {cfg.lr} (warm-up {cfg.warmup}, "
          f"cosine), {cfg.dtype}{' autocast, fp32 master weights' if cfg.dtype == 'bf16' else ''}, seed {cfg.seed}")
    if device.type == "cpu":
        print("note: no CUDA GPU: CPU timings; the triton backend would run in the Triton interpreter (slow)")

    t_run = time.perf_counter()
    rows = {}
    for backend, stop in plan:
        stop = min(cfg.steps, stop or cfg.steps)
        rows[backend] = run_backend(backend, stop, cfg, train, val, data_info, device, args,
                                    resume_states.pop(backend, None))

    def speed(a, b):
        ta, tb = rows[a]["tokens_per_s"], rows[b]["tokens_per_s"]
        return ta / tb if ta and tb else None

    pairs = [(a, b) for a, b in (("triton", "torch"), ("triton", "peer-pytorch"), ("peer-pytorch", "torch"))
             if a in rows and b in rows]
    result = dict(
        device=where, gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        torch=torch.__version__, triton=triton.__version__, peer_kernels=pk.__version__, peer_pytorch=pp_version,
        python=platform.python_version(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        command=" ".join(["python", "bench/train.py", *(sys.argv[1:] if argv is None else argv)]),
        wall_s=time.perf_counter() - t_run, config=dataclasses.asdict(cfg), data=data_info, backends=rows,
        speedup={f"{a}_vs_{b}": speed(a, b) for a, b in pairs[:2] if speed(a, b)},
        agreement={f"{a}_vs_{b}": compare_curves(rows[a]["loss"], rows[b]["loss"], cfg.dtype == "fp32")
                   for a, b in (("triton", "torch"), ("peer-pytorch", "torch")) if a in rows and b in rows})
    result["agreement"] = {k: v for k, v in result["agreement"].items() if v is not None}
    summarize(result)
    print(f"total {fmt_time(result['wall_s'])}")

    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else \
        ROOT / "bench" / "out" / f"train_{harness.device_slug(where) if device.type == 'cuda' else 'cpu'}_{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"results: {out}")
    plot(result, out.with_suffix(".png"))
    check = result["agreement"].get("triton_vs_torch")
    if check is not None and not check["ok"]:
        print("FAILED: the triton and torch loss curves disagree beyond the tolerance")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
