"""What the backend did to each graph: sites, groups, and where each compressed copy ended up.

``placement`` reads the forward and backward graphs AOTAutograd partitioned (before Inductor
lowers them): a group's compressed copy ``x @ P`` is ``"saved"`` when the forward returns it for
the backward, ``"recomputed in backward"`` when the partitioner chose to keep ``x`` (saved anyway
for another op) and recompute the product in the backward, and ``"not saved"`` when no backward
needs it. The nodes of ``x @ P`` are found by the tag the rewrite put on its node in the Dynamo
graph (``meta["prac"]``) and the provenance AOTAutograd keeps for the nodes it traces, not by
their op names.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx

from prac_fx.passes import kinds, torch_seam
from prac_fx.passes.graph_state import Group, PassResult, Site

_VIEWS = {"view", "_unsafe_view", "reshape", "permute", "t", "transpose", "expand", "alias"}


def _op_name(node: torch.fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target)).split(".")[0]


def _with_views(nodes: list[torch.fx.Node]) -> set[str]:
    """Names of ``nodes`` and of every view taken of them (the partitioner may save a view)."""
    names, todo = set(), list(nodes)
    while todo:
        node = todo.pop()
        if node.name in names:
            continue
        names.add(node.name)
        todo.extend(u for u in node.users if u.op == "call_function" and _op_name(u) in _VIEWS)
    return names


def _compress_nodes(graph: torch.fx.Graph, tags: dict[str, dict]) -> dict[int, list[torch.fx.Node]]:
    """Per group index: the nodes of a partitioned graph traced from the group's ``x @ P`` node,
    found by the tag the rewrite gave that node (``kinds.TAG``) and the provenance AOTAutograd
    keeps for every node it traces (``torch_seam.dynamo_origins``)."""
    compress = {name: tag["group"] for name, tag in tags.items() if tag["role"] == kinds.ROLE_COMPRESS}
    traced: dict[torch.fx.Node, int] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        for origin in torch_seam.dynamo_origins(node):
            if origin in compress:
                traced[node] = compress[origin]
                break
    # the product itself: a node of x @ P that no other node of it reads (not the views of x
    # or the cast of P it starts from)
    found: dict[int, list[torch.fx.Node]] = {g: [] for g in compress.values()}
    for node, group in traced.items():
        if not any(user in traced for user in node.users):
            found[group].append(node)
    return found


def placement(forward: torch.fx.Graph, tags: dict[str, dict]) -> tuple[dict[int, str], list[str]]:
    """(per group index, "saved" or "not saved" from the forward; saved output names)."""
    output = next(n for n in forward.nodes if n.op == "output")
    outs = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    out_names = {o.name for o in outs if isinstance(o, torch.fx.Node)}
    found = _compress_nodes(forward, tags)
    status = {g: "saved" if _with_views(nodes) & out_names else "not saved" for g, nodes in found.items()}
    return status, sorted(out_names)


def _saved_inputs(backward: torch.fx.Graph, forward_ops: dict[str, str]) -> list[dict]:
    """The backward graph's inputs other than the incoming gradients: what the forward saved."""
    saved = []
    for node in backward.nodes:
        if node.op != "placeholder" or node.name.startswith("tangents"):
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            saved.append({"name": node.name, "shape": [], "dtype": type(val).__name__, "bytes": 0,
                          "op": forward_ops.get(node.name, "placeholder")})
            continue
        shape = [int(d) if isinstance(d, int) or not hasattr(d, "node") else str(d) for d in val.shape]
        numel = 1
        for d in shape:
            numel = numel * d if isinstance(d, int) else numel
        saved.append({
            "name": node.name, "shape": shape, "dtype": str(val.dtype).replace("torch.", ""),
            "bytes": numel * val.element_size() if all(isinstance(d, int) for d in shape) else None,
            "op": forward_ops.get(node.name, "placeholder"),
        })
    return saved


@dataclasses.dataclass
class GraphRecord:
    """One graph the backend compiled."""

    index: int
    training: bool
    sites: list[Site] = dataclasses.field(default_factory=list)
    groups: list[Group] = dataclasses.field(default_factory=list)
    passes: list[PassResult] = dataclasses.field(default_factory=list)
    note: str = ""
    fallback: str | None = None  # why the graph compiled unchanged, when it fell back
    dynamo_code: str = ""  # the Dynamo graph as the backend received it
    rewritten_code: str = ""  # the same graph after the passes ("" when unchanged)
    tags: dict[str, dict] = dataclasses.field(default_factory=dict)  # its nodes' meta["prac"]
    forward_code: str = ""
    backward_code: str = ""
    placement: dict[str, str] = dataclasses.field(default_factory=dict)  # group key -> status
    head_losses: list = dataclasses.field(default_factory=list)  # passes.head_loss.HeadLoss
    budget: object = None  # prac_fx.budget.BudgetRecord when memory_budget is set
    saved: list[dict] = dataclasses.field(default_factory=list)  # what the forward keeps for backward
    _forward_ops: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def matched(self) -> int:
        return sum(1 for s in self.sites if s.kind in kinds.LINEAR_KINDS and s.weight)

    @property
    def kept_bytes(self) -> int:
        """Bytes the compiled forward keeps for backward, graph inputs excluded."""
        return sum(s["bytes"] for s in self.saved if s.get("op") not in ("input", "placeholder"))

    @property
    def rewritten(self) -> int:
        return sum(1 for s in self.sites if s.status == kinds.REWRITTEN)

    def capture(self, gm: torch.fx.GraphModule, is_backward: bool) -> None:
        code = gm.print_readable(print_output=False, include_stride=False, include_device=False)
        if not is_backward:
            self.forward_code = code
            self._forward_ops = {n.name: "input" if n.op == "placeholder" else _op_name(n)
                                 for n in gm.graph.nodes}
            status, _ = placement(gm.graph, self.tags)
            for index, group in enumerate(self.groups):
                if index in status:
                    self.placement[group.key] = status[index]
        else:
            self.backward_code = code
            self.saved = _saved_inputs(gm.graph, self._forward_ops)
            found = _compress_nodes(gm.graph, self.tags)
            for index, group in enumerate(self.groups):
                if self.placement.get(group.key) == "not saved" and found.get(index):
                    self.placement[group.key] = "recomputed in backward"


def _fraction(site) -> float | None:
    """The saved copy's bytes over the input's own (``rows x n`` in the dtype the linear reads:
    bf16 under bf16 autocast), rounded; None with symbolic rows."""
    saved, full = site.saved_bytes, site.input_bytes
    return None if saved is None or not full else round(saved / full, 3)


def checkpoint_lines(count: int) -> list[str]:
    """What the report (and ``prac-fx diff``) says of ``count`` graph breaks out of activation
    checkpoints: the break, then the remedy."""
    return [f"ACTIVATION CHECKPOINT: {count} graph break(s) at a {kinds.CHECKPOINT_BREAK}: "
            f"{kinds.CHECKPOINT_UNCOMPILED}.", f"Remedy: {kinds.CHECKPOINT_REMEDY}."]


@dataclasses.dataclass
class Report:
    graphs: list[GraphRecord]
    store: object = None  # the BasisStore: the running variance estimate per site
    # Dynamo's graph breaks since the backend was made (reason -> count): code at a break may
    # run uncompiled, e.g. a whole activation-checkpointed layer whose forward has a side effect
    graph_breaks: dict = dataclasses.field(default_factory=dict)

    @property
    def checkpoint_breaks(self) -> int:
        """Dynamo's graph breaks out of an activation checkpoint by a side effect in its
        forward (``kinds.CHECKPOINT_BREAK``): each ran a checkpointed region uncompiled, its
        linear layers in no graph. ``prac_fx.allow_checkpoint_side_effects()`` lifts them."""
        return self.graph_breaks.get(kinds.CHECKPOINT_BREAK, 0)

    @property
    def fallbacks(self) -> list[GraphRecord]:
        """The graphs that fell back to plain Inductor (nothing compressed in them)."""
        return [g for g in self.graphs if g.fallback]

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
                if s.status != kinds.REWRITTEN and not include_skipped:
                    continue
                rows.append({
                    "graph": g.index,
                    "node": s.node,
                    "kind": s.kind,
                    "module": s.module,
                    "group": s.group or "",
                    "n": s.n,
                    "r1": s.r1 if s.status == kinds.REWRITTEN else None,
                    "r2": s.r2 if s.status == kinds.REWRITTEN else None,
                    "status": s.status if s.status == kinds.REWRITTEN else f"skipped: {s.reason}",
                    "format": s.fmt.name if s.status == kinds.REWRITTEN else "",
                    "saved bytes": s.saved_bytes if s.status == kinds.REWRITTEN else None,
                    "of input": _fraction(s) if s.status == kinds.REWRITTEN else None,
                    "compressed copy": g.placement.get(s.group, "") if s.group else "",
                    "rel. variance": self._variance(g, s),
                })
        return rows

    def _variance(self, record: GraphRecord, site: Site) -> float | None:
        """The running estimate of the site's relative weight-gradient variance, or None."""
        if self.store is None or site.status != kinds.REWRITTEN or not site.group:
            return None
        group = next((g for g in record.groups if g.key == site.group), None)
        if group is None or site.node not in group.sites:
            return None
        value = self.store.running_variance(site.group, group.sites.index(site.node))
        return None if value is None else round(value, 4)

    def pass_rows(self) -> list[dict]:
        """What each pass did to each graph, in pipeline order (``PassResult``)."""
        return [{"graph": g.index, "pass": r.name, "nodes created": r.nodes_created,
                 "nodes erased": r.nodes_erased, "sites matched": r.sites_matched,
                 "notes": "; ".join(r.notes)}
                for g in self.graphs for r in g.passes]

    def head_rows(self) -> list[dict]:
        """One row per cross-entropy loss the head_loss pass looked at."""
        return [{"graph": g.index, "node": h.node, "module": h.module, "rows": h.rows,
                 "vocab": h.vocab, "reduction": h.reduction, "chunk rows": h.chunk_rows,
                 "status": h.status if h.status == "rewritten" else f"skipped: {h.reason}",
                 "logits kept before": h.saved_bytes_before, "after": h.saved_bytes_after,
                 "gradients": ("in forward" if h.grad_in_forward else "recomputed")
                 if h.status == "rewritten" else "", "held": h.grad_bytes}
                for g in self.graphs for h in g.head_losses]

    def budget_lines(self) -> list[str]:
        """Per training graph with ``memory_budget``: asked, measured, used and kept."""
        MiB = 2**20
        out = []
        for g in self.graphs:
            b = g.budget
            if b is None:
                continue
            kept = f"{g.kept_bytes / MiB:.2f} MiB kept" if g.saved else "kept: after the first backward"
            if b.uncompressed_bytes:
                out.append(f"graph {g.index}: memory_budget {b.asked:g} of {b.uncompressed_bytes / MiB:.2f} "
                           f"MiB uncompressed = {b.target_bytes / MiB:.2f} MiB; rewritten keeps "
                           f"{b.rewritten_bytes / MiB:.2f} MiB by default; partitioner budget "
                           f"{b.partitioner_budget:.3f}; {kept}")
            else:
                out.append(f"graph {g.index}: memory_budget {b.asked:g} (graph not rewritten: "
                           f"partitioner budget {b.partitioner_budget:g}); {kept}")
        return out

    def table(self, include_skipped: bool = False) -> str:
        from tabulate import tabulate

        rows = self.rows(include_skipped)
        head = (f"{self.sites_matched} linear sites with a trained weight, "
                f"{self.sites_rewritten} rewritten, in {len(self.graphs)} graph(s)")
        checkpoint = self.checkpoint_breaks
        if checkpoint:  # its linear layers ran outside any graph: no site list has them
            head += ("; not counted: the linear layers of the activation-checkpointed regions "
                     "that broke out of the graph, which ran uncompiled")
        fallbacks = self.fallbacks
        if fallbacks:  # first: nothing else in the table matters as much
            head = (f"{len(fallbacks)} graph(s) FELL BACK to plain Inductor, nothing compressed "
                    f"in them (first: graph {fallbacks[0].index}, {fallbacks[0].fallback})\n"
                    + head)
        if checkpoint:
            head = "\n".join(checkpoint_lines(checkpoint)) + "\n" + head
        others = {r: c for r, c in self.graph_breaks.items() if r != kinds.CHECKPOINT_BREAK}
        if others:
            head += "\nDynamo graph breaks (code at a break may run uncompiled): " + "; ".join(
                f"{count} x {reason}" for reason, count in others.items())
        out = head + ("\n" + tabulate(rows, headers="keys") if rows else "")
        heads = self.head_rows()
        if heads:
            out += "\nhead + loss\n" + tabulate(heads, headers="keys")
        lines = self.budget_lines()
        return out + ("\n" + "\n".join(lines) if lines else "")
