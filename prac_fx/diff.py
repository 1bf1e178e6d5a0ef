"""``prac-fx diff``: what the PRAC pass changed in a model's graphs, and what it saved.

``compare(workload, config)`` compiles the workload twice, with plain Inductor and with the PRAC
backend (both through ``PracBackend``, the first with ``rewrite=False``, so that both sides are
captured the same way), runs one training step on each, and returns the report as a plain dict:
the one the JSON output prints and the text and HTML renderers read.

Saved-tensor accounting
-----------------------
What the forward saves is read from the backward graph AOTAutograd partitioned: its inputs
other than the incoming gradients. Each saved tensor is traced through view ops (aten ops whose
schema says the result aliases the input, and ``getitem`` of those) to the node that owns its
storage. Totals count each storage once and leave out parameters and views of them, like
``prac_fx.memory.saved_tensors`` does with ``saved_tensors_hooks`` at run time; graph inputs
that are not parameters (token ids, buffers, the PRAC bases) count. The report also carries the
hooks' measurement of the same step (``measured``), and ``agrees`` says whether the two match.
They can differ where the graph cannot tell what Inductor did at run time (a view it
materialises as its own buffer) or where two graphs save one storage (counted by each graph,
once by the hooks); the measurement is then the one to trust.

Names are AOTAutograd's. The PRAC side's nodes take the names of the Inductor side's nodes they
match (``prac_fx.graph_text.align``), so a tensor both sides save has one name in the saved
table and in the diffs; a new node keeps its name or takes the next free counter.

JSON schema (``"schema": "prac-fx-diff/1"``)
--------------------------------------------
::

    {
      "schema": "prac-fx-diff/1",
      "model": {"spec": str, "label": str,
                "settings": {str: int}},             # preset size, or the batch/seq given
      "config": {"rank": int | float, "split": int | float, "exclude": [str]},
      "graphs": [{"index": int, "note": str}],        # one per Dynamo graph (graph breaks);
                                                     # note: why a graph was left unchanged
      "notes": [str],                                # e.g. the two sides' graph counts differ
      "summary": {"sites": int,                      # linear sites with a trained weight
                  "rewritten": int, "groups": int},
      "sites": [{                                    # every node the passes looked at
        "graph": int, "node": str,                   # node name in the Dynamo graph
        "module": str,                               # module path of the call ("" = root)
        "kind": "linear" | "addmm" | "matmul" | "attention" | "nonlinear" | "unsupported",
        "weight": str, "group": str | null,          # input group: sites sharing one basis
        "N": int | null, "n": int | null, "m": int | null,  # rows, input and output width
        "r1": int | null, "r2": int | null,
        "status": "rewritten" | "skipped",
        "reason": null | "attention" | "nonlinear" | "no trainable weight" | "output head"
                  | "filtered" | "too narrow for the rank" | "too few rows to gain"
                  | "unsupported pattern",
        "compressed_copy": "" | "saved" | "recomputed in backward" | "not saved"}],
      "saved": {
        "rows": [{"graph": int, "change": "kept" | "removed" | "added",
                  "inductor": TENSOR | null, "prac": TENSOR | null}],
        "totals": {"inductor": int, "prac": int,     # bytes, each storage once
                   "ratio": float | null,            # prac / inductor
                   "bases": int},                    # of "prac": the PRAC bases
        "measured": {"inductor": int, "prac": int},  # saved_tensors_hooks, same step
        "agrees": bool,
        "removed": [{"graph": int, "name": str, "bytes": int}],  # counted tensors the pass
        "added": [{"graph": int, "name": str, "bytes": int}],    # removed / added
        "by_category": {CATEGORY: {"inductor": int, "prac": int}}},  # counted bytes
      "heads": [{"graph": int, "node": str, "module": str,  # cross-entropy nodes the
                 "rows": int | null, "vocab": int | null,  # head-and-loss pass looked at
                 "reduction": str, "chunk_rows": int | null, "returns_logits": bool,
                 "status": "rewritten" | "skipped", "reason": str | null,
                 "saved_before": int, "saved_after": int}],  # logits bytes the loss keeps
      "flops": {
        "sites": [{"graph": int, "module": str, "N": int, "n": int, "m": int, "r": int,
                   "exact": int, "factored": int}],   # weight-gradient matmul flops;
                                                     # r = 0 and factored = exact if skipped
        "exact": int, "factored": int, "ratio": float | null,
        "compress": int},                            # forward flops of x @ P, all groups
      "diffs": [{"graph": int, "kind": "dynamo" | "forward" | "backward",
                 "before": str, "after": str,        # labels
                 "changed": int,                     # lines removed + added
                 "lines": [str]}]}                   # unified diff, normalised

    TENSOR = {"name": str, "shape": [int], "dtype": str, "bytes": int,
              "op": str,                             # aten op that produced it, "input"
              "kind": "activation" | "input" | "basis" | "parameter",
              "storage": str,                        # node owning the storage it views
              "counted": int,                        # bytes it adds to the total
              "category": CATEGORY}

    CATEGORY = "linear inputs and copies" | "attention" | "nonlinear inputs" | "head and loss"
               | "bases" | "other"                   # what keeps it (prac_fx/breakdown.py)

Flops: the exact weight gradient of a site costs ``2 N n m``; the factored one
``2 (N r m + m r n)`` (arXiv 2605.01255, dW = (dY^T (X P)) P^T); a skipped site keeps the exact
cost; ``compress`` is the forward cost ``2 N n r`` of each group's ``x @ P``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import time
from typing import Callable

import torch

from passes.paths import module_path
from prac_fx import breakdown, graph_text, memory
from prac_fx.backend import PracBackend
from prac_fx.config import PracConfig
from prac_fx.report import GraphRecord
from prac_fx.workload import Workload

SCHEMA = "prac-fx-diff/1"
GRAPH_KINDS = ("dynamo", "forward", "backward")
LINEAR_KINDS = ("linear", "addmm", "matmul")


def _itemsizes() -> dict[str, int]:
    sizes = {}
    for dtype, abbr in torch.fx.graph.dtype_abbrs.items():
        try:
            sizes[abbr] = dtype.itemsize
        except (AttributeError, RuntimeError):
            pass
    return sizes


_ITEMSIZE = _itemsizes()


class NoLinearSites(Exception):
    """The model has no linear layer with a trained weight: nothing to compare."""


# -- capture --------------------------------------------------------------------------------------
@dataclasses.dataclass
class _DynamoInfo:
    """What the diff needs from a Dynamo graph that the backend's record does not keep."""

    inputs: list[str]  # per graph input: "parameter", "input" or "symint"
    modules: dict[str, str]  # node name -> module path of the call
    rows: dict[str, int]  # node name -> rows (numel / last dim) of its value


class _Recorder:
    """The backend ``torch.compile`` gets: notes the Dynamo graph's inputs and node metadata,
    then hands the graph to the ``PracBackend``."""

    def __init__(self, backend: PracBackend):
        self.backend = backend
        self.graphs: list[_DynamoInfo] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        inputs = ["parameter" if isinstance(e, torch.nn.Parameter) else
                  "input" if isinstance(e, torch.Tensor) else "symint" for e in example_inputs]
        modules, rows = {}, {}
        for node in gm.graph.nodes:
            modules[node.name] = module_path(node)
            val = node.meta.get("example_value")
            if isinstance(val, torch.Tensor) and val.dim() >= 1 and isinstance(val.shape[-1], int) \
                    and val.shape[-1] > 0 and isinstance(val.numel(), int):
                rows[node.name] = val.numel() // val.shape[-1]
        self.graphs.append(_DynamoInfo(inputs, modules, rows))
        return self.backend(gm, example_inputs)


@dataclasses.dataclass
class _Side:
    records: list[GraphRecord]
    infos: list[_DynamoInfo]
    measured: int  # saved_tensors_hooks bytes of one forward
    seconds: float


def _capture(work: Workload, backend: PracBackend) -> _Side:
    torch._dynamo.reset()
    for p in work.params:
        p.grad = None
    recorder = _Recorder(backend)
    compiled = torch.compile(work.model, backend=recorder)
    start = time.perf_counter()
    # An AOTAutograd cache hit skips the compiler the backend records the partitioned graphs in.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        work.loss(compiled).backward()
        seconds = time.perf_counter() - start
        n_graphs = len(backend.graphs)
        measured = memory.saved_bytes(lambda: work.loss(compiled), work.params)
    for p in work.params:
        p.grad = None
    records = backend.graphs[:n_graphs]  # a recompile while measuring would add graphs
    return _Side(records, recorder.graphs[:n_graphs], measured, seconds)


# -- saved tensors --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _is_view_op(op: str) -> bool:
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
            if parent is None or not _is_view_op(parent.op):
                return node
            node = nodes.get(parent.first_arg or "") or node
        elif _is_view_op(op) and node.first_arg in nodes:
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


def _short_op(op: str) -> str:
    if op.startswith("torch.ops."):
        return op.split(".")[3]
    return op


def _saved(record: GraphRecord, info: _DynamoInfo, names: dict[str, str],
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
                  _short_op(node.op) if node is not None else entry.get("op", ""),
            "kind": kind,
            "storage": names.get(base_name, base_name),
            "counted": size,
            "category": category.get(entry["name"], "other"),
        })
    return out


def _pair(graph: int, before: list[dict], after: list[dict]) -> list[dict]:
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


# -- graph diffs ----------------------------------------------------------------------------------
def _basis_marks(nodes: dict[str, graph_text.Node], bases: dict[str, str],
                 copies: dict[str, str] | None = None, *, backward: bool = False):
    """Notes for the nodes that read a PRAC basis or a compressed copy ``x @ P``.

    ``bases`` and ``copies`` map names to group keys; views and casts of them count as them.
    Returns (marks, bases, copies), the last two extended with what ``nodes`` derive from them
    (the forward's are the backward's inputs).
    """
    bases, copies = dict(bases), dict(copies or {})
    projected: dict[str, str] = {}  # grad_out^T @ (x @ P), (m, r), or its transpose
    marks = {}
    for node in nodes.values():
        if node.name in bases or node.name in copies:
            continue
        op = _short_op(node.op)
        on_basis = [bases[a] for a in node.args if a in bases]
        on_copy = [copies[a] for a in node.args if a in copies]
        on_projected = [projected[a] for a in node.args if a in projected]
        if not on_basis and not on_copy:
            continue
        if _is_view_op(node.op) or op in ("convert_element_type", "_to_copy"):
            (bases if on_basis else copies)[node.name] = (on_basis or on_copy)[0]
        elif op == "mm" and on_copy:
            projected[node.name] = on_copy[0]
            marks[node.name] = ("weight gradient, low-rank part (grad_out with x @ P), "
                                f"group {on_copy[0]}")
        elif op == "mm" and on_basis and on_projected:
            # grad_weight = grad_out^T @ x  ~=  (grad_out^T @ (x @ P)) @ P^T
            marks[node.name] = f"weight gradient, back through P, group {on_basis[0]}"
        elif "compress" in op or (op == "mm" and on_basis and node.args[-1] in bases):
            copies[node.name] = on_basis[0]
            marks[node.name] = f"x @ P{' recomputed' if backward else ''}, group {on_basis[0]}"
        elif "autograd" in node.op or op == "apply":
            marks[node.name] = f"compressed linear, group {(on_basis or on_copy)[0]}"
        else:
            marks[node.name] = f"reads the basis of group {(on_basis or on_copy)[0]}"
    return marks, bases, copies


def _site_marks(sites) -> dict[str, str]:
    marks = {}
    for s in sites:
        if s.kind not in LINEAR_KINDS:
            continue
        if s.status == "rewritten":
            marks[s.node] = f"rewritten, group {s.group} (r1={s.r1}, r2={s.r2})"
        elif s.reason:
            marks[s.node] = f"skipped: {s.reason}"
    return marks


def _graph_diffs(index: int, base: GraphRecord, prac: GraphRecord, kinds, context: int):
    """(diffs, forward name mapping) for one graph pair."""
    diffs = []
    groups = [g.key for g in prac.groups]

    def add(kind, before_label, after_label, before, after, marks_before, marks_after):
        lines = graph_text.unified(before, after, label_before=before_label, label_after=after_label,
                                   context=context, marks_before=marks_before, marks_after=marks_after)
        changed = sum(1 for l in lines[2:] if l[:1] in "+-")
        diffs.append({"graph": index, "kind": kind, "before": before_label, "after": after_label,
                      "changed": changed, "lines": lines})

    if "dynamo" in kinds:
        before = graph_text.normalise(prac.dynamo_code)
        after = graph_text.normalise(prac.rewritten_code) if prac.rewritten_code else before
        after, mapping = graph_text.align(before, after)
        bases = {mapping.get(f"prac_basis_{i}", f"prac_basis_{i}"): g for i, g in enumerate(groups)}
        marks_after, _, _ = _basis_marks(graph_text.parse("\n".join(after)), bases)
        add("dynamo", f"graph {index}: dynamo graph", f"graph {index}: after the PRAC passes",
            before, after, {**_site_marks(prac.sites), **breakdown.head_marks(prac.head_losses)},
            marks_after)

    base_fw, prac_fw = graph_text.normalise(base.forward_code), graph_text.normalise(prac.forward_code)
    base_bw, prac_bw = graph_text.normalise(base.backward_code), graph_text.normalise(prac.backward_code)
    reserved = set(graph_text.parse("\n".join(base_fw))) | set(graph_text.parse("\n".join(base_bw)))
    prac_fw_named, fw_map = graph_text.align(base_fw, prac_fw, reserved=reserved)
    prac_bw_named, _ = graph_text.align(base_bw, prac_bw, seed=fw_map,
                                        reserved=reserved | set(fw_map.values()))
    fw_nodes = graph_text.parse("\n".join(prac_fw_named))
    # The bases are the last forward inputs, in group order.
    fw_inputs = [n.name for n in graph_text.parse(prac.forward_code).values() if n.op == "input"]
    basis_inputs = fw_inputs[len(fw_inputs) - len(groups):] if groups else []
    bases = {fw_map.get(name, name): g for name, g in zip(basis_inputs, groups)}
    fw_marks, fw_bases, fw_copies = _basis_marks(fw_nodes, bases)
    if "forward" in kinds:
        add("forward", f"graph {index}: inductor forward", f"graph {index}: prac forward",
            base_fw, prac_fw_named, {}, fw_marks)
    if "backward" in kinds:
        bw_marks, _, _ = _basis_marks(graph_text.parse("\n".join(prac_bw_named)), fw_bases, fw_copies,
                                      backward=True)
        add("backward", f"graph {index}: inductor backward", f"graph {index}: prac backward",
            base_bw, prac_bw_named, {}, bw_marks)
    return diffs, fw_map


# -- the report -----------------------------------------------------------------------------------
def _sites(index: int, record: GraphRecord, info: _DynamoInfo) -> list[dict]:
    rows = []
    for s in record.sites:
        linear = s.kind in LINEAR_KINDS and s.n is not None
        rows.append({
            "graph": index, "node": s.node,
            "module": info.modules.get(s.node, "") or s.module,
            "kind": s.kind, "weight": s.weight, "group": s.group,
            "N": info.rows.get(s.input_node) if linear else None,
            "n": s.n, "m": s.m,
            "r1": s.r1 if s.status == "rewritten" else None,
            "r2": s.r2 if s.status == "rewritten" else None,
            "status": "rewritten" if s.status == "rewritten" else "skipped",
            "reason": None if s.status == "rewritten" else s.reason,
            "compressed_copy": record.placement.get(s.group, "") if s.group else "",
        })
    return rows


def _flops(sites: list[dict], groups) -> dict:
    rows = []
    for s in sites:
        if s["kind"] not in LINEAR_KINDS or s["n"] is None or s["N"] is None:
            continue
        N, n, m = s["N"], s["n"], s["m"]
        r = (s["r1"] or 0) + (s["r2"] or 0)
        exact = 2 * N * n * m
        factored = 2 * (N * r * m + m * r * n) if s["status"] == "rewritten" else exact
        rows.append({"graph": s["graph"], "module": s["module"], "N": N, "n": n, "m": m, "r": r,
                     "exact": exact, "factored": factored})
    exact = sum(r["exact"] for r in rows)
    factored = sum(r["factored"] for r in rows)
    compress = 0
    for index, group, n_rows in groups:
        compress += 2 * n_rows * group.n * group.rank
    return {"sites": rows, "exact": exact, "factored": factored,
            "ratio": round(factored / exact, 4) if exact else None, "compress": compress}


def _changed(rows: list[dict], change: str, side: str) -> list[dict]:
    return [{"graph": r["graph"], "name": r[side]["name"], "bytes": r[side]["counted"]}
            for r in rows if r["change"] == change and r[side]["counted"]]


def config_summary(config: PracConfig, exclude: list[str]) -> dict:
    return {"rank": config.rank, "split": config.split, "exclude": list(exclude)}


def compare(work: Workload, config: PracConfig, *, graphs=GRAPH_KINDS, context: int = 3,
            exclude: list[str] = (), progress: Callable[[str], None] | None = None) -> dict:
    """Compile ``work`` with Inductor and with PRAC and report the difference (module docstring).

    Raises ``NoLinearSites`` when no graph has a linear site with a trained weight.
    """
    say = progress or (lambda msg: None)
    say(f"compiling {work.label} with the PRAC backend ...")
    prac = _capture(work, PracBackend(config))
    say(f"  {prac.seconds:.1f} s, {len(prac.records)} graph(s)")
    sites = [row for i, (rec, info) in enumerate(zip(prac.records, prac.infos))
             for row in _sites(i, rec, info)]
    matched = [s for s in sites if s["kind"] in LINEAR_KINDS and s["n"] is not None]
    if not matched:
        raise NoLinearSites(f"{work.label}: no linear layer with a trained weight in "
                            f"{len(prac.records)} graph(s); nothing for PRAC to compress")
    say("compiling with plain Inductor ...")
    base = _capture(work, PracBackend(config, rewrite=False))
    say(f"  {base.seconds:.1f} s, {len(base.records)} graph(s)")

    diffs, saved_rows, graph_notes, notes = [], [], [], []
    for i, (b, p) in enumerate(zip(base.records, prac.records)):
        d, fw_map = _graph_diffs(i, b, p, graphs, context)
        diffs += d
        vocabs = {h.vocab for h in p.head_losses if h.vocab}
        saved_rows += _pair(i, _saved(b, base.infos[i], {}, vocabs),
                            _saved(p, prac.infos[i], fw_map, vocabs))
        graph_notes.append({"index": i, "note": p.note})
    if len(base.records) != len(prac.records):
        notes.append(f"graph counts differ: inductor {len(base.records)}, prac {len(prac.records)}; "
                     f"compared the first {min(len(base.records), len(prac.records))}")
    totals = {side: sum(r[side]["counted"] for r in saved_rows if r[side])
              for side in ("inductor", "prac")}
    totals["ratio"] = round(totals["prac"] / totals["inductor"], 4) if totals["inductor"] else None
    totals["bases"] = sum(r["prac"]["counted"] for r in saved_rows
                          if r["prac"] and r["prac"]["kind"] == "basis")
    measured = {"inductor": base.measured, "prac": prac.measured}
    groups = [(i, g, prac.infos[i].rows.get(g.input_node, 0))
              for i, rec in enumerate(prac.records) for g in rec.groups]
    return {
        "schema": SCHEMA,
        "model": {"spec": work.spec, "label": work.label, "settings": work.settings},
        "config": config_summary(config, exclude),
        "graphs": graph_notes,
        "notes": notes,
        "summary": {"sites": len(matched), "rewritten": sum(s["status"] == "rewritten" for s in sites),
                    "groups": len(groups)},
        "sites": sites,
        "saved": {
            "rows": saved_rows,
            "totals": totals,
            "measured": measured,
            "agrees": totals["inductor"] == measured["inductor"] and totals["prac"] == measured["prac"],
            "removed": _changed(saved_rows, "removed", "inductor"),
            "added": _changed(saved_rows, "added", "prac"),
            "by_category": breakdown.totals(saved_rows),
        },
        "heads": breakdown.head_rows(prac.records),
        "flops": _flops(sites, groups),
        "diffs": diffs,
    }


@contextlib.contextmanager
def quiet_logs():
    """Silence the backend's warnings (a skipped site, a fallback): the report shows them."""
    import logging

    logger = logging.getLogger("prac_fx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
