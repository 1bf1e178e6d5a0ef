"""prac_fx/basis.py: what the basis store keeps resident between steps."""
import torch

import prac_fx
from prac_fx.basis import BasisStore
from prac_fx.passes.graph_state import BasisSpec


def _store(device="cpu"):
    store = BasisStore(prac_fx.PracConfig(rank=16))
    for key, n in (("a", 64), ("b", 96)):
        store.register(key, BasisSpec(n, 8, 8), device)
        store.refresh(key, None)  # a random orthonormal Q1, then Q2
    return store


def test_only_the_bases_stay_resident_on_cpu():
    """n r float32 per group: P alone (Q1 and Q2 used to be kept beside it, 2 n r in all)."""
    store = _store()
    assert store.persistent_bytes() == (64 + 96) * 16 * 4
    g = store.groups["a"]
    assert g._q1_new is None and g._q1_host is None
    torch.testing.assert_close(g.q1, g.basis[:, :8])
    k = (64 - 8) / 8
    torch.testing.assert_close(g.q2 * k ** 0.5, g.basis[:, 8:])
    torch.testing.assert_close(g.q2.t() @ g.q2, torch.eye(8), atol=1e-5, rtol=0)


def test_refit_then_redraw_reads_q1_from_p():
    store = _store()
    gram = torch.randn(64, 64, dtype=torch.float64)
    gram = gram @ gram.t()
    store.refresh("a", gram)
    fitted = store.groups["a"].q1.clone()
    store.resample("a")  # Q2 redrawn in the complement of the Q1 held in P
    g = store.groups["a"]
    torch.testing.assert_close(g.q1, fitted)
    assert (g.q1.t() @ g.q2).abs().max() < 1e-5


def test_state_dict_still_carries_q1_and_q2():
    store = _store()
    state = store.state_dict()["groups"]["b"]
    assert state["q1"].shape == (96, 8) and state["q2"].shape == (96, 8)
    other = BasisStore(prac_fx.PracConfig(rank=16))
    other.load_state_dict(store.state_dict())
    assert torch.equal(other.basis("b"), store.basis("b"))
    assert other.persistent_bytes() == store.persistent_bytes()
