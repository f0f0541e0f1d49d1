"""Expert usage and unevenness (paper Table 2) against hand-computed values, gate
weighting, the accumulator against the one-shot metric, and argument errors."""
import math

import pytest
import torch

import peer_kernels as pk
from peer_kernels import ExpertUsage, expert_usage


def test_uniform_use_has_zero_unevenness():
    idx = torch.arange(16).repeat(3).reshape(4, 3, 4)  # every expert 3 times, shape [T, H, k]
    r = expert_usage(idx, 16)
    assert r["usage"] == 1.0
    assert abs(r["unevenness"]) < 1e-12
    assert r["counts"].dtype == torch.float64 and torch.equal(r["counts"], torch.full((16,), 3.0, dtype=torch.float64))


def test_all_to_one_expert_is_log_n():
    r = expert_usage(torch.full((5, 2, 3), 7), 32)
    assert r["usage"] == 1 / 32
    assert math.isclose(r["unevenness"], math.log(32), rel_tol=1e-12)


def test_half_the_experts_is_log_2():
    idx = torch.arange(0, 64, 2).reshape(8, 4)  # 32 of 64 experts, once each
    r = expert_usage(idx, 64)
    assert r["usage"] == 0.5
    assert math.isclose(r["unevenness"], math.log(2), rel_tol=1e-12)


def test_hand_computed_counts():
    idx = torch.tensor([[0, 0], [0, 1]], dtype=torch.int32)  # z' = [3, 1, 0, 0]
    r = expert_usage(idx, 4)
    assert r["usage"] == 0.5
    expected = math.log(4) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25)
    assert math.isclose(r["unevenness"], expected, rel_tol=1e-12)


def test_gates_weight_the_counts():
    idx = torch.tensor([[0, 1], [1, 2]])
    gates = torch.tensor([[0.6, 0.4], [0.2, 0.0]])  # z' = [0.6, 0.6, 0.0, 0]: expert 2's gate is 0
    r = expert_usage(idx, 4, gates)
    torch.testing.assert_close(r["counts"], torch.tensor([0.6, 0.6, 0.0, 0.0], dtype=torch.float64))
    assert r["usage"] == 0.5  # a selected expert with gate 0 has z_i = 0: not used
    assert math.isclose(r["unevenness"], math.log(2), rel_tol=1e-9)
    # without gates the same picks count once each
    r = expert_usage(idx, 4)
    assert r["usage"] == 0.75
    expected = math.log(4) + 2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)
    assert math.isclose(r["unevenness"], expected, rel_tol=1e-12)


def test_gates_in_half_precision():
    idx = torch.tensor([0, 1, 1])
    r = expert_usage(idx, 2, torch.tensor([1.0, 0.5, 0.5], dtype=torch.bfloat16))
    assert abs(r["unevenness"]) < 1e-12 and r["usage"] == 1.0


def test_no_mass():
    r = expert_usage(torch.tensor([1, 2]), 4, torch.zeros(2))
    assert r["usage"] == 0.0 and math.isnan(r["unevenness"])
    r = expert_usage(torch.zeros(0, 2, 4, dtype=torch.int64), 4)
    assert r["usage"] == 0.0 and math.isnan(r["unevenness"])


def test_random_against_dense_formula():
    torch.manual_seed(0)
    n = 100
    idx = torch.randint(0, n, (50, 4, 3))
    gates = torch.rand(50, 4, 3)
    r = expert_usage(idx, n, gates)
    dense = torch.zeros(n, dtype=torch.float64)
    for e, g in zip(idx.flatten().tolist(), gates.flatten().tolist()):
        dense[e] += g
    z = dense / dense.sum()
    ent = sum(v * math.log(v) for v in z.tolist() if v > 0)
    torch.testing.assert_close(r["counts"], dense)
    assert r["usage"] == (dense > 0).sum().item() / n
    assert math.isclose(r["unevenness"], math.log(n) + ent, rel_tol=1e-10)


@pytest.mark.parametrize("weighted", [False, True])
def test_accumulator_equals_one_shot_on_concatenation(weighted):
    torch.manual_seed(1)
    n = 49
    batches = [torch.randint(0, n, (t, 3, 2)) for t in (5, 1, 12)]
    gates = [torch.rand(b.shape) for b in batches] if weighted else [None] * 3
    acc = ExpertUsage(n)
    for b, g in zip(batches, gates):
        acc.update(b, g)
    got = acc.compute()
    want = expert_usage(torch.cat(batches), n, torch.cat(gates) if weighted else None)
    torch.testing.assert_close(got["counts"], want["counts"])
    assert got["usage"] == want["usage"]
    assert math.isclose(got["unevenness"], want["unevenness"], rel_tol=1e-12)
    assert acc.updates == 3 and acc.counts.device == batches[0].device
    # compute() is a snapshot, not a view of the running vector
    got["counts"].zero_()
    assert acc.compute()["usage"] == want["usage"]
    acc.reset()
    assert acc.counts.sum() == 0 and acc.updates == 0
    acc.update(batches[1], gates[1])
    r1 = expert_usage(batches[1], n, gates[1])
    assert acc.compute()["usage"] == r1["usage"]


def test_accumulator_with_layer_routing():
    """The accumulator fed with the routing decisions of a PEER layer (its ops, its weights)."""
    torch.manual_seed(2)
    m = pk.PEER(16, num_experts=16, heads=2, k=2, dim_key=4, query_norm=None, backend="torch").eval()
    acc = ExpertUsage(16)
    for _ in range(4):
        x = torch.randn(8, 16)
        q = m.query_proj(x).reshape(8, 2, 4)
        s, i = pk.product_key_topk(q, m.sub_keys, 2, backend="torch")
        acc.update(i, s.softmax(-1))
    r = acc.compute()
    assert 0 < r["usage"] <= 1 and r["unevenness"] >= 0
    torch.testing.assert_close(r["counts"].sum().item(), 4 * 8 * 2.0)  # softmax gates sum to 1 per head


def test_accumulator_refuses_mixing_gates_and_counts():
    acc = ExpertUsage(4)
    acc.update(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="every update must pass gates, or none"):
        acc.update(torch.tensor([0, 1]), torch.ones(2))
    acc.reset()
    acc.update(torch.tensor([0, 1]), torch.ones(2))  # allowed after a reset


def test_empty_accumulator():
    r = ExpertUsage(9).compute()
    assert r["usage"] == 0.0 and math.isnan(r["unevenness"]) and r["counts"].shape == (9,)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: expert_usage(torch.tensor([0, 4]), 4), IndexError, r"must lie in \[0, 4\)"),
    (lambda: expert_usage(torch.tensor([-1, 0]), 4), IndexError, r"must lie in \[0, 4\)"),
    (lambda: expert_usage(torch.tensor([0.0, 1.0]), 4), TypeError, "indices must be an integer tensor"),
    (lambda: expert_usage([0, 1], 4), TypeError, "indices must be an integer tensor"),
    (lambda: expert_usage(torch.tensor([0, 1]), 0), ValueError, "num_experts must be a positive int"),
    (lambda: expert_usage(torch.tensor([0, 1]), 4, torch.ones(3)), ValueError, "gates must have the shape"),
    (lambda: expert_usage(torch.tensor([0, 1]), 4, torch.ones(2, dtype=torch.int64)), TypeError,
     "gates must be a floating tensor"),
    (lambda: expert_usage(torch.tensor([0, 1]), 4, torch.tensor([1.0, -0.5])), ValueError,
     "gates must be non-negative"),
    (lambda: ExpertUsage(0), ValueError, "num_experts must be a positive int"),
    (lambda: ExpertUsage(4).update(torch.tensor([5])), IndexError, r"must lie in \[0, 4\)"),
])
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
