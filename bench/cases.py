"""The cases of the benchmark suite (bench/run.py): what is measured, at which sizes,
through which backends, and how many bytes and FLOPs each pass must at least move.

Cases: product_key_topk, peer_experts and the PEER layer; passes fwd (forward with
autograd recording, as in training), bwd (backward alone, on a retained graph) and
fwd+bwd. Gradients are set to None before every call, as after optimizer.zero_grad().

Backends, same inputs and weights for all:
    triton        peer-kernels' Triton kernels (in the interpreter on the CPU)
    triton-atomic peer_experts with backward="atomic" (paper config only)
    torch         the pure-PyTorch reference (peer_kernels.reference, via backend="torch")
    compile       the same reference under torch.compile (dynamic=False: one static graph per shape)
    peer-pytorch  PEER_pytorch.PEER with the equivalent config (layer only: it has no
                  standalone ops), our weights copied into it

Skewed ids (peer_experts, ids="zipf<s>"): each (token, slot) draws expert rank r with
probability proportional to r^-s over the N ranks, ranks mapped to ids by a random
permutation; s = 1.0 by default (--zipf-exponent).
"""
from __future__ import annotations

import math

import torch

import peer_kernels as pk
from peer_kernels import reference as ref

PASSES = ("fwd", "bwd", "fwd+bwd")
BACKENDS = ("triton", "triton-atomic", "torch", "compile", "peer-pytorch")
PEERS = ("torch", "compile", "peer-pytorch")  # what users would otherwise use

try:
    from PEER_pytorch import PEER as PeerPytorch
except ImportError:  # the `bench` extra is not installed: the peer-pytorch rows are skipped
    PeerPytorch = None

# ---- sizes ------------------------------------------------------------------------
# Each case: the main configuration (the paper config of DESIGN.md on a GPU) and the
# one-parameter sweeps around it. A config's tags name the sweeps it belongs to; the main
# config belongs to all. "quick" keeps the main config (and the Zipf ids).

_GPU = {
    "product_key_topk": (dict(T=4096, H=8, k=16, n=1024, Dk=128, shared=False),
                         {"T": (1024, 16384), "H": (4, 16), "n": (256,), "shared": (True,)}),
    "peer_experts": (dict(T=4096, D=1024, N=1024**2, H=8, k=16, ids="uniform"),
                     {"T": (1024, 16384), "D": (2048,), "H": (4, 16), "N": (256**2,), "ids": ("zipf",)}),
    "PEER": (dict(T=4096, D=1024, N=1024**2, H=8, k=16, Dk=128),
             {"T": (1024, 16384), "D": (2048,)}),
}
# CPU: tiny sizes so that the Triton interpreter finishes in seconds
_CPU = {
    "product_key_topk": (dict(T=16, H=2, k=2, n=8, Dk=16, shared=False), {"T": (8, 32)}),
    "peer_experts": (dict(T=16, D=16, N=16, H=2, k=2, ids="uniform"), {"T": (8, 32), "ids": ("zipf",)}),
    "PEER": (dict(T=16, D=16, N=16, H=2, k=2, Dk=16), {"T": (8, 32)}),
}
CASES = tuple(_GPU)
ALIASES = {"retrieval": "product_key_topk", "topk": "product_key_topk", "product_key_topk": "product_key_topk",
           "experts": "peer_experts", "peer_experts": "peer_experts", "layer": "PEER", "peer": "PEER"}
# torch.compile rows: main config and the T, D and ids sweeps (a new shape is a recompile,
# tens of seconds each; the H*k, N and shared-keys points would add one each)
COMPILE_TAGS = {"main", "T", "D", "ids"}
# the sweep a varied size belongs to (H is swept as H*k, n as N = n^2)
_SWEEP_TAG = {"T": "T", "D": "D", "H": "HK", "n": "N", "N": "N", "shared": "shared", "ids": "ids"}


def plan(case: str, device: str, quick: bool, zipf_exponent: float) -> list[tuple[dict, tuple[str, ...]]]:
    """[(config, tags)], the main config first."""
    base, sweeps = (_GPU if device == "cuda" else _CPU)[case]
    out = [(dict(base), ("main",) + tuple(sorted(set(_SWEEP_TAG[s] for s in sweeps))))]
    for size, values in sweeps.items():
        if quick and size != "ids":
            continue
        for v in values:
            if size == "ids":
                v = f"zipf{zipf_exponent:g}"
            out.append(({**base, size: v}, (_SWEEP_TAG[size],)))
    return out


def backends_for(case: str, config: dict, tags, wanted) -> list[tuple[str, str]]:
    """[(backend, pass)] run at this config."""
    out = []
    for b in wanted:
        if b == "peer-pytorch" and case != "PEER":
            continue
        if b == "triton-atomic" and (case != "peer_experts" or "main" not in tags):
            continue
        if b == "compile" and not set(tags) & COMPILE_TAGS:
            continue
        for p in PASSES:
            if b == "triton-atomic" and p == "fwd":  # the same forward as "triton"
                continue
            out.append((b, p))
    return out


# ---- bytes and FLOPs ----------------------------------------------------------------
# Useful bytes: what the pass must move between memory and the chip at least once
# (inputs, parameters and outputs; no intermediates). FLOPs: multiply-adds x 2.

def _esize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _retrieval_bytes(T, H, n, Dk, k, shared, es):
    keys = (1 if shared else H) * n * Dk * es
    q = T * H * Dk * es
    out = T * H * k * (4 + 8)  # fp32 scores, int64 ids
    fwd = q + keys + out
    bwd = T * H * k * (4 + 8) + 2 * q + 2 * keys  # d-scores and ids; q read, dq written; keys read, d-keys written
    return fwd, bwd


def _retrieval_flops(T, H, n, Dk, k):
    return 2 * T * H * n * Dk, 4 * T * H * k * Dk  # all sub-key scores; dq and d-keys of the k selected pairs


def _experts_bytes(T, D, N, H, k, es):
    rows = 2 * T * H * k * D * es  # the gathered rows of down and up
    slots = T * H * k
    fwd = rows + 2 * T * D * es + slots * (8 + es)  # x in, y out, ids and gates
    bwd = rows + 2 * N * D * es + 3 * T * D * es + slots * (8 + 2 * es + 4)  # dense grad tables, x, dy, dx,
    return fwd, bwd                                                        # ids, gates, d-gates, pre-activations


def _experts_flops(T, D, H, k):
    return 4 * T * H * k * D, 8 * T * H * k * D


def pass_bytes_flops(case: str, c: dict, pass_: str, dtype) -> tuple[int, int]:
    es = _esize(dtype)
    if case == "product_key_topk":
        (bf, bb), (ff, fb) = (_retrieval_bytes(c["T"], c["H"], c["n"], c["Dk"], c["k"], c["shared"], es),
                              _retrieval_flops(c["T"], c["H"], c["n"], c["Dk"], c["k"]))
    elif case == "peer_experts":
        (bf, bb), (ff, fb) = (_experts_bytes(c["T"], c["D"], c["N"], c["H"], c["k"], es),
                              _experts_flops(c["T"], c["D"], c["H"], c["k"]))
    else:  # the layer: query projection + retrieval + experts, intermediates not counted
        T, D, N, H, k, Dk = (c[s] for s in ("T", "D", "N", "H", "k", "Dk"))
        n = math.isqrt(N)
        wq = D * H * Dk * es
        rf, rb = _retrieval_bytes(T, H, n, Dk, k, False, es)
        ef, eb = _experts_bytes(T, D, N, H, k, es)
        q, out = T * H * Dk * es, T * H * k * (4 + 8)
        bf = wq + (rf - q - out) + ef  # x, W_q, keys, rows, y (ids, gates, q are intermediates)
        bb = 2 * wq + (rb - 2 * q - out) + eb
        r_ff, r_fb = _retrieval_flops(T, H, n, Dk, k)
        e_ff, e_fb = _experts_flops(T, D, H, k)
        ff, fb = 2 * T * D * H * Dk + r_ff + e_ff, 4 * T * D * H * Dk + r_fb + e_fb
    return {"fwd": (bf, ff), "bwd": (bb, fb), "fwd+bwd": (bf + bb, ff + fb)}[pass_]


# ---- inputs -------------------------------------------------------------------------

def zipf_ids(shape, num: int, exponent: float, generator: torch.Generator, device) -> torch.Tensor:
    """int64 ids [shape] in [0, num): rank r (1-based) drawn with p ~ r^-exponent, ranks
    mapped to ids by a random permutation (hot experts scattered over the table)."""
    ranks = torch.arange(1, num + 1, dtype=torch.float64)
    p = ranks.pow(-exponent)
    p = (p / p.sum()).to(device=device, dtype=torch.float32)
    perm = torch.randperm(num, generator=generator, device="cpu").to(device)
    draws = torch.multinomial(p, math.prod(shape), replacement=True,
                              generator=generator if device == "cpu" else None)
    return perm[draws].view(shape)


def hpd_to_phd(layer: "pk.PEER", t: torch.Tensor) -> torch.Tensor:
    """Query features of `layer` ordered (head, half, d) -> peer-pytorch's (half, head, d),
    along dim 0 of t ([(h p d), ...]: W_q rows, query-BatchNorm channels)."""
    heads, half = layer.heads, layer.dim_key // 2
    return t.reshape(heads, 2, half, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def copy_into_peer_pytorch(layer: "pk.PEER", pp) -> None:
    """Our weights into a peer-pytorch PEER of the same config (the inverse of
    PEER.from_peer_pytorch): W_q rows (h, p, d) -> (p, h, d); sub_keys [h, p, n, d] ->
    keys [h, n, p, d]; down / up tables as they are."""
    with torch.no_grad():
        pp.to_queries[0].weight.copy_(hpd_to_phd(layer, layer.query_proj.weight))
        pp.keys.copy_(layer.sub_keys.transpose(1, 2))
        pp.weight_down_embed.weight.copy_(layer.down)
        pp.weight_up_embed.weight.copy_(layer.up)


def build_peer_pytorch(layer: "pk.PEER", device, dtype):
    """peer-pytorch's PEER with the layer's config (softmax gates, GELU, its dropout; no
    query norm: it has none) and its weights, or None when peer-pytorch is not installed.
    Built on the meta device: every parameter is then copied from the layer, so the
    random init of its two N x D tables would be wasted."""
    if PeerPytorch is None:
        return None
    with torch.device("meta"):
        pp = PeerPytorch(layer.dim, heads=layer.heads, num_experts=layer.num_experts, num_experts_per_head=layer.k,
                         dim_key=layer.dim_key // 2, product_key_topk=layer.candidates, non_competing_scores=False,
                         activation=torch.nn.GELU, dropout=layer.dropout.p)
    pp = pp.to_empty(device=device).to(dtype)
    copy_into_peer_pytorch(layer, pp)
    return pp


class _Compiled:
    """torch.compile'd references, one per function, shared by all configs. dynamic=False:
    one static graph per shape, as a user with fixed shapes gets (with the default, the
    second shape turns on dynamic shapes and every later graph is the slower dynamic one:
    the Zipf row, same shape as the main one, measured 3.79 instead of 2.48 ms). The
    recompile limit is raised so that it never falls back to eager silently, and donated
    buffers are off: the bwd rows run the backward of one graph again and again
    (retain_graph=True), which a graph with donated buffers refuses."""

    def __init__(self):
        self._fns = {}

    @staticmethod
    def configure():
        import torch._dynamo.config as dcfg

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(64, getattr(dcfg, name)))
        import torch._functorch.config as fcfg

        if hasattr(fcfg, "donated_buffer"):
            fcfg.donated_buffer = False

    def get(self, name, fn):
        if name not in self._fns:
            self.configure()
            self._fns[name] = torch.compile(fn, dynamic=False)
        return self._fns[name]


COMPILED = _Compiled()


class State:
    """The inputs of one case at one config: tensors (leaves with requires_grad), the
    output gradient, and for the layer the modules."""

    def __init__(self, case: str, c: dict, device: str, dtype, seed: int = 0):
        self.case, self.c, self.device, self.dtype = case, c, device, dtype
        torch.manual_seed(seed)
        g = torch.Generator(device="cpu").manual_seed(seed)
        gd = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape, scale=1.0, dt=dtype, grad=True):
            t = (torch.randn(*shape, generator=gd, device=device, dtype=torch.float32) * scale).to(dt)
            return t.requires_grad_(grad)

        if case == "product_key_topk":
            T, H, k, n, Dk = c["T"], c["H"], c["k"], c["n"], c["Dk"]
            self.q = randn(T, H, Dk)
            self.keys = randn(*((2, n, Dk // 2) if c["shared"] else (H, 2, n, Dk // 2)), scale=(2 / Dk) ** 0.5)
            self.dy = randn(T, H, k, dt=torch.float32, grad=False)
            self.leaves = [self.q, self.keys]
        elif case == "peer_experts":
            T, D, N, H, k = c["T"], c["D"], c["N"], c["H"], c["k"]
            self.x = randn(T, D)
            self.down = randn(N, D, scale=D**-0.5)
            self.up = randn(N, D, scale=D**-0.5)
            self.gates = torch.softmax(randn(T, H, k, dt=torch.float32, grad=False), -1).to(dtype).requires_grad_()
            if c["ids"] == "uniform":
                self.idx = torch.randint(0, N, (T, H, k), generator=gd, device=device)
            else:
                self.idx = zipf_ids((T, H, k), N, float(c["ids"][len("zipf"):]), g, device)
            self.dy = randn(T, D, grad=False)
            self.leaves = [self.x, self.gates, self.down, self.up]
        else:
            T, D, N, H, k, Dk = (c[s] for s in ("T", "D", "N", "H", "k", "Dk"))
            self.layer = pk.PEER(D, num_experts=N, heads=H, k=k, dim_key=Dk, device=device, dtype=dtype)
            self.x = randn(1, T, D)  # [batch, tokens, dim]: peer-pytorch takes [b, n, d] only
            self.dy = randn(1, T, D, grad=False)
            self.pp = self.compiled = None
            self.leaves = [self.x, *self.layer.parameters()]

    def peer_pytorch(self):
        if self.pp is None:
            self.pp = build_peer_pytorch(self.layer, self.device, self.dtype)
        return self.pp

    def forward_fn(self, backend: str):
        """backend -> a function running the forward and returning the tensor to
        differentiate, and the leaves that receive gradients."""
        c = self.c
        if self.case == "product_key_topk":
            if backend == "compile":
                f = COMPILED.get("product_key_topk", ref.product_key_topk)
                return (lambda: f(self.q, self.keys, c["k"], c["k"])[0]), self.leaves
            return (lambda: pk.product_key_topk(self.q, self.keys, c["k"], backend=backend)[0]), self.leaves
        if self.case == "peer_experts":
            args = (self.x, self.idx, self.gates, self.down, self.up)
            if backend == "compile":
                f = COMPILED.get("peer_experts", ref.peer_experts)
                return (lambda: f(*args)), self.leaves
            if backend == "triton-atomic":
                return (lambda: pk.peer_experts(*args, backend="triton", backward="atomic")), self.leaves
            return (lambda: pk.peer_experts(*args, backend=backend)), self.leaves
        if backend == "peer-pytorch":
            pp = self.peer_pytorch()
            if pp is None:
                raise RuntimeError("peer-pytorch is not installed")
            return (lambda: pp(self.x)), [self.x, *pp.parameters()]
        layer = self.layer
        if backend == "compile":
            if self.compiled is None:  # per layer, freed with it
                COMPILED.configure()
                self.compiled = torch.compile(layer, dynamic=False)
            f = self.compiled

            def run():
                layer.backend = "torch"
                return f(self.x)

            return run, self.leaves

        def run():
            layer.backend = backend
            return layer(self.x)

        return run, self.leaves


class Runner:
    """fn() runs one pass; clear() drops the leaves' gradients; grad_bytes is the size of
    the gradients fn() creates (subtracted from its peak memory)."""

    def __init__(self, state: State, backend: str, pass_: str):
        forward, leaves = state.forward_fn(backend)
        dy = state.dy

        def clear():
            for p in leaves:
                p.grad = None

        self.clear = clear
        self.grad_bytes = 0 if pass_ == "fwd" else sum(p.numel() * p.element_size() for p in leaves)
        if pass_ == "fwd":
            self.fn = forward
        elif pass_ == "fwd+bwd":
            def fwd_bwd():
                clear()
                forward().backward(dy)

            self.fn = fwd_bwd
        else:
            y = forward()  # the graph is kept; every call runs the backward again

            def bwd():
                clear()
                y.backward(dy, retain_graph=True)

            self.fn = bwd
