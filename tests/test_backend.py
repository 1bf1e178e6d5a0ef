"""The backend end to end on a small MLP: the ladder, unbiasedness, basis lifetime, recompiles."""
import logging
import sys

import pytest
import torch
import torch._dynamo

import prac_fx
from toys import MLP
from conftest import rel_err


def _grads(model, x, grad_out):
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(grad_out)
    return out.detach(), x.grad, {k.removeprefix("_orig_mod."): p.grad.clone()
                                  for k, p in model.named_parameters()}


@pytest.fixture
def mlp_case():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 8, 32)
    grad_out = torch.randn(4, 8, 16)
    return model, x, grad_out, _grads(model, x, grad_out)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_full_rank_matches_eager(mlp_case, compiler):
    """Ladder: eager -> aot_eager with the pass -> Inductor with the pass."""
    torch._dynamo.reset()
    model, x, grad_out, (ref_out, ref_gx, ref_g) = mlp_case
    be = prac_fx.backend(rank=1.0, compiler=compiler)
    compiled = torch.compile(model, backend=be, fullgraph=True)
    out, gx, g = _grads(compiled, x, grad_out)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, ref_gx)
    for k in ref_g:
        assert rel_err(g[k], ref_g[k]) < 1e-4, k
    report = be.report()
    assert (report.sites_matched, report.sites_rewritten) == (3, 3)
    assert [r["status"] for r in report.rows(include_skipped=False)] == ["rewritten"] * 3
    passes = [(r["pass"], r["nodes created"], r["nodes erased"], r["sites matched"])
              for r in report.pass_rows()]
    # rewrite: per site the op and its statistics row, per group basis and x @ P, one stats input
    assert passes == [("head_loss", 0, 0, 0), ("find_sites", 0, 0, 3), ("group_sites", 0, 0, 3),
                      ("rewrite_sites", 13, 3, 3)]


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_low_rank_forward_and_input_grad_exact(mlp_case, compiler):
    torch._dynamo.reset()
    model, x, grad_out, (ref_out, ref_gx, ref_g) = mlp_case
    be = prac_fx.backend(rank=4, compiler=compiler)
    out, gx, g = _grads(torch.compile(model, backend=be), x, grad_out)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, ref_gx)
    for k in ("up.bias", "down.bias"):
        torch.testing.assert_close(g[k], ref_g[k])
    assert rel_err(g["mid.weight"], ref_g["mid.weight"]) > 1e-3  # really compressed


def _mean_grad_errors(model, x, grad_out, exact, calls, compiler="eager", **options):
    torch._dynamo.reset()
    be = prac_fx.backend(rank=8, split=0.5, refresh_every=10**9, resample_every=1, seed=1,
                         compiler=compiler, **options)
    compiled = torch.compile(model, backend=be)
    total = {k: torch.zeros_like(v) for k, v in exact.items()}
    errors = {}
    for i in range(1, max(calls) + 1):
        model.zero_grad()
        compiled(x).backward(grad_out)
        for k in total:
            total[k] += getattr(model, k).weight.grad
        if i in calls:
            errors[i] = sum(rel_err(total[k] / i, exact[k]) for k in total) / len(total)
    return errors


def test_weight_gradient_unbiased(mlp_case):
    """Mean over n calls -> exact gradient at the 1/sqrt(n) rate; a wrong scale does not."""
    model, x, grad_out, (_, _, ref_g) = mlp_case
    exact = {k: ref_g[f"{k}.weight"] for k in ("up", "mid", "down")}
    n = 150
    good = _mean_grad_errors(model, x, grad_out, exact, (n, 4 * n))
    ratio = good[n] / good[4 * n]
    assert 1.5 < ratio < 2.8, good  # 1/sqrt(n): error halves for 4x the calls
    for scale in (1.0, "n/r"):
        k = 32 / 8 if scale == "n/r" else scale
        bad = _mean_grad_errors(model, x, grad_out, exact, (n, 4 * n), complement_scale=k)
        assert bad[4 * n] > 2 * good[4 * n], (scale, bad, good)  # a bias floor stays
        assert bad[n] / bad[4 * n] < 1.4, (scale, bad)


def test_weight_gradient_unbiased_under_inductor(mlp_case):
    """The same rate through Inductor: its partitioner may move ``x @ P`` into the backward, and
    the bases stay runtime inputs drawn outside the graph, so the mean still converges."""
    model, x, grad_out, (_, _, ref_g) = mlp_case
    exact = {k: ref_g[f"{k}.weight"] for k in ("up", "mid", "down")}
    n = 150
    good = _mean_grad_errors(model, x, grad_out, exact, (n, 4 * n), compiler="inductor")
    assert 1.5 < good[n] / good[4 * n] < 2.8, good


def test_basis_fixed_between_forward_and_backward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8, bias=False)
    be = prac_fx.backend(rank=4, refresh_every=10**9, resample_every=1)
    compiled = torch.compile(layer, backend=be)
    x = torch.randn(10, 16)
    grad = torch.randn(10, 8)
    out_a = compiled(x)
    (key,) = be.store.groups
    basis_a = be.store.basis(key).clone()
    out_b = compiled(x)  # draws a new basis before its forward
    assert not torch.equal(be.store.basis(key), basis_a)
    layer.zero_grad()
    out_a.backward(grad)
    expected = (grad.t() @ (x @ basis_a)) @ basis_a.t()
    torch.testing.assert_close(layer.weight.grad, expected)
    del out_b


def test_refresh_and_resample_do_not_recompile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    be = prac_fx.backend(rank=8, refresh_every=2, resample_every=1, compiler="eager")
    compiled = torch.compile(model, backend=be)
    x = torch.randn(4, 8, 32)
    seen = []
    for _ in range(6):
        compiled(x).sum().backward()
        seen.append(be.store.basis("up"))
    assert len(be.graphs) == 1
    group = be.store.groups["up"]
    assert (group.calls, group.refreshes, group.resamples) == (6, 3, 6)
    assert all(not torch.equal(a, b) for a, b in zip(seen, seen[1:]))  # a new basis each call


def test_default_redraws_the_random_part_only_at_refreshes():
    torch._dynamo.reset()
    torch.manual_seed(0)
    be = prac_fx.backend(rank=8, refresh_every=3, compiler="eager")
    compiled = torch.compile(MLP(), backend=be)
    x = torch.randn(4, 8, 32)
    seen = []
    for _ in range(7):
        compiled(x).sum().backward()
        seen.append(be.store.basis("up"))
    group = be.store.groups["up"]
    assert (group.calls, group.refreshes, group.resamples) == (7, 3, 3)
    assert [a is b for a, b in zip(seen, seen[1:])] == [True, True, False, True, True, False]


def test_inference_is_exact_and_unchanged():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 8, 32)
    be = prac_fx.backend(rank=4, compiler="eager")
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        out = compiled(x)
        ref = model(x)
    torch.testing.assert_close(out, ref)
    assert [g.training for g in be.graphs] == [False]
    assert be.report().sites_rewritten == 0
    assert be.store.groups == {}


def test_site_filter_and_too_narrow_stay_exact():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    # 512 rows, so that rank 48 still pays on the 64-wide ``mid`` (48 (512 + 64) < 512 * 64).
    x, grad_out = torch.randn(64, 8, 32), torch.randn(64, 8, 16)
    _, _, ref_g = _grads(model, x, grad_out)
    be = prac_fx.backend(rank=48, site_filter=lambda fqn: fqn != "down", compiler="eager")
    _, _, g = _grads(torch.compile(model, backend=be), x, grad_out)
    reasons = {r["module"]: r["status"] for r in be.report().rows() if r["kind"] == "linear"}
    assert reasons == {"up": "skipped: too narrow for the rank", "mid": "rewritten",
                       "down": "skipped: filtered"}
    torch.testing.assert_close(g["down.weight"], ref_g["down.weight"])
    torch.testing.assert_close(g["up.weight"], ref_g["up.weight"])
    assert rel_err(g["mid.weight"], ref_g["mid.weight"]) > 1e-3


class PooledClassifier(torch.nn.Module):
    """Token-level layers, then mean pooling into a classifier that sees one row per sample."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(32, 32)
        self.pooled = torch.nn.Linear(32, 2)  # not named as a head: its rows decide

    def forward(self, x):
        return self.pooled(torch.relu(self.body(x)).mean(dim=1))


def test_pooled_head_with_few_rows_stays_exact():
    """With N = 4 rows, n = 32, r = 8: r (N + n) = 288 >= N n = 128, so ``pooled`` stays exact;
    the body (N = 4 * 16 = 64 rows: 768 < 2048) is compressed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = PooledClassifier()
    x = torch.randn(4, 16, 32)
    grad_out = torch.randn(4, 2)
    model(x).backward(grad_out)
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    be = prac_fx.backend(rank=8, compiler="eager")
    torch.compile(model, backend=be)(x).backward(grad_out)
    status = {r["module"]: r["status"] for r in be.report().rows() if r["kind"] == "linear"}
    assert status == {"body": "rewritten", "pooled": "skipped: too few rows to gain"}
    torch.testing.assert_close(model.pooled.weight.grad, ref["pooled.weight"])
    assert rel_err(model.body.weight.grad, ref["body.weight"]) > 1e-3


class Chain(torch.nn.Module):
    """A linear layer feeding another directly: the second group's input is a rewritten site."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(32, 32)
        self.b = torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_linear_feeding_linear(compiler):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Chain()
    x, grad_out = torch.randn(4, 16, 32), torch.randn(4, 16, 16)
    ref_out, ref_gx, ref_g = _grads(model, x, grad_out)
    be = prac_fx.backend(rank=8, compiler=compiler)
    out, gx, g = _grads(torch.compile(model, backend=be), x, grad_out)
    assert be.report().sites_rewritten == 2
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, ref_gx)
    assert rel_err(g["b.weight"], ref_g["b.weight"]) > 1e-3


def test_registered_backend_name():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(2, 32)
    out = torch.compile(model, backend="prac")(x)
    torch.testing.assert_close(out, model(x))
    assert sys.modules["prac_fx.backend"]._default is not None


def test_backend_entry_point_declared():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "prac"]
    assert eps and eps[0].load() is prac_fx.prac_backend


def test_logs_site_counts(caplog, mlp_case):
    torch._dynamo.reset()
    model, x, grad_out, _ = mlp_case
    with caplog.at_level(logging.INFO, logger="prac_fx"):
        torch.compile(model, backend=prac_fx.backend(rank=4, compiler="eager"))(x)
    assert any("3 sites matched, 3 rewritten" in r.getMessage() for r in caplog.records)


class ParamMatmul(torch.nn.Module):
    """``x @ W`` with a raw parameter (weight stored (n, m)), as some models write projections."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Parameter(torch.randn(32, 24) / 6)
        self.out = torch.nn.Linear(24, 8)

    def forward(self, x):
        return self.out(torch.tanh(x @ self.proj))


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_matmul_with_parameter(compiler):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ParamMatmul()
    x, grad_out = torch.randn(3, 5, 32), torch.randn(3, 5, 8)
    ref_out, ref_gx, ref_g = _grads(model, x, grad_out)
    be = prac_fx.backend(rank=1.0, compiler=compiler)
    out, gx, g = _grads(torch.compile(model, backend=be), x, grad_out)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, ref_gx)
    assert rel_err(g["proj"], ref_g["proj"]) < 1e-4
    kinds = sorted(r["kind"] for r in be.report().rows(include_skipped=False))
    assert kinds == ["linear", "matmul"]


class CountingMLP(MLP):
    """Mutates a buffer in place every call: the probe must not run such a graph twice."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return super().forward(x)


def test_graph_mutating_inputs_gets_no_probe(caplog):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CountingMLP()
    x = torch.randn(4, 8, 32)
    be = prac_fx.backend(rank=8, refresh_every=1, compiler="eager")
    compiled = torch.compile(model, backend=be)
    with caplog.at_level(logging.WARNING, logger="prac_fx"):
        for _ in range(3):
            compiled(x).sum().backward()
    assert model.calls.item() == 3  # mutated once per call, not again by a probe
    assert any("no activation probe" in r.getMessage() for r in caplog.records)
    assert be.report().sites_rewritten == 3
    assert all(torch.isfinite(be.store.basis(k)).all() for k in be.store.groups)


def test_following_basis_keeps_the_gradient_unbiased(mlp_case):
    """With subspace_iters, Q1 depends on each call's input, the random part is rebuilt against
    it from a draw independent of the data: the mean still converges at the 1/sqrt(n) rate."""
    model, x, grad_out, (_, _, ref_g) = mlp_case
    exact = {k: ref_g[f"{k}.weight"] for k in ("up", "mid", "down")}
    n = 150
    good = _mean_grad_errors(model, x, grad_out, exact, (n, 4 * n), subspace_iters=1)
    ratio = good[n] / good[4 * n]
    assert 1.5 < ratio < 2.8, good


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_following_basis_at_full_rank_is_exact(compiler, mlp_case):
    model, x, grad_out, (ref_out, ref_gx, ref_g) = mlp_case
    torch._dynamo.reset()
    be = prac_fx.backend(rank=1.0, subspace_iters=2, compiler=compiler)
    compiled = torch.compile(model, backend=be)
    for _ in range(2):  # the second call starts from the basis the first one built
        model.zero_grad()
        xi = x.detach().clone().requires_grad_()
        out = compiled(xi)
        out.backward(grad_out)
    torch.testing.assert_close(out, ref_out)
    params = dict(model.named_parameters())
    worst = max(rel_err(params[k].grad, v) for k, v in ref_g.items())
    assert worst < 1e-4, worst  # P P^T = I up to the rounding of two QRs in float32
    assert be.report().sites_rewritten == 3
    assert all(g.omega is not None for g in be.store.groups.values())


def test_following_basis_keeps_loss_and_input_gradients_exact():
    """At a real rank (n/4) on a small Llama, the following basis changes only the compressed
    weights' gradients: the loss and the gradient of every other parameter (embeddings, norms,
    the exact head), which reach it through the input gradients, equal eager's."""
    from prac_fx import variance
    from prac_fx.diff import models

    torch.manual_seed(0)
    model = models.build("llama", layers=1, width=64, seq=32, vocab=128)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    be = prac_fx.backend(rank=0.25, subspace_iters=1)
    compiled = torch.compile(model, backend=be)
    for _ in range(2):  # the second call follows from the first call's basis
        model.zero_grad(set_to_none=True)
        loss = compiled(ids, labels=ids).loss
        loss.backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref = model(ids, labels=ids).loss
    ref.backward()
    torch.testing.assert_close(loss, ref)
    compressed = {s.weight for _, sites in variance._rewritten_groups(be) for s in sites}
    assert len(compressed) == 7  # q, k, v, o, gate, up, down
    exact = [n for n in got if n not in compressed]
    assert "lm_head.weight" in exact and "model.embed_tokens.weight" in exact
    for n in exact:
        torch.testing.assert_close(got[n], dict(model.named_parameters())[n].grad, rtol=1e-4, atol=1e-6)
    assert max(rel_err(got[n], dict(model.named_parameters())[n].grad) for n in compressed) > 1e-3


def test_following_basis_tracks_the_batch():
    """A principal basis that follows the input holds the new batch's top directions after one
    call; the default one keeps the subspace of the batch it was fitted to."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)

    def batch(rotation):
        z = torch.randn(16, 32, 32, generator=gen) @ torch.diag(torch.logspace(1, -2, 32))
        return z @ rotation

    rot_a = torch.linalg.qr(torch.randn(32, 32, generator=gen))[0]
    rot_b = torch.linalg.qr(torch.randn(32, 32, generator=gen))[0]
    layer = torch.nn.Linear(32, 16, bias=False)
    energy = {}
    for iters in (0, 2):
        torch._dynamo.reset()
        be = prac_fx.backend(rank=8, subspace_iters=iters, compiler="eager")
        compiled = torch.compile(layer, backend=be)
        compiled(batch(rot_a)).sum().backward()  # the first call fits Q1 to batch a
        xb = batch(rot_b)
        compiled(xb).sum().backward()
        (key,) = be.store.groups
        q1 = be.store.groups[key].basis[:, :4].double()
        xb2 = xb.reshape(-1, 32).double()
        energy[iters] = ((xb2 @ q1).norm() / xb2.norm()).item()  # share of batch b held by Q1
        best = torch.linalg.svdvals(xb2)[:4].norm().item() / xb2.norm().item()  # its top 4
    assert energy[2] > 0.95 * best and energy[0] < 0.6 * best, (energy, best)


def test_following_draw_is_isotropic():
    """The held draw of a following group is the raw Gaussian: the graph projects it against
    each call's own Q1, and a draw already projected against an older Q1 would leave the new
    complement short of the directions the old Q1 held (a biased gradient)."""
    from prac_fx.basis import BasisStore
    from prac_fx.passes.graph_state import BasisSpec

    store = BasisStore(prac_fx.PracConfig(rank=16, subspace_iters=1, seed=3))
    store.register("g", BasisSpec(64, 8, 8), "cpu")
    store.refresh("g", None)
    along = []
    for _ in range(200):
        store.resample("g")
        q1 = store.groups["g"].q1.double()
        omega = store.groups["g"].omega.double()
        along.append((q1.t() @ omega).square().sum().item())
    # an isotropic (64, 8) draw puts r1 * r2 = 64 of its expected squared norm along Q1
    mean = sum(along) / len(along)
    assert 48 < mean < 80, mean


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_cycled_complement_averages_to_the_exact_gradient(mlp_case, compiler):
    """complement="cycle" through the compiled graph: each call's weight gradient is still
    compressed (really noisy), and over the calls in which every group has used each column of
    its complement basis equally often (lcm of 28/4 = 7 and 60/4 = 15 calls) the mean gradient is
    the exact one, up to float rounding: the errors of consecutive calls cancel."""
    torch._dynamo.reset()
    model, x, grad_out, (_, _, ref_g) = mlp_case
    be = prac_fx.backend(rank=8, split=0.5, refresh_every=10**9, complement="cycle", seed=1,
                         compiler=compiler)
    compiled = torch.compile(model, backend=be)
    total = {k: torch.zeros_like(ref_g[f"{k}.weight"], dtype=torch.float64) for k in ("up", "mid", "down")}
    calls = 105
    for _ in range(calls):
        model.zero_grad()
        compiled(x).backward(grad_out)
        for k in total:
            grad = getattr(model, k).weight.grad
            assert rel_err(grad, ref_g[f"{k}.weight"]) > 1e-2, k  # each call is compressed
            total[k] += grad.double()
    for k in total:
        assert rel_err((total[k] / calls).float(), ref_g[f"{k}.weight"]) < 1e-4, k
    assert {g.block for g in be.store.groups.values()} == {calls - 1}
    assert len(be.graphs) == 1  # a new block is a new input, not a recompile


def test_early_refits_refit_in_the_first_window_only():
    torch._dynamo.reset()
    torch.manual_seed(0)
    be = prac_fx.backend(rank=8, refresh_every=16, early_refits=2, compiler="eager")
    assert be.config.early_refit_calls == {4, 8}
    compiled = torch.compile(MLP(), backend=be)
    x = torch.randn(4, 8, 32)
    refits = []
    for call in range(34):
        before = be.store.groups["up"].refreshes if "up" in be.store.groups else 0
        compiled(x).sum().backward()
        if be.store.groups["up"].refreshes > before:
            refits.append(call)
    # the first fit, the early ones, then every refresh_every calls
    assert refits == [0, 4, 8, 16, 32]
    assert be.store.groups["up"].resamples == 5  # each refit redraws the random part
    assert len(be.graphs) == 1


def test_per_site_ranks():
    """A rank mapping: the longest key in the path wins, '*' takes the rest; q/k/v share one
    basis at the largest of their ranks; a path no key names, without '*', stays exact."""
    from toys import Attention
    from prac_fx.passes import kinds

    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(4, 32, 32)
    be = prac_fx.backend(rank={"*": 8, "k": 4, "q": 12, "down": 0.5, "up": 1.0}, compiler="eager")
    torch.compile(Attention(), backend=be)(x).sum().backward()
    got = {k: (g.r1, g.r2) for k, g in be.store.groups.items()}
    assert got == {"q+k+v": (6, 6), "out": (4, 4), "up": (16, 16), "down": (16, 16)}

    torch._dynamo.reset()
    be = prac_fx.backend(rank={"q": 8}, compiler="eager")
    torch.compile(Attention(), backend=be)(x).sum().backward()
    assert set(be.store.groups) == {"q"}
    status = {row["module"]: row["status"] for row in be.report().rows() if row["kind"] == "linear"}
    assert status["k"] == status["up"] == f"skipped: {kinds.FILTERED}"
    assert status["q"] == kinds.REWRITTEN
