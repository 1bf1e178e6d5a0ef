"""The probe graph and ``clone`` on small captured graphs: Gram matrices of the requested inputs,
no grad-mode switches, refused for graphs that mutate their inputs."""
import pytest
import torch

from invariants import capture
from prac_fx.passes import probe, torch_seam
from toys import MLP


def test_gram_of_each_requested_input():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(2, 8, 32)
    (gm, args), = capture(model, x)
    first = next(n for n in gm.graph.nodes if n.op == "call_function"
                 and n.target in torch_seam.LINEAR_FNS)
    input_node = first.args[0].name  # the input of ``up``: x itself
    graph = probe.build(gm, [input_node])
    (gram,) = graph(*args)
    x2d = x.reshape(-1, 32)
    torch.testing.assert_close(gram, x2d.t() @ x2d)
    assert not any(n.target in torch_seam.GRAD_MODE_FNS for n in graph.graph.nodes)


def test_clone_keeps_sources_and_leaves_the_original():
    torch.manual_seed(0)
    (gm, _), = capture(MLP(), torch.randn(2, 8, 32))
    copy = probe.clone(gm)
    assert copy.graph is not gm.graph and copy.code == gm.code
    for a, b in zip(gm.graph.nodes, copy.graph.nodes):
        if a.op == "placeholder":
            assert torch_seam.node_source(b) is torch_seam.node_source(a)


def test_a_graph_mutating_its_input_gets_no_probe():
    def bump(x, counter):
        counter.add_(1)
        return (x * 2).sum()

    (gm, _), = capture(bump, torch.randn(4, 4), torch.zeros(()))
    with pytest.raises(ValueError, match="mutates its inputs"):
        probe.build(gm, [])
