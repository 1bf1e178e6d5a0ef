"""Checkpoint and resume: a run resumed in a fresh process reproduces the uninterrupted run.

The first half trains N steps, saves model, optimizer, backend and torch RNG state, then trains M
more steps. A new Python process builds the model, loads the checkpoint, compiles with a new
backend that loads its state, and trains the same M steps: losses, parameters and bases must be
bitwise equal. The schedule puts refreshes and resamples inside the resumed steps and the resume
point in the middle of both periods. Run as a script, this file is that second process.
"""
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo

import prac_fx
from prac_fx.diff import models
from prac_fx.passes.graph_state import BasisSpec

OPTIONS = dict(rank=8, refresh_every=3, resample_every=2, seed=5)
N_STEPS, M_STEPS = 4, 5


class DropoutMLP(torch.nn.Module):
    def __init__(self, n=64, hidden=64, out=16):
        super().__init__()
        self.up = torch.nn.Linear(n, hidden)
        self.mid = torch.nn.Linear(hidden, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, out)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        h = self.drop(torch.nn.functional.gelu(self.up(x)))
        h = torch.tanh(self.mid(h))
        return self.down(h)


def build(name="mlp"):
    torch.manual_seed(0)
    if name == "gpt2":  # dropout in embeddings, attention and residuals
        model = models.build("gpt2", layers=2, width=64, seq=32, vocab=128, dropout=0.1)
    else:
        model = DropoutMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt


def data(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(2, 32, 64, generator=g), torch.randn(2, 32, 16, generator=g)


def lm_data(step):
    return models.batch(128, 2, 32, seed=1000 + step)


def train(compiled, opt, start, steps, name="mlp"):
    losses = []
    for step in range(start, start + steps):
        opt.zero_grad()
        if name == "gpt2":
            ids = lm_data(step)
            loss = compiled(ids, labels=ids).loss
        else:
            x, y = data(step)
            loss = (compiled(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def checkpoint(model, opt, backend) -> dict:
    """Everything a bitwise resume needs (the torch RNG state drives dropout)."""
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "prac": backend.state_dict(), "torch_rng": torch.get_rng_state()}


def bases(backend) -> dict:
    return {k: g.basis.clone() for k, g in backend.store.groups.items()}


def resume(path: str, name: str, compiler: str, out: str) -> None:
    """The fresh process: build, load, compile with a new backend, train M steps, save results."""
    model, opt = build(name)
    state = torch.load(path)  # weights_only: the backend state is plain tensors and numbers
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    backend = prac_fx.backend(**OPTIONS, compiler=compiler)
    backend.load_state_dict(state["prac"])  # before the first compile
    torch.set_rng_state(state["torch_rng"])
    compiled = torch.compile(model, backend=backend)
    losses = train(compiled, opt, N_STEPS, M_STEPS, name)
    torch.save({"losses": losses, "params": model.state_dict(), "bases": bases(backend),
                "calls": {k: g.calls for k, g in backend.store.groups.items()},
                "graphs": len(backend.graphs)}, out)


@pytest.mark.parametrize("name,compiler", [("mlp", "eager"), ("mlp", "inductor"), ("gpt2", "eager")])
def test_resume_in_fresh_process_is_bitwise_equal(tmp_path, name, compiler):
    torch._dynamo.reset()
    model, opt = build(name)
    backend = prac_fx.backend(**OPTIONS, compiler=compiler)
    compiled = torch.compile(model, backend=backend)
    first = train(compiled, opt, 0, N_STEPS, name)
    ckpt = tmp_path / "ckpt.pt"
    torch.save(checkpoint(model, opt, backend), ckpt)
    expected = train(compiled, opt, N_STEPS, M_STEPS, name)
    assert torch.isfinite(first).all() and torch.isfinite(expected).all()
    groups = backend.store.groups
    assert len(groups) == {"mlp": 3, "gpt2": 8}[name], list(groups)  # gpt2: lm_head stays exact
    # refreshes at calls 0, 3, 6 (two after the resume point), resamples every 2 calls
    assert {g.refreshes for g in groups.values()} == {3}

    out = tmp_path / "resumed.pt"
    # the child imports this checkout's prac_fx, whatever the installed copy is
    root = os.path.dirname(os.path.dirname(os.path.abspath(prac_fx.__file__)))
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, __file__, str(ckpt), name, compiler, str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out)
    assert got["graphs"] == 1
    assert torch.equal(got["losses"], expected), (got["losses"], expected)
    for k, v in model.state_dict().items():
        assert torch.equal(got["params"][k], v), k
    for k, v in bases(backend).items():
        assert torch.equal(got["bases"][k], v), k
    assert got["calls"] == {k: N_STEPS + M_STEPS for k in groups}


def test_resume_without_backend_state_differs(tmp_path):
    """The check above can fail: a new backend without the loaded state draws other bases."""
    torch._dynamo.reset()
    model, opt = build()
    backend = prac_fx.backend(**OPTIONS, compiler="eager")
    compiled = torch.compile(model, backend=backend)
    train(compiled, opt, 0, N_STEPS)
    state = checkpoint(model, opt, backend)
    expected = train(compiled, opt, N_STEPS, M_STEPS)

    torch._dynamo.reset()
    model, opt = build()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    fresh = train(torch.compile(model, backend=prac_fx.backend(**OPTIONS, compiler="eager")),
                  opt, N_STEPS, M_STEPS)
    assert not torch.equal(fresh, expected)


def test_state_loaded_after_compile_is_used():
    """Loading into a backend whose graph is already compiled replaces its bases and counters."""
    torch._dynamo.reset()
    model, opt = build()
    source = prac_fx.backend(**OPTIONS, compiler="eager")
    compiled_source = torch.compile(model, backend=source)
    train(compiled_source, opt, 0, N_STEPS)

    other, other_opt = build()
    target = prac_fx.backend(**OPTIONS, compiler="eager")
    compiled_target = torch.compile(other, backend=target)
    train(compiled_target, other_opt, 0, 1)  # compiled, registered its groups, drew bases
    target.load_state_dict(source.state_dict())
    other.load_state_dict(model.state_dict())
    for key, group in target.store.groups.items():
        assert group.calls == N_STEPS
        assert torch.equal(group.basis, source.store.groups[key].basis)
    # the next call draws the same complement and gives the same weight gradients
    x, _ = data(99)
    for m, c in ((model, compiled_source), (other, compiled_target)):
        m.zero_grad()
        torch.manual_seed(7)
        c(x).sum().backward()
    for name, p in model.named_parameters():
        assert torch.equal(dict(other.named_parameters())[name].grad, p.grad), name


def test_load_state_with_other_rank_is_an_error():
    torch._dynamo.reset()
    model, opt = build()
    source = prac_fx.backend(**OPTIONS, compiler="eager")
    train(torch.compile(model, backend=source), opt, 0, 1)
    torch._dynamo.reset()
    target = prac_fx.backend(**(OPTIONS | {"rank": 4}), compiler="eager")
    with pytest.raises(ValueError, match="rank"):
        target.load_state_dict(source.state_dict())


def test_state_loaded_before_compile_moves_to_the_graphs_device():
    from prac_fx.basis import BasisStore

    source = BasisStore(prac_fx.PracConfig(rank=8))
    source.register("g", BasisSpec(16, 4, 4), "cpu")
    source.refresh("g", torch.diag(torch.arange(16.0)))
    target = BasisStore(prac_fx.PracConfig(rank=8))
    target.load_state_dict(source.state_dict())
    group = target.register("g", BasisSpec(16, 4, 4), "meta")  # the first compile sees the activation's device
    assert group.basis.device.type == "meta" and group.basis.shape == (16, 8)
    assert torch.equal(group.q1, source.groups["g"].q1)  # Q1, Q2 stay on the CPU
    target.resample("g")  # later draws land on the graph's device too
    assert target.basis("g").device.type == "meta"


def _fake_rank(monkeypatch, rank):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)


def test_rank_seeds_and_loading_another_ranks_state(monkeypatch, caplog):
    from prac_fx.basis import RANK_STRIDE, BasisStore

    states = []
    for rank in (0, 1):
        _fake_rank(monkeypatch, rank)
        store = BasisStore(prac_fx.PracConfig(rank=8, seed=3))
        store.register("g", BasisSpec(16, 0, 8), "cpu")  # the rank is read at the first register
        store.resample("g")
        assert store.seed == 3 + RANK_STRIDE * rank
        states.append(store.state_dict())
    assert [s["seed"] for s in states] == [3, 3 + RANK_STRIDE]
    assert not torch.equal(states[0]["groups"]["g"]["basis"], states[1]["groups"]["g"]["basis"])

    with caplog.at_level(logging.WARNING, logger="prac_fx"):
        BasisStore(prac_fx.PracConfig(rank=8, seed=3)).load_state_dict(states[1])  # its own
        assert not caplog.records
        BasisStore(prac_fx.PracConfig(rank=8, seed=3)).load_state_dict(states[0])  # rank 0's
    assert len(caplog.records) == 1 and "one state per rank" in caplog.records[0].getMessage()


if __name__ == "__main__":
    torch.set_num_threads(1)
    resume(*sys.argv[1:5])
