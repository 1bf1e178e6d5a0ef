"""The weight-gradient variance diagnostic: the identity (1) of ``prac_fx.variance`` checked
numerically, the one-draw running estimate against it, and ``measure`` against the gradient the
backend actually computes."""
import math

import pytest
import torch
import torch._dynamo

import prac_fx
from prac_fx import variance
from toys import MLP


def _orthonormal(n, r, gen):
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return q


@pytest.mark.parametrize("n, r1, r2", [(48, 8, 8), (48, 0, 12), (32, 16, 4)])
def test_identity_matches_many_draws(n, r1, r2):
    """E||G P P^T - G||^2 = (k - 1)||G (I - Q1 Q1^T)||^2, to within 5 standard errors."""
    gen = torch.Generator().manual_seed(1)
    m = 20
    # a gradient with most energy in a few directions, partly caught by Q1
    g = torch.randn(m, n, generator=gen, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, n, dtype=torch.float64))
    q1 = _orthonormal(n, r1, gen) if r1 else None
    k = (n - r1) / r2
    errors = []
    for _ in range(3000):
        q2 = variance.complement_draw(q1, n, r2, gen)
        p = torch.cat(([q1] if q1 is not None else []) + [math.sqrt(k) * q2], dim=1)
        errors.append(((g @ p) @ p.t() - g).square().sum().item())
    errors = torch.tensor(errors)
    expected = variance.identity_variance(g, q1, r2)
    assert abs(errors.mean().item() - expected) < 5 * errors.std().item() / math.sqrt(len(errors))
    # the estimate is unbiased as well
    mean = torch.zeros_like(g)
    gen2 = torch.Generator().manual_seed(2)
    for _ in range(3000):
        q2 = variance.complement_draw(q1, n, r2, gen2)
        p = torch.cat(([q1] if q1 is not None else []) + [math.sqrt(k) * q2], dim=1)
        mean += (g @ p) @ p.t()
    mean /= 3000
    assert ((mean - g).norm() / g.norm()).item() < 5 * math.sqrt(expected / 3000) / g.norm().item()


def test_sampled_variance_converges_to_the_identity():
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(16, 40, generator=gen, dtype=torch.float64)
    q1 = _orthonormal(40, 6, gen)
    sampled = variance.sampled_variance(g, q1, 10, draws=2000, generator=gen)
    assert sampled == pytest.approx(variance.identity_variance(g, q1, 10), rel=0.05)


def test_running_estimate_is_unbiased_for_the_outside_energy():
    """||A2||^2 = k ||G Q2||^2 has mean ||G_perp||^2; ||A1||^2 = ||G Q1||^2 is exact."""
    gen = torch.Generator().manual_seed(4)
    n, r1, r2 = 40, 8, 8
    k = (n - r1) / r2
    g = torch.randn(12, n, generator=gen, dtype=torch.float64)
    q1 = _orthonormal(n, r1, gen)
    perp_sq = (g - g @ q1 @ q1.t()).square().sum().item()
    a2 = torch.tensor([(math.sqrt(k) * g @ variance.complement_draw(q1, n, r2, gen)).square().sum().item()
                       for _ in range(4000)])
    assert abs(a2.mean().item() - perp_sq) < 5 * a2.std().item() / math.sqrt(len(a2))
    a1_sq = (g @ q1).square().sum().item()
    relative = variance.identity_variance(g, q1, r2) / g.square().sum().item()
    # at the mean draw, the running estimate equals the identity's relative variance
    assert variance.running_estimate(a1_sq, perp_sq, k) == pytest.approx(relative, rel=1e-9)


def test_running_estimate_gives_none_where_the_energy_estimate_is_not_positive():
    """A quantized copy's energy estimate is ``||dW||^2 - q``; where the rounding model's q
    exceeds the squared gradient (2 bits) it is negative. The estimate is then missing, not a
    false 0, and the total over sites is missing with it (leaving the site out would understate
    the noise). A site with no gradient at all leaves the total to the others."""
    from types import SimpleNamespace

    assert variance.running_estimate(0.0, -0.005, 1.0, 0.05) is None
    assert variance.running_estimate(0.0, 0.0, 1.0, 0.0) is None
    assert variance.running_estimate(0.0, 0.2, 1.0, 0.05) == pytest.approx(0.25)

    def backend(*rows):
        group = SimpleNamespace(n=64, r1=0, r2=0, stats=torch.tensor(rows, dtype=torch.float64))
        return SimpleNamespace(collect=lambda: None, config=SimpleNamespace(complement_scale=None),
                               store=SimpleNamespace(groups={"g": group}))

    out = variance.running(backend([0.0, 0.2, 0.05], [0.0, -0.005, 0.05]))
    assert out == {"g/0": pytest.approx(0.25)}  # no "g/1", no total
    out = variance.running(backend([0.0, 0.2, 0.05], [0.0, 0.0, 0.0], [0.0, 0.6, 0.05]))
    assert set(out) == {"g/0", "g/2", "total"} and out["total"] == pytest.approx(0.1 / 0.8)


@pytest.fixture(scope="module")
def trained_mlp():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP(n=32, hidden=64, out=16)
    be = prac_fx.backend(rank=8, compiler="eager")
    compiled = torch.compile(model, backend=be)
    x = torch.randn(8, 16, 32)
    compiled(x).square().mean().backward()  # the first call fits Q1 to this batch
    return model, be, compiled, x


def test_measure_agrees_with_the_identity_and_the_backends_gradient(trained_mlp):
    model, be, compiled, x = trained_mlp
    rows = variance.measure(be, model, lambda: model(x).square().mean(), fit="state", draws=400)
    assert {r.module for r in rows} == {"up", "mid", "down"}
    for r in rows:
        assert r.relative == pytest.approx(r.relative_identity, rel=0.25), r
        assert 0.0 < r.energy_outside < 1.0
    # the estimate measured is the one the backend computes: its gradient is G P P^T
    model.zero_grad()
    model(x).square().mean().backward()
    exact = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    compiled(x).square().mean().backward()
    group = next(g for g in be.graphs[0].groups if g.sites)
    p = be.store.basis(group.key).double()
    site = next(s for s in be.graphs[0].sites if s.group == group.key)
    g = exact[site.weight].double()
    torch.testing.assert_close(model.get_parameter(site.weight).grad.double(), g @ p @ p.t(),
                               rtol=1e-4, atol=1e-6)


def test_fit_to_the_batch_beats_a_stale_basis(trained_mlp):
    """On a batch unlike the one Q1 was fitted to, refitting Q1 to it leaves less energy outside."""
    model, be, _, _ = trained_mlp
    gen = torch.Generator().manual_seed(9)
    other = torch.randn(8, 16, 32, generator=gen) @ torch.diag(torch.logspace(1, -1, 32))
    loss = lambda: model(other).square().mean()  # noqa: E731
    stale = variance.measure(be, model, loss, fit="state", draws=64)
    fresh = variance.measure(be, model, loss, fit="batch", draws=64)
    assert variance.total(fresh, "identity") < variance.total(stale, "identity")
    up = {r.module: r for r in fresh}["up"]
    assert up.energy_outside < {r.module: r for r in stale}["up"].energy_outside


def test_measure_leaves_grads_and_checks_its_input(trained_mlp):
    model, be, _, x = trained_mlp
    marker = {k: torch.full_like(p, 7.0) for k, p in model.named_parameters()}
    for k, p in model.named_parameters():
        p.grad = marker[k].clone()
    variance.measure(be, model, lambda: model(x).sum(), draws=2)
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, marker[k])
    with pytest.raises(ValueError, match="fit must be"):
        variance.measure(be, model, lambda: model(x).sum(), fit="oracle")
    with pytest.raises(ValueError, match="no site yet"):
        variance.measure(prac_fx.backend(rank=8), model, lambda: model(x).sum())


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_running_statistics_are_the_squared_norms_of_g_p(compiler):
    """The backward hands the runner [||G Q1||^2, ||sqrt(k) G Q2||^2, q] per site, exactly (q, the
    rounding term, is 0 for an unquantized copy), and the report shows the running estimate."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP(n=32, hidden=64, out=16)
    be = prac_fx.backend(rank=8, compiler=compiler)
    compiled = torch.compile(model, backend=be)
    x = torch.randn(8, 16, 32)
    compiled(x).square().mean().backward()
    model.zero_grad()
    model(x).square().mean().backward()
    exact = {k: p.grad.clone() for k, p in model.named_parameters()}
    be.collect()
    rows = {r["module"]: r for r in be.report().rows(include_skipped=False)}
    assert set(rows) == {"up", "mid", "down"}
    for record in be.graphs:
        for group in record.groups:
            g_basis = be.store.groups[group.key]
            p = g_basis.basis.double()
            for index, name in enumerate(group.sites):
                site = next(s for s in record.sites if s.node == name)
                g = exact[site.weight].double()
                g = g if site.kind == "linear" else g.t()
                a = g @ p
                expected = [a[:, :group.r1].square().sum().item(), a[:, group.r1:].square().sum().item()]
                got = g_basis.stats[index].tolist()
                assert got[:2] == pytest.approx(expected, rel=1e-4) and got[2] == 0.0
                k = (group.n - group.r1) / group.r2
                assert rows[site.module]["rel. variance"] == pytest.approx(
                    variance.running_estimate(*expected, k), rel=1e-3, abs=1e-4)
