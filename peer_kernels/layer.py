"""PEER: the nn.Module of the layer (He 2024, "Mixture of A Million Experts").

Chain: pre-RMSNorm -> query projection -> query norm -> product_key_topk (retrieval.py)
-> gates -> dropout -> peer_experts (experts.py). The math is DESIGN.md sec. 1.

    y = sum_h sum_{e in top-k(h)} g_{h,e} * act(down[e] . x) * up[e]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .checks import BACKENDS, is_perfect_square
from .experts import BACKWARD_MODES, peer_experts
from .reference import ACTIVATIONS
from .retrieval import product_key_topk

__all__ = ["PEER"]

GATES = ("softmax", "relu", "sigmoid")
QUERY_NORMS = ("batch", "layer", None)
# activation given as an nn.Module class (peer-pytorch style) -> our name
_ACTIVATION_MODULES = {nn.GELU: "gelu", nn.ReLU: "relu", nn.SiLU: "silu", nn.Identity: "identity"}
# peer-pytorch keyword -> ours (non_competing_scores is handled apart: it sets gate and k)
_ALIASES = {
    "num_experts_per_head": "k",
    "product_key_topk": "candidates",
    "separate_embed_per_head": "separate_experts_per_head",
    "non_competing_scores": "gate",
}


class _Default:
    """A keyword's default that prints as its value, so that an explicit argument can be
    told apart from the default (needed to refuse an alias given with its native name)."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return repr(self.value)


def _activation_name(activation) -> str:
    """'gelu' | 'relu' | 'silu' | 'identity', or nn.GELU / nn.ReLU / nn.SiLU / nn.Identity
    (the class or an instance; GELU only in its exact erf form) -> our name."""
    if isinstance(activation, str):
        if activation in ACTIVATIONS:
            return activation
    elif isinstance(activation, type):
        if activation in _ACTIVATION_MODULES:
            return _ACTIVATION_MODULES[activation]
    elif isinstance(activation, nn.Module) and type(activation) in _ACTIVATION_MODULES:
        if isinstance(activation, nn.GELU) and activation.approximate != "none":
            raise ValueError(f"activation: nn.GELU(approximate={activation.approximate!r}) is not supported, "
                             "only the exact (erf) GELU")
        return _ACTIVATION_MODULES[type(activation)]
    raise ValueError(f"activation must be one of {ACTIVATIONS} or one of the nn.Module classes "
                     f"{[c.__name__ for c in _ACTIVATION_MODULES]}, got {activation!r}")


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


class _RMSNorm(nn.Module):
    """peer-pytorch's RMSNorm: normalize(x) * sqrt(dim) * (gamma + 1), gamma zero-init."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale * (self.gamma + 1)


class PEER(nn.Module):
    r"""Parameter Efficient Expert Retrieval layer (He 2024): a drop-in FFN replacement
    with `num_experts` single-neuron experts, `heads` retrieval heads of `k` experts each.

    For a token x [dim]:
        x  = RMSNorm(x)                                   (if pre_rmsnorm)
        q  = query_norm(W_q x)          [heads, dim_key]
        s, e = product_key_topk(q, sub_keys, k, candidates)   per head, s sorted desc
        g  = dropout(gate(s))           softmax over the k experts of a head, or relu / sigmoid
        y  = sum_{h, j} g[h, j] * act(down[e[h, j]] . x) * up[e[h, j]]

    Args:
        dim: model width D (input and output size).
        num_experts: N, a perfect square n^2 (expert id e = i * n + j).
        heads: H retrieval heads.
        k: experts per head (default 16).
        dim_key: Dk, the FULL per-head query size; each of the two product-key halves
            has Dk/2. NOTE: peer-pytorch's `dim_key` is the size of ONE half, so its
            `dim_key=d` is our `dim_key=2*d`. Passing `dim_key` to this class always
            means ours (also when the other peer-pytorch keywords are used);
            `PEER.from_peer_pytorch` does the conversion.
        candidates: sub-keys kept per half before pairing (k <= candidates^2,
            candidates <= n). Default: min(k, n), which gives the exact top-k over all
            N product keys.
        query_norm: "batch" (BatchNorm1d over the heads*dim_key query features, statistics
            over all tokens of the call: running statistics in eval mode; one token in
            training mode raises ValueError, as BatchNorm cannot estimate a variance
            from one sample), "layer" (one LayerNorm(dim_key) applied to each head's
            query, parameters shared by the heads) or None.
        shared_keys: one set of sub-keys for all heads ([2, n, Dk/2], the paper) instead
            of one per head ([H, 2, n, Dk/2], peer-pytorch).
        gate: "softmax" over the k scores of a head (paper), "relu" or "sigmoid"
            (non-competing, Csordas et al. 2023).
        activation: expert activation "gelu" (erf), "relu", "silu", "identity", or the
            nn.Module class nn.GELU / nn.ReLU / nn.SiLU / nn.Identity.
        separate_experts_per_head: one pool of N experts per head (tables of H*N rows;
            head h uses rows h*N .. h*N + N - 1).
        dropout: dropout probability on the gates. Since y is linear in each gate, this
            is exactly dropout on the experts' hidden activations act(down . x) (what
            peer-pytorch does): same masks, same scaling, same output and gradients.
        pre_rmsnorm: peer-pytorch's RMSNorm on the input (the experts see the normed x).
        backend: "auto" | "triton" | "torch", passed to both ops.
        deterministic: passed to peer_experts (None: follows
            torch.are_deterministic_algorithms_enabled()).
        backward: the expert backward, passed to peer_experts: None or "sorted" (its
            default: pairs sorted by expert id, deterministic, no atomics) or "atomic"
            (fp32 atomics into fp32 scratch tables of 2 x N x D: more memory, not
            deterministic, slower on the H200). Neither syncs with the host; the sorted
            one was captured by CUDA graphs (torch.compile mode="reduce-overhead") in a
            test on the H200, the atomic one's test failed there (README, training).
        device, dtype: factory keywords for the parameters.

    peer-pytorch keyword names are accepted as aliases: `num_experts_per_head` (k),
    `product_key_topk` (candidates), `separate_embed_per_head`
    (separate_experts_per_head) and `non_competing_scores`: True means gate="relu" with
    only the top-1 expert per head, as in peer-pytorch (k=1, and candidates defaults
    to the requested experts per head, `num_experts_per_head` or `k`); False means
    gate="softmax". peer-pytorch's default is non_competing_scores=True, ours is
    gate="softmax": pass it explicitly to get its behaviour. `pre_rmsnorm`, `dropout`,
    `heads`, `num_experts` and an nn.Module class `activation` have the same meaning in
    both; `dim_key` does not (see above). An alias given together with its native name
    (or non_competing_scores with gate) raises TypeError, as does an unknown keyword.

    Initialisation (`reset_parameters`):
        - query projection W_q: nn.Linear's default (Kaiming-uniform, U(+-1/sqrt(dim))).
        - sub_keys ~ N(0, 1/(Dk/2)): for unit-variance queries (e.g. after the query
          BatchNorm) each half score q_half . c has unit variance.
        - down ~ N(0, 1/dim): for unit-variance x the pre-activation down[e] . x has unit
          variance.
        - up ~ N(0, 1/(heads*k)): per token the layer is an MLP of width heads*k whose
          output layer is `up`; this is the fan-in (LeCun) init of that layer, so the
          output keeps the scale of the hidden activations times the gates, whatever
          heads and k are.
        - query norm: weight 1, bias 0 (LayerNorm / BatchNorm defaults); RMSNorm gamma 0.

    Shapes: forward(x [..., dim]) -> [..., dim] in x's dtype, any leading shape.
    """

    def __init__(self, dim: int, *, num_experts: int = 1024 ** 2, heads: int = 8, k=_Default(16),
                 dim_key: int = 128, candidates=_Default(None), query_norm: str | None = "batch",
                 shared_keys: bool = False, gate=_Default("softmax"), activation="gelu",
                 separate_experts_per_head=_Default(False), dropout: float = 0.0, pre_rmsnorm: bool = False,
                 backend: str = "auto", deterministic: bool | None = None, backward: str | None = None,
                 device=None, dtype=None, **peer_pytorch_aliases):
        super().__init__()
        native = {"k": k, "candidates": candidates, "gate": gate,
                  "separate_experts_per_head": separate_experts_per_head}
        unknown = sorted(set(peer_pytorch_aliases) - set(_ALIASES))
        if unknown:
            raise TypeError(f"PEER got unexpected keyword argument(s) {unknown}; peer-pytorch aliases accepted: "
                            f"{sorted(_ALIASES)}")
        for alias, value in peer_pytorch_aliases.items():
            ours = _ALIASES[alias]
            if not isinstance(native[ours], _Default):
                raise TypeError(f"PEER got both {ours!r} and its peer-pytorch alias {alias!r}; pass one")
        for alias in ("num_experts_per_head", "product_key_topk", "separate_embed_per_head"):
            if alias in peer_pytorch_aliases:
                native[_ALIASES[alias]] = peer_pytorch_aliases[alias]
        native = {n: (v.value if isinstance(v, _Default) else v) for n, v in native.items()}
        k, candidates, gate = native["k"], native["candidates"], native["gate"]
        if "non_competing_scores" in peer_pytorch_aliases:
            if peer_pytorch_aliases["non_competing_scores"]:
                # peer-pytorch: ReLU scores and only the top-1 of the candidates^2 pairs
                gate, candidates, k = "relu", (k if candidates is None else candidates), 1
            else:
                gate = "softmax"

        # ---- validation: a ValueError naming the argument ----
        self.dim = _positive_int("dim", dim)
        self.num_experts = _positive_int("num_experts", num_experts)
        if not is_perfect_square(num_experts):
            raise ValueError(f"num_experts must be a perfect square n*n (product keys), got {num_experts}")
        self.num_keys = math.isqrt(num_experts)
        self.heads = _positive_int("heads", heads)
        self.k = _positive_int("k", k)
        self.dim_key = _positive_int("dim_key", dim_key)
        if dim_key % 2:
            raise ValueError(f"dim_key must be even (the query is split in two halves), got {dim_key}")
        if candidates is None:
            candidates = min(self.k, self.num_keys)
        self.candidates = _positive_int("candidates", candidates)
        if candidates > self.num_keys:
            raise ValueError(f"candidates={candidates} is larger than the number of sub-keys "
                             f"n=sqrt(num_experts)={self.num_keys}")
        if self.k > candidates * candidates:
            raise ValueError(f"k={self.k} is larger than candidates^2={candidates * candidates} "
                             f"(candidates={candidates})")
        if query_norm not in QUERY_NORMS:
            raise ValueError(f"query_norm must be one of {QUERY_NORMS}, got {query_norm!r}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        self.activation = _activation_name(activation)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if deterministic not in (None, True, False):
            raise ValueError(f"deterministic must be None, True or False, got {deterministic!r}")
        if backward is not None and backward not in BACKWARD_MODES:
            raise ValueError(f"backward must be None or one of {BACKWARD_MODES}, got {backward!r}")
        if deterministic and backward == "atomic":
            raise ValueError("backward='atomic' is not deterministic; use backward='sorted' (or None) with "
                             "deterministic=True")
        self.query_norm_type = query_norm
        self.shared_keys = bool(shared_keys)
        self.gate = gate
        self.separate_experts_per_head = bool(native["separate_experts_per_head"])
        self.pre_rmsnorm = bool(pre_rmsnorm)
        self.backend = backend
        self.deterministic = deterministic
        self.backward = backward

        # ---- modules and parameters ----
        fk = {"device": device, "dtype": dtype}
        self.norm = _RMSNorm(dim, **fk) if pre_rmsnorm else nn.Identity()
        self.query_proj = nn.Linear(dim, heads * dim_key, bias=False, **fk)
        if query_norm == "batch":
            self.query_norm = nn.BatchNorm1d(heads * dim_key, **fk)
        elif query_norm == "layer":
            self.query_norm = nn.LayerNorm(dim_key, **fk)
        else:
            self.query_norm = nn.Identity()
        key_shape = (2, self.num_keys, dim_key // 2)
        self.sub_keys = nn.Parameter(torch.empty(key_shape if shared_keys else (heads, *key_shape), **fk))
        rows = num_experts * (heads if self.separate_experts_per_head else 1)
        self.down = nn.Parameter(torch.empty(rows, dim, **fk))
        self.up = nn.Parameter(torch.empty(rows, dim, **fk))
        self.dropout = nn.Dropout(float(dropout))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise every parameter as documented in the class docstring."""
        self.query_proj.reset_parameters()
        if not isinstance(self.query_norm, nn.Identity):  # BatchNorm1d, LayerNorm, or SyncBatchNorm after
            self.query_norm.reset_parameters()            # nn.SyncBatchNorm.convert_sync_batchnorm
        if isinstance(self.norm, _RMSNorm):
            self.norm.gamma.zero_()
        nn.init.normal_(self.sub_keys, std=(2.0 / self.dim_key) ** 0.5)
        nn.init.normal_(self.down, std=self.dim ** -0.5)
        nn.init.normal_(self.up, std=(self.heads * self.k) ** -0.5)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] (already pre-normed) -> normalised queries [..., H, Dk]."""
        q = self.query_proj(x)  # [..., H*Dk]
        if self.query_norm_type == "batch":
            flat = q.reshape(-1, q.shape[-1])  # [T, H*Dk]: statistics over all tokens
            if self.training and flat.shape[0] == 1:
                raise ValueError("PEER with query_norm='batch' got 1 token in training mode: BatchNorm needs more "
                                 "than one token per call to estimate the batch statistics; call .eval() for "
                                 "single-token inference (running statistics) or use query_norm='layer' or None")
            if flat.shape[0] > 0:
                q = self.query_norm(flat).reshape(q.shape)
        q = q.unflatten(-1, (self.heads, self.dim_key))  # [..., H, Dk]
        if self.query_norm_type == "layer":
            q = self.query_norm(q)
        return q

    def _gates(self, scores: torch.Tensor) -> torch.Tensor:
        if self.gate == "softmax":
            return scores.softmax(dim=-1)
        if self.gate == "relu":
            return F.relu(scores)
        return torch.sigmoid(scores)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"PEER input x must have shape [..., dim] with dim={self.dim}, got {got}")
        x = self.norm(x)
        q = self._queries(x)  # [..., H, Dk]
        scores, indices = product_key_topk(q, self.sub_keys, self.k, candidates=self.candidates,
                                           backend=self.backend)  # [..., H, k] each
        gates = self._gates(scores)
        # Dropout on the gates == dropout on the hidden activations act(down . x) of the
        # selected experts (peer-pytorch): y is linear in each gate, g * (m act / (1-p))
        # = (m g / (1-p)) * act, so outputs and gradients are the same for the same mask.
        gates = self.dropout(gates)
        if self.separate_experts_per_head:
            offsets = torch.arange(self.heads, device=indices.device, dtype=indices.dtype) * self.num_experts
            indices = indices + offsets[:, None]
        # the ids come from product_key_topk, in [0, rows) by construction: no range check (host sync)
        return peer_experts(x, indices, gates, self.down, self.up, activation=self.activation, backend=self.backend,
                            deterministic=self.deterministic, backward=self.backward, validate=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, heads={self.heads}, k={self.k}, "
                f"dim_key={self.dim_key}, candidates={self.candidates}, query_norm={self.query_norm_type!r}, "
                f"shared_keys={self.shared_keys}, gate={self.gate!r}, activation={self.activation!r}, "
                f"separate_experts_per_head={self.separate_experts_per_head}, dropout={self.dropout.p}, "
                f"pre_rmsnorm={self.pre_rmsnorm}, backend={self.backend!r}, deterministic={self.deterministic}, "
                f"backward={self.backward!r}")

    # ---- peer-pytorch interop ----------------------------------------------------------

    @classmethod
    def from_peer_pytorch(cls, module: nn.Module, **overrides) -> "PEER":
        """An equivalent PEER built from a peer-pytorch (0.2.x) `PEER_pytorch.PEER`:
        same config, weights copied (same device, dtype and train/eval mode), same outputs.

        Mapping: its `to_queries` Linear writes features in (p, h, d) order with d its
        `dim_key` (one half); ours wants (h, p, d), so the rows are permuted and our
        dim_key = 2 * its. Its keys [heads, n, 2, d] become sub_keys [heads, 2, n, d].
        No query norm in peer-pytorch (query_norm=None), per-head keys, gate = softmax
        or relu (non_competing_scores, with its top-1), k = its num_experts_per_head_topk,
        candidates = its product_key_topk, weight_down_embed / weight_up_embed -> down /
        up, RMSNorm gamma -> ours, dropout p (it drops the activations, we the gates:
        equivalent). `overrides` (e.g. backend="triton") go to the constructor.
        """
        needed = ("to_queries", "keys", "weight_down_embed", "weight_up_embed", "score_activation", "activation",
                  "norm", "dropout", "num_experts_per_head_topk", "product_key_topk", "heads", "num_experts")
        missing = [a for a in needed if not hasattr(module, a)]
        if missing:
            raise TypeError(f"from_peer_pytorch needs a PEER_pytorch.PEER module, got {type(module).__name__} "
                            f"(missing {missing})")
        if isinstance(module.score_activation, nn.Softmax):
            gate = "softmax"
        elif isinstance(module.score_activation, nn.ReLU):
            gate = "relu"
        else:
            raise ValueError(f"from_peer_pytorch: unsupported score activation {module.score_activation!r}")
        heads, num_keys, two, half = module.keys.shape
        if two != 2:
            raise ValueError(f"from_peer_pytorch: keys must have shape [heads, n, 2, d], "
                             f"got {tuple(module.keys.shape)}")
        linear = module.to_queries[0]
        dim = linear.in_features
        pre_rmsnorm = not isinstance(module.norm, nn.Identity)
        w = module.weight_down_embed.weight
        config = dict(
            num_experts=module.num_experts, heads=heads, k=module.num_experts_per_head_topk, dim_key=2 * half,
            candidates=module.product_key_topk, query_norm=None, shared_keys=False, gate=gate,
            activation=_activation_name(module.activation),
            separate_experts_per_head=bool(module.separate_embed_per_head), dropout=module.dropout.p,
            pre_rmsnorm=pre_rmsnorm, device=w.device, dtype=w.dtype,
        )
        config.update(overrides)
        new = cls(dim, **config)
        with torch.no_grad():
            wq = linear.weight  # [(p h d), dim]
            new.query_proj.weight.copy_(wq.reshape(2, heads, half, dim).transpose(0, 1).reshape(heads * 2 * half, dim))
            new.sub_keys.copy_(module.keys.transpose(1, 2))  # [h, n, p, d] -> [h, p, n, d]
            new.down.copy_(module.weight_down_embed.weight)
            new.up.copy_(module.weight_up_embed.weight)
            if pre_rmsnorm:
                new.norm.gamma.copy_(module.norm.gamma)
        new.train(module.training)
        return new
