"""What the backend does when things go wrong: non-finite activations at a refresh, graphs the
passes cannot handle, weights that are not floating point, a rank wider than a layer."""
import logging

import pytest
import torch
import torch._dynamo

import prac_fx
from prac_fx import passes


class ScaledMLP(torch.nn.Module):
    """``scale`` multiplies the hidden activation: a NaN there reaches the inputs of ``mid`` and
    ``down`` but not of ``up``."""

    def __init__(self, n=32, hidden=64, out=8):
        super().__init__()
        self.up = torch.nn.Linear(n, hidden)
        self.mid = torch.nn.Linear(hidden, hidden)
        self.down = torch.nn.Linear(hidden, out)

    def forward(self, x, scale):
        h = torch.nn.functional.gelu(self.up(x)) * scale
        return self.down(torch.tanh(self.mid(h)))


def test_nan_activation_at_refresh_keeps_bases_and_training_finite(caplog):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ScaledMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    be = prac_fx.backend(rank=8, refresh_every=3, resample_every=1, compiler="eager")
    compiled = torch.compile(model, backend=be)
    groups = be.store.groups
    poisoned = {3, 6}  # refresh calls (calls % 3 == 0)
    losses = []
    with caplog.at_level(logging.WARNING, logger="prac_fx"):
        for step in range(11):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, 8, generator=g)
            scale = torch.ones(64)
            if step in poisoned:
                scale[5] = float("nan")
                q1_before = {k: groups[k].q1.clone() for k in groups}
                refreshes_before = {k: groups[k].refreshes for k in groups}
            opt.zero_grad()
            loss = (compiled(x, scale) - y).square().mean()
            loss.backward()
            if step in poisoned:
                # the step's loss is NaN (as it is in eager); the user skips it, as a grad
                # scaler would, and the bases stay what they were
                assert not torch.isfinite(loss)
                for k in ("mid", "down"):
                    assert torch.equal(groups[k].q1, q1_before[k]), k
                    assert groups[k].refreshes == refreshes_before[k], k
                assert groups["up"].refreshes == refreshes_before["up"] + 1  # its input was clean
                assert not torch.equal(groups["up"].q1, q1_before["up"])
                for group in groups.values():
                    assert torch.isfinite(group.basis).all()
                continue
            opt.step()
            losses.append(loss.detach())
    assert torch.isfinite(torch.stack(losses)).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the clean refresh at call 9 refitted every group again
    assert {k: g.refreshes for k, g in groups.items()} == {"up": 4, "mid": 2, "down": 2}
    warned = [r.getMessage() for r in caplog.records if "NaN/Inf" in r.getMessage()]
    assert len(warned) == 2 and any("'mid'" in m for m in warned) and any("'down'" in m for m in warned)


def test_pass_failure_falls_back_to_plain_inductor(monkeypatch, caplog):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ScaledMLP()
    x, scale = torch.randn(2, 16, 32), torch.rand(64)
    model.zero_grad()
    ref = model(x, scale)
    ref.square().sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}

    def broken(gm, policy):
        raise RuntimeError("cannot handle this graph")

    monkeypatch.setattr(passes, "run", broken)
    be = prac_fx.backend(rank=4, strict=False)  # Inductor
    model.zero_grad()
    with caplog.at_level(logging.WARNING, logger="prac_fx"):
        out = torch.compile(model, backend=be)(x, scale)
        out.square().sum().backward()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    # the cause, the torch release and what to do
    assert "fell back to plain Inductor" in warned[0]
    assert "the passes failed (RuntimeError: cannot handle this graph)" in warned[0]
    assert f"torch {torch.__version__}" in warned[0] and "PRAC_FX_STRICT=1" in warned[0]
    assert be.graphs[0].note.startswith("fallback: the passes failed (RuntimeError")
    report = be.report()
    assert be.store.groups == {} and report.sites_rewritten == 0
    assert [g.index for g in report.fallbacks] == [0]
    assert report.table().splitlines()[0].startswith("1 graph(s) FELL BACK to plain Inductor")
    torch.testing.assert_close(out, ref)
    for k, p in model.named_parameters():  # nothing compressed: weight gradients are exact
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-5, atol=1e-6)


def test_rewritten_graph_failing_to_compile_falls_back(monkeypatch, caplog):
    """The passes succeed but AOTAutograd cannot trace the result: the original graph is
    compiled instead, nothing is compressed, training goes on."""
    from prac_fx.passes.ops import CompressedLinear

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ScaledMLP()
    x, scale = torch.randn(2, 16, 32), torch.rand(64)
    model.zero_grad()
    model(x, scale).square().sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}

    def untraceable(ctx, *args):
        raise NotImplementedError("op not supported by this tracer")

    monkeypatch.setattr(CompressedLinear, "forward", staticmethod(untraceable))
    be = prac_fx.backend(rank=4, compiler="eager", strict=False)
    compiled = torch.compile(model, backend=be)
    with caplog.at_level(logging.WARNING, logger="prac_fx"):
        for _ in range(2):
            model.zero_grad()
            compiled(x, scale).square().sum().backward()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("the rewritten graph failed to compile (NotImplementedError: op not supported "
               "by this tracer)" in m for m in messages) == 1, messages
    assert len(be.graphs) == 1 and be.graphs[0].note.startswith("fallback: the rewritten graph")
    assert be.report().sites_rewritten == 0 and be.graphs[0].groups == []
    # bound only after a successful compile: no group in the store or in its state
    assert be.store.groups == {} and be.state_dict()["store"]["groups"] == {}
    for k, p in model.named_parameters():  # exact: the original graph ran
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-5, atol=1e-6)


def test_strict_raises_at_the_fallback_naming_its_cause(monkeypatch):
    """strict=True (the suite's default, through PRAC_FX_STRICT): no silent fallback."""
    torch._dynamo.reset()
    model = ScaledMLP()
    x, scale = torch.randn(2, 16, 32), torch.rand(64)

    def broken(gm, policy):
        raise RuntimeError("cannot handle this graph")

    monkeypatch.setattr(passes, "run", broken)
    be = prac_fx.backend(rank=4, compiler="eager", strict=True)
    with pytest.raises(Exception) as caught:
        torch.compile(model, backend=be)(x, scale)
    # Dynamo wraps what a backend raises; the FallbackError is in the chain
    chain, err = [], caught.value
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    fallback = next(e for e in chain if isinstance(e, prac_fx.FallbackError))
    assert "the passes failed (RuntimeError: cannot handle this graph)" in str(fallback)
    assert f"torch {torch.__version__}" in str(fallback)


class ComplexAndInt(torch.nn.Module):
    """A complex trained weight and an integer buffer: neither may be compressed."""

    def __init__(self):
        super().__init__()
        self.cw = torch.nn.Parameter(torch.randn(16, 16, dtype=torch.complex64) / 4)
        self.register_buffer("table", torch.arange(16 * 4).reshape(16, 4))
        self.real = torch.nn.Linear(16, 4)

    def forward(self, x, ids):
        z = x.to(torch.complex64) @ self.cw
        counts = ids @ self.table  # integer matmul
        return self.real(z.abs()) + counts.float()


def test_non_floating_weights_are_skipped():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ComplexAndInt()
    x, ids = torch.randn(3, 16), torch.randint(0, 3, (3, 16))
    ref = model(x, ids)
    ref.sum().backward()
    ref_cw = model.cw.grad.clone()
    model.zero_grad()
    be = prac_fx.backend(rank=2, compiler="eager")
    out = torch.compile(model, backend=be)(x, ids)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model.cw.grad, ref_cw)  # exact: the complex site is untouched
    rows = {r["node"]: r for r in be.report().rows()}
    kinds = {r["kind"]: r["status"] for r in rows.values() if r["kind"] in ("linear", "matmul")}
    assert kinds["linear"] == "rewritten"
    matmuls = [r["status"] for r in rows.values() if r["kind"] == "matmul"]
    assert matmuls == ["skipped: no trainable weight"] * 2, rows
    assert list(be.store.groups) == ["real"]


def test_rank_wider_than_a_site_is_exact_and_logged_once(caplog):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ScaledMLP()  # widths 32, 64, 64
    be = prac_fx.backend(rank=48, compiler="eager")
    compiled = torch.compile(model, backend=be, dynamic=False)
    model.zero_grad()
    # 64 rows per position: even at seq 4 (N = 256) rank 48 pays on the 64-wide sites
    x, scale = torch.randn(64, 16, 32), torch.ones(64)
    ref_x = x.clone().requires_grad_()
    with caplog.at_level(logging.WARNING, logger="prac_fx"):
        for seq in (16, 16, 8, 4):  # new shapes recompile: still one message per module
            compiled(x[:, :seq], scale).sum().backward()
    narrow = [r.getMessage() for r in caplog.records if "narrower than rank" in r.getMessage()]
    assert len(narrow) == 1 and "'up'" in narrow[0] and "width 32" in narrow[0], narrow
    assert sum(g.training for g in be.graphs) >= 2
    assert set(be.store.groups) == {"mid", "down"}
    # the narrow site's weight gradient is exact
    model_ref = ScaledMLP()
    model_ref.load_state_dict(model.state_dict())
    for seq in (16, 16, 8, 4):
        model_ref(ref_x[:, :seq], scale).sum().backward()
    torch.testing.assert_close(model.up.weight.grad, model_ref.up.weight.grad)

    other = prac_fx.backend(rank=48, compiler="eager")  # a new backend says it again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prac_fx"):
        torch.compile(ScaledMLP(), backend=other)(x, scale).sum().backward()
    assert sum("narrower than rank" in r.getMessage() for r in caplog.records) == 1


def test_float64_model_is_compressed():
    """Floating dtypes other than float32 are sites too; the basis is cast to the activation's."""
    dtype = torch.float64
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ScaledMLP().to(dtype)
    x, scale = torch.randn(2, 16, 32, dtype=dtype), torch.ones(64, dtype=dtype)
    ref_x = x.clone().requires_grad_()
    ref = model(ref_x, scale)
    ref.sum().backward()
    ref_up = model.up.weight.grad.clone()
    model.zero_grad()
    be = prac_fx.backend(rank=1.0, compiler="eager")
    x = x.requires_grad_()
    out = torch.compile(model, backend=be)(x, scale)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, ref_x.grad)
    assert model.up.weight.grad.dtype == dtype
    # the basis is stored in float32: at rank 1.0, P P^T = I to float32 precision only
    torch.testing.assert_close(model.up.weight.grad, ref_up, rtol=1e-5, atol=1e-6)
    assert be.report().sites_rewritten == 3
    assert all(g.basis.dtype == torch.float32 for g in be.store.groups.values())


def test_inf_activation_at_the_first_call_draws_a_random_basis(caplog):
    """No previous basis to keep: a random orthonormal Q1 (unbiased still), finite, and the next
    clean refresh fits it to the activation."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ScaledMLP()
    be = prac_fx.backend(rank=8, refresh_every=2, compiler="eager")
    compiled = torch.compile(model, backend=be)
    x = torch.randn(2, 16, 32)
    scale = torch.ones(64)
    scale[0] = float("inf")
    with caplog.at_level(logging.WARNING, logger="prac_fx"):
        compiled(x, scale).sum().backward()
    mid = be.store.groups["mid"]
    q1 = mid.q1
    assert torch.isfinite(mid.basis).all() and mid.refreshes == 1
    torch.testing.assert_close(q1.t() @ q1, torch.eye(4), atol=1e-5, rtol=0)
    assert any("NaN/Inf" in r.getMessage() and "'mid'" in r.getMessage() for r in caplog.records)
    model.zero_grad()
    for _ in range(2):  # call 2 refreshes from a clean activation
        out = compiled(x, torch.ones(64))
        out.sum().backward()
    assert torch.isfinite(out).all() and mid.refreshes == 2 and not torch.equal(mid.q1, q1)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_runner_checks_each_basis_against_its_spec():
    """A basis of another shape or dtype than the graph was compiled for is refused before the
    call, not turned into a wrong product or a recompile."""
    torch._dynamo.reset()
    model = ScaledMLP()
    x, scale = torch.randn(2, 16, 32), torch.rand(64)
    be = prac_fx.backend(rank=4, compiler="eager")
    compiled = torch.compile(model, backend=be)
    compiled(x, scale).square().sum().backward()
    key, group = next(iter(be.store.groups.items()))
    good = group.basis
    group.basis = good.double()
    with pytest.raises(ValueError, match=f"basis of group '{key}' has shape .*float64"):
        compiled(x, scale)
    group.basis = good[:, :-1]
    with pytest.raises(ValueError, match="compiled for"):
        compiled(x, scale)
    group.basis = good
    compiled(x, scale).square().sum().backward()


def test_exact_if_kept_check_failing_keeps_every_group_compressed(caplog, monkeypatch):
    """``exact_if_kept`` partitions the rewritten graph once; if that fails the graph is
    compiled with every group compressed, and a warning says why."""
    from prac_fx.passes import torch_seam
    from toys import Attention

    def broken(*args, **kwargs):
        raise RuntimeError("partitioner exploded")

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Attention()
    monkeypatch.setattr(torch_seam, "partition_only", broken)
    be = prac_fx.backend(rank=8, compiler="eager", exact_if_kept=True)
    with caplog.at_level(logging.WARNING, logger="prac_fx"):
        torch.compile(model, backend=be)(torch.randn(2, 16, 32)).square().mean().backward()
    assert "exact_if_kept could not partition" in caplog.text and "partitioner exploded" in caplog.text
    graph = next(g for g in be.graphs if g.training)
    assert graph.rewritten == 6 and not any(s.reason == passes.kinds.KEPT_ANYWAY for s in graph.sites)
