"""Measure a training step: bytes saved for backward, peak live memory, step and compile time.

A *variant* is a name and a function that turns a model into the callable to train
(``eager``, ``inductor``, ``prac r=n/8`` ...). ``run_suite`` builds one fresh model per variant
(same seed, same weights), compiles each with its first step (timed apart as compile time),
measures saved bytes and peak memory, then times ``repeats`` rounds in which every variant runs
one step, in turn, and reports medians: noise on a shared machine hits all variants alike.

For PRAC variants whose principal basis is fitted to activations, a *refresh step* (the step
that first runs the no-grad probe forward and refits the basis) is timed in the same rounds, by
setting the backend's call counters to the next multiple of ``refresh_every`` through its
``state_dict``; its amortised share is ``(refresh - steady) / (steady * refresh_every)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import statistics
import time
from typing import Callable

import torch

from prac_fx.diff import memory, models

MiB = 2**20


@dataclasses.dataclass
class Variant:
    name: str
    make: Callable[[torch.nn.Module], Callable]  # model -> the callable to train
    # The callable's PRAC backend, if any, is read from its ``prac_backend`` attribute.


@dataclasses.dataclass
class Row:
    """One model x variant. The ``*_vs_*`` columns are ratios to the same model's eager and
    Inductor rows, filled in by ``add_ratios``."""

    model: str
    variant: str
    saved_mib: float
    peak_mib: float
    step_ms: float
    tokens_per_s: float
    compile_s: float
    bases_mib: float = float("nan")  # resident bytes of the PRAC bases, between steps
    refresh_ms: float = float("nan")
    refresh_every: int = 0
    refresh_amortised: float = float("nan")  # extra time per step from refreshes, / steady step
    saved_vs_eager: float = float("nan")
    saved_vs_inductor: float = float("nan")
    peak_vs_eager: float = float("nan")
    peak_vs_inductor: float = float("nan")
    step_vs_eager: float = float("nan")
    step_vs_inductor: float = float("nan")
    ppl: float = float("nan")  # from the cached convergence run, when there is one
    ppl_gap_vs_eager: float = float("nan")
    ppl_gap_vs_inductor: float = float("nan")


@dataclasses.dataclass(frozen=True)
class Setup:
    layers: int = 4
    width: int = 256
    seq: int = 256
    batch: int = 8
    vocab: int = 2048
    dtype: str = "float32"
    # "bfloat16": every step under torch.autocast of the model's device in that dtype (the
    # linears read bf16 casts, so the copies count against bf16 inputs); None: no autocast
    autocast: str | None = None
    repeats: int = 7
    refresh_repeats: int = 3  # rounds that also time a refresh step of each PRAC variant

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def return_freed_memory() -> bool:
    """Ask glibc to serve blocks of 64 KiB and more from mmap and to trim freed memory at once,
    as ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` in the environment would: the
    peak resident size then tracks live bytes. True when it took effect (glibc only)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 65536)) and bool(libc.mallopt(m_trim_threshold, 0))
    except (OSError, AttributeError):
        return False


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def autocast_of(setup: "Setup"):
    """The context every step of ``setup`` runs in: ``torch.autocast`` in ``setup.autocast``'s
    dtype on the CPU, or a null context."""
    if setup.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, setup.autocast))


def _step(fn: Callable, ids: torch.Tensor, params: list[torch.Tensor],
          context: Callable = contextlib.nullcontext) -> None:
    with context():
        loss = fn(ids, labels=ids).loss
    loss.backward()
    for p in params:
        p.grad = None


def add_ratios(rows: list[Row]) -> None:
    base = {(r.model, r.variant): r for r in rows}
    for r in rows:
        for ref_name in ("eager", "inductor"):
            ref = base.get((r.model, ref_name))
            if ref is None:
                continue
            for col in ("saved", "peak", "step"):
                mine, theirs = getattr(r, f"{col}_{'ms' if col == 'step' else 'mib'}"), \
                    getattr(ref, f"{col}_{'ms' if col == 'step' else 'mib'}")
                setattr(r, f"{col}_vs_{ref_name}", mine / theirs if theirs else float("nan"))


def _backend_of(fn: Callable):
    backend = getattr(fn, "prac_backend", None)
    if backend is None or not backend.store.groups:
        return None
    if not any(g.r1 > 0 for g in backend.store.groups.values()):
        return None  # random-only: nothing to refit
    return backend


def _make_refresh_due(backend) -> None:
    """Set every group's call counter to the next multiple of ``refresh_every``: the next
    training call refits the principal bases, as every ``refresh_every``-th call does."""
    every = backend.config.refresh_every
    state = backend.state_dict()
    for g in state["store"]["groups"].values():
        g["calls"] = -(-g["calls"] // every) * every
    backend.load_state_dict(state)


def run_suite(model_names: list[str], variants: list[Variant], setup: Setup,
              progress: Callable[[str], None] = lambda s: None) -> list[Row]:
    dtype = getattr(torch, setup.dtype)
    context = lambda: autocast_of(setup)  # noqa: E731
    return_freed_memory()
    # Every variant compiles the same model code with a backend of its own: one cache entry
    # each. Past Dynamo's default limit of 8 the later variants would silently run eagerly.
    from torch._dynamo import config as dynamo_config

    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, limit):
            setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 256))
    rows: list[Row] = []
    for name in model_names:
        ids = models.batch(setup.vocab, setup.batch, setup.seq)
        runs = []
        for v in variants:
            torch.manual_seed(0)
            model = models.build(name, layers=setup.layers, width=setup.width, seq=setup.seq,
                                 vocab=setup.vocab).to(dtype)
            params = list(model.parameters())
            fn = v.make(model)
            progress(f"{name}/{v.name}: compiling")
            t = time.perf_counter()
            _step(fn, ids, params, context)
            compile_s = time.perf_counter() - t
            _step(fn, ids, params, context)  # warm

            def loss_of():
                with context():
                    return fn(ids, labels=ids).loss

            saved = memory.saved_bytes(loss_of, params)
            peak = memory.peak_rss_above(lambda: _step(fn, ids, params, context))
            runs.append((v, model, params, fn, compile_s, saved, peak, [], []))
        for i in range(setup.repeats):
            progress(f"{name}: timing round {i + 1}/{setup.repeats}")
            order = runs if i % 2 == 0 else runs[::-1]
            for v, model, params, fn, *_, times, refresh_times in order:
                t = time.perf_counter()
                _step(fn, ids, params, context)
                times.append(time.perf_counter() - t)
                backend = _backend_of(fn)
                if backend is not None and backend.config.refresh_every > 1 and i < setup.refresh_repeats:
                    _make_refresh_due(backend)
                    t = time.perf_counter()
                    _step(fn, ids, params, context)
                    refresh_times.append(time.perf_counter() - t)
        for v, model, params, fn, compile_s, saved, peak, times, refresh_times in runs:
            step = statistics.median(times)
            row = Row(name, v.name, saved / MiB, peak / MiB, step * 1e3, setup.tokens / step,
                      max(0.0, compile_s - step))
            prac = getattr(fn, "prac_backend", None)
            if prac is not None:
                row.bases_mib = prac.store.persistent_bytes() / MiB
            backend = _backend_of(fn)
            if backend is not None:
                every = row.refresh_every = backend.config.refresh_every
                if every == 1:  # every step is a refresh step: step_ms is the refresh step
                    row.refresh_ms = step * 1e3
                elif refresh_times:
                    refresh = statistics.median(refresh_times)
                    row.refresh_ms = refresh * 1e3
                    row.refresh_amortised = (refresh - step) / (step * every)
            rows.append(row)
    add_ratios(rows)
    return rows
