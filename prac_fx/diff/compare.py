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
``prac_fx.diff.memory.saved_tensors`` does with ``saved_tensors_hooks`` at run time; graph inputs
that are not parameters (token ids, buffers, the PRAC bases) count. The report also carries the
hooks' measurement of the same step (``measured``), and ``agrees`` says whether the two match.
They can differ where the graph cannot tell what Inductor did at run time (a view it
materialises as its own buffer) or where two graphs save one storage (counted by each graph,
once by the hooks); the measurement is then the one to trust.

Names are AOTAutograd's. The PRAC side's nodes take the names of the Inductor side's nodes they
match (``prac_fx.diff.graph_text.align``), so a tensor both sides save has one name in the saved
table and in the diffs; a new node keeps its name or takes the next free counter.

JSON schema (``"schema": "prac-fx-diff/3"``)
--------------------------------------------
::

    {
      "schema": "prac-fx-diff/3",
      "model": {"spec": str, "label": str,
                "settings": {str: int}},             # preset size, or the batch/seq given
      "config": {"rank": int | float, "split": int | float, "bits": null | int | str | {str: ...},
                 "group_size": null | int, "residual": bool, "exclude": [str]},
      "graphs": [{"index": int, "note": str}],        # one per Dynamo graph (graph breaks);
                                                     # note: why a graph was left unchanged
      "graph_breaks": {str: int},                    # Dynamo's break reasons on the PRAC side,
                                                     # a break out of an activation checkpoint
                                                     # keyed "side effect inside an activation
                                                     # checkpoint"
      "notes": [str],                                # e.g. the two sides' graph counts differ,
                                                     # the checkpoint breaks and their remedy
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
        "compressed_copy": "" | "saved" | "recomputed in backward" | "not saved",
        "format": null | str,                        # the copy's format: "float", "int8 row",
                                                     # "int4 g64", "fp8 row", ...
        "copy_bytes": null | int}],                  # bytes of its group's copy, if kept
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
                 "saved_before": int, "saved_after": int,  # logits bytes the loss keeps
                 "grad_in_forward": bool,           # gradients computed in the forward, and
                 "grad_bytes": int}],               # the bytes it holds for them to backward
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
               | "bases" | "other"                   # what keeps it (prac_fx/diff/breakdown.py)

Flops: the exact weight gradient of a site costs ``2 N n m``; the factored one
``2 (N r m + m r n)`` (arXiv 2605.01255, dW = (dY^T (X P)) P^T); a skipped site keeps the exact
cost; ``compress`` is the forward cost ``2 N n r`` of each group's ``x @ P``.
"""
from __future__ import annotations

import contextlib
from typing import Callable

from prac_fx.backend import PracBackend
from prac_fx.config import PracConfig
from prac_fx.diff import breakdown
from prac_fx.diff.capture import DynamoInfo, capture
from prac_fx.diff.flops import flops
from prac_fx.diff.graphs import graph_diffs
from prac_fx.diff.saved import changed, pair, saved
from prac_fx.diff.workload import Workload
from prac_fx.passes import kinds
from prac_fx.passes.kinds import LINEAR_KINDS
from prac_fx.report import GraphRecord, checkpoint_lines

SCHEMA = "prac-fx-diff/3"  # 2: the sites' format and copy bytes, the config's bits; 3: graph_breaks
GRAPH_KINDS = ("dynamo", "forward", "backward")


class NoLinearSites(Exception):
    """The model has no linear layer with a trained weight: nothing to compare."""


# -- the report -----------------------------------------------------------------------------------
def _sites(index: int, record: GraphRecord, info: DynamoInfo) -> list[dict]:
    rows = []
    for s in record.sites:
        linear = s.kind in LINEAR_KINDS and s.n is not None
        rows.append({
            "graph": index, "node": s.node,
            "module": info.modules.get(s.node, "") or s.module,
            "kind": s.kind, "weight": s.weight, "group": s.group,
            "N": info.rows.get(s.input_node) if linear else None,
            "n": s.n, "m": s.m,
            "r1": s.r1 if s.status == kinds.REWRITTEN else None,
            "r2": s.r2 if s.status == kinds.REWRITTEN else None,
            "status": kinds.REWRITTEN if s.status == kinds.REWRITTEN else kinds.SKIPPED,
            "reason": None if s.status == kinds.REWRITTEN else s.reason,
            "compressed_copy": record.placement.get(s.group, "") if s.group else "",
            "format": s.fmt.name if s.status == kinds.REWRITTEN else None,
            "copy_bytes": s.saved_bytes if s.status == kinds.REWRITTEN else None,
        })
    return rows


def _logits_path_rows(index: int, record: GraphRecord) -> list[dict]:
    """The head inputs the runner keeps, outside the graph, for the gradient path of logits a
    head-and-loss op computed its gradients in the forward for and returned (saved by
    ``chunked_ce.attach_logits_grad``; the hooks' measurement sees them)."""
    rows = []
    for h in record.head_losses:
        if h.status != kinds.REWRITTEN or not h.logits_path_bytes:
            continue
        rows.append({"graph": index, "change": "added", "inductor": None, "prac": {
            "name": f"{h.module} input (returned logits' gradient path)", "shape": [],
            "dtype": "", "bytes": h.logits_path_bytes, "op": "runner", "kind": "activation",
            "storage": f"{h.module} input", "counted": h.logits_path_bytes,
            "category": "head gradients"}})
    return rows


def _checkpoint_note(count: int) -> str:
    """What the report says of Dynamo's breaks out of activation checkpoints, "" for none."""
    return " ".join(checkpoint_lines(count)) if count else ""


def config_summary(config: PracConfig, exclude: list[str]) -> dict:
    return {"rank": config.rank, "split": config.split, "bits": config.bits,
            "group_size": config.group_size, "residual": config.residual, "exclude": list(exclude)}


def compare(work: Workload, config: PracConfig, *, graphs=GRAPH_KINDS, context: int = 3,
            exclude: list[str] = (), progress: Callable[[str], None] | None = None) -> dict:
    """Compile ``work`` with Inductor and with PRAC and report the difference (module docstring).

    Raises ``NoLinearSites`` when no graph has a linear site with a trained weight.
    """
    say = progress or (lambda msg: None)
    say(f"compiling {work.label} with the PRAC backend ...")
    prac_backend = PracBackend(config)
    prac = capture(work, prac_backend)
    say(f"  {prac.seconds:.1f} s, {len(prac.records)} graph(s)")
    breaks = dict(prac_backend.report().graph_breaks)
    checkpoint = _checkpoint_note(breaks.get(kinds.CHECKPOINT_BREAK, 0))
    sites = [row for i, (rec, info) in enumerate(zip(prac.records, prac.infos))
             for row in _sites(i, rec, info)]
    matched = [s for s in sites if s["kind"] in LINEAR_KINDS and s["n"] is not None]
    if not matched:
        raise NoLinearSites(f"{work.label}: no linear layer with a trained weight in "
                            f"{len(prac.records)} graph(s); nothing for PRAC to compress"
                            + (f"\n{checkpoint}" if checkpoint else ""))
    say("compiling with plain Inductor ...")
    base = capture(work, PracBackend(config, rewrite=False))
    say(f"  {base.seconds:.1f} s, {len(base.records)} graph(s)")

    diffs, saved_rows, graph_notes = [], [], []
    notes = [checkpoint] if checkpoint else []
    for i, (b, p) in enumerate(zip(base.records, prac.records)):
        d, fw_map = graph_diffs(i, b, p, graphs, context)
        diffs += d
        vocabs = {h.vocab for h in p.head_losses if h.vocab}
        saved_rows += pair(i, saved(b, base.infos[i], {}, vocabs),
                           saved(p, prac.infos[i], fw_map, vocabs))
        saved_rows += _logits_path_rows(i, p)
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
        "graph_breaks": breaks,
        "notes": notes,
        "summary": {"sites": len(matched), "rewritten": sum(s["status"] == kinds.REWRITTEN for s in sites),
                    "groups": len(groups)},
        "sites": sites,
        "saved": {
            "rows": saved_rows,
            "totals": totals,
            "measured": measured,
            "agrees": totals["inductor"] == measured["inductor"] and totals["prac"] == measured["prac"],
            "removed": changed(saved_rows, "removed", "inductor"),
            "added": changed(saved_rows, "added", "prac"),
            "by_category": breakdown.totals(saved_rows),
        },
        "heads": breakdown.head_rows(prac.records),
        "flops": flops(sites, groups),
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
