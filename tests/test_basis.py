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


# -- complement="cycle" -------------------------------------------------------------------------
def _cycling(n=24, r1=4, r2=5, seed=2):
    store = _store(rank=r1 + r2, split=r1, seed=seed, complement="cycle")
    store.register("g", BasisSpec(n, r1, r2), "cpu")
    x = torch.randn(100, n) @ torch.diag(torch.linspace(3, 0.1, n))
    store.refresh("g", x.t() @ x)
    return store


@pytest.mark.parametrize("n, r1, r2", [(24, 4, 5), (24, 4, 4), (16, 0, 4)])
def test_cycle_blocks_are_haar_frames_that_tile_the_complement(seeded, n, r1, r2):
    """Each block is an orthonormal frame of Q1's complement, and the blocks walk through one
    basis of it: over lcm(n - r1, r2) / r2 calls every column is used equally often, so the
    P P^T of those calls sum to exactly (calls) I, whether or not r2 divides n - r1."""
    store = _cycling(n, r1, r2)
    g = store.groups["g"]
    q1 = g.q1
    width = n - r1
    calls = math.lcm(width, r2) // r2
    total = torch.zeros(n, n, dtype=torch.float64)
    seen = []
    for call in range(calls):
        if call:
            store.next_block("g")
        p = store.basis("g")
        if r1:
            torch.testing.assert_close(p[:, :r1], q1)  # the principal part does not move
        q2 = p[:, r1:] / math.sqrt(width / r2)
        torch.testing.assert_close(q2.t() @ q2, torch.eye(r2), atol=1e-5, rtol=0)
        if r1:
            assert (q1.t() @ q2).abs().max() < 1e-5
        seen.append(p)
        total += p.double() @ p.double().t()
    torch.testing.assert_close(total / calls, torch.eye(n, dtype=torch.float64), atol=1e-5, rtol=0)
    assert len({t.data_ptr() for t in seen}) == calls  # a new tensor every call


def test_cycle_each_block_is_unbiased(seeded):
    """E[P P^T] = I for a block at any position in the window, over the window's draw: the mean
    over draws converges at the 1/sqrt(draws) rate (a biased scheme would level off)."""
    n, r1, r2 = 12, 3, 3
    store = _cycling(n, r1, r2, seed=4)
    errors = {}
    acc = torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, 4001):
        store.resample("g")
        for _ in range(2):  # the third block of each window
            store.next_block("g")
        p = store.basis("g").double()
        acc += p @ p.t()
        if i in (1000, 4000):
            errors[i] = (acc / i - torch.eye(n, dtype=torch.float64)).norm().item()
    assert errors[4000] < 0.25, errors
    assert 1.4 < errors[1000] / errors[4000] < 2.9, errors


def test_cycle_state_round_trip_and_held_states():
    """The window's complement basis and position survive a state_dict; a state saved by a run
    that held its draw loads with its Q1 and starts a cycle at the next call."""
    a = _cycling(seed=3)
    a.next_block("g")
    b = _store(rank=9, split=4, seed=99, complement="cycle")
    b.load_state_dict(a.state_dict())
    assert b.cycles("g") and b.groups["g"].block == 1
    for _ in range(3):
        a.next_block("g")
        b.next_block("g")
        torch.testing.assert_close(a.basis("g"), b.basis("g"))

    held = _store(rank=9, split=4, seed=3)
    held.register("g", BasisSpec(24, 4, 5), "cpu")
    held.refresh("g", torch.diag(torch.arange(24.0)))
    held.advance("g")  # mid-window: no refresh due
    c = _store(rank=9, split=4, seed=3, complement="cycle")
    c.load_state_dict(held.state_dict())
    assert c.due_resample("g") and not c.due_refresh("g")
    c.resample("g")
    torch.testing.assert_close(c.basis("g")[:, :4], held.basis("g")[:, :4])
    assert c.cycles("g")
    # and the other way: a held run ignores a cycling state's basis of the complement
    d = _store(rank=9, split=4, seed=3)
    d.load_state_dict(a.state_dict())
    assert not d.cycles("g") and d.groups["g"].persistent_bytes == a.basis("g").numel() * 4


def test_cycle_keeps_its_complement_basis_in_the_resident_bytes():
    store = _cycling(n=24, r1=4, r2=5)
    assert store.persistent_bytes() == (24 * 9 + 24 * 20) * 4


# -- a random part that outlives refits of Q1 (resample_every > refresh_every) -------------------
def test_refit_within_the_window_keeps_the_draw(seeded):
    """T1 = 2, T2 = 6: a refit between redraws projects the same raw draw against the new Q1, so
    Q2 stays Haar in the new complement and moves only as far as Q1 moved; a redraw replaces it."""
    n, r1, r2 = 24, 4, 4
    store = _store(rank=8, split=4, refresh_every=2, resample_every=6, seed=1)
    store.register("g", BasisSpec(n, r1, r2), "cpu")
    x = torch.randn(200, n) @ torch.diag(torch.linspace(3, 0.1, n))
    store.refresh("g", x.t() @ x)  # call 0: the first fit draws
    g = store.groups["g"]
    draw = g.draw.clone()
    assert g.resamples == 1 and store.keeps_draw("g")
    for _ in range(2):
        store.advance("g")
    assert not store.due_resample("g")
    y = x + 0.3 * torch.randn(200, n)
    store.refresh("g", y.t() @ y)  # call 2: refit, same draw
    assert g.resamples == 1 and torch.equal(g.draw, draw)
    p = store.basis("g")
    q1, q2 = p[:, :r1], p[:, r1:] / math.sqrt((n - r1) / r2)
    projected = draw.double() - q1.double() @ (q1.double().t() @ draw.double())
    expected = BasisStore._orthonormal(projected - q1.double() @ (q1.double().t() @ projected))
    torch.testing.assert_close(q2, expected, atol=1e-5, rtol=0)
    assert (q1.t() @ q2).abs().max() < 1e-5
    for _ in range(4):
        store.advance("g")
    assert store.due_resample("g")
    store.refresh("g", y.t() @ y)  # call 6: refit and redraw
    assert g.resamples == 2 and not torch.equal(g.draw, draw)
    # the held draw is part of the state, and only a run that refits within windows keeps one
    other = _store(rank=8, split=4, refresh_every=2, resample_every=6, seed=9)
    other.load_state_dict(store.state_dict())
    assert torch.equal(other.groups["g"].draw, g.draw)
    plain = _store(rank=8, split=4)
    plain.register("g", BasisSpec(n, r1, r2), "cpu")
    plain.refresh("g", x.t() @ x)
    assert not plain.keeps_draw("g") and plain.groups["g"].draw is None


def test_refit_within_the_window_is_unbiased(seeded):
    """Over the window's draw, E[P P^T] = I after a refit to a new Q1 too."""
    n, r1, r2 = 12, 3, 3
    store = _store(rank=6, split=3, refresh_every=1, resample_every=10**6, seed=5)
    store.register("g", BasisSpec(n, r1, r2), "cpu")
    a, b = torch.randn(50, n), torch.randn(50, n)
    acc = torch.zeros(n, n, dtype=torch.float64)
    draws = 4000
    for _ in range(draws):
        store.groups["g"].draw = None
        store.refresh("g", a.t() @ a)  # a fresh draw against Q1(a) ...
        store.advance("g")
        store.refresh("g", b.t() @ b)  # ... kept, projected against Q1(b)
        p = store.basis("g").double()
        acc += p @ p.t()
    err = (acc / draws - torch.eye(n, dtype=torch.float64)).abs().max().item()
    assert err < 0.15  # Monte-Carlo error ~ k / sqrt(draws) = 3 / 63
