"""Small captured Dynamo graphs and the graph invariants every pass keeps (not collected).

``capture(fn, *args)`` compiles ``fn`` with a backend that keeps a copy of each Dynamo graph and
runs it unchanged: no AOTAutograd, no Inductor. ``run_checked(gm, policy)`` runs the pipeline on
a graph and calls ``check`` after every pass, which asserts what ``passes/graph_state.py``
promises:

- every node a pass created carries ``meta["example_value"]`` and the tag ``meta["prac"]``;
- no output of the graph is an input, or a view of an input, that was not one before;
- the placeholders the rewrite appends come after every original one: the bases in group
  order, the draws of following groups, the statistics input;
- the ``PassResult`` counts what the graph and the state show.
"""
from __future__ import annotations

import operator

import torch
import torch._dynamo

from prac_fx.passes import kinds, pipeline
from prac_fx.passes import probe as probe_graph

_VIEWS = {"view", "reshape", "transpose", "permute", "t", "expand", "__getitem__", "flatten",
          "unsqueeze", "squeeze", "contiguous", "detach"}


def capture(fn, *args) -> list[tuple[torch.fx.GraphModule, list]]:
    """(a copy of each Dynamo graph, the real arguments it was called with)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append((probe_graph.clone(gm), list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=keep)(*args)
    return graphs


def _aliases_input(node) -> bool:
    while isinstance(node, torch.fx.Node):
        if node.op == "placeholder":
            return True
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if node.target is operator.getitem:
            name = "__getitem__"
        if name not in _VIEWS or not node.args:
            return False
        node = node.args[0]
    return False


def _outputs(gm) -> list:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return list(_flatten(output.args))


def _flatten(value):
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value


def check(state, result, before: set[str], aliased_before: set[str]) -> None:
    gm = state.gm
    nodes = list(gm.graph.nodes)
    names = {n.name for n in nodes}
    new = [n for n in nodes if n.name not in before]
    # every new node carries a fake example value and its tag
    for node in new:
        value = node.meta.get("example_value")
        values = value if isinstance(value, tuple) else (value,)  # a multi-output op: a tuple
        assert values and all(isinstance(v, torch.Tensor) for v in values), (result.name, node.name)
        tag = node.meta.get(kinds.TAG)
        assert tag is not None and tag["role"] in kinds.ROLES, (result.name, node.name, tag)
    # no output aliases an input that did not before
    aliased = {o.name for o in _outputs(gm) if isinstance(o, torch.fx.Node) and _aliases_input(o)}
    assert aliased <= aliased_before, (result.name, aliased - aliased_before)
    # the appended inputs last: bases in group order, then the draws of following groups, then
    # the statistics input
    placeholders = [n for n in nodes if n.op == "placeholder"]
    added = [n for n in placeholders if kinds.TAG in n.meta]
    assert placeholders[len(placeholders) - len(added):] == added, result.name
    roles = [n.meta[kinds.TAG]["role"] for n in added]
    assert roles == sorted(roles, key=kinds.INPUT_ROLES.index), roles
    bases = [n for n in added if n.meta[kinds.TAG]["role"] == kinds.ROLE_BASIS]
    assert [n.name for n in bases] == [g.basis_placeholder for g in state.groups if g.basis_placeholder]
    assert [n.meta[kinds.TAG]["group"] for n in bases] == list(range(len(bases)))
    omegas = [n.name for n in added if n.meta[kinds.TAG]["role"] == kinds.ROLE_OMEGA]
    assert omegas == [g.omega_placeholder for g in state.groups if g.omega_placeholder]
    assert roles.count(kinds.ROLE_STATS) == (1 if bases else 0)
    # the counts
    assert result.nodes_created == len(names - before), result
    assert result.nodes_erased == len(before - names), result
    if result.name == "find_sites":
        assert result.sites_matched == sum(s.status == kinds.CANDIDATE for s in state.sites)
        assert result.nodes_created == result.nodes_erased == 0
    elif result.name == "group_sites":
        assert result.sites_matched == sum(len(g.sites) for g in state.groups)
        assert result.nodes_created == result.nodes_erased == 0
    elif result.name == "rewrite_sites":
        rewritten = sum(s.status == kinds.REWRITTEN for s in state.sites)
        assert result.sites_matched == rewritten
        assert result.nodes_erased == rewritten
        following = sum(1 for g in state.groups if g.omega_placeholder)
        # per site: the op and its statistics row; per group: basis, x @ P; per following
        # group: its draw and the in-graph basis; once: the statistics input
        assert result.nodes_created == (2 * rewritten + 2 * len(state.groups) + 2 * following
                                        + (1 if state.groups else 0))
        roles = [n.meta[kinds.TAG]["role"] for n in new]
        assert roles.count(kinds.ROLE_SITE) == roles.count(kinds.ROLE_STATS_ROW) == rewritten
        assert roles.count(kinds.ROLE_FOLLOW) == following == state.followed


def run_checked(gm: torch.fx.GraphModule, policy):
    """The pipeline on ``gm`` (edited in place) with ``check`` after every pass."""
    aliased = {o.name for o in _outputs(gm) if isinstance(o, torch.fx.Node) and _aliases_input(o)}
    seen = []

    def observe(state, result, before):
        check(state, result, before, aliased)
        seen.append(result.name)

    state = pipeline.run(gm, policy, observe=observe)
    assert seen == [name for name, _ in pipeline.PIPELINE]
    return state
