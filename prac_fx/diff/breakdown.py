"""Where the saved bytes are: each tensor a forward keeps for backward, put in one category by
what keeps it, and the head-and-loss rewrites, for ``prac-fx diff``.

Categories (``CATEGORIES``), decided from the partitioned aten graphs (first match wins):

- ``bases``: the PRAC bases (graph inputs the backend appends);
- ``attention``: produced by an attention op (its output, log-sum-exp, seeds) or read by an
  attention backward (q, k, v);
- ``head gradients`` (checked before the next, whose ops also make the weight gradient's
  blocks): float tensors whose first dimension is a vocabulary size and last is not, see below;
- ``head and loss``: the logits or what the loss keeps of them: a tensor whose last dimension is
  a vocabulary size the head-and-loss pass saw, or the output of ``_log_softmax`` /
  ``logsumexp`` or of its decomposition (``amax``, ``log``), or a ``cat`` of those (the chunked
  op's per-row log-sum-exp), or a view of one;
- ``head gradients``: float tensors whose first dimension is a vocabulary size and last is not
  (the head's weight gradient, which the head-and-loss op computes in the forward and holds
  until the backward; its input gradient, shaped like the head input, falls under the
  categories below, and the head rows give the op's held bytes exactly), and, outside the
  graph, the head input the runner keeps for returned logits' gradient path;
- ``linear inputs and copies``: read by a matmul in the backward (``mm``, ``addmm``: the input a
  weight gradient needs) or a compressed copy ``x @ P``;
- ``other``: integer and boolean tensors (token ids, labels, masks);
- ``nonlinear inputs``: everything else (inputs of GeLU/SiLU, norms and their statistics,
  element-wise products).
"""
from __future__ import annotations

from prac_fx.diff import graph_text

CATEGORIES = ("linear inputs and copies", "attention", "nonlinear inputs", "head and loss",
              "head gradients", "bases", "other")

_ATTENTION = ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "attention_backward")
# the cross-entropy's log-softmax (or its decomposition: row max and log of the row sum)
_HEAD_OPS = {"_log_softmax", "log_softmax", "logsumexp", "amax", "log"}
_VIEWS = {"getitem", "view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "permute", "t",
          "transpose", "expand", "alias", "slice", "select"}
_MATMUL = {"mm", "addmm"}
_INTEGER = ("i64", "i32", "i16", "i8", "u8", "b8")


def _op(node: graph_text.Node | None) -> str:
    if node is None:
        return ""
    op = node.op
    return op.split(".")[3] if op.startswith("torch.ops.") and op.count(".") >= 3 else op


def _dims(node: graph_text.Node | None) -> list[int | None]:
    """The sizes a node's annotation prints (``f32[2048, 256]``); None for a symbolic size."""
    if node is None or "[" not in node.annotation:
        return []
    out = []
    for dim in node.annotation.split("[", 1)[1].rstrip("]").split(","):
        try:
            out.append(int(dim))
        except ValueError:
            out.append(None)
    return out


def _last_dim(node: graph_text.Node | None) -> int | None:
    dims = _dims(node)
    return dims[-1] if dims else None


def _first_dim(node: graph_text.Node | None) -> int | None:
    dims = _dims(node)
    return dims[0] if dims else None


def categories(forward_code: str, backward_code: str, names: list[str], bases: set[str],
               vocabs: set[int]) -> dict[str, str]:
    """Category of each saved tensor in ``names`` (names as the two graphs print them)."""
    fw = graph_text.parse(forward_code) if forward_code else {}
    bw = graph_text.parse(backward_code) if backward_code else {}
    readers: dict[str, set[str]] = {}
    for node in bw.values():
        for arg in node.args:
            if arg:
                readers.setdefault(arg, set()).add(_op(node))

    def base_of(name: str) -> graph_text.Node | None:
        node = fw.get(name)
        for _ in range(16):  # through getitem and views to the op that made the storage
            if node is None or _op(node) not in _VIEWS or not node.args or not node.args[0]:
                break
            node = fw.get(node.args[0])
        return node

    out = {}
    for name in names:
        node = fw.get(name)
        made = base_of(name)
        made_op = _op(made)
        read = readers.get(name, set())
        if name in bases or (made is not None and made.name in bases):
            cat = "bases"
        elif any(a in made_op for a in _ATTENTION) or any(a in op for op in read for a in _ATTENTION):
            cat = "attention"
        elif (vocabs and _first_dim(node) in vocabs and _last_dim(node) not in vocabs
              and node.dtype.startswith(("f", "bf"))):
            cat = "head gradients"  # (V, n) and (V,): before the head's ops, which make them too
        elif (vocabs and _last_dim(node) in vocabs) or made_op in _HEAD_OPS or (
                made_op == "cat" and made is not None and made.args
                and all(_op(fw.get(a)) in _HEAD_OPS for a in made.args if a)):
            cat = "head and loss"
        elif read & _MATMUL or (made_op == "mm" and made is not None
                                and any(a in bases for a in made.args[1:])):
            cat = "linear inputs and copies"
        elif node is not None and node.dtype in _INTEGER:
            cat = "other"
        else:
            cat = "nonlinear inputs"
        out[name] = cat
    return out


def totals(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Counted bytes per category and side, from the diff's saved rows (each with a
    ``category``); categories in ``CATEGORIES`` order, empty ones left out."""
    out = {c: {"inductor": 0, "prac": 0} for c in CATEGORIES}
    for row in rows:
        for side in ("inductor", "prac"):
            t = row.get(side)
            if t and t.get("counted"):
                out[t.get("category", "other")][side] += t["counted"]
    return {c: v for c, v in out.items() if v["inductor"] or v["prac"]}


def head_rows(records) -> list[dict]:
    """One row per cross-entropy node the head-and-loss pass looked at."""
    return [{"graph": i, "node": h.node, "module": h.module, "rows": h.rows, "vocab": h.vocab,
             "reduction": h.reduction, "chunk_rows": h.chunk_rows,
             "returns_logits": h.returns_logits, "status": h.status, "reason": h.reason,
             "saved_before": h.saved_bytes_before, "saved_after": h.saved_bytes_after,
             "grad_in_forward": h.grad_in_forward, "grad_bytes": h.grad_bytes}
            for i, rec in enumerate(records) for h in rec.head_losses]


def head_marks(head_losses) -> dict[str, str]:
    """Notes for the Dynamo graph diff: the loss nodes the pass replaced or left."""
    marks = {}
    for h in head_losses:
        if h.status == "rewritten":
            held = (f"; gradients computed in the forward, {h.grad_bytes} bytes held"
                    if h.grad_in_forward else "; logits recomputed in the backward")
            marks[h.node] = (f"head + loss -> chunked LinearCrossEntropy ({h.chunk_rows} rows per "
                             f"chunk; logits kept for backward: {h.saved_bytes_before} -> "
                             f"{h.saved_bytes_after} bytes{held})")
        else:
            marks[h.node] = f"head + loss left as is: {h.reason}"
    return marks
