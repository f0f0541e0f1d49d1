"""PEER nn.Module (peer_kernels/layer.py) on the CPU with the torch backend: forward and
every gradient against a hand-written composition of the reference ops, query-norm
train / eval behaviour, dropout, separate pools, initialisation, argument errors,
peer-pytorch keyword aliases and from_peer_pytorch (against a stand-in module with
peer-pytorch's attribute layout; the real package is in test_peer_pytorch.py)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peer_kernels as pk
from peer_kernels import reference as ref

DIM = 32


def make(seed=0, **kw):
    """A small PEER with its norm parameters randomised so that they matter."""
    cfg = dict(num_experts=64, heads=3, k=4, dim_key=8, backend="torch")
    cfg.update(kw)
    torch.manual_seed(seed)
    m = pk.PEER(DIM, **cfg)
    with torch.no_grad():
        if isinstance(m.query_norm, (nn.BatchNorm1d, nn.LayerNorm)):
            m.query_norm.weight.uniform_(0.5, 1.5)
            m.query_norm.bias.normal_(0, 0.3)
        if isinstance(m.query_norm, nn.BatchNorm1d):
            m.query_norm.running_mean.normal_(0, 0.5)
            m.query_norm.running_var.uniform_(0.5, 2.0)
        if m.pre_rmsnorm:
            m.norm.gamma.normal_(0, 0.3)
    return m


def manual(m, x, dropout_seed=None):
    """The layer written out by hand from the module's parameters and the reference ops."""
    h, dk = m.heads, m.dim_key
    if m.pre_rmsnorm:
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) * m.dim ** 0.5 * (m.norm.gamma + 1)
    q = x @ m.query_proj.weight.t()  # [..., H*Dk]
    if m.query_norm_type == "batch":
        bn = m.query_norm
        flat = q.reshape(-1, h * dk)
        if m.training:
            mean, var = flat.mean(0), flat.var(0, unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        q = ((flat - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias).reshape(q.shape)
    q = q.reshape(*q.shape[:-1], h, dk)
    if m.query_norm_type == "layer":
        ln = m.query_norm
        mu, var = q.mean(-1, keepdim=True), q.var(-1, unbiased=False, keepdim=True)
        q = (q - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias
    scores, idx = ref.product_key_topk(q, m.sub_keys, m.k, m.candidates)
    if m.gate == "softmax":
        g = torch.exp(scores - scores.max(-1, keepdim=True).values)
        g = g / g.sum(-1, keepdim=True)
    elif m.gate == "relu":
        g = scores.clamp_min(0)
    else:
        g = 1 / (1 + torch.exp(-scores))
    if m.training and m.dropout.p > 0:
        torch.manual_seed(dropout_seed)
        g = F.dropout(g, m.dropout.p, training=True)
    if m.separate_experts_per_head:
        idx = idx + torch.arange(h)[:, None] * m.num_experts
    return ref.peer_experts(x, idx, g, m.down, m.up, m.activation)


def grads(m, fn, x, dy):
    params = [p for p in m.parameters()]
    x = x.detach().requires_grad_()
    y = fn(x)
    gs = torch.autograd.grad((y * dy).sum(), [x] + params, allow_unused=True)
    return y.detach(), gs


def assert_layer_matches_manual(m, x, seed=123):
    torch.manual_seed(1)
    dy = torch.randn(*x.shape[:-1], DIM)

    def run(x):
        torch.manual_seed(seed)
        return m(x)

    y, g = grads(m, run, x, dy)
    y_ref, g_ref = grads(m, lambda x: manual(m, x, seed), x, dy)
    assert torch.isfinite(y).all() and y.abs().max() > 0
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, g, g_ref):
        if b is None:
            assert a is None or a.abs().max() == 0, name
            continue
        assert a is not None, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda s: f"grad of {name}: {s}")


# ---- forward / backward against the hand-written composition ------------------------

@pytest.mark.parametrize("shape", [(7,), (2, 5)])
def test_forward_backward_shapes(shape):
    m = make()
    torch.manual_seed(2)
    x = torch.randn(*shape, DIM, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    assert_layer_matches_manual(m, x)


COMBOS = list(itertools.product(["batch", "layer", None], [False, True], ["softmax", "relu", "sigmoid"],
                                [False, True], [False, True]))


@pytest.mark.parametrize("query_norm,shared_keys,gate,separate,pre_rmsnorm", COMBOS)
def test_matches_manual_composition(query_norm, shared_keys, gate, separate, pre_rmsnorm):
    m = make(query_norm=query_norm, shared_keys=shared_keys, gate=gate, separate_experts_per_head=separate,
             pre_rmsnorm=pre_rmsnorm, candidates=5)
    assert m.sub_keys.shape == ((2, 8, 4) if shared_keys else (3, 2, 8, 4))
    assert m.down.shape == m.up.shape == ((64 * 3 if separate else 64), DIM)
    torch.manual_seed(3)
    x = torch.randn(2, 5, DIM)
    m.train()
    assert_layer_matches_manual(m, x)
    m.eval()
    assert_layer_matches_manual(m, x)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "identity", nn.GELU, nn.ReLU, nn.SiLU, nn.Identity])
def test_activations(activation):
    m = make(activation=activation)
    name = activation if isinstance(activation, str) else activation.__name__.lower()
    assert m.activation == name
    torch.manual_seed(4)
    assert_layer_matches_manual(m, torch.randn(7, DIM))


def test_activation_changes_output():
    outs = {}
    for act in ["gelu", "relu", "silu", "identity"]:
        m = make(activation=act).eval()
        torch.manual_seed(4)
        outs[act] = m(torch.randn(7, DIM))
    for a, b in itertools.combinations(outs, 2):
        assert not torch.allclose(outs[a], outs[b]), (a, b)


@pytest.mark.parametrize("gate", ["relu", "sigmoid"])
def test_non_competing_gates_with_negative_scores(gate):
    """k = 48 of 64 experts: the lower selected scores are negative, where relu gates
    vanish (those experts add nothing) and sigmoid gates fall below 1/2."""
    m = make(gate=gate, k=48, candidates=8, query_norm="layer")
    torch.manual_seed(16)
    x = torch.randn(2, 5, DIM)
    q = m.query_norm((x @ m.query_proj.weight.t()).reshape(2, 5, 3, 8))
    scores, _ = ref.product_key_topk(q, m.sub_keys, 48, 8)
    assert (scores < 0).any() and (scores > 0).any()
    assert_layer_matches_manual(m, x)


def test_candidates_wider_than_k_is_exact_topk():
    """candidates = n: the product-key search is the exact top-k over all N keys."""
    m = make(candidates=8, k=6, query_norm=None).eval()
    torch.manual_seed(5)
    x = torch.randn(9, DIM)
    q = (x @ m.query_proj.weight.t()).reshape(9, 3, 8)
    s_bf, i_bf = ref.brute_force_topk(q, m.sub_keys, 6)
    s, i = pk.product_key_topk(q, m.sub_keys, 6, candidates=8, backend="torch")
    assert torch.equal(i, i_bf)
    assert_layer_matches_manual(m, x)


def test_fp64_gradcheck():
    m = make(query_norm="layer", pre_rmsnorm=True, dtype=torch.float64)
    torch.manual_seed(6)
    x = torch.randn(3, DIM, dtype=torch.float64, requires_grad=True)
    assert m(x).dtype == torch.float64
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)


def test_passes_backend_and_deterministic_to_ops(monkeypatch):
    import peer_kernels.layer as layer_mod

    seen = {}
    real_topk, real_experts = layer_mod.product_key_topk, layer_mod.peer_experts

    def topk(*a, **kw):
        seen["topk"] = kw
        return real_topk(*a, **kw)

    def experts(*a, **kw):
        seen["experts"] = kw
        return real_experts(*a, **kw)

    monkeypatch.setattr(layer_mod, "product_key_topk", topk)
    monkeypatch.setattr(layer_mod, "peer_experts", experts)
    m = make(deterministic=True, activation="silu", candidates=6)
    m(torch.randn(4, DIM))
    assert seen["topk"] == {"candidates": 6, "backend": "torch"}
    assert seen["experts"]["backend"] == "torch" and seen["experts"]["deterministic"] is True
    assert seen["experts"]["activation"] == "silu"


# ---- query BatchNorm: train vs eval --------------------------------------------------

def test_batchnorm_train_uses_batch_statistics():
    m = make(query_norm="batch")
    m.train()
    torch.manual_seed(7)
    x = torch.randn(6, DIM)
    rm0 = m.query_norm.running_mean.clone()
    y_all = m(x)
    q = x @ m.query_proj.weight.t()
    torch.testing.assert_close(m.query_norm.running_mean, 0.9 * rm0 + 0.1 * q.mean(0).detach())
    # train mode: a token's output depends on the other tokens of the batch
    y_half = m(x[:3])
    assert not torch.allclose(y_all[:3], y_half, atol=1e-4)


def test_batchnorm_eval_uses_running_statistics():
    m = make(query_norm="batch")
    m.train()
    torch.manual_seed(8)
    for _ in range(3):
        m(torch.randn(2, 5, DIM))
    m.eval()
    rm = m.query_norm.running_mean.clone()
    x = torch.randn(2, 5, DIM)
    y = m(x)
    assert torch.equal(m.query_norm.running_mean, rm), "eval must not update running stats"
    # one token alone (any leading shape) equals the same token inside the batch
    torch.testing.assert_close(m(x[1, 2]), y[1, 2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m(x[1, 2:3]), y[1, 2:3], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m(x.reshape(10, DIM)), y.reshape(10, DIM), atol=1e-6, rtol=1e-6)
    assert_layer_matches_manual(m, x)


@pytest.mark.parametrize("shape", [(DIM,), (1, DIM), (1, 1, DIM)])
def test_batchnorm_single_token_in_training_raises(shape):
    m = make(query_norm="batch").train()
    with pytest.raises(ValueError, match="1 token in training mode"):
        m(torch.randn(*shape))
    m.eval()
    assert m(torch.randn(*shape)).shape == shape


@pytest.mark.parametrize("query_norm", ["layer", None])
def test_single_token_in_training_other_norms(query_norm):
    m = make(query_norm=query_norm).train()
    torch.manual_seed(9)
    x = torch.randn(4, DIM)
    y = m(x)
    # no batch statistics: each token is independent of the others
    torch.testing.assert_close(m(x[2]), y[2], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_empty_input(training):
    m = make().train(training)
    x = torch.randn(0, DIM, requires_grad=True)
    y = m(x)
    assert y.shape == (0, DIM)
    y.sum().backward()
    assert x.grad.shape == (0, DIM)


# ---- dropout ---------------------------------------------------------------------

def test_dropout_train_vs_eval():
    m = make(dropout=0.5)
    m0 = make(dropout=0.0)
    m0.load_state_dict(m.state_dict())
    torch.manual_seed(10)
    x = torch.randn(2, 5, DIM)
    m.eval()
    m0.eval()
    y_eval = m(x)
    assert torch.equal(y_eval, m(x)), "eval must be deterministic"
    torch.testing.assert_close(y_eval, m0(x))
    m.train()
    m0.train()
    torch.manual_seed(11)
    y1 = m(x)
    y2 = m(x)
    assert not torch.allclose(y1, y2), "train-mode dropout draws a new mask per call"
    assert not torch.allclose(y1, m0(x))
    assert_layer_matches_manual(m, x)


def test_gate_dropout_equals_activation_dropout():
    """Dropout on the gates == peer-pytorch's dropout on act(down . x), same mask."""
    p = 0.4
    m = make(dropout=p, query_norm="layer", separate_experts_per_head=True).train()
    torch.manual_seed(12)
    x = torch.randn(2, 5, DIM)
    torch.manual_seed(99)
    y = m(x)
    # the same layer with the dropout moved onto the hidden activations
    q = m.query_norm((x @ m.query_proj.weight.t()).reshape(2, 5, 3, 8))
    scores, idx = ref.product_key_topk(q, m.sub_keys, m.k, m.candidates)
    idx = idx + torch.arange(3)[:, None] * m.num_experts
    torch.manual_seed(99)
    mask = F.dropout(torch.ones_like(scores), p, training=True)  # the mask nn.Dropout draws for the gates
    assert (mask == 0).any() and (mask != 0).any()
    hid = F.gelu(torch.einsum("bsd,bshkd->bshk", x, m.down[idx])) * mask
    y_act = torch.einsum("bshk,bshkd->bsd", hid * scores.softmax(-1), m.up[idx])
    torch.testing.assert_close(y, y_act, atol=1e-5, rtol=1e-5)


# ---- separate pools --------------------------------------------------------------

def test_separate_pools_route_each_head_to_its_own_rows():
    torch.manual_seed(13)
    x = torch.randn(11, DIM)
    for h in range(3):
        m2 = make(separate_experts_per_head=True, query_norm=None).eval()
        # only head h's pool carries weights: the output is head h's contribution alone
        with torch.no_grad():
            keep = torch.zeros(3 * 64, 1)
            keep[h * 64:(h + 1) * 64] = 1
            m2.up.mul_(keep)
        y = m2(x)
        q = (x @ m2.query_proj.weight.t()).reshape(11, 3, 8)[:, h:h + 1]
        s, i = ref.product_key_topk(q, m2.sub_keys[h:h + 1], 4, m2.candidates)
        y_h = ref.peer_experts(x, i, s.softmax(-1), m2.down[h * 64:(h + 1) * 64], m2.up[h * 64:(h + 1) * 64])
        torch.testing.assert_close(y, y_h, atol=1e-5, rtol=1e-5)


# ---- initialisation ----------------------------------------------------------------

def test_init_statistics_and_reset():
    torch.manual_seed(14)
    m = pk.PEER(64, num_experts=1024, heads=4, k=8, dim_key=16, pre_rmsnorm=True, backend="torch")
    torch.testing.assert_close(m.sub_keys.std().item(), math.sqrt(2 / 16), rtol=0.05, atol=0)
    torch.testing.assert_close(m.down.std().item(), math.sqrt(1 / 64), rtol=0.05, atol=0)
    torch.testing.assert_close(m.up.std().item(), math.sqrt(1 / 32), rtol=0.05, atol=0)
    assert abs(m.down.mean().item()) < 0.01
    assert torch.equal(m.norm.gamma, torch.zeros(64))
    bound = 1 / math.sqrt(64)
    assert m.query_proj.weight.abs().max() <= bound and m.query_proj.weight.std() > 0.5 * bound / math.sqrt(3)
    # unit-variance x -> unit-variance pre-activations; BN queries -> unit-variance half scores
    x = torch.randn(4096, 64)
    assert abs((x @ m.down[:256].t()).var().item() - 1) < 0.1
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(3.0)
    m.reset_parameters()
    assert torch.equal(m.norm.gamma, torch.zeros(64))
    assert torch.equal(m.query_norm.weight, torch.ones(64)) and torch.equal(m.query_norm.bias, torch.zeros(64))
    torch.testing.assert_close(m.up.std().item(), math.sqrt(1 / 32), rtol=0.05, atol=0)
    torch.testing.assert_close(m.sub_keys.std().item(), math.sqrt(2 / 16), rtol=0.05, atol=0)


def test_seeded_construction_is_reproducible():
    a, b = make(seed=5), make(seed=5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(make(seed=6).down, a.down)


def test_extra_repr():
    r = repr(make(query_norm="layer", gate="sigmoid", shared_keys=True, activation=nn.SiLU, dropout=0.1))
    for part in ["dim=32", "num_experts=64", "heads=3", "k=4", "dim_key=8", "candidates=4", "query_norm='layer'",
                 "shared_keys=True", "gate='sigmoid'", "activation='silu'", "dropout=0.1", "backend='torch'"]:
        assert part in r, part


def test_default_candidates_capped_at_n():
    m = make(k=16)  # n = 8 < k: candidates = n, exact
    assert m.candidates == 8 and m.k == 16


# ---- argument errors ------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(num_experts=60), "num_experts must be a perfect square"),
    (dict(num_experts=0), "num_experts must be a positive int"),
    (dict(dim_key=9), "dim_key must be even"),
    (dict(dim_key=0), "dim_key must be a positive int"),
    (dict(k=17, candidates=4), r"k=17 is larger than candidates\^2=16"),
    (dict(k=0), "k must be a positive int"),
    (dict(heads=0), "heads must be a positive int"),
    (dict(candidates=9), "candidates=9 is larger than the number of sub-keys n=sqrt\\(num_experts\\)=8"),
    (dict(candidates=0), "candidates must be a positive int"),
    (dict(gate="tanh"), "gate must be one of"),
    (dict(query_norm="group"), "query_norm must be one of"),
    (dict(activation="tanh"), "activation must be one of"),
    (dict(activation=nn.Tanh), "activation must be one of"),
    (dict(activation=nn.GELU(approximate="tanh")), "activation: nn.GELU\\(approximate='tanh'\\)"),
    (dict(dropout=1.0), "dropout must be a probability"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(deterministic="yes"), "deterministic must be None, True or False"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_bad_dim():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        pk.PEER(0, num_experts=64)


@pytest.mark.parametrize("shape", [(4, DIM + 1), (DIM - 1,)])
def test_wrong_input_dim(shape):
    m = make()
    with pytest.raises(ValueError, match="PEER input x must have shape \\[..., dim\\] with dim=32"):
        m(torch.randn(*shape))


@pytest.mark.parametrize("kw,match", [
    (dict(k=4, num_experts_per_head=4), "both 'k' and its peer-pytorch alias 'num_experts_per_head'"),
    (dict(candidates=4, product_key_topk=4), "both 'candidates' and its peer-pytorch alias 'product_key_topk'"),
    (dict(separate_experts_per_head=False, separate_embed_per_head=True), "both 'separate_experts_per_head'"),
    (dict(gate="relu", non_competing_scores=True), "both 'gate' and its peer-pytorch alias 'non_competing_scores'"),
    (dict(gate="softmax", non_competing_scores=False), "both 'gate'"),
    (dict(num_expert=64), "unexpected keyword argument\\(s\\) \\['num_expert'\\]"),
    (dict(train_mem_mask=None), "unexpected keyword"),
])
def test_alias_and_unknown_keyword_errors(kw, match):
    with pytest.raises(TypeError, match=match):
        pk.PEER(DIM, num_experts=64, heads=2, dim_key=8, backend="torch", **kw)


# ---- peer-pytorch keyword aliases -----------------------------------------------------

def test_peer_pytorch_aliases_mapping():
    base = dict(num_experts=64, heads=2, dim_key=8, backend="torch")
    m = pk.PEER(DIM, num_experts_per_head=4, product_key_topk=6, separate_embed_per_head=True,
                non_competing_scores=False, activation=nn.ReLU, pre_rmsnorm=True, dropout=0.1, **base)
    assert (m.k, m.candidates, m.separate_experts_per_head, m.gate, m.activation, m.pre_rmsnorm, m.dropout.p) == \
        (4, 6, True, "softmax", "relu", True, 0.1)
    assert m.dim_key == 8 and m.sub_keys.shape == (2, 2, 8, 4), "dim_key is ours (full query), not peer-pytorch's"
    assert m.down.shape == (128, DIM)
    # non_competing_scores=True: relu gates, top-1 per head; candidates = experts per head
    m = pk.PEER(DIM, num_experts_per_head=4, non_competing_scores=True, **base)
    assert (m.k, m.candidates, m.gate) == (1, 4, "relu")
    m = pk.PEER(DIM, num_experts_per_head=4, product_key_topk=6, non_competing_scores=True, **base)
    assert (m.k, m.candidates, m.gate) == (1, 6, "relu")
    m = pk.PEER(DIM, k=3, non_competing_scores=True, **base)
    assert (m.k, m.candidates, m.gate) == (1, 3, "relu")
    # the alias spelling builds the same layer as the native one
    a = pk.PEER(DIM, num_experts_per_head=3, product_key_topk=5, separate_embed_per_head=True, **base)
    b = pk.PEER(DIM, k=3, candidates=5, separate_experts_per_head=True, **base)
    assert repr(a) == repr(b)


# ---- from_peer_pytorch against a stand-in with peer-pytorch's layout ------------------

class _PPRMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(dim) * 0.3)

    def forward(self, x):
        return F.normalize(x, dim=-1) * x.shape[-1] ** 0.5 * (self.gamma + 1)


class FakePeerPytorch(nn.Module):
    """PEER_pytorch.PEER 0.2.2's attributes and math, one head at a time, no einx."""

    def __init__(self, dim, *, heads, num_experts, num_experts_per_head, dim_key, product_key_topk=None,
                 separate_embed_per_head=False, pre_rmsnorm=False, non_competing_scores=True, activation=nn.GELU):
        super().__init__()
        self.norm = _PPRMSNorm(dim) if pre_rmsnorm else nn.Identity()
        sets = heads if separate_embed_per_head else 1
        self.heads, self.separate_embed_per_head, self.num_experts = heads, separate_embed_per_head, num_experts
        self.weight_down_embed = nn.Embedding(num_experts * sets, dim)
        self.weight_up_embed = nn.Embedding(num_experts * sets, dim)
        self.activation = activation()
        self.num_keys = math.isqrt(num_experts)
        self.to_queries = nn.Sequential(nn.Linear(dim, dim_key * heads * 2, bias=False))
        self.product_key_topk = product_key_topk or num_experts_per_head
        self.num_experts_per_head_topk = num_experts_per_head if not non_competing_scores else 1
        self.keys = nn.Parameter(torch.randn(heads, self.num_keys, 2, dim_key))
        self.dropout = nn.Dropout(0.0)
        self.score_activation = nn.Softmax(dim=-1) if not non_competing_scores else nn.ReLU()

    def forward(self, x):
        x = self.norm(x)
        d = self.keys.shape[-1]
        q = self.to_queries(x).unflatten(-1, (2, self.heads, d))  # (p h d)
        y = 0
        for h in range(self.heads):
            s1 = q[..., 0, h, :] @ self.keys[h, :, 0, :].t()
            s2 = q[..., 1, h, :] @ self.keys[h, :, 1, :].t()
            t1, i1 = s1.topk(self.product_key_topk, dim=-1)
            t2, i2 = s2.topk(self.product_key_topk, dim=-1)
            pair = (t1[..., :, None] + t2[..., None, :]).flatten(-2)
            ids = (i1[..., :, None] * self.num_keys + i2[..., None, :]).flatten(-2)
            sc, w = pair.topk(self.num_experts_per_head_topk, dim=-1)
            e = ids.gather(-1, w) + (h * self.num_experts if self.separate_embed_per_head else 0)
            a = self.activation(torch.einsum("...d,...kd->...k", x, self.weight_down_embed(e)))
            a = self.dropout(a) * self.score_activation(sc)
            y = y + torch.einsum("...k,...kd->...d", a, self.weight_up_embed(e))
        return y


@pytest.mark.parametrize("kw", [
    dict(non_competing_scores=False),
    dict(non_competing_scores=True),
    dict(non_competing_scores=False, product_key_topk=6, separate_embed_per_head=True),
    dict(non_competing_scores=True, product_key_topk=6, pre_rmsnorm=True, activation=nn.SiLU),
])
def test_from_peer_pytorch_standin(kw):
    torch.manual_seed(15)
    pp = FakePeerPytorch(DIM, heads=4, num_experts=64, num_experts_per_head=4, dim_key=4, **kw).eval()
    m = pk.PEER.from_peer_pytorch(pp, backend="torch")
    assert m.dim_key == 8 and m.query_norm_type is None and not m.training
    assert m.k == pp.num_experts_per_head_topk and m.candidates == pp.product_key_topk
    x = torch.randn(2, 5, DIM, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_pp = m(x), pp(x2)
    torch.testing.assert_close(y, y_pp, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (y_pp * dy).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_from_peer_pytorch_rejects_other_modules():
    with pytest.raises(TypeError, match="from_peer_pytorch needs a PEER_pytorch.PEER module"):
        pk.PEER.from_peer_pytorch(nn.Linear(4, 4))


# ---- the Triton path (interpreter on the CPU, conftest sets TRITON_INTERPRET=1) -------

@pytest.mark.parametrize("query_norm,separate,gate,shared", [("batch", False, "softmax", False),
                                                            ("layer", True, "relu", True)])
def test_triton_backend_matches_torch(device, query_norm, separate, gate, shared):
    kw = dict(num_experts=64, heads=2, k=4, dim_key=16, candidates=5, query_norm=query_norm, gate=gate,
              separate_experts_per_head=separate, shared_keys=shared, activation="silu", device=device)
    torch.manual_seed(17)
    a = pk.PEER(DIM, backend="triton", **kw)
    b = pk.PEER(DIM, backend="torch", **kw)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, DIM, device=device)
    dy = torch.randn(2, 5, DIM, device=device)
    ya, ga = grads(a, a, x, dy)
    yb, gb = grads(b, b, x, dy)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    names = ["x"] + [n for n, _ in a.named_parameters()]
    for name, u, v in zip(names, ga, gb):
        torch.testing.assert_close(u, v, atol=2e-5, rtol=2e-5, msg=lambda s: f"grad of {name}: {s}")
