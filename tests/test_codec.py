"""passes/codec.py: the quantized copy against eager on seeded inputs. Unbiasedness is checked
statistically (the mean over independent draws converges at the 1/sqrt(n) rate), the edge cases
(zeros, inf/NaN, outliers, widths the group does not divide) exactly, and the whole path through
the backend (the ladder, the seeds, resume, the saved bytes)."""
import pytest
import torch

import prac_fx
from conftest import rel_err
from prac_fx.passes import codec
from prac_fx.passes.ops import CompressedLinear
from toys import MLP

FORMATS = [codec.Format(8), codec.Format(8, 64), codec.Format(4, 32), codec.Format(4, 64),
           codec.Format(2, 64), codec.Format(2), codec.Format(4, 128, "float32")]


def _seeds(i):
    return torch.tensor(codec.call_seeds(0, "test", i), dtype=torch.int64)


def _roundtrip(v, fmt, i=0):
    codes, scales = codec.encode(v, _seeds(i), fmt.spec)
    return codec.decode(codes, scales, fmt.spec, v.shape[1]), codes, scales


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.spec)
def test_codes_are_packed_and_bytes_counted(fmt):
    torch.manual_seed(0)
    v = torch.randn(48, 256)
    _, codes, scales = _roundtrip(v, fmt)
    assert codes.dtype == torch.uint8
    assert codes.shape == (48, 256 * fmt.bits // 8)  # 4 and 2 bits: two and four per byte
    groups = 1 if fmt.group_size is None else 256 // fmt.group_size
    assert scales.shape == (48, groups) and scales.dtype == codec.SCALE_DTYPES[fmt.scale_dtype]
    real = codes.numel() * codes.element_size() + scales.numel() * scales.element_size()
    assert fmt.saved_bytes(48, 256) == real


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.spec)
def test_stochastic_rounding_is_unbiased(fmt):
    """E[decode(encode(v))] = v: over n draws the error of the mean falls as 1/sqrt(n); each
    element's variance is at most s^2 / 4, so its mean over n draws stays within 6 sigma."""
    torch.manual_seed(0)
    v = torch.randn(16, 128) * torch.linspace(0.1, 10, 128)  # column scales apart
    total = torch.zeros_like(v)
    errors = {}
    for i in range(1, 1601):
        total += _roundtrip(v, fmt, i)[0]
        if i in (100, 1600):
            errors[i] = rel_err(total / i, v)
    assert 3.0 < errors[100] / errors[1600] < 5.5, errors  # sqrt(16) = 4
    _, _, scales = _roundtrip(v, fmt)
    s = scales.float().repeat_interleave(128 // scales.shape[1], dim=1)
    assert ((total / 1600 - v).abs() <= 6 * s / 2 / 1600 ** 0.5 + 1e-6).all()


def test_draws_differ_by_call_and_repeat_by_seed():
    v = torch.randn(8, 64)
    fmt = codec.Format(4, 32)
    a, b, a2 = (_roundtrip(v, fmt, i)[0] for i in (1, 2, 1))
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    assert codec.call_seeds(0, "k", 3) != codec.call_seeds(1, "k", 3) != codec.call_seeds(0, "j", 3)
    u = codec.uniform((256, 256), _seeds(0))
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean().item() - 0.5) < 0.005


@pytest.mark.parametrize("fmt", [codec.Format(8), codec.Format(4, 64), codec.Format(codec.FP8)],
                         ids=lambda f: f.spec)
def test_zero_rows_and_outliers(fmt):
    torch.manual_seed(0)
    v = torch.randn(6, 128)
    v[2] = 0.0
    v[4, 7] = 1e4  # one outlier: its group's scale grows, the others' do not
    out, _, _ = _roundtrip(v, fmt)
    assert torch.isfinite(out).all()
    assert torch.equal(out[2], torch.zeros(128))
    assert abs(out[4, 7].item() - 1e4) <= 1e4 * 2 ** -7 + 1e4 / 7  # within one level
    if fmt.group_size is not None:  # groups away from the outlier keep their resolution
        assert rel_err(out[4, 64:], v[4, 64:]) < 0.25


def test_width_the_group_does_not_divide_is_padded():
    torch.manual_seed(0)
    v = torch.randn(5, 100)
    fmt = codec.Format(2, 64)
    out, codes, scales = _roundtrip(v, fmt)
    assert out.shape == (5, 100) and codes.shape == (5, 128 // 4) and scales.shape == (5, 2)
    assert fmt.saved_bytes(5, 100) == 5 * (32 + 2 * 2)
    levels = out / scales.float().repeat_interleave(64, dim=1)[:, :100]
    torch.testing.assert_close(levels, levels.round())  # every value on the grid


def test_non_finite_inputs_stay_in_their_columns():
    """A row with inf or NaN: the weight gradient is non-finite exactly where eager's is."""
    torch.manual_seed(0)
    n, m = 64, 24
    x = torch.randn(10, n)
    x[3, 5], x[7, 40] = float("inf"), float("nan")
    w = torch.randn(m, n, requires_grad=True)
    grad = torch.randn(10, m)
    ref_w, = torch.autograd.grad(torch.nn.functional.linear(x, w), [w], grad)
    for fmt, layout in ((codec.Format(8, None, layout="identity"), "identity"),
                        (codec.Format(4, 32, layout="identity"), "identity"),
                        (codec.Format(4, 64, layout="residual"), "residual"),
                        (codec.Format(codec.FP8, layout="identity"), "identity")):
        r1 = 8 if layout == "residual" else 0
        basis = torch.linalg.qr(torch.randn(n, r1))[0] if r1 else torch.zeros(n, 0)
        principal, codes, scales = codec.compress(x, basis, _seeds(0), r1, fmt.spec, layout)
        w2 = w.detach().clone().requires_grad_()
        out = CompressedLinear.apply(x, w2, None, principal, basis, "linear", r1, None, codes,
                                     scales, fmt.spec, layout)
        g, = torch.autograd.grad(out, [w2], grad)
        assert torch.equal(torch.isfinite(g), torch.isfinite(ref_w)), fmt


@pytest.mark.parametrize("kind", ["linear", "addmm", "matmul"])
@pytest.mark.parametrize("layout", ["identity", "project", "residual"])
def test_op_exact_forward_and_unbiased_weight_gradient(kind, layout):
    torch.manual_seed(0)
    n, m, rows = 32, 16, 64
    x = torch.randn(rows, n) * torch.linspace(0.2, 4, n)
    w = (torch.randn(m, n) if kind == "linear" else torch.randn(n, m)).requires_grad_()
    grad = torch.randn(rows, m)
    ref = torch.nn.functional.linear(x, w) if kind == "linear" else x @ w
    exact, = torch.autograd.grad(ref, [w], grad)
    r1 = {"identity": 0, "project": n, "residual": 4}[layout]
    basis = torch.linalg.qr(torch.randn(n, n))[0][:, :max(r1, 0)] if r1 else torch.zeros(n, 0)
    fmt = codec.Format(4, 32, layout=layout)
    total, errors = torch.zeros_like(exact), {}
    for i in range(1, 801):
        principal, codes, scales = codec.compress(x, basis, _seeds(i), r1, fmt.spec, layout)
        w2 = w.detach().clone().requires_grad_()
        x2 = x.clone().requires_grad_()
        out = CompressedLinear.apply(x2, w2, None, principal, basis, kind, r1, None, codes,
                                     scales, fmt.spec, layout)
        gx, gw = torch.autograd.grad(out, [x2, w2], grad)
        if i == 1:
            torch.testing.assert_close(out, ref.detach())  # forward exact
            wd = w.detach()
            torch.testing.assert_close(gx, grad @ (wd if kind == "linear" else wd.t()))
            assert rel_err(gw, exact) > 1e-4  # really quantized
        total += gw
        if i in (50, 800):
            errors[i] = rel_err(total / i, exact)
    assert 2.8 < errors[50] / errors[800] < 5.5, errors  # sqrt(16) = 4: no bias floor


def test_config_rejects_what_is_not_allowed():
    for bad, words in ((dict(bits=3), "8, 4, 2 or 'fp8'"), (dict(bits=True), "8, 4, 2"),
                       (dict(bits=8, group_size=48), "(32, 64, 128)"),
                       (dict(bits=8, scale_dtype="float16"), "bfloat16"),
                       (dict(rank=0.25, residual=True), "needs bits"),
                       (dict(residual=True), "needs that rank"),
                       (dict(bits={"*": 8, "attn": 5}), "got 5")):
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            prac_fx.PracConfig(**bad)
    with pytest.raises(ValueError, match="PRAC_FX_BITS"):
        prac_fx.PracConfig.from_env({"PRAC_FX_BITS": "int7"})
    c = prac_fx.PracConfig.from_env({"PRAC_FX_BITS": "*=8,down=4", "PRAC_FX_GROUP_SIZE": "64",
                                     "PRAC_FX_RESIDUAL": "1", "PRAC_FX_RANK": "0.125"})
    assert c.format_for(256, "blocks.0.down") == codec.Format(4, 64, layout="residual")
    assert c.ranks(256, "blocks.0.down") == (32, 0)
    full = prac_fx.PracConfig(rank=1.0, bits=2, group_size=32)
    assert full.ranks(256) == (0, 0) and full.format_for(256).layout == "identity"
    assert prac_fx.PracConfig(rank=1.0).ranks(256) == (128, 128)  # the exact path stays


# -- through the backend -------------------------------------------------------------------------
def _step(compiled, model, x, grad_out):
    model.zero_grad()
    xi = x.detach().clone().requires_grad_()
    out = compiled(xi)
    out.backward(grad_out)
    return out.detach(), xi.grad, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.fixture
def case():
    torch.manual_seed(0)
    model = MLP()
    x, grad_out = torch.randn(4, 8, 32), torch.randn(4, 8, 16)
    return model, x, grad_out, _step(model, model, x, grad_out)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("options", [dict(rank=1.0, bits=8), dict(rank=1.0, bits=4, group_size=32),
                                     dict(rank=8, bits=4, residual=True, group_size=32),
                                     dict(rank=8, bits=8)], ids=str)
def test_backend_ladder(case, compiler, options):
    """Loss and input gradients exact; weight gradients within the format's error floor and
    unbiased (the mean over calls converges); the report names the format and its bytes."""
    torch._dynamo.reset()
    model, x, grad_out, (ref_out, ref_gx, ref_g) = case
    be = prac_fx.backend(compiler=compiler, refresh_every=10**9, resample_every=1, **options)
    compiled = torch.compile(model, backend=be)
    total = {k: torch.zeros_like(v) for k, v in ref_g.items() if k.endswith("weight")}
    errs = {}
    for i in range(1, 201):
        out, gx, g = _step(compiled, model, x, grad_out)
        if i == 1:
            torch.testing.assert_close(out, ref_out)
            torch.testing.assert_close(gx, ref_gx)
            for k in ("up.bias", "down.bias"):
                torch.testing.assert_close(g[k], ref_g[k])
            # a single draw: int8 of x about 1%; PRAC's projection at rank 8 (k = 7 and 15) far more
            floor = 0.02 if options.get("bits") == 8 and options["rank"] == 1.0 else 10.0
            for k in total:
                assert 1e-6 < rel_err(g[k], ref_g[k]) < floor, (k, rel_err(g[k], ref_g[k]))
        for k in total:
            total[k] += g[k]
        if i in (12, 200):
            errs[i] = sum(rel_err(total[k] / i, ref_g[k]) for k in total) / len(total)
    assert 2.5 < errs[12] / errs[200] < 6.5, errs  # sqrt(200 / 12) = 4.1
    rows = be.report().rows(include_skipped=False)
    assert len(rows) == 3 and all(r["format"] == be.config.format_for(32).name or r["n"] != 32
                                  for r in rows)
    assert all(r["saved bytes"] > 0 for r in rows)


def test_resume_draws_what_the_uninterrupted_run_draws(case):
    model, x, grad_out, _ = case
    torch._dynamo.reset()
    opts = dict(rank=8, bits=2, group_size=32, residual=True, refresh_every=3, compiler="eager")
    be = prac_fx.backend(**opts)
    compiled = torch.compile(model, backend=be)
    for _ in range(4):
        _step(compiled, model, x, grad_out)
    state = be.state_dict()
    after = [_step(compiled, model, x, grad_out)[2] for _ in range(3)]
    torch._dynamo.reset()
    be2 = prac_fx.backend(**opts)
    compiled2 = torch.compile(model, backend=be2)
    _step(compiled2, model, x, grad_out)  # compile, then load the state
    be2.load_state_dict(state)
    again = [_step(compiled2, model, x, grad_out)[2] for _ in range(3)]
    for a, b in zip(after, again):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_saved_bytes_fall_with_the_bits():
    """What the saved-tensor hooks see: the 4- and 2-bit codes packed two and four to a byte,
    their scales beside them, and the total falling with the bits."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 256))
    x = torch.randn(512, 256, requires_grad=True)

    def saved(**options):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=prac_fx.backend(rank=1.0, **options))
        compiled(x).sum().backward()  # compile
        seen = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                seen[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.dtype,
                                                        t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = compiled(x)
        out.sum().backward()
        return list(seen.values())

    s8, s4, s2 = saved(bits=8), saved(bits=4, group_size=64), saved(bits=2, group_size=64)
    assert ((512, 256), torch.uint8, 512 * 256) in s8
    assert ((512, 128), torch.uint8, 512 * 128) in s4 and ((512, 4), torch.bfloat16, 4096) in s4
    assert ((512, 64), torch.uint8, 512 * 64) in s2
    total = [sum(b for *_, b in s) for s in (s8, s4, s2)]
    assert total[0] > total[1] > total[2], total
    # where the partitioner keeps every copy (it does at 4 and 2 bits here), the codes differ
    # by exactly the packing: three sites of 512 x 256 values, at 1/2 and 1/4 byte each
    assert total[1] - total[2] == 3 * 512 * 256 // 4, total


@pytest.mark.parametrize("options", [dict(rank=1.0, bits=4, group_size=32),
                                     dict(rank=8, bits=4, residual=True, group_size=32),
                                     dict(rank=8, bits=8)], ids=str)
def test_variance_measure_covers_the_formats(case, options):
    """``prac_fx.variance.measure`` samples the rounding (and, for a projection, the draw of Q2
    with it) at every site. The running estimate's rounding term assumes uniform fractional
    parts (s^2 / 6 per value); inputs that cluster near a level (a GELU's many near-zeros)
    round with less, so it may overstate the sampled figure, up to about 2x here."""
    from prac_fx import variance

    model, x, grad_out, _ = case
    torch._dynamo.reset()
    be = prac_fx.backend(compiler="eager", **options)
    compiled = torch.compile(model, backend=be)
    _step(compiled, model, x, grad_out)
    rows = variance.measure(be, model, lambda: (model(x) * grad_out).sum(), draws=64)
    assert {r.module for r in rows} == {"up", "mid", "down"}
    for r in rows:
        assert r.relative > 0
        assert 0.35 < r.relative / r.relative_identity < 1.5, (r.module, r.relative, r.relative_identity)
    running = variance.running(be)
    assert running["total"] > 0
    if options.get("residual") is None and options["rank"] == 8:  # PRAC: the projection dominates
        assert variance.total(rows) > 0.5
    else:
        assert variance.total(rows) < 0.2
