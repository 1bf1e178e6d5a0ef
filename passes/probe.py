"""The probe graph: measure the activations that a basis refresh needs.

``build(gm, input_nodes)`` returns a copy of the (unrewritten) Dynamo graph whose output is the
tuple of Gram matrices ``x2d^T x2d`` (n, n), float32, one per requested input node, with
everything that does not feed them removed and grad-mode switches dropped, so it runs as a
no-grad forward. A refresh runs it on the step's real arguments, takes the top eigenvectors of
each Gram matrix as the new principal basis Q1 (the top right singular vectors of x), and then
runs the training step itself with the new basis: the basis is always fitted to the micro-batch
it compresses, as in PRAC.

``clone(gm)`` copies a Dynamo graph module with its placeholders' sources, so that passes can
edit the copy while Dynamo keeps its own.
"""
from __future__ import annotations

import torch.fx

from prac_fx.passes import torch_seam
from prac_fx.passes.ops import gram


def clone(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    torch_seam.copy_codegen(gm.graph, graph)
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    for old, new in val_map.items():
        if old.op == "placeholder":
            torch_seam.set_node_source(new, torch_seam.node_source(old))
    return torch.fx.GraphModule(gm, graph, gm.__class__.__name__)


def _mutates_input(node: torch.fx.Node) -> bool:
    """An in-place op on a graph input (``buf.add_(1)``): running the probe would repeat it."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_method", "call_function") or not str(name).endswith("_") \
            or str(name).startswith("_") or name == "requires_grad_":
        return False
    first = node.args[0] if node.args else None
    while isinstance(first, torch.fx.Node) and first.op != "placeholder" and first.args:
        first = first.args[0] if first.target in ("view", "reshape", "transpose") else None
    return isinstance(first, torch.fx.Node) and first.op == "placeholder"


def build(gm: torch.fx.GraphModule, input_nodes: list[str]) -> torch.fx.GraphModule:
    """Raises ValueError for a graph that mutates its inputs: it cannot be run twice per step."""
    bad = [n.name for n in gm.graph.nodes if _mutates_input(n)]
    if bad:
        raise ValueError(f"graph mutates its inputs in place ({', '.join(bad[:3])})")
    probe = clone(gm)
    graph = probe.graph
    nodes = {n.name: n for n in graph.nodes}
    output = next(n for n in graph.nodes if n.op == "output")
    grams = []
    for name in input_nodes:
        with graph.inserting_before(output):
            grams.append(graph.call_function(gram, (nodes[name],)))
    output.args = (tuple(grams),)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in torch_seam.GRAD_MODE_FNS:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    probe.recompile()
    return probe
