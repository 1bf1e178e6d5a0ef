"""find_sites on small captured Dynamo graphs (no AOTAutograd, no Inductor): what it matches,
what it skips and why, and that it leaves the graph alone."""
import torch

from invariants import capture
from prac_fx import PracConfig
from prac_fx.passes import kinds, sites
from prac_fx.passes.graph_state import GraphState
from toys import MLP, Attention, Conv1DLike


def _find(model, x, **config):
    (gm, _), = capture(model, x)
    code = gm.code
    state = GraphState(gm)
    result = sites.run(state, PracConfig(**config))
    assert gm.code == code  # the pass does not change the graph
    return state, result


def _linear(state):
    return {s.module: s for s in state.sites if s.kind in kinds.LINEAR_KINDS}


def test_linear_sites_heads_attention_and_nonlinear():
    torch.manual_seed(0)
    state, result = _find(Attention(), torch.randn(2, 8, 32), rank=4)
    found = _linear(state)
    assert sorted(found) == ["down", "k", "lm_head", "out", "q", "up", "v"]
    assert all(s.kind == kinds.LINEAR for s in found.values())
    assert found["lm_head"].status == kinds.SKIPPED and found["lm_head"].reason == kinds.OUTPUT_HEAD
    candidates = [m for m, s in found.items() if s.status == kinds.CANDIDATE]
    assert sorted(candidates) == ["down", "k", "out", "q", "up", "v"]
    assert result.sites_matched == len(candidates)
    assert {(s.n, s.m, s.r1, s.r2) for m, s in found.items() if m in ("q", "k", "v")} == {(32, 32, 2, 2)}
    assert (found["up"].n, found["up"].m) == (32, 64) and found["q"].weight == "q.weight"
    others = {s.kind for s in state.sites if s.kind not in kinds.LINEAR_KINDS}
    assert others == {kinds.ATTENTION, kinds.NONLINEAR}
    assert all(s.reason == s.kind for s in state.sites if s.kind in others)
    assert {s.status for s in state.sites} <= set(kinds.STATUSES)
    assert {s.reason for s in state.sites if s.reason} <= set(kinds.REASONS)
    assert "skipped output head: 1" in result.notes


def test_addmm_and_matmul_with_a_parameter():
    torch.manual_seed(0)
    state, _ = _find(Conv1DLike(), torch.randn(2, 8, 32), rank=4)
    by_kind = {s.kind: s for s in state.sites if s.kind in kinds.LINEAR_KINDS}
    assert by_kind[kinds.ADDMM].status == kinds.CANDIDATE and (by_kind[kinds.ADDMM].n, by_kind[kinds.ADDMM].m) == (32, 48)
    assert by_kind[kinds.MATMUL].status == kinds.CANDIDATE and (by_kind[kinds.MATMUL].n, by_kind[kinds.MATMUL].m) == (48, 32)
    assert any(s.kind == kinds.NONLINEAR for s in state.sites)  # the tanh


def test_filter_narrow_rank_and_few_rows():
    torch.manual_seed(0)
    state, _ = _find(MLP(), torch.randn(4, 8, 32), rank=0.25, site_filter=lambda p: p != "mid")
    assert _linear(state)["mid"].reason == kinds.FILTERED
    state, _ = _find(MLP(), torch.randn(4, 64, 32), rank=48)  # wider than up (32) and down (32)
    found = _linear(state)
    assert found["up"].reason == found["down"].reason == kinds.TOO_NARROW
    assert found["mid"].status == kinds.CANDIDATE  # its input is 64 wide
    state, _ = _find(MLP(), torch.randn(2, 32), rank=16)  # 2 rows: r (N + n) >= N n
    assert {s.reason for s in _linear(state).values()} == {kinds.TOO_FEW_ROWS}


def test_a_matmul_of_two_activations_has_no_trainable_weight():
    def scores(a, b):
        return (a @ b.transpose(-1, -2)).softmax(-1)

    (gm, _), = capture(scores, torch.randn(2, 8, 16), torch.randn(2, 8, 16))
    state = GraphState(gm)
    sites.run(state, PracConfig(rank=4))
    (site,) = [s for s in state.sites if s.kind == kinds.MATMUL]
    assert site.reason == kinds.NO_TRAINABLE_WEIGHT
