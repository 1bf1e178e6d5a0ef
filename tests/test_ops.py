"""CompressedLinear against eager on seeded inputs, outside any compiler."""
import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from prac_fx.passes.ops import CompressedLinear, compress


def _orthonormal(n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0].float()


def _reference(kind, x, w, b):
    if kind == "linear":
        return F.linear(x, w, b)
    if kind == "addmm":
        return torch.addmm(b, x, w) if b is not None else x @ w
    return torch.matmul(x, w)


# addmm takes 2-D inputs only; matmul has no bias
CASES = [
    (kind, shape, bias)
    for kind in ("linear", "addmm", "matmul")
    for shape in ((12,), (3, 4))
    for bias in (True, False)
    if not (kind == "addmm" and len(shape) > 1) and not (kind == "matmul" and bias)
]


@pytest.mark.parametrize("kind, shape, bias", CASES)
@pytest.mark.parametrize("full_rank", [True, False])
def test_against_eager(kind, shape, bias, full_rank, seeded):
    n, m = 16, 24
    x = torch.randn(*shape, n, requires_grad=True)
    w = torch.randn(m, n) if kind == "linear" else torch.randn(n, m)
    w.requires_grad_()
    b = torch.randn(m, requires_grad=True) if bias else None
    basis = _orthonormal(n, n if full_rank else 4)

    ref = _reference(kind, x, w, b)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x, w] + ([b] if bias else []), grad)

    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    b2 = None if b is None else b.detach().clone().requires_grad_()
    out = CompressedLinear.apply(x2, w2, b2, compress(x2, basis), basis, kind)
    grads = torch.autograd.grad(out, [x2, w2] + ([b2] if bias else []), grad)

    torch.testing.assert_close(out, ref)  # forward exact
    torch.testing.assert_close(grads[0], ref_grads[0])  # input gradient exact at any rank
    if bias:
        torch.testing.assert_close(grads[2], ref_grads[2])
    if full_rank:
        torch.testing.assert_close(grads[1], ref_grads[1], rtol=1e-4, atol=1e-4)
    else:
        # the factored gradient is the exact one of the projected input x P P^T
        x_proj = (x.detach().reshape(-1, n) @ basis @ basis.t()).reshape(x.shape)
        projected = torch.autograd.grad(_reference(kind, x_proj, w, b), w, grad)[0]
        torch.testing.assert_close(grads[1], projected, rtol=1e-4, atol=1e-4)
        assert rel_err(grads[1], ref_grads[1]) > 1e-2  # and it is not the exact one


def test_saves_only_compressed_copy(seeded):
    n, m, N = 64, 32, 128
    x = torch.randn(N, n, requires_grad=True)
    w = torch.randn(m, n, requires_grad=True)
    basis = _orthonormal(n, 8)
    x_compressed = compress(x, basis)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        CompressedLinear.apply(x, w, None, x_compressed, basis, "linear")
    assert not any(t.shape == x.shape for t in saved)
    assert any(t.data_ptr() == x_compressed.data_ptr() for t in saved)


def test_bf16_keeps_dtypes(seeded):
    n, m = 32, 16
    x = torch.randn(8, n, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(m, n, dtype=torch.bfloat16, requires_grad=True)
    basis = _orthonormal(n, 8)  # float32
    xc = compress(x, basis)
    assert xc.dtype == torch.bfloat16
    out = CompressedLinear.apply(x, w, None, xc, basis, "linear")
    out.sum().backward()
    assert w.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
