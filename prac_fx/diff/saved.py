"""Saved-tensor accounting: what the forward of each graph keeps for its backward.

Read from the backward graph AOTAutograd partitioned: its inputs other than the incoming
gradients. Each saved tensor is traced through view ops (aten ops whose schema says the result
aliases the input, and ``getitem`` of those) to the node that owns its storage; each storage
counts once, parameters and views of them not at all (``compare``'s docstring has the rest).

``saved(record, info, names)`` lists one graph's saved tensors; ``pair(graph, before, after)``
lines up the two sides' lists; ``changed(rows, change, side)`` lists what one side removed or
added.
"""
from __future__ import annotations

import difflib
import functools

import torch

from prac_fx.diff import breakdown, graph_text
from prac_fx.diff.capture import DynamoInfo
from prac_fx.report import GraphRecord


def _itemsizes() -> dict[str, int]:
    sizes = {}
    for dtype, abbr in torch.fx.graph.dtype_abbrs.items():
        try:
            sizes[abbr] = dtype.itemsize
        except (AttributeError, RuntimeError):
            pass
    return sizes


_ITEMSIZE = _itemsizes()

@functools.lru_cache(maxsize=None)
def is_view_op(op: str) -> bool:
    if not op.startswith("torch.ops."):
        return False
    obj = torch.ops
    for part in op.split(".")[2:]:
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    schema = getattr(obj, "_schema", None) or getattr(getattr(obj, "default", None), "_schema", None)
    if schema is None or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def _storage(name: str, nodes: dict[str, graph_text.Node]) -> graph_text.Node | None:
    """The node owning the storage ``name`` views (``name`` itself when it is no view)."""
    node = nodes.get(name)
    seen = set()
    while node is not None and node.name not in seen:
        seen.add(node.name)
        op = node.op
        if op == "getitem":
            parent = nodes.get(node.first_arg or "")
            if parent is None or not is_view_op(parent.op):
                return node
            node = nodes.get(parent.first_arg or "") or node
        elif is_view_op(op) and node.first_arg in nodes:
            node = nodes[node.first_arg]
        else:
            return node
    return node


def _nbytes(node: graph_text.Node) -> int | None:
    shape = node.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    numel = 1
    for d in shape:
        numel *= d
    return numel * _ITEMSIZE.get(node.dtype, 4)


def short_op(op: str) -> str:
    if op.startswith("torch.ops."):
        return op.split(".")[3]
    return op


def saved(record: GraphRecord, info: DynamoInfo, names: dict[str, str],
          vocabs: set[int] = frozenset()) -> list[dict]:
    """The saved tensors of one graph with kind, storage owner, counted bytes and category."""
    fw = graph_text.parse(record.forward_code)
    inputs = [n.name for n in fw.values() if n.op == "input"]
    input_kind = {name: (info.inputs[i] if i < len(info.inputs) else "basis")
                  for i, name in enumerate(inputs)}
    category = breakdown.categories(record.forward_code, record.backward_code,
                                    [e["name"] for e in record.saved],
                                    {n for n, k in input_kind.items() if k == "basis"}, set(vocabs))
    counted: set[str] = set()
    out = []
    for entry in record.saved:
        if not isinstance(entry.get("bytes"), int) or entry["dtype"] in ("int", "SymInt"):
            continue  # a symbolic size, not a tensor
        node = fw.get(entry["name"])
        base = _storage(entry["name"], fw) if node else None
        base_name = base.name if base else entry["name"]
        if base is not None and base.op == "input":
            kind = {"parameter": "parameter", "basis": "basis"}.get(input_kind.get(base_name), "input")
        else:
            kind = "activation"
        size = 0
        if kind != "parameter" and base_name not in counted:
            counted.add(base_name)
            size = (_nbytes(base) if base is not None else None) or entry["bytes"]
        out.append({
            "name": names.get(entry["name"], entry["name"]),
            "shape": list(entry["shape"]),
            "dtype": entry["dtype"],
            "bytes": entry["bytes"],
            "op": "input" if node is not None and node.op == "input" else
                  short_op(node.op) if node is not None else entry.get("op", ""),
            "kind": kind,
            "storage": names.get(base_name, base_name),
            "counted": size,
            "category": category.get(entry["name"], "other"),
        })
    return out


def pair(graph: int, before: list[dict], after: list[dict]) -> list[dict]:
    rows = []
    matcher = difflib.SequenceMatcher(None, [t["name"] for t in before], [t["name"] for t in after],
                                      autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for a, b in zip(before[i1:i2], after[j1:j2]):
                if (a["kind"], a["shape"], a["dtype"]) == (b["kind"], b["shape"], b["dtype"]):
                    rows.append({"graph": graph, "change": "kept", "inductor": a, "prac": b})
                else:  # the same name for another tensor
                    rows += [{"graph": graph, "change": "removed", "inductor": a, "prac": None},
                             {"graph": graph, "change": "added", "inductor": None, "prac": b}]
            continue
        rows += [{"graph": graph, "change": "removed", "inductor": a, "prac": None}
                 for a in before[i1:i2]]
        rows += [{"graph": graph, "change": "added", "inductor": None, "prac": b}
                 for b in after[j1:j2]]
    return rows


def changed(rows: list[dict], change: str, side: str) -> list[dict]:
    return [{"graph": r["graph"], "name": r[side]["name"], "bytes": r[side]["counted"]}
            for r in rows if r["change"] == change and r[side]["counted"]]
