import math

import pytest
import torch

from prac_fx import PracConfig
from prac_fx.basis import BasisStore
from prac_fx.passes.graph_state import BasisSpec


def _store(**kw):
    store = BasisStore(PracConfig(**kw))
    return store


def test_basis_structure(seeded):
    n, r1, r2 = 32, 4, 6
    store = _store(rank=10, split=4)
    store.register("g", BasisSpec(n, r1, r2), "cpu")
    x = torch.randn(200, n) @ torch.diag(torch.linspace(3, 0.1, n))
    store.refresh("g", x.t() @ x)
    p = store.basis("g")
    assert p.shape == (n, r1 + r2) and p.dtype == torch.float32 and p.is_contiguous()
    q1, q2 = p[:, :r1], p[:, r1:] / math.sqrt((n - r1) / r2)
    torch.testing.assert_close(q1.t() @ q1, torch.eye(r1), atol=1e-5, rtol=0)
    torch.testing.assert_close(q2.t() @ q2, torch.eye(r2), atol=1e-5, rtol=0)
    assert (q1.t() @ q2).abs().max() < 1e-5  # complement orthogonal to the principal part
    # Q1 spans the top right singular vectors of x
    v = torch.linalg.svd(x, full_matrices=False).Vh[:r1].t()
    torch.testing.assert_close((v.t() @ q1).abs().diagonal(), torch.ones(r1), atol=1e-4, rtol=0)


def test_expected_projection_is_identity(seeded):
    """E[P P^T] = I over the draw of Q2 (the unbiasedness of PRAC's reconstruction)."""
    n, r1, r2 = 12, 3, 3
    store = _store(rank=6, split=3, seed=1)
    store.register("g", BasisSpec(n, r1, r2), "cpu")
    x = torch.randn(50, n)
    store.refresh("g", x.t() @ x)
    acc = torch.zeros(n, n, dtype=torch.float64)
    draws = 4000
    for _ in range(draws):
        store.resample("g")
        p = store.basis("g").double()
        acc += p @ p.t()
    err = (acc / draws - torch.eye(n, dtype=torch.float64)).abs().max().item()
    assert err < 0.15  # Monte-Carlo error ~ k / sqrt(draws) = 3 / 63


def test_new_tensor_on_every_update():
    store = _store(rank=8)
    store.register("g", BasisSpec(16, 4, 4), "cpu")
    store.refresh("g", torch.eye(16))
    first = store.basis("g")
    before = first.clone()
    store.resample("g")
    assert store.basis("g") is not first
    torch.testing.assert_close(first, before)  # the old tensor was not written to


def test_non_finite_gram_keeps_basis(caplog):
    store = _store(rank=8)
    store.register("g", BasisSpec(16, 4, 4), "cpu")
    store.refresh("g", torch.diag(torch.arange(16.0)))
    q1 = store.groups["g"].q1.clone()
    bad = torch.eye(16)
    bad[3, 3] = float("nan")
    store.refresh("g", bad)
    store.refresh("g", bad)
    torch.testing.assert_close(store.groups["g"].q1, q1)
    assert torch.isfinite(store.basis("g")).all()
    assert sum("NaN/Inf" in r.message for r in caplog.records) == 1  # warned once


def test_state_dict_round_trip():
    a = _store(rank=8, seed=3)
    a.register("g", BasisSpec(16, 4, 4), "cpu")
    a.refresh("g", torch.diag(torch.arange(16.0)))
    a.advance("g")
    b = _store(rank=8, seed=99)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.basis("g"), b.basis("g"))
    a.resample("g")
    b.resample("g")
    torch.testing.assert_close(a.basis("g"), b.basis("g"))  # same generator state
    assert b.groups["g"].calls == 1


def test_shape_mismatch_is_an_error():
    store = _store(rank=8)
    store.register("g", BasisSpec(16, 4, 4), "cpu")
    with pytest.raises(ValueError, match="registered with"):
        store.register("g", BasisSpec(32, 4, 4), "cpu")
