"""What the backend did to each graph: sites, groups, and where each compressed copy ended up.

``placement`` reads the forward and backward graphs AOTAutograd partitioned (before Inductor
lowers them): a group's compressed copy ``x @ P`` is ``"saved"`` when the forward returns it for
the backward, ``"recomputed in backward"`` when the partitioner chose to keep ``x`` (saved anyway
for another op) and recompute the product in the backward, and ``"not saved"`` when no backward
needs it.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx

from passes.graph_state import Group, PassResult, Site

_CASTS = {"convert_element_type", "_to_copy", "to"}


def _compress_nodes(graph: torch.fx.Graph, basis_names: list[str]) -> dict[str, list[torch.fx.Node]]:
    """Nodes ``mm(x2d, P)`` (P possibly cast) per basis placeholder name."""
    found: dict[str, list[torch.fx.Node]] = {b: [] for b in basis_names}
    for node in graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "").split(".")[0] != "mm":
            continue
        rhs = node.args[1]
        while isinstance(rhs, torch.fx.Node) and rhs.op == "call_function" and \
                str(getattr(rhs.target, "__name__", "")).split(".")[0] in _CASTS:
            rhs = rhs.args[0]
        if isinstance(rhs, torch.fx.Node) and rhs.name in found:
            found[rhs.name].append(node)
    return found


def placement(forward: torch.fx.Graph, n_bases: int) -> tuple[list[str], list[str], list[str]]:
    """(basis placeholder names, per-basis status from the forward, saved output names)."""
    placeholders = [n for n in forward.nodes if n.op == "placeholder"]
    bases = [n.name for n in placeholders[len(placeholders) - n_bases:]] if n_bases else []
    output = next(n for n in forward.nodes if n.op == "output")
    outs = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    out_names = {o.name for o in outs if isinstance(o, torch.fx.Node)}
    found = _compress_nodes(forward, bases)
    status = ["saved" if any(n.name in out_names for n in found[b]) else "not saved" for b in bases]
    return bases, status, sorted(out_names)


@dataclasses.dataclass
class GraphRecord:
    """One graph the backend compiled."""

    index: int
    training: bool
    sites: list[Site] = dataclasses.field(default_factory=list)
    groups: list[Group] = dataclasses.field(default_factory=list)
    passes: list[PassResult] = dataclasses.field(default_factory=list)
    note: str = ""
    forward_code: str = ""
    backward_code: str = ""
    placement: dict[str, str] = dataclasses.field(default_factory=dict)  # group key -> status
    _basis_names: list[str] = dataclasses.field(default_factory=list)

    @property
    def matched(self) -> int:
        return sum(1 for s in self.sites if s.kind in ("linear", "addmm", "matmul") and s.weight)

    @property
    def rewritten(self) -> int:
        return sum(1 for s in self.sites if s.status == "rewritten")

    def capture(self, gm: torch.fx.GraphModule, is_backward: bool, n_bases: int) -> None:
        code = gm.print_readable(print_output=False, include_stride=False, include_device=False)
        if not is_backward:
            self.forward_code = code
            names, status, _ = placement(gm.graph, n_bases)
            self._basis_names = names
            for group, st in zip(self.groups, status):
                self.placement[group.key] = st
        else:
            self.backward_code = code
            found = _compress_nodes(gm.graph, self._basis_names)
            for group, name in zip(self.groups, self._basis_names):
                if self.placement.get(group.key) == "not saved" and found.get(name):
                    self.placement[group.key] = "recomputed in backward"


@dataclasses.dataclass
class Report:
    graphs: list[GraphRecord]

    @property
    def sites_matched(self) -> int:
        return sum(g.matched for g in self.graphs)

    @property
    def sites_rewritten(self) -> int:
        return sum(g.rewritten for g in self.graphs)

    def rows(self, include_skipped: bool = True) -> list[dict]:
        rows = []
        for g in self.graphs:
            for s in g.sites:
                if s.status != "rewritten" and not include_skipped:
                    continue
                rows.append({
                    "graph": g.index,
                    "node": s.node,
                    "kind": s.kind,
                    "module": s.module,
                    "group": s.group or "",
                    "n": s.n,
                    "r1": s.r1 if s.status == "rewritten" else None,
                    "r2": s.r2 if s.status == "rewritten" else None,
                    "status": s.status if s.status == "rewritten" else f"skipped: {s.reason}",
                    "compressed copy": g.placement.get(s.group, "") if s.group else "",
                })
        return rows

    def table(self, include_skipped: bool = False) -> str:
        from tabulate import tabulate

        rows = self.rows(include_skipped)
        head = (f"{self.sites_matched} linear sites with a trained weight, "
                f"{self.sites_rewritten} rewritten, in {len(self.graphs)} graph(s)")
        return head + ("\n" + tabulate(rows, headers="keys") if rows else "")
