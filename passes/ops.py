"""The operations the PRAC rewrite inserts into a graph.

Contract
--------
``compress(x, basis)`` returns the compressed activation ``x_compressed = x2d @ P`` with ``x2d`` the
input flattened to ``(N, n)``. It is detached: no gradient flows through the compressed copy.

``CompressedLinear.apply(x, weight, bias, x_compressed, basis, kind)`` computes *exactly* the op it
replaces (``kind`` names it: ``"linear"`` for ``F.linear`` with a weight of shape ``(m, n)``,
``"addmm"`` for ``torch.addmm(bias, x, weight)`` with a weight of shape ``(n, m)`` as in GPT-2's
Conv1D, ``"matmul"`` for ``x @ weight`` with a weight of shape ``(n, m)``). It saves only
``x_compressed``, the basis and the weight for backward, never ``x``:

- the input gradient is exact (it never reads ``x``);
- the weight gradient is computed in the co-compressed order of arXiv 2605.01255,
  ``(dY^T (x P)) P^T``, so the reconstructed input ``x P P^T`` is never materialised;
- the bias gradient is exact.

With ``P = [Q1, sqrt(k) Q2]`` built as in PRAC (arXiv 2602.23111) the weight gradient is unbiased:
``E[P P^T] = I`` over the draw of ``Q2``.

Both are plain Python over torch ops, so AOTAutograd traces them into aten ops and Inductor fuses
and places them like any other node (the min-cut partitioner may recompute ``x_compressed`` in
the backward where ``x`` is saved anyway).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prac_fx.passes import kinds

KINDS = kinds.LINEAR_KINDS


def compress(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``x`` (..., n), ``basis`` (n, r) float32 -> ``x_compressed`` (N, r) in ``x``'s dtype."""
    n = basis.shape[0]
    return torch.mm(x.detach().reshape(-1, n), basis.to(x.dtype))


def gram(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., n) -> ``x2d^T x2d`` (n, n) in float32, used to refresh the principal basis.

    Float32 even under autocast (the probe runs in the caller's autocast state, which would
    otherwise round the product to bf16/fp16)."""
    x2d = x.detach().reshape(-1, x.shape[-1]).float()
    with torch.autocast(device_type=x2d.device.type, enabled=False):
        return torch.mm(x2d.t(), x2d)


class CompressedLinear(torch.autograd.Function):
    """Exact forward, exact input gradient, factored low-rank weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_compressed, basis, kind):
        if kind == kinds.LINEAR:
            out = F.linear(x, weight, bias)
        elif kind == kinds.ADDMM:
            out = torch.addmm(bias, x, weight) if bias is not None else torch.mm(x, weight)
        elif kind == kinds.MATMUL:
            out = torch.matmul(x, weight)
        else:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        ctx.kind = kind
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x_compressed, basis, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_compressed, basis, weight = ctx.saved_tensors
        weight_is_out_in = ctx.kind == kinds.LINEAR  # (m, n) for linear, (n, m) otherwise
        m = weight.shape[0] if weight_is_out_in else weight.shape[1]
        grad_x = grad_weight = grad_bias = None

        # grad_x = grad_out @ W (linear) or grad_out @ W^T (addmm, matmul): exact, x is not needed.
        if ctx.needs_input_grad[0]:
            w = weight.to(grad_out.dtype)
            grad_x = torch.matmul(grad_out, w if weight_is_out_in else w.t())

        grad_out_2d = grad_out.reshape(-1, m)  # (N, m)
        if ctx.needs_input_grad[1]:
            basis_c = basis.to(x_compressed.dtype)
            g = grad_out_2d.to(x_compressed.dtype)
            if weight_is_out_in:
                # grad_weight = grad_out^T @ x  ~=  (grad_out^T @ (x @ P)) @ P^T     (m, n)
                grad_weight = torch.mm(torch.mm(g.t(), x_compressed), basis_c.t())
            else:
                # grad_weight = x^T @ grad_out  ~=  P @ ((x @ P)^T @ grad_out)       (n, m)
                grad_weight = torch.mm(basis_c, torch.mm(x_compressed.t(), g))
            grad_weight = grad_weight.to(weight.dtype)

        # grad_bias = sum over rows of grad_out: exact.
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_out_2d.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None
