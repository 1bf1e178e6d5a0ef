"""bfloat16 through the backend: CPU autocast (and fp16 autocast) and bf16 weights.

Bases stay float32 in the store; the compressed copy ``x @ P`` follows the activation dtype
(bf16 under autocast, where the linear itself runs in bf16); gradients keep the parameter's
dtype. At rank 1.0 results match eager within bf16 rounding.
"""
import pytest
import torch
import torch._dynamo

import prac_fx
from toys import MLP
from conftest import rel_err

BF16_REL = 2e-2  # weight gradients: a few bf16 roundings (eps 2^-8) more than eager's


def _step(model, x, grad_out, autocast: bool, dtype=torch.bfloat16):
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        out = model(x)
    out.backward(grad_out.to(out.dtype))
    grads = {k.removeprefix("_orig_mod."): p.grad.clone() for k, p in model.named_parameters()}
    return out.detach(), x.grad, grads


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 8, 32, generator=g).to(dtype), torch.randn(4, 8, 16, generator=g).to(dtype)


def _compressed_copies(be):
    """dtypes of the saved ``x @ P`` products, one per group (saved as forward ``mm`` outputs)."""
    ranks = {g.rank for g in be.graphs[0].groups}
    return [s["dtype"] for s in be.graphs[0].saved
            if s["op"] == "mm" and len(s["shape"]) == 2 and s["shape"][1] in ranks]


def _check_store(be):
    assert set(be.store.groups) == {"up", "mid", "down"}
    for g in be.store.groups.values():
        assert g.basis.dtype == torch.float32 and torch.isfinite(g.basis).all()


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_autocast_full_rank_matches_eager_autocast(compiler):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    x, grad_out = _data()
    ref_out, ref_gx, ref = _step(model, x, grad_out, autocast=True)
    _, _, exact = _step(model, x, grad_out, autocast=False)
    be = prac_fx.backend(rank=1.0, compiler=compiler)
    out, gx, grads = _step(torch.compile(model, backend=be), x, grad_out, autocast=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref_out)
    assert gx.dtype == torch.float32
    torch.testing.assert_close(gx, ref_gx, rtol=1.6e-2, atol=1e-5)
    for k in ref:
        assert grads[k].dtype == torch.float32, k
        assert rel_err(grads[k], ref[k]) < BF16_REL, k
        # no further from the float32 gradient than bf16 autocast itself is, within a factor
        assert rel_err(grads[k], exact[k]) < 2 * rel_err(ref[k], exact[k]) + 1e-3, k
    _check_store(be)
    if compiler == "eager":
        assert _compressed_copies(be) == ["bfloat16"] * 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_low_rank_with_refresh(dtype):
    """Low rank under autocast: forward and input gradient as eager autocast, bf16 (fp16) saved
    copies of rank r, float32 bases refitted from float32 Gram matrices of the activations."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    x, grad_out = _data()
    ref_out, ref_gx, ref = _step(model, x, grad_out, autocast=True, dtype=dtype)
    be = prac_fx.backend(rank=8, refresh_every=2, resample_every=1, compiler="eager")
    compiled = torch.compile(model, backend=be)
    for _ in range(3):
        out, gx, grads = _step(compiled, x, grad_out, autocast=True, dtype=dtype)
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(gx, ref_gx, rtol=1.6e-2, atol=1e-5)
        torch.testing.assert_close(grads["up.bias"], ref["up.bias"])
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert rel_err(grads["mid.weight"], ref["mid.weight"]) > 0.05  # really compressed
    assert {g.refreshes for g in be.store.groups.values()} == {2}
    _check_store(be)
    assert _compressed_copies(be) == [str(dtype).removeprefix("torch.")] * 3
    assert len(be.graphs) == 1


@pytest.mark.parametrize("rank", [1.0, 8])
def test_bf16_weights(rank):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    x, grad_out = _data(torch.bfloat16)
    ref_out, ref_gx, ref = _step(model, x, grad_out, autocast=False)
    be = prac_fx.backend(rank=rank, compiler="eager")
    out, gx, grads = _step(torch.compile(model, backend=be), x, grad_out, autocast=False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, ref_gx)
    assert gx.dtype == torch.bfloat16
    for k in ref:
        assert grads[k].dtype == torch.bfloat16, k
        assert torch.isfinite(grads[k]).all(), k
        if rank == 1.0 or k.endswith("bias"):
            assert rel_err(grads[k].float(), ref[k].float()) < BF16_REL, k
    _check_store(be)
    assert _compressed_copies(be) == ["bfloat16"] * 3


def test_refresh_under_autocast_uses_a_float32_gram():
    """The probe runs in the caller's autocast state; its Gram matrix must not be rounded to bf16:
    Q1 spans the top right singular vectors of the float32 input to float32 accuracy."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    x, _ = _data()
    x = x @ torch.diag(torch.linspace(3, 0.1, 32))  # distinct singular values
    be = prac_fx.backend(rank=8, compiler="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.compile(model, backend=be)(x)
    q1 = be.store.groups["up"].q1.double()
    x2d = x.reshape(-1, 32).double()
    top = torch.linalg.eigh(x2d.t() @ x2d).eigenvectors[:, -4:].flip(-1)
    alignment = (top.t() @ q1).abs().diagonal()
    assert (1 - alignment).abs().max() < 1e-6, alignment  # a bf16 Gram gives ~3e-5


def test_bytes_are_counted_against_the_autocast_input():
    """Under bf16 autocast the linear reads a bf16 cast of a float32 input: the report counts
    the copy against those bf16 bytes (int8 with one bf16 scale per row: half of them, plus
    the scales), and against float32 bytes without autocast (a quarter)."""
    model = MLP()
    x, grad_out = _data()
    fractions = {}
    for autocast in (False, True):
        torch._dynamo.reset()
        be = prac_fx.backend(rank=1.0, bits=8, compiler="eager")
        _step(torch.compile(model, backend=be), x, grad_out, autocast=autocast)
        rows = [r for r in be.report().rows() if r["format"]]
        assert rows
        for r in rows:
            n = r["n"]
            assert r["of input"] == pytest.approx((n + 2) / (n * (2 if autocast else 4)), abs=2e-3)
        fractions[autocast] = {r["node"]: r["of input"] for r in rows}
    assert fractions[True].keys() == fractions[False].keys()
