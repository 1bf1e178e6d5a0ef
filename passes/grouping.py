"""group_sites: gather candidate sites that read the same input node into groups.

Sites of one group (q/k/v projections; gate/up projections) share one basis and one compressed
copy ``x @ P``: the input is saved once, at the group's rank, instead of once per site.

A group's key names its modules (``"model.layers.0.self_attn.q_proj+k_proj+v_proj"`` in short
form, see ``_key``) plus an occurrence counter for a module applied to several inputs, so that
the graphs Dynamo compiles for other shapes or grad modes find the same bases under the same key.

Does not change the graph.
"""
from __future__ import annotations

from prac_fx.passes import kinds
from prac_fx.passes.graph_state import GraphState, Group, PassResult, SitePolicy


def _key(modules: list[str]) -> str:
    first = modules[0]
    prefix = first.rsplit(".", 1)[0] + "." if "." in first else ""
    tails = [m[len(prefix):] if prefix and m.startswith(prefix) else m for m in modules]
    return prefix + "+".join(tails)


def run(state: GraphState, policy: SitePolicy) -> PassResult:
    result = PassResult("group_sites")
    by_input: dict[str, list] = {}
    for site in state.sites:
        if site.status == kinds.CANDIDATE:
            by_input.setdefault(site.input_node, []).append(site)
    seen: dict[str, int] = {}
    groups = []
    for input_node, sites in by_input.items():
        base = _key([s.module for s in sites])
        occurrence = seen.get(base, 0)
        seen[base] = occurrence + 1
        key = base if occurrence == 0 else f"{base}#{occurrence}"
        # sites sharing an input share one basis; per-site ranks that differ: the largest
        first = max(sites, key=lambda s: (s.r1 + s.r2, s.r1))
        for s in sites:
            s.r1, s.r2, s.fmt = first.r1, first.r2, first.fmt
        group = Group(key=key, input_node=input_node, n=first.n, r1=first.r1, r2=first.r2,
                      sites=[s.node for s in sites], fmt=first.fmt)
        for s in sites:
            s.group = key
        groups.append(group)
    state.groups = groups
    result.sites_matched = sum(len(g.sites) for g in groups)
    result.notes = [f"{len(groups)} groups"]
    return result
