"""The operations the PRAC rewrite inserts into a graph.

Contract
--------
``compress(x, basis)`` returns the compressed activation ``x_compressed = x2d @ P`` with ``x2d`` the
input flattened to ``(N, n)``. It is detached: no gradient flows through the compressed copy.

``CompressedLinear.apply(x, weight, bias, x_compressed, basis, kind, r1, stats)`` computes *exactly* the op it
replaces (``kind`` names it: ``"linear"`` for ``F.linear`` with a weight of shape ``(m, n)``,
``"addmm"`` for ``torch.addmm(bias, x, weight)`` with a weight of shape ``(n, m)`` as in GPT-2's
Conv1D, ``"matmul"`` for ``x @ weight`` with a weight of shape ``(n, m)``). It saves only
``x_compressed``, the basis and the weight for backward, never ``x``:

- the input gradient is exact (it never reads ``x``);
- the weight gradient is computed in the co-compressed order of arXiv 2605.01255,
  ``(dY^T (x P)) P^T``, so the reconstructed input ``x P P^T`` is never materialised;
- the bias gradient is exact;
- ``stats`` (optional, a (2,) float32 tensor that requires grad) receives as its "gradient" the
  squared norms ``[||A1||^2, ||A2||^2]`` of ``A = dY^T (x P)`` split at column ``r1``: the
  product the factored weight gradient computes first, so they cost two reductions. ``A1 = G Q1``
  is exact and ``E ||A2||^2 = ||G (I - Q1 Q1^T)||^2``, which is what the weight gradient's
  variance depends on (``prac_fx.variance``). The runner passes a fresh leaf each call and reads
  its ``.grad`` after the backward.

With ``P = [Q1, sqrt(k) Q2]`` built as in PRAC (arXiv 2602.23111) the weight gradient is unbiased:
``E[P P^T] = I`` over the draw of ``Q2``.

Both are plain Python over torch ops, so AOTAutograd traces them into aten ops and Inductor fuses
and places them like any other node (the min-cut partitioner may recompute ``x_compressed`` in
the backward where ``x`` is saved anyway).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prac_fx.passes import codec, kinds, torch_seam

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


def follow_basis(x: torch.Tensor, basis_prev: torch.Tensor, omega: torch.Tensor, r1: int,
                 iters: int, scale: float) -> torch.Tensor:
    """A basis ``P = [Q1, scale * Q2]`` (n, r) float32 whose principal part follows ``x``.

    Q1 (n, r1): ``iters`` subspace iterations ``Q1 <- orth(x^T (x Q1))`` on this call's input,
    warm-started from the previous basis's first ``r1`` columns, so Q1 tracks the principal
    subspace of the very batch it compresses at the cost of ``2 iters`` thin products.
    Q2 (n, r2): the held Gaussian draw ``omega`` (n, r2) projected onto the complement of the new
    Q1 (twice, against rounding) and orthonormalised. ``omega`` is drawn outside the graph,
    independently of the data, so given Q1 the complement is Haar-distributed and
    ``E[P P^T] = I`` with ``scale = sqrt((n - r1) / r2)``: the weight gradient stays unbiased
    whatever Q1 depends on (PRAC, arXiv 2602.23111). Float32 even under autocast."""
    n = basis_prev.shape[0]
    x2d = x.detach().reshape(-1, n)
    with torch.autocast(device_type=x2d.device.type, enabled=False):
        x2d = x2d.float()
        q1 = basis_prev.detach()[:, :r1].float()
        for _ in range(iters):
            q1, _ = torch.linalg.qr(torch.mm(x2d.t(), torch.mm(x2d, q1)))  # (n, r1)
        w = omega.detach().float()
        if w.shape[1] == 0:
            return q1.contiguous()
        for _ in range(2):
            w = w - torch.mm(q1, torch.mm(q1.t(), w))
        q2, _ = torch.linalg.qr(w)  # (n, r2)
        return torch.cat([q1, q2 * scale], dim=1).contiguous()


class CompressedLinear(torch.autograd.Function):
    """Exact forward, exact input gradient, factored low-rank weight gradient.

    Unquantized (``codes is None``): ``x_compressed = x P`` and ``dW = (dY^T (x P)) P^T``.
    Quantized (``passes/codec.py``): ``codes``/``scales`` hold ``q(x)`` (layout ``identity``),
    ``q(x P)`` (``project``) or the residual ``q(x - (x Q1) Q1^T)`` beside ``x_compressed = x Q1``
    (``residual``), in the format ``spec``; ``codec.weight_grad`` decodes inside the backward.
    ``stats``, when given, receives ``[||G Q1||^2, ||sqrt(k) G Q2||^2, q]`` for the running
    variance (``q``: the rounding term's estimate, 0 unquantized)."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_compressed, basis, kind, r1=0, stats=None, codes=None,
                scales=None, spec="", layout=codec.PROJECT):
        if kind == kinds.LINEAR:
            out = F.linear(x, weight, bias)
        elif kind == kinds.ADDMM:
            out = torch.addmm(bias, x, weight) if bias is not None else torch.mm(x, weight)
        elif kind == kinds.MATMUL:
            out = torch.matmul(x, weight)
        else:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        ctx.kind = kind
        ctx.r1 = r1
        ctx.with_stats = stats is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.spec, ctx.layout = spec, layout
        ctx.save_for_backward(x_compressed, basis, weight, codes, scales)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_compressed, basis, weight, codes, scales = ctx.saved_tensors
        weight_is_out_in = ctx.kind == kinds.LINEAR  # (m, n) for linear, (n, m) otherwise
        m = weight.shape[0] if weight_is_out_in else weight.shape[1]
        grad_x = grad_weight = grad_bias = grad_stats = None

        # grad_x = grad_out @ W (linear) or grad_out @ W^T (addmm, matmul): exact, x is not needed.
        if ctx.needs_input_grad[0]:
            w = weight.to(grad_out.dtype)
            grad_x = torch.matmul(grad_out, w if weight_is_out_in else w.t())

        grad_out_2d = grad_out.reshape(-1, m)  # (N, m)
        with_stats = ctx.with_stats and ctx.needs_input_grad[7]
        if (ctx.needs_input_grad[1] or with_stats) and codes is not None:
            # a quantized copy (passes/codec.py): dW from its decoded form, in factored order
            grad_weight, grad_stats = codec.weight_grad(grad_out_2d, x_compressed, codes, scales, basis,
                                                        ctx.r1, ctx.spec, ctx.layout, with_stats)
            if not weight_is_out_in:
                grad_weight = grad_weight.t()
            grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        elif ctx.needs_input_grad[1] or with_stats:
            basis_c = basis.to(x_compressed.dtype)
            g = grad_out_2d.to(x_compressed.dtype)
            if weight_is_out_in:
                # grad_weight = grad_out^T @ x  ~=  (grad_out^T @ (x @ P)) @ P^T     (m, n)
                a = torch.mm(g.t(), x_compressed)  # (m, r)
                grad_weight = torch.mm(a, basis_c.t())
            else:
                # grad_weight = x^T @ grad_out  ~=  P @ ((x @ P)^T @ grad_out)       (n, m)
                a_t = torch.mm(x_compressed.t(), g)  # (r, m) = A^T
                grad_weight = torch.mm(basis_c, a_t)
                a = a_t.t()
            grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
            if with_stats:
                # [||G Q1||^2, ||sqrt(k) G Q2||^2]: the running variance estimate's inputs
                a = a.float()
                grad_stats = torch.stack([a[:, :ctx.r1].square().sum(), a[:, ctx.r1:].square().sum(),
                                          a.new_zeros(())])

        # grad_bias = sum over rows of grad_out: exact.
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_out_2d.sum(0).to(ctx.bias_dtype)
        return (grad_x, grad_weight, grad_bias, None, None, None, None, grad_stats, None, None,
                None, None)


# The target of the graph nodes the rewrite inserts (``torch_seam.graph_function``).
compressed_linear = torch_seam.graph_function(CompressedLinear, __name__, "compressed_linear")
