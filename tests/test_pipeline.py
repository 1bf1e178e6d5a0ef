"""The pipeline: named passes in order, the invariants after every pass on graphs with several
groups and graph breaks, and the layering of the passes package."""
import ast
import dataclasses
import pathlib

import pytest
import torch

from invariants import capture, run_checked
from prac_fx import PracConfig
from prac_fx.passes import PIPELINE, kinds
from toys import MLP, Attention

PASSES = pathlib.Path(__file__).resolve().parent.parent / "passes"


def test_passes_run_by_name_in_order():
    assert [name for name, _ in PIPELINE] == ["head_loss", "find_sites", "group_sites", "rewrite_sites"]


@pytest.mark.parametrize("config", [dict(rank=4), dict(rank=1.0), dict(rank=4, split=0.0),
                                    dict(rank=4, exact_heads=())])
def test_invariants_on_every_graph_of_a_graph_break(config):
    torch.manual_seed(0)
    attention, mlp = Attention(), MLP(n=24, out=8)

    def two_graphs(x):
        h = attention(x)
        torch._dynamo.graph_break()
        return mlp(h)

    graphs = capture(two_graphs, torch.randn(2, 8, 32))
    assert len(graphs) == 2
    for gm, _ in graphs:
        state = run_checked(gm, PracConfig(**config))
        assert [r.name for r in state.results] == [name for name, _ in PIPELINE]
        assert any(s.status == kinds.REWRITTEN for s in state.sites)


def test_the_passes_import_nothing_else_of_prac_fx():
    for path in sorted(PASSES.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name == "prac_fx" or name.startswith("prac_fx."):
                    assert name.startswith("prac_fx.passes") or (
                        name == "prac_fx" and all(a.name == "passes" for a in node.names)), \
                        (path.name, name)


def test_the_checker_catches_a_broken_invariant():
    """The invariant check can fail: a node without an example value, a basis placeholder that
    is not last, a wrong count."""
    from invariants import check

    torch.manual_seed(0)
    (gm, _), = capture(MLP(), torch.randn(2, 8, 32))
    before = {n.name for n in gm.graph.nodes}
    state = run_checked(gm, PracConfig(rank=4))
    rewrite = state.results[-1]
    check(state, rewrite, before, set())  # as run: holds
    wrong = dataclasses.replace(rewrite, nodes_created=rewrite.nodes_created - 1)
    with pytest.raises(AssertionError):
        check(state, wrong, before, set())
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        gm.graph.placeholder("late")  # after the bases, untagged, no example value
    with pytest.raises(AssertionError):
        check(state, rewrite, before, set())
