"""Parity with the real peer-pytorch package (PEER_pytorch 0.2.x): PEER.from_peer_pytorch
gives the same outputs and gradients, and PEER(dim, **peer-pytorch kwargs) the same
config (up to dim_key, which is the full query size for us and one half for it)."""
import pytest
import torch
from torch import nn

PEER_pytorch = pytest.importorskip("PEER_pytorch", reason="peer-pytorch not installed (pip install peer-pytorch)")

import peer_kernels as pk  # noqa: E402

DIM = 32
BASE = dict(num_experts=64, heads=4, num_experts_per_head=4, dim_key=8)
CASES = {
    "softmax": dict(non_competing_scores=False),
    "non_competing": dict(non_competing_scores=True),
    "separate_pools": dict(non_competing_scores=False, separate_embed_per_head=True),
    "separate_pools_non_competing": dict(non_competing_scores=True, separate_embed_per_head=True),
    "pre_rmsnorm": dict(non_competing_scores=False, pre_rmsnorm=True),
    "wide_candidates": dict(non_competing_scores=False, product_key_topk=6),
    "wide_candidates_non_competing": dict(non_competing_scores=True, product_key_topk=6),
    "relu_experts": dict(non_competing_scores=False, activation=nn.ReLU, product_key_topk=5),
    "silu_experts": dict(non_competing_scores=False, activation=nn.SiLU, pre_rmsnorm=True),
    "identity_experts": dict(non_competing_scores=True, activation=nn.Identity),
    "dropout": dict(non_competing_scores=False, dropout=0.3),
}


def build(kw, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    pp = PEER_pytorch.PEER(DIM, **BASE, **kw).to(dtype)
    with torch.no_grad():
        pp.keys.normal_()  # its std 0.02 init leaves near-ties between product keys
        if isinstance(pp.norm, nn.Module) and hasattr(pp.norm, "gamma"):
            pp.norm.gamma.normal_(0, 0.3)
    return pp


def compare(pp, ours, x, atol, seed=None):
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    y_pp = pp(x1)
    if seed is not None:
        torch.manual_seed(seed)
    y = ours(x2)
    assert y.abs().max() > 0
    torch.testing.assert_close(y, y_pp, atol=atol, rtol=atol)
    dy = torch.randn_like(y)
    (y_pp * dy).sum().backward()
    (y * dy).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=atol, rtol=atol)


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_peer_pytorch_matches(case):
    pp = build(CASES[case]).eval()
    ours = pk.PEER.from_peer_pytorch(pp, backend="torch")
    assert not ours.training
    torch.manual_seed(1)
    x = torch.randn(2, 5, DIM)
    compare(pp, ours, x, atol=1e-5)


@pytest.mark.parametrize("case", ["softmax", "separate_pools_non_competing", "pre_rmsnorm"])
def test_parameter_gradients_match(case):
    """Gradients of the weights too, mapped through the layout conversion."""
    pp = build(CASES[case]).eval()
    ours = pk.PEER.from_peer_pytorch(pp, backend="torch")
    torch.manual_seed(2)
    x = torch.randn(3, 4, DIM)
    dy = torch.randn(3, 4, DIM)
    (pp(x) * dy).sum().backward()
    (ours(x) * dy).sum().backward()
    h, half = pp.keys.shape[0], pp.keys.shape[-1]
    gq = pp.to_queries[0].weight.grad.reshape(2, h, half, DIM).transpose(0, 1).reshape(-1, DIM)
    torch.testing.assert_close(ours.query_proj.weight.grad, gq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.sub_keys.grad, pp.keys.grad.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.down.grad, pp.weight_down_embed.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.up.grad, pp.weight_up_embed.weight.grad, atol=1e-5, rtol=1e-5)
    if ours.pre_rmsnorm:
        torch.testing.assert_close(ours.norm.gamma.grad, pp.norm.gamma.grad, atol=1e-5, rtol=1e-5)


def test_dropout_in_training_mode_matches():
    """Same seed, same mask: its dropout on the activations == ours on the gates."""
    pp = build(CASES["dropout"]).train()
    ours = pk.PEER.from_peer_pytorch(pp, backend="torch")
    assert ours.training and ours.dropout.p == 0.3
    torch.manual_seed(3)
    x = torch.randn(2, 5, DIM)
    compare(pp, ours, x, atol=1e-5, seed=1234)
    # and the dropout does act: a different seed gives another output
    torch.manual_seed(4321)
    y_other = ours(x)
    torch.manual_seed(1234)
    assert not torch.allclose(ours(x), y_other)


def test_float64_parity():
    pp = build(CASES["wide_candidates"], dtype=torch.float64).eval()
    ours = pk.PEER.from_peer_pytorch(pp, backend="torch")
    assert ours.down.dtype == torch.float64
    torch.manual_seed(5)
    compare(pp, ours, torch.randn(2, 7, DIM, dtype=torch.float64), atol=1e-12)


def test_tokens_independent_of_leading_shape():
    """peer-pytorch takes [b, n, d] only; ours any leading shape, same values."""
    pp = build(CASES["softmax"]).eval()
    ours = pk.PEER.from_peer_pytorch(pp, backend="torch")
    torch.manual_seed(6)
    x = torch.randn(2, 5, DIM)
    y = pp(x)
    torch.testing.assert_close(ours(x.reshape(10, DIM)), y.reshape(10, DIM), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x[1, 3]), y[1, 3], atol=1e-5, rtol=1e-5)


def _config(m):
    return dict(num_experts=m.num_experts, heads=m.heads, k=m.k, candidates=m.candidates, gate=m.gate,
                activation=m.activation, separate=m.separate_experts_per_head, pre_rmsnorm=m.pre_rmsnorm,
                dropout=m.dropout.p)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_kwargs_same_config(case):
    kw = {**BASE, **CASES[case]}
    pp = PEER_pytorch.PEER(DIM, **kw)
    ours = pk.PEER(DIM, **kw, backend="torch")
    converted = pk.PEER.from_peer_pytorch(pp, backend="torch")
    assert _config(ours) == _config(converted)
    assert ours.k == pp.num_experts_per_head_topk and ours.candidates == pp.product_key_topk
    assert ours.gate == ("relu" if isinstance(pp.score_activation, nn.ReLU) else "softmax")
    assert ours.down.shape == pp.weight_down_embed.weight.shape
    # dim_key: ours is the full per-head query, peer-pytorch's one half of it
    assert ours.dim_key == kw["dim_key"] and pp.keys.shape[-1] == kw["dim_key"]
    assert converted.dim_key == 2 * kw["dim_key"]
    # with the factor 2 (and no query norm, as peer-pytorch) the whole config is the same
    same = pk.PEER(DIM, **{**kw, "dim_key": 2 * kw["dim_key"]}, query_norm=None, backend="torch")
    assert repr(same) == repr(converted)
    assert {n: p.shape for n, p in same.named_parameters()} == {n: p.shape for n, p in converted.named_parameters()}
