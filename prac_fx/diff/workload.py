"""What ``prac-fx`` runs: a model, the inputs of one training step and its loss.

``load(spec, ...)`` accepts

- a built-in preset, ``gpt2`` or ``llama`` (tiny, random init; ``layers``, ``width``, ``seq``,
  ``batch``, ``vocab`` set its size), trained as ``model(ids, labels=ids).loss``;
- ``path/to/file.py:factory`` or ``package.module:factory``: a callable returning
  ``(model, inputs)`` or ``(model, inputs, loss_fn)``, where

  - ``model`` is a ``torch.nn.Module``;
  - ``inputs`` is a tensor or an input spec (the one positional argument), a tuple or list
    (positional arguments) or a dict (keyword arguments). An input spec is a shape (a
    ``torch.Size`` or a tuple of ints): it becomes ``torch.randn(shape)`` from a seeded generator;
  - ``loss_fn(output) -> scalar tensor`` is optional; without it the loss is ``output.loss``,
    else ``output["loss"]``, else the sum of the output (its first tensor when it is a tuple).

  The factory is called with ``batch=`` and ``seq=`` when those options are given and its
  signature accepts them; otherwise with no arguments. ``torch.manual_seed(0)`` runs first.

Bad input raises ``WorkloadError`` with a one-line message.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable

import torch

from prac_fx.diff import models


class WorkloadError(Exception):
    """The model spec, the factory or what it returned cannot be used (a one-line message)."""


@dataclasses.dataclass
class Workload:
    spec: str
    label: str  # "gpt2 (layers=2, width=64, seq=32, batch=2, vocab=256)"
    settings: dict
    model: torch.nn.Module
    args: tuple
    kwargs: dict
    loss_fn: Callable[[Any], torch.Tensor]

    def loss(self, model: Callable | None = None) -> torch.Tensor:
        return self.loss_fn((self.model if model is None else model)(*self.args, **self.kwargs))

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())


PRESET_DEFAULTS = {"layers": 2, "width": 64, "seq": 64, "batch": 4, "vocab": 256}


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _default_loss(out) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(out, (tuple, list)):
        out = next((o for o in out if isinstance(o, torch.Tensor)), None)
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    raise WorkloadError(f"cannot make a loss of a {type(out).__name__} output; "
                        "return (model, inputs, loss_fn)")


def _preset(name: str, *, layers, width, seq, batch, vocab) -> Workload:
    settings = {"layers": layers, "width": width, "seq": seq, "batch": batch, "vocab": vocab}
    for key, value in settings.items():
        if value < 1:
            raise WorkloadError(f"--{key} must be >= 1, got {value}")
    torch.manual_seed(0)
    model = models.build(name, layers=layers, width=width, seq=seq, vocab=vocab)
    model.train()
    ids = models.batch(vocab, batch, seq)
    label = f"{name} ({', '.join(f'{k}={v}' for k, v in settings.items())})"
    return Workload(name, label, settings, model, (ids,), {"labels": ids}, lambda out: out.loss)


def _import_factory(spec: str) -> Callable:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise WorkloadError(f"model {spec!r} is neither a preset ({', '.join(models.PRESETS)}) "
                            "nor FILE.py:FACTORY nor MODULE:FACTORY")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise WorkloadError(f"no such file: {target}")
        name = "_prac_fx_model_" + os.path.splitext(os.path.basename(path))[0]
        loader = importlib.util.spec_from_file_location(name, path)
        if loader is None or loader.loader is None:
            raise WorkloadError(f"cannot import {target}: not a Python file")
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module  # dataclasses and pickling look their module up there
        sys.path.insert(0, os.path.dirname(path))
        try:
            loader.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise WorkloadError(f"importing {target} raised {_one_line(err)}") from None
        finally:
            sys.path.remove(os.path.dirname(path))
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:
            raise WorkloadError(f"cannot import module {target!r}: {_one_line(err)}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise WorkloadError(f"{target} has no attribute {attr!r}")
    if not callable(factory):
        raise WorkloadError(f"{target}:{attr} is not callable: {type(factory).__name__}")
    return factory


def _is_shape(value) -> bool:
    return isinstance(value, torch.Size) or (
        isinstance(value, tuple) and bool(value)
        and all(isinstance(d, int) and not isinstance(d, bool) for d in value))


def _materialise(value, gen: torch.Generator):
    return torch.randn(tuple(value), generator=gen) if _is_shape(value) else value


def _factory(spec: str, *, batch, seq) -> Workload:
    factory = _import_factory(spec)
    given = {k: v for k, v in (("batch", batch), ("seq", seq)) if v is not None}
    try:
        accepted = inspect.signature(factory).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    except (TypeError, ValueError):
        accepted, takes_any = {}, False
    extra = [k for k in given if k not in accepted and not takes_any]
    if extra:
        raise WorkloadError(f"factory {spec} takes no {', '.join(extra)} argument; drop --{extra[0]}")
    torch.manual_seed(0)
    try:
        made = factory(**given)
    except Exception as err:
        raise WorkloadError(f"factory {spec} raised {_one_line(err)}") from None
    if not isinstance(made, (tuple, list)) or len(made) not in (2, 3):
        raise WorkloadError(f"factory {spec} must return (model, inputs) or (model, inputs, loss_fn), "
                            f"got {type(made).__name__}")
    model, inputs, *rest = made
    if not isinstance(model, torch.nn.Module):
        raise WorkloadError(f"factory {spec} returned a {type(model).__name__} as the model, "
                            "not a torch.nn.Module")
    loss_fn = rest[0] if rest else _default_loss
    if not callable(loss_fn):
        raise WorkloadError(f"factory {spec}: the third item (loss_fn) is not callable")
    gen = torch.Generator().manual_seed(0)
    if isinstance(inputs, dict):
        args, kwargs = (), {k: _materialise(v, gen) for k, v in inputs.items()}
    elif isinstance(inputs, (tuple, list)) and not _is_shape(inputs):
        args, kwargs = tuple(_materialise(v, gen) for v in inputs), {}
    else:
        args, kwargs = (_materialise(inputs, gen),), {}
    settings = dict(given)
    label = spec + (f" ({', '.join(f'{k}={v}' for k, v in given.items())})" if given else "")
    return Workload(spec, label, settings, model, args, kwargs, loss_fn)


def _check(work: Workload) -> None:
    """One eager forward, so that a broken model fails here with a clear message."""
    try:
        loss = work.loss()
    except WorkloadError:
        raise
    except Exception as err:
        raise WorkloadError(f"running {work.spec} on its inputs raised {_one_line(err)}") from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else ""
        raise WorkloadError(f"the loss of {work.spec} must be a scalar tensor, got "
                            f"{type(loss).__name__}{shape}")
    if not loss.requires_grad:
        raise WorkloadError(f"the loss of {work.spec} does not require grad: "
                            "no trained parameter reaches it")


def load(spec: str, *, batch: int | None = None, seq: int | None = None, layers: int | None = None,
         width: int | None = None, vocab: int | None = None) -> Workload:
    """The workload for ``spec`` (see the module docstring); raises ``WorkloadError``."""
    if spec in models.PRESETS:
        size = dict(PRESET_DEFAULTS)
        size.update({k: v for k, v in dict(layers=layers, width=width, seq=seq, batch=batch,
                                             vocab=vocab).items() if v is not None})
        work = _preset(spec, **size)
    else:
        presets = ", ".join(models.PRESETS)
        preset_only = [k for k, v in (("layers", layers), ("width", width), ("vocab", vocab))
                       if v is not None]
        if preset_only and ":" in spec:
            raise WorkloadError(f"--{preset_only[0]} applies to the presets ({presets}) only")
        if ":" not in spec:
            raise WorkloadError(f"unknown model {spec!r}: choose a preset ({', '.join(models.PRESETS)}) "
                                "or give FILE.py:FACTORY or MODULE:FACTORY")
        work = _factory(spec, batch=batch, seq=seq)
    _check(work)
    return work
