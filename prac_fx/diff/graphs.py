"""Graph diffs: the Dynamo, forward and backward graphs of the two sides, aligned and marked.

``graph_diffs(index, base, prac, kinds, context)`` aligns the PRAC side's graphs to the Inductor
side's (``graph_text.align``: a node both sides have keeps one name), marks the nodes that read a
basis or a compressed copy, and returns the unified diffs with the forward's name mapping (the
saved-tensor table names tensors by it).
"""
from __future__ import annotations

from prac_fx.diff import breakdown, graph_text
from prac_fx.passes import kinds
from prac_fx.passes.kinds import LINEAR_KINDS
from prac_fx.diff.saved import is_view_op, short_op
from prac_fx.report import GraphRecord


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
        op = short_op(node.op)
        on_basis = [bases[a] for a in node.args if a in bases]
        on_copy = [copies[a] for a in node.args if a in copies]
        on_projected = [projected[a] for a in node.args if a in projected]
        if not on_basis and not on_copy:
            continue
        if is_view_op(node.op) or op in ("convert_element_type", "_to_copy"):
            (bases if on_basis else copies)[node.name] = (on_basis or on_copy)[0]
        elif op == "mm" and on_copy:
            projected[node.name] = on_copy[0]
            marks[node.name] = ("weight gradient, low-rank part (grad_out with x @ P), "
                                f"group {on_copy[0]}")
        elif op == "mm" and on_basis and on_projected:
            # grad_weight = grad_out^T @ x  ~=  (grad_out^T @ (x @ P)) @ P^T
            marks[node.name] = f"weight gradient, back through P, group {on_basis[0]}"
        elif "compressed_linear" in op or "autograd" in node.op or op == "apply":
            marks[node.name] = f"compressed linear, group {(on_basis or on_copy)[0]}"
        elif "compress" in op or (op == "mm" and on_basis and node.args[-1] in bases):
            copies[node.name] = on_basis[0]
            marks[node.name] = f"x @ P{' recomputed' if backward else ''}, group {on_basis[0]}"
        else:
            marks[node.name] = f"reads the basis of group {(on_basis or on_copy)[0]}"
    return marks, bases, copies


def _tag_marks(tags: dict[str, dict], groups: list[str], mapping: dict[str, str]) -> dict[str, str]:
    """Notes for the nodes the rewrite inserted into the Dynamo graph, read from their tags
    (``kinds.TAG``); ``mapping`` renames them as ``graph_text.align`` did."""
    marks = {}
    for name, tag in tags.items():
        index = tag.get("group")
        group = groups[index] if isinstance(index, int) and index < len(groups) else ""
        if tag["role"] == kinds.ROLE_COMPRESS:
            marks[mapping.get(name, name)] = f"x @ P, group {group}"
        elif tag["role"] == kinds.ROLE_SITE:
            marks[mapping.get(name, name)] = f"compressed linear, group {group}"
        elif tag["role"] == kinds.ROLE_FOLLOW:
            marks[mapping.get(name, name)] = f"P fitted to this input, group {group}"
    return marks


def _site_marks(sites) -> dict[str, str]:
    marks = {}
    for s in sites:
        if s.kind not in LINEAR_KINDS:
            continue
        if s.status == kinds.REWRITTEN:
            marks[s.node] = f"rewritten, group {s.group} (r1={s.r1}, r2={s.r2})"
        elif s.reason:
            marks[s.node] = f"skipped: {s.reason}"
    return marks


def graph_diffs(index: int, base: GraphRecord, prac: GraphRecord, kinds, context: int):
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
        marks_after = _tag_marks(prac.tags, groups, mapping)
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
