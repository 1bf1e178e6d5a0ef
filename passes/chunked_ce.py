"""The exact chunked output head and cross-entropy loss that the ``head_loss`` pass inserts.

Contract
--------
``LinearCrossEntropy.apply(x, weight, bias, labels, ignore_index, reduction, chunk_rows, upcast,
return_logits)`` returns ``F.cross_entropy(logits.view(-1, V), labels.view(-1),
ignore_index=ignore_index, reduction=reduction)`` with ``logits = F.linear(x, weight, bias)``
(``.float()`` first when ``upcast``), for ``x`` of shape ``(..., n)``, ``weight`` ``(V, n)`` and
``labels`` with as many elements as ``x`` has rows. With ``return_logits`` it returns
``(loss, logits)``, the logits in ``F.linear``'s shape and dtype, and a gradient flowing into the
returned logits reaches ``x``, ``weight`` and ``bias`` exactly as through ``F.linear``.

- **Forward:** the loss is computed ``chunk_rows`` rows at a time: per chunk the logits
  ``(chunk_rows, V)``, their log-sum-exp and the logit of the label. Only ``x``, ``labels`` and
  the per-row log-sum-exp ``(N,)`` are saved for backward, never an ``(N, V)`` tensor. (Where
  the logits are returned they are computed once in full, as the caller holds them anyway; the
  chunks are slices of them, and they are still not saved.)
- **Backward:** per chunk the logits are recomputed from ``x``, and
  ``grad_logits = (softmax - onehot(label)) * valid * scale`` (``scale`` is ``grad_loss /
  valid_count`` for ``"mean"``, ``grad_loss`` for ``"sum"``; plus the incoming gradient of the
  returned logits) is turned into
  ``grad_x = grad_logits @ W``, ``grad_weight += grad_logits^T @ x`` and
  ``grad_bias += grad_logits.sum(0)``: all exact.
- **ignore_index:** rows whose label equals it add nothing to the loss, the count or any
  gradient. A ``"mean"`` over a batch where every label is ignored is ``0 / 0``, NaN, as in
  eager ``F.cross_entropy``; a ``"sum"`` is 0.

The input gradient depends on ``softmax(x W^T)``, a nonlinear function of ``x``: it needs the
exact ``x`` (a compressed copy ``x P`` would bias it, arXiv 2605.01255), so this op always saves
``x`` itself.

Plain Python over torch ops with a Python loop over a static row count: AOTAutograd traces it
into one slice per chunk, and Inductor fuses each chunk's softmax with its matmuls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prac_fx.passes import torch_seam

REDUCTIONS = ("mean", "sum")
MAX_CHUNK_ELEMENTS = 1 << 22  # rows x vocab per chunk: 16 MiB of float32 logits
MIN_CHUNK_ROWS = 128  # below this a chunk's matmul re-reads the head weight for too few rows


def chunk_rows_for(rows: int, vocab: int, width: int | None = None,
                   max_elements: int = MAX_CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that rows x vocab stays within ``max_elements`` and, given the head's
    input ``width``, a chunk's logits are no larger than the head input itself (rows x width
    elements) unless that takes a chunk below ``MIN_CHUNK_ROWS`` rows; at least 1 row, with the
    rows spread evenly over the chunks (no small last chunk).

    The backward holds one chunk's logits and their gradient at a time, on top of everything
    saved: sized like the head input, that transient stays small against the activations (at
    vocab 2048 and width 256 one 16 MiB chunk raised the step peak of the bench's Llama by about 25
    MiB against 256-row chunks). The floor keeps the weight re-reads, one per chunk, few."""
    if rows <= 0:
        return 1
    per_chunk = max(1, max_elements // max(1, vocab))
    if width:
        per_chunk = min(per_chunk, max(MIN_CHUNK_ROWS, rows * width // max(1, vocab)))
    chunks = -(-rows // per_chunk)
    return -(-rows // chunks)


def _chunk_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """(sum of the per-row losses over valid rows, per-row log-sum-exp) of one chunk."""
    lse = torch.logsumexp(logits, dim=-1)  # (c,)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    target = torch.gather(logits, 1, safe.unsqueeze(1)).squeeze(1)  # (c,)
    per_row = torch.where(valid, lse - target, torch.zeros_like(lse))
    return per_row.sum(), lse


class LinearCrossEntropy(torch.autograd.Function):
    """Exact head + cross-entropy, computed chunk by chunk; saves x, labels and a log-sum-exp."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, ignore_index, reduction, chunk_rows, upcast,
                return_logits):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        n = x.shape[-1]
        x2d = x.reshape(-1, n)  # (N, n)
        labels1d = labels.reshape(-1)  # (N,)
        rows = x2d.shape[0]
        full = F.linear(x2d, weight, bias) if return_logits else None  # (N, V)
        total, lses = None, []
        for start in range(0, rows, chunk_rows):
            stop = min(rows, start + chunk_rows)
            logits = full[start:stop] if full is not None else F.linear(x2d[start:stop], weight, bias)
            if upcast:
                logits = logits.float()
            part, lse = _chunk_loss(logits, labels1d[start:stop], ignore_index)
            total = part if total is None else total + part
            lses.append(lse)
        lse = torch.cat(lses) if len(lses) > 1 else lses[0]  # (N,)
        count = (labels1d != ignore_index).sum()
        loss = total / count.to(total.dtype) if reduction == "mean" else total

        ctx.ignore_index, ctx.reduction, ctx.chunk_rows = ignore_index, reduction, chunk_rows
        ctx.upcast, ctx.return_logits = upcast, return_logits
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias, labels1d, lse, count)
        if return_logits:
            return loss, full.reshape(*x.shape[:-1], full.shape[-1])
        return loss

    @staticmethod
    def backward(ctx, grad_loss, grad_logits_out=None):
        x, weight, bias, labels1d, lse, count = ctx.saved_tensors
        n = x.shape[-1]
        x2d = x.reshape(-1, n)
        rows = x2d.shape[0]
        vocab = weight.shape[0]
        if grad_logits_out is not None:
            grad_logits_out = grad_logits_out.reshape(rows, vocab)
        # d loss / d logits_i = scale * (softmax_i - onehot(label_i)) on valid rows, 0 elsewhere
        scale = grad_loss / count.to(grad_loss.dtype) if ctx.reduction == "mean" else grad_loss
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], \
            ctx.has_bias and ctx.needs_input_grad[2]
        grad_x_parts = []
        grad_weight = grad_bias = None
        for start in range(0, rows, ctx.chunk_rows):
            stop = min(rows, start + ctx.chunk_rows)
            xc = x2d[start:stop]  # (c, n)
            logits = F.linear(xc, weight, bias)  # (c, V), recomputed
            compute_dtype = logits.dtype
            if ctx.upcast:
                logits = logits.float()
            labels = labels1d[start:stop]
            valid = labels != ctx.ignore_index
            safe = torch.where(valid, labels, torch.zeros_like(labels))
            row_scale = torch.where(valid, scale.to(logits.dtype),
                                    torch.zeros_like(scale, dtype=logits.dtype)).unsqueeze(1)  # (c, 1)
            # softmax * scale, then minus scale at each row's label (no (c, V) one-hot)
            grad_logits = torch.exp(logits - lse[start:stop].unsqueeze(1)) * row_scale  # (c, V)
            grad_logits = torch.scatter_add(grad_logits, 1, safe.unsqueeze(1), -row_scale)
            if grad_logits_out is not None:
                grad_logits = grad_logits + grad_logits_out[start:stop].to(grad_logits.dtype)
            grad_logits = grad_logits.to(compute_dtype)
            # grad_x = grad_logits @ W                                             (c, n)
            if need_x:
                grad_x_parts.append(torch.mm(grad_logits, weight.to(compute_dtype)))
            # grad_weight = sum over chunks of grad_logits^T @ x                    (V, n)
            if need_w:
                part = torch.mm(grad_logits.t(), xc.to(compute_dtype))
                grad_weight = part if grad_weight is None else grad_weight + part
            # grad_bias = sum over rows of grad_logits                              (V,)
            if need_b:
                part = grad_logits.sum(0)
                grad_bias = part if grad_bias is None else grad_bias + part
        grad_x = None
        if need_x:
            grad_x = (torch.cat(grad_x_parts) if len(grad_x_parts) > 1 else grad_x_parts[0])
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


# The target of the graph node the head-and-loss pass inserts (``torch_seam.graph_function``).
linear_cross_entropy = torch_seam.graph_function(LinearCrossEntropy, __name__, "linear_cross_entropy")
