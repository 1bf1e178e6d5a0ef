"""rewrite_sites: replace every grouped site by the compressed op and add the basis inputs.

For each group, in order:
- a placeholder ``prac_basis_<i>`` of shape ``(n, r1 + r2)``, float32, is appended after the
  graph's inputs (the runner passes the basis tensors as extra arguments, so a refreshed basis
  never recompiles and Dynamo never guards on it). Its fake value has static shapes: a basis
  with a dynamic dimension would make every size symbolic;
- one node ``x_compressed = compress(x, basis)`` (shape ``(N, r)``) is inserted before the
  group's first site;
- each site becomes ``CompressedLinear.apply(x, weight, bias, x_compressed, basis, kind, r1,
  stats[i])``, which returns exactly what the site returned;
- after the bases, one placeholder ``prac_stats`` of shape ``(sites, 2)``, float32, requiring
  grad: the runner passes a fresh leaf per call, and the backward writes each rewritten site's
  squared norms ``[||A1||^2, ||A2||^2]`` into its gradient (the running variance estimate, see
  ``passes.ops``). Row ``i`` belongs to the ``i``-th rewritten site in graph order
  (``Site.stat_index``).

Guarantees: forward values unchanged; every new node carries ``meta["example_value"]``; the
original graph inputs keep their positions.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from passes.graph_state import GraphState, PassResult, SitePolicy
from passes.ops import CompressedLinear, compress
from passes.sites import match


def _fake_mode(gm: torch.fx.GraphModule):
    """The fake mode AOTAutograd will trace in: the tracing context's, else the inputs'."""
    from torch._guards import TracingContext, detect_fake_mode

    context = TracingContext.try_get()
    if context is not None and context.fake_mode is not None:
        return context.fake_mode
    vals = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def _example(node: torch.fx.Node):
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else node


def run(state: GraphState, policy: SitePolicy) -> PassResult:
    result = PassResult("rewrite_sites")
    graph = state.gm.graph
    if not state.groups:
        return result
    nodes = {n.name: n for n in graph.nodes}
    fake_mode = _fake_mode(state.gm)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    weight_device = None
    last = placeholders[-1]
    group_nodes = []
    sites = {s.node: s for s in state.sites}
    n_sites = sum(len(g.sites) for g in state.groups)
    first_x = _example(nodes[state.groups[0].input_node])
    stats_device = first_x.device if isinstance(first_x, torch.Tensor) else None
    for index, group in enumerate(state.groups):
        x = nodes[group.input_node]
        first = nodes[group.sites[0]]
        x_val = _example(x)
        device = x_val.device if isinstance(x_val, torch.Tensor) else weight_device
        with graph.inserting_after(last):
            basis = graph.placeholder(f"prac_basis_{index}")
        basis._dynamo_source = None
        last = basis
        if fake_mode is not None:
            # Static shapes: a basis with a symbolic size would make every size symbolic.
            basis.meta["example_value"] = fake_mode.from_tensor(
                torch.empty((group.n, group.rank), dtype=torch.float32, device=device),
                static_shapes=True,
            )
        group.basis_placeholder = basis.name
        with graph.inserting_before(first):
            x_compressed = graph.call_function(compress, (x, basis))
        x_compressed.meta["stack_trace"] = first.meta.get("stack_trace")
        x_mode = getattr(x_val, "fake_mode", None)
        if x_mode is not None:
            with x_mode:  # in the mode of the graph's own example values
                x_compressed.meta["example_value"] = compress(
                    x_val, torch.empty((group.n, group.rank), dtype=torch.float32, device=device)
                )
        group.compressed_node = x_compressed.name
        result.nodes_created += 2
        group_nodes.append((group, x_compressed, basis))
    with graph.inserting_after(last):
        stats = graph.placeholder("prac_stats")
    stats._dynamo_source = None
    state.stats_placeholder = stats.name
    result.nodes_created += 1
    if fake_mode is not None:
        stats.meta["example_value"] = fake_mode.from_tensor(
            torch.zeros((n_sites, 2), dtype=torch.float32, device=stats_device, requires_grad=True),
            static_shapes=True)
    stat_index = 0
    for group, x_compressed, basis in group_nodes:
        x = nodes[group.input_node]  # the rewritten node where a site reads another's output
        for name in group.sites:
            site_node = nodes[name]
            kind, x_arg, weight, bias = match(site_node)
            assert kind == sites[name].kind and x_arg is x
            with graph.inserting_before(site_node):
                row = graph.call_function(operator.getitem, (stats, stat_index))
                new = graph.call_function(
                    CompressedLinear.apply, (x, weight, bias, x_compressed, basis, kind, group.r1, row)
                )
            stats_val = stats.meta.get("example_value")
            if stats_val is not None:
                with stats_val.fake_mode:
                    row.meta["example_value"] = stats_val[stat_index]
            sites[name].stat_index = stat_index
            stat_index += 1
            result.nodes_created += 1
            new.meta.update({k: v for k, v in site_node.meta.items()})
            site_node.replace_all_uses_with(new)
            graph.erase_node(site_node)
            nodes[name] = new  # a later group may read this site's output (linear -> linear)
            sites[name].status = "rewritten"
            result.nodes_created += 1
            result.nodes_erased += 1
            result.sites_matched += 1
    graph.lint()
    state.gm.recompile()
    return result
