"""rewrite_sites: replace every grouped site by the compressed op and add the basis inputs.

Inputs appended after the graph's own, in this order (the runner passes them as extra
arguments, so a refreshed basis never recompiles and Dynamo never guards on it; their fake
values have static shapes, since a basis with a dynamic dimension would make every size
symbolic):
- per group, ``prac_basis_<i>`` of shape ``(n, r1 + r2)``, float32;
- per *following* group (``policy.subspace_iters > 0`` and ``r1 > 0``), ``prac_omega_<i>`` of
  shape ``(n, r2)``, float32: the Gaussian draw its random part is built from;
- one ``prac_stats`` of shape ``(sites, 2)``, float32, requiring grad: the runner passes a fresh
  leaf per call, and the backward writes each rewritten site's squared norms
  ``[||A1||^2, ||A2||^2]`` into its gradient (the running variance estimate, see
  ``passes.ops``). Row ``i`` belongs to the ``i``-th rewritten site in graph order
  (``Site.stat_index``).

Per group, before its first site:
- a following group computes its basis in the graph, ``basis = follow_basis(x, prac_basis_<i>,
  prac_omega_<i>, r1, iters, sqrt(k))``, and the graph returns it as an extra output after its
  own (the runner keeps it as the next call's warm start and strips it); other groups use
  ``prac_basis_<i>`` as it is;
- ``x_compressed = compress(x, basis)`` (shape ``(N, r)``).
Each site becomes ``compressed_linear(x, weight, bias, x_compressed, basis, kind, r1,
stats[i])``, which returns exactly what the site returned.

Guarantees: forward values unchanged; every new node carries ``meta["example_value"]`` and the
tag ``meta["prac"]`` (``kinds.TAG``: its role, one of ``kinds.ROLES``, and its group's index); the
original graph inputs keep their positions and the original outputs come first.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx

from prac_fx.passes import codec, kinds, torch_seam
from prac_fx.passes.graph_state import GraphState, PassResult, SitePolicy
from prac_fx.passes.ops import compress, compressed_linear, follow_basis
from prac_fx.passes.sites import match


def _example(node: torch.fx.Node):
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else node


def follows(group, policy) -> bool:
    """Whether ``group``'s principal basis follows each call's input (``follow_basis``)."""
    return int(getattr(policy, "subspace_iters", 0) or 0) > 0 and group.r1 > 0


def _scale(group, policy) -> float:
    k = getattr(policy, "complement_scale", None)
    k = (group.n - group.r1) / group.r2 if k is None and group.r2 else (k or 1.0)
    return math.sqrt(k)


def run(state: GraphState, policy: SitePolicy) -> PassResult:
    result = PassResult("rewrite_sites")
    graph = state.gm.graph
    if not state.groups:
        return result
    nodes = {n.name: n for n in graph.nodes}
    fake_mode = torch_seam.fake_mode(state.gm)
    sites = {s.node: s for s in state.sites}
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def placeholder(name, shape, device, role, group=None, requires_grad=False,
                    dtype=torch.float32):
        nonlocal last
        with graph.inserting_after(last):
            node = graph.placeholder(name)
        torch_seam.set_node_source(node, None)
        node.meta[kinds.TAG] = {"role": role, "group": group}
        last = node
        if fake_mode is not None:
            node.meta["example_value"] = fake_mode.from_tensor(
                torch.zeros(shape, dtype=dtype, device=device, requires_grad=requires_grad),
                static_shapes=True)
        result.nodes_created += 1
        return node

    devices = []
    for group in state.groups:
        x_val = _example(nodes[group.input_node])
        devices.append(x_val.device if isinstance(x_val, torch.Tensor) else None)
    bases = []
    for index, (group, device) in enumerate(zip(state.groups, devices)):
        bases.append(placeholder(f"prac_basis_{index}", group.spec.shape, device,
                                 kinds.ROLE_BASIS, index))
        group.basis_placeholder = bases[-1].name
    omegas = {}
    for index, (group, device) in enumerate(zip(state.groups, devices)):
        if follows(group, policy):
            omegas[index] = placeholder(f"prac_omega_{index}", (group.n, group.r2), device,
                                        kinds.ROLE_OMEGA, index)
            group.omega_placeholder = omegas[index].name
    n_sites = sum(len(g.sites) for g in state.groups)
    stats = placeholder("prac_stats", (n_sites, 3), devices[0], kinds.ROLE_STATS,
                        requires_grad=True)
    state.stats_placeholder = stats.name
    stats_val = stats.meta.get("example_value")
    quantized = [i for i, g in enumerate(state.groups) if g.fmt.quantized]
    seeds = seeds_val = None
    if quantized:
        seeds = placeholder("prac_seeds", (len(quantized), 2), devices[quantized[0]],
                            kinds.ROLE_SEEDS, dtype=torch.int64)
        state.seeds_placeholder = seeds.name
        seeds_val = seeds.meta.get("example_value")
        for row, index in enumerate(quantized):
            state.groups[index].seed_row = row

    followed = []  # the in-graph bases the graph returns, in group order
    stat_index = 0
    iters = int(getattr(policy, "subspace_iters", 0) or 0)
    for index, group in enumerate(state.groups):
        x = nodes[group.input_node]  # the rewritten node where a site reads another's output
        first = nodes[group.sites[0]]
        x_val = _example(x)
        x_mode = getattr(x_val, "fake_mode", None)
        basis = bases[index]
        basis_val = basis.meta.get("example_value")
        if index in omegas:
            args = (x, basis, omegas[index], group.r1, iters, _scale(group, policy))
            with graph.inserting_before(first):
                basis = graph.call_function(follow_basis, args)
            basis.meta["stack_trace"] = first.meta.get("stack_trace")
            basis.meta[kinds.TAG] = {"role": kinds.ROLE_FOLLOW, "group": index}
            if x_mode is not None:
                with x_mode:
                    basis.meta["example_value"] = basis_val = follow_basis(
                        x_val, torch.empty((group.n, group.rank), device=devices[index]),
                        torch.empty((group.n, group.r2), device=devices[index]),
                        group.r1, iters, _scale(group, policy))
            group.followed_node = basis.name
            followed.append(basis)
        fmt = group.fmt
        quant = ()  # the trailing arguments of a quantized site: codes, scales, spec, layout
        if fmt.quantized:
            with graph.inserting_before(first):
                seed_row = graph.call_function(operator.getitem, (seeds, group.seed_row))
                args = (x, basis, seed_row, group.r1, fmt.spec, fmt.layout)
                copy = graph.call_function(codec.compress, args)
                parts = [graph.call_function(operator.getitem, (copy, i)) for i in range(3)]
            seed_row.meta[kinds.TAG] = {"role": kinds.ROLE_SEED_ROW, "group": index}
            copy.meta[kinds.TAG] = {"role": kinds.ROLE_COMPRESS, "group": index}
            for part in parts:
                part.meta[kinds.TAG] = {"role": kinds.ROLE_PART, "group": index}
            for node in (seed_row, copy, *parts):
                node.meta["stack_trace"] = first.meta.get("stack_trace")
            if seeds_val is not None:
                with seeds_val.fake_mode:
                    seed_row.meta["example_value"] = seeds_val[group.seed_row]
            if x_mode is not None:
                with x_mode:
                    vals = codec.compress(x_val, group.spec.empty(devices[index]),
                                          torch.zeros(2, dtype=torch.int64, device=devices[index]),
                                          group.r1, fmt.spec, fmt.layout)
                copy.meta["example_value"] = vals
                for part, val in zip(parts, vals):
                    part.meta["example_value"] = val
            x_compressed = parts[0]  # the residual's principal part; (N, 0) otherwise
            quant = (parts[1], parts[2], fmt.spec, fmt.layout)
            group.compressed_node = copy.name
        else:
            with graph.inserting_before(first):
                x_compressed = graph.call_function(compress, (x, basis))
            x_compressed.meta["stack_trace"] = first.meta.get("stack_trace")
            x_compressed.meta[kinds.TAG] = {"role": kinds.ROLE_COMPRESS, "group": index}
            if x_mode is not None:
                with x_mode:  # in the mode of the graph's own example values
                    x_compressed.meta["example_value"] = compress(
                        x_val, group.spec.empty(devices[index]))
            group.compressed_node = x_compressed.name
        result.nodes_created += 1
        for name in group.sites:
            site_node = nodes[name]
            kind, x_arg, weight, bias = match(site_node)
            assert kind == sites[name].kind and x_arg is x
            with graph.inserting_before(site_node):
                row = graph.call_function(operator.getitem, (stats, stat_index))
                new = graph.call_function(
                    compressed_linear,
                    (x, weight, bias, x_compressed, basis, kind, group.r1, row, *quant))
            row.meta["stack_trace"] = site_node.meta.get("stack_trace")
            row.meta[kinds.TAG] = {"role": kinds.ROLE_STATS_ROW, "group": index}
            if stats_val is not None:
                with stats_val.fake_mode:
                    row.meta["example_value"] = stats_val[stat_index]
            new.meta.update({k: v for k, v in site_node.meta.items()})
            new.meta[kinds.TAG] = {"role": kinds.ROLE_SITE, "group": index, "kind": kind}
            site_node.replace_all_uses_with(new)
            graph.erase_node(site_node)
            nodes[name] = new  # a later group may read this site's output (linear -> linear)
            sites[name].status = kinds.REWRITTEN
            sites[name].stat_index = stat_index
            stat_index += 1
            result.nodes_created += 2
            result.nodes_erased += 1
            result.sites_matched += 1
    if followed:
        output = next(n for n in graph.nodes if n.op == "output")
        outs = output.args[0]
        if not isinstance(outs, (tuple, list)):
            raise ValueError("a graph whose output is not a tuple cannot return its followed bases")
        output.args = (type(outs)([*outs, *followed]),)
    state.followed = len(followed)
    graph.lint()
    state.gm.recompile()
    return result
