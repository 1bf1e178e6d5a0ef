"""head_loss: replace an output head and the cross-entropy loss on its logits by one exact,
chunked op (``passes.chunked_ce.LinearCrossEntropy``) that never keeps an ``(N, V)`` tensor for
backward.

Matches
-------
``F.cross_entropy(input, target, ...)`` whose ``input`` is reached from a head
``F.linear(x, W, b)`` (``W`` a trained 2-D parameter) through nothing but

- a float cast (``.float()``, ``.to(torch.float32)``): the op then computes the loss in float32;
- row-preserving reshapes that keep the vocabulary as the last dimension (``view``, ``reshape``,
  ``flatten``) and ``contiguous``;
- a slice of the leading dimensions (``logits[..., :-1, :]``, the shift of older causal-LM
  losses), replayed on ``x``.

This covers the Hugging Face causal-LM loss (transformers 5.x ``ForCausalLMLoss``: head
``F.linear``, ``.float()``, ``view(-1, V)``, ``cross_entropy(..., ignore_index=-100,
reduction="mean")``, or ``"sum"`` when ``num_items_in_batch`` is given) and a plain
``F.cross_entropy(model(x), y)``. The labels are taken as they reach the loss (HF pads and
shifts them itself).

Where the logits are also a graph output (Hugging Face models return them next to the loss)
the op returns them too, with their gradient path: any gradient the caller sends into them
reaches ``x``, ``W`` and ``b`` exactly. They are then computed once in full in the forward (the
caller holds them), and are still not saved for backward.

Left alone, with the reason in the report (``state.head_losses``): ``label smoothing``, ``class
weights``, ``reduction none``, ``soft targets`` (class probabilities), ``other op on the logits``
(a softcap ``tanh``, a temperature, a z-loss's extra ``logsumexp``: anything between the head
and the loss that is not listed above), ``logits used elsewhere`` (a node other than the loss
chain and the graph output reads the logits, e.g. a user's own loss), ``logits returned and
sliced for the loss``, ``no head linear``, ``dynamic row count``, ``filtered`` (the site
filter), ``off`` (``policy.head_loss`` is False). An output head (``policy.is_head``) whose logits
reach no ``F.cross_entropy`` (a user's own loss, logits only returned) is listed too, with the
reason ``no cross-entropy on the logits``.

Gradients: computed in the forward's chunks (``head_loss_grad_in_forward``, by default when
``chunked_ce.grad_in_forward_pays``), or recomputed in the backward. Computed in the forward,
returned logits leave the op without a gradient path: the head input becomes an extra graph
output after the graph's own (``state.logits_grads``) and the runner attaches the path outside
the graph, where it costs nothing unless something differentiates through the logits.

Guarantees: the loss, the returned logits and every gradient equal eager's up to float
rounding (tests compare with ``assert_close`` in float32); every node created carries
``meta["example_value"]``. Runs before ``find_sites``, so the head it takes is no longer a site.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx
import torch.nn.functional as F

from prac_fx.passes.chunked_ce import chunk_rows_for, grad_in_forward_pays, linear_cross_entropy
from prac_fx.passes import kinds
from prac_fx.passes.graph_state import GraphState, PassResult, SitePolicy
from prac_fx.passes.paths import module_path, parameter_path

_CE = {F.cross_entropy}
_LINEAR = {torch._C._nn.linear, F.linear}
_RESHAPES = {"view", "reshape", "flatten"}
_FLOAT_DTYPES = {torch.float32, torch.float}


@dataclasses.dataclass
class HeadLoss:
    """One cross-entropy node the pass looked at: ``status`` is ``"rewritten"`` or ``"skipped"``
    (then ``reason`` says why). Bytes are what the loss keeps of the ``(N, V)`` logits for
    backward before (one float copy, as eager and Inductor keep) and after (the per-row
    log-sum-exp); the head input and labels are kept by both."""

    node: str
    module: str = ""
    weight: str = ""
    rows: int | None = None
    vocab: int | None = None
    reduction: str = ""
    ignore_index: int | None = None
    upcast: bool = False
    returns_logits: bool = False
    chunk_rows: int | None = None
    status: str = "skipped"
    reason: str | None = None
    saved_bytes_before: int = 0
    saved_bytes_after: int = 0
    grad_in_forward: bool = False  # the gradients computed in the forward (or recomputed)
    grad_bytes: int = 0  # held from forward to backward when computed in the forward
    # the head input the runner keeps for the returned logits' gradient path (grad_in_forward
    # with returned logits; ``chunked_ce.attach_logits_grad``), alive while the logits are
    logits_path_bytes: int = 0


def _val(node):
    if isinstance(node, torch.fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return None


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _is_head_weight(node) -> bool:
    """A 2-D floating-point graph input: a head weight, trained or frozen (a base model under
    adapters; the op then computes no weight gradient)."""
    v = _val(node)
    return (isinstance(node, torch.fx.Node) and node.op == "placeholder"
            and isinstance(v, torch.Tensor) and v.dim() == 2 and v.is_floating_point())


def _is_trained_weight(node) -> bool:
    return _is_head_weight(node) and _val(node).requires_grad


def _is_float_cast(node: torch.fx.Node) -> bool:
    if node.op == "call_method" and node.target == "float" and len(node.args) == 1:
        return True
    if node.op == "call_method" and node.target == "to":
        rest = list(node.args[1:]) + list(node.kwargs.values())
        return len(rest) == 1 and rest[0] in _FLOAT_DTYPES
    return False


def _leading_slice(node: torch.fx.Node) -> bool:
    """``t[idx]`` that slices leading dimensions only and keeps the last one whole."""
    if not (node.op == "call_function" and node.target is operator.getitem):
        return False
    idx = node.args[1]
    if not isinstance(idx, tuple) or not idx or any(i is None for i in idx):
        return False
    last = idx[-1]
    if not (isinstance(last, slice) and last == slice(None)):
        return False
    return all(isinstance(i, slice) or i is Ellipsis for i in idx)


def _static_rows(val: torch.Tensor) -> int | None:
    rows = 1
    for size in val.shape[:-1]:
        if not isinstance(size, int):
            return None
        rows *= size
    return rows


def _walk(ce: torch.fx.Node):
    """From the loss input back to the head: (linear, chain nodes loss-first, upcast, slices) or
    a reason string."""
    chain, upcast, slices = [], False, []
    node = _arg(ce, 0, "input")
    while isinstance(node, torch.fx.Node):
        if node.op == "call_function" and node.target in _LINEAR:
            return node, chain, upcast, slices
        if len(node.users) != 1:
            return "logits used elsewhere"
        val = _val(node)
        if not isinstance(val, torch.Tensor):
            return "other op on the logits"
        if _is_float_cast(node):
            upcast = True
        elif node.op == "call_method" and node.target == "contiguous":
            pass
        elif node.op == "call_method" and node.target in _RESHAPES:
            src = _val(node.args[0])
            if not isinstance(src, torch.Tensor) or val.shape[-1] != src.shape[-1]:
                return "other op on the logits"
        elif _leading_slice(node):
            slices.append(node)
        else:
            return "other op on the logits"
        chain.append(node)
        node = node.args[0]
    return "no head linear"


def _check_loss(ce: torch.fx.Node) -> str | None:
    if _arg(ce, 2, "weight") is not None:
        return "class weights"
    if _arg(ce, 3, "size_average") is not None or _arg(ce, 5, "reduce") is not None:
        return "unsupported pattern"
    if _arg(ce, 7, "label_smoothing", 0.0) != 0.0:
        return "label smoothing"
    reduction = _arg(ce, 6, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        return f"reduction {reduction}"
    if not isinstance(_arg(ce, 4, "ignore_index", -100), int):
        return "unsupported pattern"
    target = _val(_arg(ce, 1, "target"))
    if not isinstance(target, torch.Tensor) or target.is_floating_point():
        return "soft targets"
    return None


def _reaches_loss(node: torch.fx.Node) -> bool:
    """Whether a cross-entropy node reads ``node``'s value, directly or through other nodes."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for user in n.users:
            if user.op == "call_function" and user.target in _CE:
                return True
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return False


def _fake(node: torch.fx.Node, fn, *args):
    """``fn(*args)`` on the graph's fake example values, stored as ``node``'s example value."""
    vals = [_val(a) if isinstance(a, torch.fx.Node) else a for a in args]
    mode = next((getattr(v, "fake_mode", None) for v in vals if isinstance(v, torch.Tensor)), None)
    if mode is not None:
        with mode:
            node.meta["example_value"] = fn(*vals)


def run(state: GraphState, policy: SitePolicy) -> PassResult:
    result = PassResult("head_loss")
    graph = state.gm.graph
    heads: list[HeadLoss] = []
    output = next(n for n in graph.nodes if n.op == "output")
    for ce in [n for n in graph.nodes if n.op == "call_function" and n.target in _CE]:
        head = HeadLoss(node=ce.name)
        heads.append(head)
        if not getattr(policy, "head_loss", True):
            head.reason = "off"
            continue
        reason = _check_loss(ce)
        walked = _walk(ce)
        if isinstance(walked, str):
            head.reason = reason or walked
            continue
        linear, chain, upcast, slices = walked
        x, weight, bias = _arg(linear, 0, "input"), _arg(linear, 1, "weight"), _arg(linear, 2, "bias")
        if reason is None and not _is_head_weight(weight):
            reason = "no head linear"
        if reason is None and bias is not None and not isinstance(bias, torch.fx.Node):
            reason = "unsupported pattern"
        x_val, logits_val = _val(x), _val(linear)
        if reason is None and (not isinstance(x_val, torch.Tensor) or not x_val.is_floating_point()
                               or not isinstance(logits_val, torch.Tensor)):
            reason = "unsupported pattern"
        head.weight = parameter_path(weight) if isinstance(weight, torch.fx.Node) else ""
        head.module = module_path(linear) or head.weight.rsplit(".", 1)[0]
        others = [u for u in linear.users if u is not (chain[-1] if chain else ce)]
        returns = any(u is output for u in others)
        if reason is None and any(u is not output for u in others):
            reason = "logits used elsewhere"
        if reason is None and returns and slices:
            reason = "logits returned and sliced for the loss"
        if reason is None and not policy.include(head.module):
            reason = "filtered"
        loss_in = _val(_arg(ce, 0, "input"))
        if reason is None and (not isinstance(loss_in, torch.Tensor) or loss_in.dim() != 2):
            reason = "unsupported pattern"  # the class dimension is dim 1: only (N, V) is rows x vocab
        rows = _static_rows(loss_in) if isinstance(loss_in, torch.Tensor) else None
        if reason is None and rows is None:
            reason = "dynamic row count"
        vocab = int(logits_val.shape[-1]) if isinstance(logits_val, torch.Tensor) else None
        head.rows, head.vocab, head.upcast, head.returns_logits = rows, vocab, upcast, returns
        head.reduction = _arg(ce, 6, "reduction", "mean")
        head.ignore_index = _arg(ce, 4, "ignore_index", -100)
        if reason is not None:
            head.reason = reason
            continue

        width = int(x_val.shape[-1]) if isinstance(x_val, torch.Tensor) else None
        chunk = getattr(policy, "head_loss_chunk_rows", None) or chunk_rows_for(rows, vocab, width)
        chunk = min(chunk, max(rows, 1))
        head.chunk_rows = chunk
        loss_dtype = loss_in.dtype
        head.saved_bytes_before = rows * vocab * loss_dtype.itemsize
        head.saved_bytes_after = rows * loss_dtype.itemsize  # the per-row log-sum-exp
        labels = _arg(ce, 1, "target")
        early = getattr(policy, "head_loss_grad_in_forward", None)
        if early is None:
            early = grad_in_forward_pays(rows, vocab, width, bool(_val(weight).requires_grad),
                                         _val(weight).dtype)
        if returns and bias is not None and bias.op != "placeholder":
            early = False  # the runner re-attaches the logits' gradient from graph inputs
        head.grad_in_forward = early
        if early:  # the gradients it holds from forward to backward, under their own name
            head.saved_bytes_after = 0  # no log-sum-exp: nothing of the logits is kept
            head.grad_bytes = rows * width * x_val.dtype.itemsize + vocab * width * 4
            if bias is not None:
                head.grad_bytes += vocab * 4
            if returns:
                head.logits_path_bytes = rows * width * x_val.dtype.itemsize
        with graph.inserting_before(ce):
            x_rows = x
            for s in reversed(slices):  # outermost last: replay in the order applied to the logits
                x_rows = graph.call_function(operator.getitem, (x_rows, s.args[1]))
                _fake(x_rows, operator.getitem, x_rows.args[0], s.args[1])
            fused = graph.call_function(
                linear_cross_entropy,
                (x_rows, weight, bias, labels, head.ignore_index, head.reduction, chunk, upcast,
                 returns, early))
        fused.meta["stack_trace"] = ce.meta.get("stack_trace")
        if returns:
            fused.meta["example_value"] = (_val(ce), logits_val)
            with graph.inserting_after(fused):
                loss = graph.call_function(operator.getitem, (fused, 0))
            with graph.inserting_after(loss):
                logits = graph.call_function(operator.getitem, (fused, 1))
            loss.meta["example_value"] = _val(ce)
            logits.meta.update(linear.meta)
        else:
            fused.meta["example_value"] = _val(ce)
            loss = fused
        for node in {x_rows, fused, loss, *([logits] if returns else [])} - {x}:
            node.meta[kinds.TAG] = {"role": kinds.ROLE_HEAD_LOSS, "group": None}
        ce.replace_all_uses_with(loss)
        graph.erase_node(ce)
        for node in chain:  # loss side first: each now has no user
            graph.erase_node(node)
        if returns:
            linear.replace_all_uses_with(logits)
            if early:  # the op returns them without a gradient path: the runner attaches it
                outs = list(output.args[0])
                placeholders = [n for n in graph.nodes if n.op == "placeholder"]
                state.logits_grads.append((outs.index(logits), placeholders.index(weight),
                                           placeholders.index(bias) if bias is not None else None))
                output.args = (type(output.args[0])([*outs, x_rows]),)
        graph.erase_node(linear)
        head.status, head.reason = "rewritten", None
        result.sites_matched += 1
    # Heads (``policy.is_head``) whose logits reach no cross-entropy: a user's own loss, or
    # logits only returned. Listed so that the report says why they kept their logits.
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _LINEAR and _is_trained_weight(_arg(node, 1, "weight")):
            weight = parameter_path(_arg(node, 1, "weight"))
            module = module_path(node) or weight.rsplit(".", 1)[0]
            if policy.is_head(module) and not _reaches_loss(node):
                heads.append(HeadLoss(node=node.name, module=module, weight=weight,
                                      reason="no cross-entropy on the logits"))
    state.head_losses = heads
    if result.sites_matched:
        graph.lint()
        state.gm.recompile()
    skipped: dict[str, int] = {}
    for h in heads:
        if h.reason:
            skipped[h.reason] = skipped.get(h.reason, 0) + 1
    result.notes = [f"skipped {k}: {v}" for k, v in sorted(skipped.items())]
    return result
