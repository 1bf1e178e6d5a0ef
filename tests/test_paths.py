"""Site, weight and basis-key paths are the model's own names, however Dynamo spells the root.

Each entry below reaches the model through another root (``L['self']``, ``L['args'][0]``,
``L['model']``, ``G[...]``, an ``OptimizedModule``), and each must name the sites exactly as
``model.named_modules()`` does. A transformers release that changes how its forward is entered
fails here, not in a user's run. DDP and FSDP2 pin the same names in ``test_ddp.py`` and
``test_fsdp.py``.
"""
import pytest
import torch
import torch._dynamo

import prac_fx
from prac_fx.passes.paths import path_from_text, tokens
from prac_fx.diff import models

# -- the string rule --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, path", [
    ("L['self'].model.layers.0.mlp", "model.layers.0.mlp"),
    ("L['args'][0].model.layers.0.mlp", "model.layers.0.mlp"),
    ("L['fn'].lm_head", "lm_head"),
    ("L['kwargs']['model'].lm_head", "lm_head"),
    ("G['net'].blocks[1].fc", "blocks.1.fc"),
    ("L['self']._modules['blocks']._modules['1']._parameters['weight']", "blocks.1.weight"),
    ("L['self']._orig_mod.fc", "fc"),
    ("L['self'].layer._checkpoint_wrapped_module.fc", "layer.fc"),
    ("L['self']", ""),
    ("not a source", ""),
])
def test_path_from_text(text, path):
    assert path_from_text(text) == path


def test_tokens_stop_at_unknown_text():
    assert tokens("L['self'].a[0]<weird>.b") == [("root", "self"), ("attr", "a"), ("item", "0")]


# -- every way of entering a model ----------------------------------------------------------------


class Block(torch.nn.Module):
    def __init__(self, n=32):
        super().__init__()
        self.q = torch.nn.Linear(n, n)
        self.k = torch.nn.Linear(n, n)
        self.fc = torch.nn.Linear(n, n)

    def forward(self, x):
        return self.fc(torch.relu(self.q(x) * self.k(x)))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


NET_MODULES = {f"blocks.{i}.{m}" for i in range(2) for m in ("q", "k", "fc")}
NET_KEYS = {f"blocks.{i}.{m}" for i in range(2) for m in ("q+k", "fc")}

_global_net = None


def _enter(how: str, model, backend):
    """A callable that runs ``model`` on its input, compiled the way ``how`` names."""
    if how == "self":
        return torch.compile(model, backend=backend)
    if how == "method":
        model.compile(backend=backend)
        return model
    if how == "argument":
        step = torch.compile(lambda net, *args, **kwargs: net(*args, **kwargs), backend=backend)
        return lambda *args, **kwargs: step(model, *args, **kwargs)
    if how == "global":
        global _global_net
        _global_net = model
        return torch.compile(lambda x: _global_net(x), backend=backend)
    if how == "optimized":  # a function that calls an already wrapped module
        wrapped = torch.compile(model, backend="eager")
        return torch.compile(lambda x: wrapped._orig_mod(x), backend=backend)
    raise ValueError(how)


def _paths(backend):
    rows = backend.report().rows(include_skipped=False)
    return {r["module"] for r in rows}, set(backend.store.groups), \
        {s.weight for g in backend.graphs for s in g.sites if s.status == "rewritten"}


@pytest.mark.parametrize("how", ["self", "method", "argument", "global", "optimized"])
def test_paths_independent_of_the_root(how):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net()
    be = prac_fx.backend(rank=8, compiler="eager")
    run = _enter(how, model, be)
    run(torch.randn(4, 6, 32)).sum().backward()
    modules, keys, weights = _paths(be)
    assert modules == NET_MODULES
    assert keys == NET_KEYS
    assert weights == {m + ".weight" for m in NET_MODULES}
    assert weights <= {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("how", ["self", "method", "argument"])
def test_hugging_face_paths_match_named_modules(how):
    """Under transformers 5.24 ``torch.compile(model)`` enters through a wrapper
    (``L['args'][0]``); older releases gave ``L['self']``. The names must not change."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.build("llama", layers=1, width=64, seq=16, vocab=128)
    be = prac_fx.backend(rank=0.25, compiler="eager",
                         site_filter=lambda path: path.startswith("model.layers.0.mlp."))
    ids = models.batch(128, 4, 16)  # 64 rows: enough for down_proj (n = 128) to gain
    run = _enter(how, model, be)
    run(ids, labels=ids).loss.backward()
    rows = be.report().rows()
    named = {name for name, _ in model.named_modules()}
    linear = {r["module"] for r in rows if r["kind"] in ("linear", "addmm", "matmul") and r["module"]}
    assert linear and linear <= named, linear - named
    rewritten = {r["module"] for r in rows if r["status"] == "rewritten"}
    assert rewritten == {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                         "model.layers.0.mlp.down_proj"}
    assert set(be.store.groups) == {"model.layers.0.mlp.gate_proj+up_proj",
                                    "model.layers.0.mlp.down_proj"}
    heads = [r for r in rows if r["module"] == "lm_head"]
    assert heads and heads[0]["status"] == "skipped: output head"


# -- states saved under the old spelling -----------------------------------------------------------


def _train_once(be, model):
    run = torch.compile(model, backend=be)
    run(torch.randn(4, 6, 32)).sum().backward()
    return run


def _legacy(state):
    """The state as a release that spelled an ``L['args'][0]`` root as ``0.`` saved it."""
    old = {k: v for k, v in state.items()}
    store = dict(state["store"])
    store.pop("version")
    store["groups"] = {"0." + k: v for k, v in store["groups"].items()}
    old["store"] = store
    return old


@pytest.mark.parametrize("when", ["before compile", "after compile"])
def test_load_state_saved_under_the_old_spelling(when):
    torch._dynamo.reset()
    torch.manual_seed(0)
    be = prac_fx.backend(rank=8, compiler="eager", seed=1)
    _train_once(be, Net())
    saved = {k: g.basis.clone() for k, g in be.store.groups.items()}
    old = _legacy(be.state_dict())

    torch._dynamo.reset()
    fresh = prac_fx.backend(rank=8, compiler="eager", seed=2)
    model = Net()
    if when == "before compile":
        fresh.load_state_dict(old)
        _train_once(fresh, model)
    else:
        _train_once(fresh, model)
        fresh.load_state_dict(old)
    assert set(fresh.store.groups) == NET_KEYS  # adopted under the new names, nothing left over
    for key, basis in saved.items():
        torch.testing.assert_close(fresh.store.groups[key].basis, basis)
    assert fresh.state_dict()["store"]["version"] == 2


def test_state_from_a_newer_release_is_refused():
    be = prac_fx.backend(rank=8)
    state = be.state_dict()
    state["store"]["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        be.load_state_dict(state)
