"""rewrite_sites: replace every grouped site by the compressed op and add the basis inputs.

For each group, in order:
- a placeholder ``prac_basis_<i>`` of shape ``(n, r1 + r2)``, float32, is appended after the
  graph's inputs (the runner passes the basis tensors as extra arguments, so a refreshed basis
  never recompiles and Dynamo never guards on it). Its fake value has static shapes: a basis
  with a dynamic dimension would make every size symbolic;
- one node ``x_compressed = compress(x, basis)`` (shape ``(N, r)``) is inserted before the
  group's first site;
- each site becomes ``CompressedLinear.apply(x, weight, bias, x_compressed, basis, kind)``,
  which returns exactly what the site returned.

Guarantees: forward values unchanged; every new node carries ``meta["example_value"]`` and the
tag ``meta["prac"]`` (``kinds.TAG``: its role, basis / compress / site, and its group's index);
the original graph inputs keep their positions.
"""
from __future__ import annotations

import torch
import torch.fx

from prac_fx.passes import kinds, torch_seam
from prac_fx.passes.graph_state import GraphState, PassResult, SitePolicy
from prac_fx.passes.ops import CompressedLinear, compress
from prac_fx.passes.sites import match


def _example(node: torch.fx.Node):
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else node


def run(state: GraphState, policy: SitePolicy) -> PassResult:
    result = PassResult("rewrite_sites")
    graph = state.gm.graph
    if not state.groups:
        return result
    nodes = {n.name: n for n in graph.nodes}
    fake_mode = torch_seam.fake_mode(state.gm)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    last = placeholders[-1]
    sites = {s.node: s for s in state.sites}
    for index, group in enumerate(state.groups):
        x = nodes[group.input_node]
        first = nodes[group.sites[0]]
        x_val = _example(x)
        device = x_val.device if isinstance(x_val, torch.Tensor) else None
        with graph.inserting_after(last):
            basis = graph.placeholder(f"prac_basis_{index}")
        torch_seam.set_node_source(basis, None)
        last = basis
        if fake_mode is not None:
            # Static shapes: a basis with a symbolic size would make every size symbolic.
            basis.meta["example_value"] = fake_mode.from_tensor(group.spec.empty(device),
                                                                static_shapes=True)
        basis.meta[kinds.TAG] = {"role": kinds.ROLE_BASIS, "group": index}
        group.basis_placeholder = basis.name
        with graph.inserting_before(first):
            x_compressed = graph.call_function(compress, (x, basis))
        x_compressed.meta["stack_trace"] = first.meta.get("stack_trace")
        x_mode = getattr(x_val, "fake_mode", None)
        if x_mode is not None:
            with x_mode:  # in the mode of the graph's own example values
                x_compressed.meta["example_value"] = compress(x_val, group.spec.empty(device))
        x_compressed.meta[kinds.TAG] = {"role": kinds.ROLE_COMPRESS, "group": index}
        group.compressed_node = x_compressed.name
        result.nodes_created += 2
        for name in group.sites:
            site_node = nodes[name]
            kind, x_arg, weight, bias = match(site_node)
            assert kind == sites[name].kind and x_arg is x
            with graph.inserting_before(site_node):
                new = graph.call_function(
                    CompressedLinear.apply, (x, weight, bias, x_compressed, basis, kind)
                )
            new.meta.update({k: v for k, v in site_node.meta.items()})
            new.meta[kinds.TAG] = {"role": kinds.ROLE_SITE, "group": index, "kind": kind}
            site_node.replace_all_uses_with(new)
            graph.erase_node(site_node)
            nodes[name] = new  # a later group may read this site's output (linear -> linear)
            sites[name].status = kinds.REWRITTEN
            result.nodes_created += 1
            result.nodes_erased += 1
            result.sites_matched += 1
    graph.lint()
    state.gm.recompile()
    return result
