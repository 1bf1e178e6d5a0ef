"""The PRAC graph pipeline: named passes run in order over one Dynamo graph.

``PIPELINE`` is the list; ``run(gm, policy)`` runs it on ``gm`` (edited in place: pass a copy) and
returns the ``GraphState`` with the sites, groups and one ``PassResult`` per pass. Each result
records the nodes the pass created and erased, measured from the graph itself.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch.fx

from prac_fx.passes import grouping, head_loss, rewrite, sites
from prac_fx.passes.graph_state import GraphState, PassFn, PassResult, SitePolicy

log = logging.getLogger("prac_fx.passes")

PIPELINE: list[tuple[str, PassFn]] = [
    ("head_loss", head_loss.run),  # first: the head it takes is no longer a linear site
    ("find_sites", sites.run),
    ("group_sites", grouping.run),
    ("rewrite_sites", rewrite.run),
]


def run(gm: torch.fx.GraphModule, policy: SitePolicy, *,
        observe: Callable[[GraphState, PassResult, set[str]], None] | None = None) -> GraphState:
    """``observe(state, result, names_before)``, when given, is called after every pass (the
    tests check the graph invariants there, see ``graph_state``)."""
    state = GraphState(gm)
    for name, fn in PIPELINE:
        before = {n.name for n in gm.graph.nodes}
        result = fn(state, policy)
        after = {n.name for n in gm.graph.nodes}
        result.name = name
        result.nodes_created = len(after - before)
        result.nodes_erased = len(before - after)
        state.results.append(result)
        log.debug("pass %s: %s", name, result)
        if observe is not None:
            observe(state, result, before)
    return state
