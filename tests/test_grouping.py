"""group_sites on small captured graphs: one group per shared input, keys named by modules."""
import torch

from invariants import capture
from prac_fx import PracConfig
from prac_fx.passes import grouping, kinds, sites
from prac_fx.passes.graph_state import GraphState
from toys import MLP, Attention


def _group(model, *args, **config):
    (gm, _), = capture(model, *args)
    state = GraphState(gm)
    policy = PracConfig(**config)
    sites.run(state, policy)
    code = gm.code
    result = grouping.run(state, policy)
    assert gm.code == code  # the pass does not change the graph
    return state, result


def test_sites_reading_one_input_share_a_group():
    torch.manual_seed(0)
    state, result = _group(Attention(), torch.randn(2, 8, 32), rank=4)
    keys = [g.key for g in state.groups]
    assert keys == ["q+k+v", "out", "up", "down"]
    qkv = state.groups[0]
    assert [next(s.module for s in state.sites if s.node == n) for n in qkv.sites] == ["q", "k", "v"]
    assert (qkv.n, qkv.r1, qkv.r2, qkv.rank) == (32, 2, 2, 4)
    assert qkv.spec.shape == (32, 4) and qkv.spec.dtype == torch.float32
    assert result.sites_matched == 6 and result.notes == ["4 groups"]
    for s in state.sites:
        assert (s.group is not None) == (s.status == kinds.CANDIDATE)


def test_a_module_applied_twice_gets_a_counted_key():
    torch.manual_seed(0)
    model = MLP()

    def twice(x, y):
        return model(x) + model(y)

    state, _ = _group(twice, torch.randn(4, 8, 32), torch.randn(4, 8, 32), rank=4)
    assert [g.key for g in state.groups] == ["up", "mid", "down", "up#1", "mid#1", "down#1"]


def test_key_of_nested_modules_keeps_the_common_prefix():
    assert grouping._key(["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]) \
        == "model.layers.0.self_attn.q_proj+k_proj"
    assert grouping._key(["up"]) == "up"
