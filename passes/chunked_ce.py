"""The exact chunked output head and cross-entropy loss that the ``head_loss`` pass inserts.

Contract
--------
``LinearCrossEntropy.apply(x, weight, bias, labels, ignore_index, reduction, chunk_rows, upcast,
return_logits, grad_in_forward=False, vocab_block=None)`` returns ``F.cross_entropy(logits.view(-1, V), labels.view(-1),
ignore_index=ignore_index, reduction=reduction)`` with ``logits = F.linear(x, weight, bias)``
(``.float()`` first when ``upcast``), for ``x`` of shape ``(..., n)``, ``weight`` ``(V, n)`` and
``labels`` with as many elements as ``x`` has rows. With ``return_logits`` it returns
``(loss, logits)``, the logits in ``F.linear``'s shape and dtype; a gradient flowing into the
returned logits reaches ``x``, ``weight`` and ``bias`` exactly as through ``F.linear`` (with
``grad_in_forward``, once ``attach_logits_grad`` has given them their path).

- **Forward:** the loss is computed ``chunk_rows`` rows at a time: per chunk the logits
  ``(chunk_rows, V)``, their log-sum-exp and the logit of the label; never an ``(N, V)`` tensor
  is kept for backward. (Where the logits are returned they are computed once in full, as the
  caller holds them anyway, and the loss is one pass over all their rows.)
- **Gradients, with ``grad_in_forward``:** the loss is the graph's last op, so the gradient of
  the summed loss with respect to a chunk's logits, ``(softmax - onehot(label)) * valid``, is
  known in the forward. Each chunk turns it into ``grad_x = g @ W``, ``grad_weight += g^T @ x``
  (float32) and ``grad_bias += g.sum(0)`` (float32): three head matmuls in all, as Inductor's
  graph runs. Those are saved (no ``x``, no logits); the backward multiplies them by
  ``grad_loss / valid_count`` (``"mean"``) or ``grad_loss`` (``"sum"``). Returned logits then
  carry no gradient path (``attach_logits_grad`` gives it back). Gradients the inputs do not
  need are not computed, and under ``no_grad`` nothing but the loss is. Where the logits are
  returned, and so held in full anyway, the gradients come instead from a pass over
  ``vocab_block`` columns of them at a time (None: ``vocab_block_for``): ``g_j = (softmax -
  onehot)[:, j]``, ``grad_weight[j] = g_j^T x``, ``grad_x += g_j W[j]``, so the pass's
  temporaries are one (N, block) tensor, not a row chunk of the whole vocabulary.
- **Gradients, without:** ``x``, ``labels`` and the per-row log-sum-exp ``(N,)`` are saved; per
  chunk the backward recomputes the logits from ``x``, and
  ``grad_logits = (softmax - onehot(label)) * valid * scale`` (plus the incoming gradient of
  the returned logits) becomes ``grad_x``, ``grad_weight`` and ``grad_bias``: a fourth matmul.
- **ignore_index:** rows whose label equals it add nothing to the loss, the count or any
  gradient. A ``"mean"`` over a batch where every label is ignored is ``0 / 0``, NaN, as in
  eager ``F.cross_entropy``; a ``"sum"`` is 0.

The input gradient depends on ``softmax(x W^T)``, a nonlinear function of ``x``: it needs the
exact ``x`` (a compressed copy ``x P`` would bias it, arXiv 2605.01255), so this op never
compresses ``x``.

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
MIN_VOCAB_BLOCK = 256  # columns: below this a block's matmuls get too thin
MAX_VOCAB_BLOCKS = 16  # the pass is unrolled into the graph: more blocks, a longer compile


def chunk_rows_for(rows: int, vocab: int, width: int | None = None,
                   max_elements: int = MAX_CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that rows x vocab stays within ``max_elements`` and, given the head's
    input ``width``, a chunk's logits are no larger than the head input itself (rows x width
    elements), but never below ``MIN_CHUNK_ROWS`` rows (or all rows, when fewer); at least 1
    row, with the rows spread evenly over the chunks (no small last chunk).

    Each chunk holds its logits and their gradient for a moment: sized like the head input,
    that transient stays small against the activations (at vocab 2048 and width 256 one 16 MiB
    chunk raised the step peak of the bench's Llama by about 25 MiB against 256-row chunks).
    Each chunk also re-reads the whole head weight in each of its matmuls, so the floor wins
    over the element cap at large vocabularies: at vocab 128000 the cap alone gave 32-row
    chunks, 64 of them for 2048 rows, each a thin, weight-bound matmul."""
    if rows <= 0:
        return 1
    per_chunk = max(1, max_elements // max(1, vocab))
    if width:
        per_chunk = min(per_chunk, rows * width // max(1, vocab))
    per_chunk = max(per_chunk, min(MIN_CHUNK_ROWS, rows))
    chunks = -(-rows // per_chunk)
    return -(-rows // chunks)


def vocab_block_for(rows: int, vocab: int, width: int | None = None,
                    max_elements: int = MAX_CHUNK_ELEMENTS) -> int:
    """Columns per vocabulary block of the gradient pass over returned logits: rows x block
    within ``max_elements`` and, given the head's input ``width``, a block no larger than the
    head input (block <= width), as ``chunk_rows_for`` bounds row chunks; but no more than
    ``MAX_VOCAB_BLOCKS`` blocks (each block's temporary is then at most a sixteenth of the
    logits the caller holds anyway) and never below ``MIN_VOCAB_BLOCK`` columns (or the whole
    vocabulary, when smaller), with the columns spread evenly over the blocks (no thin last
    block). At vocabulary 2048 and width 256 a whole-vocabulary block of 2048 rows (16 MiB)
    raised the bench's step peaks by 7-10% against 256-column blocks."""
    if vocab <= 0:
        return 1
    per_block = max(1, max_elements // max(1, rows))
    if width:
        per_block = min(per_block, width)
    per_block = max(per_block, min(MIN_VOCAB_BLOCK, vocab), -(-vocab // MAX_VOCAB_BLOCKS))
    blocks = -(-vocab // per_block)
    return -(-vocab // blocks)


def grad_in_forward_pays(rows: int, vocab: int, width: int | None, weight_grad: bool,
                         weight_dtype: torch.dtype = torch.float32) -> bool:
    """Whether the op should compute its gradients in the forward (``grad_in_forward``).

    In the forward it runs the head's three matmuls once each, as Inductor's graph does, and
    keeps the input gradient (rows x width, the size of the head input the recompute keeps)
    and the weight gradient (vocab x width, float32) until the backward; recomputing keeps the
    head input and runs a fourth matmul. The head is the forward's last op and its backward
    the backward's first, so the held weight gradient lives over the same moment (the body's
    activations all saved) as the one the recompute would make at the backward's start. It
    costs more only where it is larger than that one: a float32 gradient for a weight of
    16-bit dtype. The rule: compute in the forward when the weight is float32 (the held
    gradient has the weight gradient's own size), when the weight takes no gradient (a frozen
    head: nothing more held), or when the held float32 gradient is at most half of the float32
    logits that plain Inductor keeps (``2 width <= rows``). So a float32 model always computes
    in the forward; a bf16 model of width 4096 does from 8192 rows on, and recomputes below."""
    if not weight_grad or not width or weight_dtype == torch.float32:
        return True
    return 2 * width <= rows


def _chunk_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """(sum of the per-row losses over valid rows, per-row log-sum-exp) of one chunk."""
    lse = torch.logsumexp(logits, dim=-1)  # (c,)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    target = torch.gather(logits, 1, safe.unsqueeze(1)).squeeze(1)  # (c,)
    per_row = torch.where(valid, lse - target, torch.zeros_like(lse))
    return per_row.sum(), lse


def _unit_grad(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor,
               ignore_index: int, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(softmax(logits) - onehot(labels)) * row_scale`` on valid rows, 0 on ignored ones:
    the gradient of the summed loss with respect to one chunk's logits (c, V), in the logits'
    dtype. ``row_scale`` (a scalar) multiplies every valid row; None: 1."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    one = torch.ones((), dtype=logits.dtype, device=logits.device)
    scale = one if row_scale is None else row_scale.to(logits.dtype)
    weights = torch.where(valid, scale, torch.zeros_like(one)).unsqueeze(1)  # (c, 1)
    # softmax * scale, then minus scale at each row's label (no (c, V) one-hot)
    grad = torch.exp(logits - lse.unsqueeze(1)) * weights
    return torch.scatter_add(grad, 1, safe.unsqueeze(1), -weights)


def _block_grads(full: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                 x2d: torch.Tensor, weight: torch.Tensor, need: tuple[bool, bool, bool],
                 block: int) -> tuple:
    """The head gradients for a loss gradient of 1 per valid row, from logits already held in
    full (N, V): a pass over vocabulary blocks of ``block`` columns, each
    ``g_j = (softmax - onehot)[:, j]`` (N, block) turned into ``grad_weight[j] = g_j^T x``,
    ``grad_bias[j] = g_j.sum(0)`` and ``grad_x += g_j W[j]``. Its temporaries are one block,
    not a row chunk of the whole vocabulary. Returns (grad_x in the logits' dtype, summed in
    float32; grad_weight and grad_bias in float32), None where ``need`` says no."""
    vocab = full.shape[1]
    valid = labels != ignore_index
    rows_w = valid.to(torch.float32).unsqueeze(1)  # (N, 1): 1 on valid rows, 0 on ignored ones
    lse_col = lse.float().unsqueeze(1)  # (N, 1)
    compute_dtype = full.dtype
    grad_x, w_parts, b_parts = None, [], []
    prev = None  # one element of the previous block's matmul output
    for start in range(0, vocab, block):
        stop = min(vocab, start + block)
        logits = full[:, start:stop].float()  # (N, b)
        cols = torch.arange(start, stop, device=full.device)
        onehot = (labels.unsqueeze(1) == cols.unsqueeze(0)).to(torch.float32)  # fused, not held
        # Every block reads the same logits and log-sum-exp, and nothing else orders them, so
        # Inductor fuses all blocks' pointwise work into one kernel that writes every g_j at
        # once: the whole (N, V) again. Adding 0 times an element of the previous block's
        # matmul (finite whenever the logits are) makes each block wait for the one before,
        # and its buffer is reused.
        shift = lse_col if prev is None else lse_col + prev * 0.0
        g = ((torch.exp(logits - shift) - onehot) * rows_w).to(compute_dtype)  # (N, b)
        if need[0]:  # grad_x += g_j @ W[j]                                     (N, n)
            part = torch.mm(g, weight[start:stop].to(g.dtype)).float()
            grad_x = part if grad_x is None else grad_x + part
        if need[1]:  # grad_weight[j] = g_j^T @ x                               (b, n)
            w_parts.append(torch.mm(g.t(), x2d.to(g.dtype)).float())
        if need[2]:  # grad_bias[j] = column sums of g_j                         (b,)
            b_parts.append(g.float().sum(0))
        last = grad_x if need[0] else w_parts[-1] if need[1] else b_parts[-1]
        prev = last.reshape(-1)[:1].float()
    grad_x = grad_x.to(compute_dtype) if grad_x is not None else None
    grad_weight = (torch.cat(w_parts) if len(w_parts) > 1 else w_parts[0]) if need[1] else None
    grad_bias = (torch.cat(b_parts) if len(b_parts) > 1 else b_parts[0]) if need[2] else None
    return grad_x, grad_weight, grad_bias


def _add_chunk_grads(grads: tuple, grad_logits: torch.Tensor, xc: torch.Tensor,
                     weight: torch.Tensor, need: tuple[bool, bool, bool],
                     accum_dtype: torch.dtype | None = None) -> tuple:
    """``grads`` = (grad_x parts, grad_weight, grad_bias) with one chunk's head gradients added,
    for the gradients ``need`` asks for; the sums in ``accum_dtype`` (None: the chunk's dtype)."""
    parts, grad_weight, grad_bias = grads
    dtype = grad_logits.dtype
    # grad_x = grad_logits @ W                                                 (c, n)
    if need[0]:
        parts.append(torch.mm(grad_logits, weight.to(dtype)))
    # grad_weight = sum over chunks of grad_logits^T @ x                        (V, n)
    if need[1]:
        part = torch.mm(grad_logits.t(), xc.to(dtype))
        part = part if accum_dtype is None else part.to(accum_dtype)
        grad_weight = part if grad_weight is None else grad_weight + part
    # grad_bias = sum over rows of grad_logits                                  (V,)
    if need[2]:
        part = (grad_logits if accum_dtype is None else grad_logits.to(accum_dtype)).sum(0)
        grad_bias = part if grad_bias is None else grad_bias + part
    return parts, grad_weight, grad_bias


class LinearCrossEntropy(torch.autograd.Function):
    """Exact head + cross-entropy, computed chunk by chunk; keeps no ``(N, V)`` tensor."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, ignore_index, reduction, chunk_rows, upcast,
                return_logits, grad_in_forward=False, vocab_block=None):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        n = x.shape[-1]
        x2d = x.reshape(-1, n)  # (N, n)
        labels1d = labels.reshape(-1)  # (N,)
        rows = x2d.shape[0]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        early = grad_in_forward and (need_x or need_w or need_b)
        full = F.linear(x2d, weight, bias) if return_logits else None  # (N, V)
        total, lses = None, []
        grads = ([], None, None)  # grad_x parts, grad_weight, grad_bias (_add_chunk_grads)
        # Returned logits are held in full anyway: one pass over all rows (Inductor fuses it
        # into one reduction; a loop of row slices would only lengthen the compile).
        step = rows if full is not None else chunk_rows
        for start in range(0, rows, max(1, step)):
            stop = min(rows, start + step)
            xc = x2d[start:stop]  # (c, n)
            logits = full[start:stop] if full is not None else F.linear(xc, weight, bias)
            compute_dtype = logits.dtype
            if upcast:
                logits = logits.float()
            part, lse = _chunk_loss(logits, labels1d[start:stop], ignore_index)
            total = part if total is None else total + part
            lses.append(lse)
            if not early or full is not None:
                continue
            # The loss is the graph's last op: its gradient with respect to this chunk's logits
            # is (softmax - onehot) times a scalar the backward supplies (grad_loss / count for
            # "mean"), so the head's three matmuls all run here, on the chunk's logits.
            grad_logits = _unit_grad(logits, lse, labels1d[start:stop], ignore_index).to(compute_dtype)
            grads = _add_chunk_grads(grads, grad_logits, xc, weight, (need_x, need_w, need_b),
                                     torch.float32)
        lse = torch.cat(lses) if len(lses) > 1 else lses[0]  # (N,)
        if early and full is not None:
            # the logits are held in full for the caller: the gradients come from a pass over
            # vocabulary blocks of them, whose temporaries are a block, not a chunk of rows
            grad_x, grad_weight, grad_bias = _block_grads(
                full, lse, labels1d, ignore_index, x2d, weight, (need_x, need_w, need_b),
                vocab_block or vocab_block_for(rows, full.shape[1], n))
            grads = ([grad_x] if grad_x is not None else [], grad_weight, grad_bias)
        count = (labels1d != ignore_index).sum()
        loss = total / count.to(total.dtype) if reduction == "mean" else total

        ctx.ignore_index, ctx.reduction, ctx.chunk_rows = ignore_index, reduction, chunk_rows
        ctx.upcast, ctx.return_logits, ctx.early = upcast, return_logits, early
        ctx.has_bias = bias is not None
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if early:
            grad_x_parts, grad_weight, grad_bias = grads
            grad_x = (torch.cat(grad_x_parts) if len(grad_x_parts) > 1 else grad_x_parts[0]) \
                if need_x else None
            ctx.save_for_backward(grad_x, grad_weight, grad_bias, count)
        else:
            ctx.save_for_backward(x, weight, bias, labels1d, lse, count)
        if return_logits:
            logits_out = full.reshape(*x.shape[:-1], full.shape[-1])
            if early:  # no gradient path here: the caller attaches one (attach_logits_grad)
                ctx.mark_non_differentiable(logits_out)
            return loss, logits_out
        return loss

    @staticmethod
    def backward(ctx, grad_loss, grad_logits_out=None):
        if ctx.early:
            return LinearCrossEntropy._backward_early(ctx, grad_loss)
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
        grads = ([], None, None)
        for start in range(0, rows, ctx.chunk_rows):
            stop = min(rows, start + ctx.chunk_rows)
            xc = x2d[start:stop]  # (c, n)
            logits = F.linear(xc, weight, bias)  # (c, V), recomputed
            compute_dtype = logits.dtype
            if ctx.upcast:
                logits = logits.float()
            grad_logits = _unit_grad(logits, lse[start:stop], labels1d[start:stop],
                                     ctx.ignore_index, scale)
            if grad_logits_out is not None:
                grad_logits = grad_logits + grad_logits_out[start:stop].to(grad_logits.dtype)
            grad_logits = grad_logits.to(compute_dtype)
            grads = _add_chunk_grads(grads, grad_logits, xc, weight, (need_x, need_w, need_b))
        grad_x_parts, grad_weight, grad_bias = grads
        grad_x = None
        if need_x:
            grad_x = (torch.cat(grad_x_parts) if len(grad_x_parts) > 1 else grad_x_parts[0])
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, None

    @staticmethod
    def _backward_early(ctx, grad_loss):
        """The forward computed the gradients for a loss gradient of 1 per valid row: scale."""
        grad_x, grad_weight, grad_bias, count = ctx.saved_tensors
        # scale = d loss / d (sum of the valid rows' losses); with no valid row the held
        # gradients are zero, and so are eager's (the clamp keeps 0 * inf from making NaN)
        if ctx.reduction == "mean":
            scale = grad_loss / count.clamp_min(1).to(grad_loss.dtype)
        else:
            scale = grad_loss
        if grad_x is not None and ctx.needs_input_grad[0]:
            grad_x = (grad_x * scale.to(grad_x.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        else:
            grad_x = None
        if grad_weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (grad_weight * scale.float()).to(ctx.weight_dtype)
        else:
            grad_weight = None
        if grad_bias is not None and ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = (grad_bias * scale.float()).to(ctx.bias_dtype)
        else:
            grad_bias = None
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, None


class _LogitsGrad(torch.autograd.Function):
    """Identity on logits computed without a gradient path, whose backward sends a gradient
    arriving at them to ``x``, ``weight`` and ``bias`` as ``F.linear`` would. Its backward runs
    only when something differentiates through the logits, so a caller who only reads them
    pays nothing."""

    @staticmethod
    def forward(ctx, logits, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad_logits):
        x, weight, bias = ctx.saved_tensors
        vocab, n = weight.shape
        g = grad_logits.reshape(-1, vocab)  # (N, V)
        grad_x = grad_weight = grad_bias = None
        # grad_x = grad_logits @ W;  grad_weight = grad_logits^T @ x;  grad_bias = row sum
        if ctx.needs_input_grad[1]:
            grad_x = torch.mm(g, weight.to(g.dtype)).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = torch.mm(g.t(), x.reshape(-1, n).to(g.dtype)).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[3]:
            grad_bias = g.sum(0).to(bias.dtype)
        return None, grad_x, grad_weight, grad_bias


def attach_logits_grad(logits: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """``logits`` (as ``F.linear(x, weight, bias)`` gives them, without a gradient path) with
    that path attached: what ``LinearCrossEntropy`` with ``grad_in_forward`` returns, made
    differentiable again outside the compiled graph, where an unused path costs nothing."""
    if not (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return logits
    return _LogitsGrad.apply(logits, x, weight, bias)


# The target of the graph node the head-and-loss pass inserts (``torch_seam.graph_function``).
linear_cross_entropy = torch_seam.graph_function(LinearCrossEntropy, __name__, "linear_cross_entropy")
