"""What compiled models share and what they do not.

- Several models of one class compiled in one process with their own backends share nothing: each
  backend has its own store, its own bases drawn from its own seed, and training one model leaves
  the other's bases, counters and generator as they were.
- One model trained on new batch sizes and sequence lengths recompiles at most once for each new
  dimension (dynamic shapes), every graph reads the same bases under the same keys, and Dynamo
  guards on no basis: bases redrawn at every call never cause a recompile.
"""
import re

import pytest
import torch
import torch._dynamo
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import prac_fx
from toys import MLP


KEYS = {"up", "mid", "down"}


def _step(compiled, opt, x):
    opt.zero_grad()
    loss = compiled(x).square().mean()
    loss.backward()
    opt.step()
    return loss.detach()


def _snapshot(be):
    store = be.store
    return {"keys": set(store.groups),
            "bases": {k: g.basis.clone() for k, g in store.groups.items()},
            "q1": {k: g.q1.clone() for k, g in store.groups.items()},
            "counters": {k: (g.calls, g.refreshes, g.resamples) for k, g in store.groups.items()},
            "generator": store.generator.get_state().clone(),
            "graphs": len(be.graphs)}


@pytest.mark.parametrize("options_b", [{"rank": 8, "seed": 2}, {"rank": 4, "seed": 1}],
                         ids=["other-seed", "other-rank"])
def test_models_with_their_own_backends_share_nothing(options_b):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model_a, model_b = MLP(), MLP()
    model_b.load_state_dict(model_a.state_dict())  # same class, same weights: only the backends differ
    be_a = prac_fx.backend(rank=8, seed=1, refresh_every=2, resample_every=1, compiler="eager")
    be_b = prac_fx.backend(**options_b, refresh_every=2, resample_every=1, compiler="eager")
    a, b = torch.compile(model_a, backend=be_a), torch.compile(model_b, backend=be_b)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    x = torch.randn(4, 8, 32)
    _step(a, opt_a, x)
    _step(b, opt_b, x)

    # each model went through its own backend, into its own store
    assert [g.training for g in be_a.graphs] == [True] and [g.training for g in be_b.graphs] == [True]
    assert be_a.store is not be_b.store
    assert set(be_a.store.groups) == set(be_b.store.groups) == KEYS
    for key in KEYS:
        ga, gb = be_a.store.groups[key], be_b.store.groups[key]
        assert ga is not gb and ga.basis is not gb.basis
        assert gb.basis.shape[1] == options_b["rank"] and ga.basis.shape[1] == 8
        if ga.basis.shape == gb.basis.shape:  # same rank, other seed: other bases
            assert not torch.equal(ga.basis, gb.basis), key
    assert be_b.store.seed == options_b["seed"]

    # training A moves A's counters and bases, not B's
    before_b = _snapshot(be_b)
    for _ in range(3):
        _step(a, opt_a, x)
    after_b = _snapshot(be_b)
    assert after_b["counters"] == before_b["counters"] == {k: (1, 1, 1) for k in KEYS}
    assert after_b["graphs"] == before_b["graphs"] and after_b["keys"] == KEYS
    assert torch.equal(after_b["generator"], before_b["generator"])
    for key in KEYS:
        assert torch.equal(after_b["bases"][key], before_b["bases"][key]), key
        assert torch.equal(after_b["q1"][key], before_b["q1"][key]), key
    assert {k: g.calls for k, g in be_a.store.groups.items()} == {k: 4 for k in KEYS}
    assert len(be_a.graphs) == 1  # B's graph did not land in A's backend either

    # and training B moves only B's
    before_a = _snapshot(be_a)
    _step(b, opt_b, x)
    assert {k: g.calls for k, g in be_b.store.groups.items()} == {k: 2 for k in KEYS}
    assert _snapshot(be_a)["counters"] == before_a["counters"]
    assert torch.equal(be_a.store.generator.get_state(), before_a["generator"])


def _cache_entries(fn):
    return _debug_get_cache_entry_list(fn.__code__)


def test_new_batch_and_sequence_recompile_once_and_share_the_bases():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    # a refit every other call, a fresh draw at every call: the bases change all the time
    be = prac_fx.backend(rank=8, refresh_every=2, resample_every=1, compiler="eager")
    compiled = torch.compile(model, backend=be)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    unique = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    shapes = [(4, 8), (4, 8), (6, 8),  # new batch size: one recompile, batch dynamic
              (6, 12),                 # new sequence length: one recompile, sequence dynamic
              (3, 5), (7, 9), (4, 8), (2, 16)]  # any shape after that: none
    graphs_after = []
    for batch, seq in shapes:
        loss = _step(compiled, opt, torch.randn(batch, seq, 32))
        assert torch.isfinite(loss)
        graphs_after.append(len(be.graphs))
    assert graphs_after == [1, 1, 2, 3, 3, 3, 3, 3]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - unique == 3
    assert all(g.training for g in be.graphs)

    # one set of bases: every graph found the same groups under the same keys, and each
    # group counted every call whatever graph made it
    assert set(be.store.groups) == KEYS
    for record in be.graphs:
        assert {(g.key, g.n, g.r1, g.r2) for g in record.groups} == \
            {(k, g.n, g.r1, g.r2) for k, g in be.store.groups.items()}
    calls = len(shapes)
    assert {k: (g.calls, g.refreshes, g.resamples) for k, g in be.store.groups.items()} == \
        {k: (calls, calls // 2, calls) for k in KEYS}
    # the recompiled graphs have a symbolic batch size, then a symbolic sequence length too;
    # the bases, the last inputs of every forward graph, keep static sizes
    x_sizes = [re.findall(r'L_x_: "f32\[([^\]]*)\]"', g.dynamo_code) for g in be.graphs]
    assert x_sizes[0] == ["4, 8, 32"]
    assert re.fullmatch(r"s\d+, 8, 32", x_sizes[1][0]) and re.fullmatch(r"s\d+, s\d+, 32", x_sizes[2][0])
    for record in be.graphs:
        inputs = re.findall(r'primals_\d+: "([^"]*)"', record.forward_code.split("\n")[1])
        # then the statistics input, one row of three per site (no seeds: nothing is quantized)
        assert inputs[-4:] == ["f32[32, 8]", "f32[64, 8]", "f32[32, 8]", "f32[3, 3]"]

    # Dynamo guards on no basis: the guards name the input and the model, never the backend
    # or its store, and the bases (redrawn before every call above) caused no recompile
    entries = _cache_entries(MLP.forward)
    assert len(entries) == 3
    for entry in entries:
        text = str(entry.guard_manager)
        for word in ("basis", "prac", "store", "PracRunner"):
            assert word not in text, word
    before = len(be.graphs)
    for _ in range(3):
        be.store.resample("up")  # a new basis tensor, as a refresh would make
        _step(compiled, opt, torch.randn(5, 7, 32))
    assert len(be.graphs) == before


class Block(torch.nn.Module):
    def __init__(self, n=32, hidden=64):
        super().__init__()
        self.up = torch.nn.Linear(n, hidden)
        self.down = torch.nn.Linear(hidden, n)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def test_blocks_compiled_one_by_one_get_their_own_bases():
    """``block.compile(...)`` per layer (as with FSDP2): Dynamo compiles the first block (its
    input needs no grad) and reuses one graph for the others, which name their modules alike;
    each block still gets its own bases and counters, and keeps them across recompiles."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[Block() for _ in range(4)])
    exact = torch.nn.Sequential(*[Block() for _ in range(4)])
    exact.load_state_dict(model.state_dict())
    be = prac_fx.backend(rank=1.0, compiler="eager")
    for block in model:
        block.compile(backend=be)
    keys = {"up", "down", "up@1", "down@1", "up@2", "down@2", "up@3", "down@3"}
    for step, batch in enumerate([4, 4, 6]):  # the last a new batch size: recompiles
        x = torch.randn(batch, 8, 32)
        model.zero_grad()
        exact.zero_grad()
        model(x).square().mean().backward()
        exact(x).square().mean().backward()
        for (name, p), q in zip(model.named_parameters(), exact.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert set(be.store.groups) == keys
        assert {k: g.calls for k, g in be.store.groups.items()} == {k: step + 1 for k in keys}
    assert [[g.key for g in r.groups] for r in be.graphs] == \
        [["up", "down"], ["up@1", "down@1"], ["up", "down"], ["up@1", "down@1"]]
    # each block fitted and drew its own
    assert not torch.equal(be.store.basis("up@1"), be.store.basis("up@2"))


def test_claim_gives_each_weight_its_own_key():
    store = prac_fx.backend(rank=4).store
    a, b, c = (torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3))
    assert [store.claim("up", w) for w in (a, b, a, c, b)] == ["up", "up@1", "up", "up@2", "up@1"]
    assert store.claim("up", None) == "up"  # weight unknown: the name itself
    assert store.claim("down", b) == "down"  # keys are per name, not per weight
    del b  # a key whose weight is gone is free again (a model replaced by a new one)
    d = torch.nn.Parameter(torch.zeros(2, 2))
    assert store.claim("up", d) == "up@1" and store.claim("up", a) == "up"
