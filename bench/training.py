"""What convergence and fine-tuning runs share: the cache key of a run's configuration, the
cached record, and the training loop itself.

``config_key(cfg, salt)`` hashes a configuration dataclass (with a salt naming the data and its
preparation, so that a new tokenisation never reads old records); ``cache_path`` names its
record file; ``load`` reads a finished record. ``train_loop`` runs the steps: per step it sets
the learning rate, times forward, backward, clipping and the optimizer step (the first step,
which compiles, apart as ``compile_s``), records the loss and stops at the first non-finite one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import sys
import time
from typing import Callable

import torch


def config_key(cfg, salt: str) -> str:
    blob = json.dumps(dataclasses.asdict(cfg), sort_keys=True) + "|" + salt
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def cache_path(cfg, cache: pathlib.Path, folder: str, prefix: str) -> pathlib.Path:
    """``cache/folder/prefix-variant-steps-key.json`` for a config with ``variant``, ``steps``
    and ``key()``."""
    safe = cfg.variant.replace("/", "_").replace("+", "_")
    return cache / folder / f"{prefix}-{safe}-{cfg.steps}-{cfg.key()}.json"


# Finished runs the README cites, committed (small JSON records): ``--cached-only`` reprints their
# tables on a fresh clone. A run in the cache takes precedence.
RECORDS = pathlib.Path(__file__).parent / "records"


def load(cfg, cache: pathlib.Path) -> dict | None:
    """The record of a finished run of ``cfg`` (any config with ``path(cache)``) from the cache,
    else from the committed records, or None."""
    for root in (cache, RECORDS):
        path = cfg.path(root)
        if path.exists():
            result = json.loads(path.read_text())
            if result.get("done"):
                return result
    return None


def train_loop(model: torch.nn.Module, opt: torch.optim.Optimizer, record: dict, *, steps: int,
               lr_at: Callable[[int], float], batch_at: Callable[[int], object],
               loss_of: Callable[[object], torch.Tensor], clip: float | None, desc: str,
               progress: bool, after_step: Callable[[int, object], None] | None = None) -> None:
    """Train ``steps`` steps, filling ``record["train_loss"]``, ``["step_s"]``, ``["compile_s"]``
    and, on a non-finite loss, ``["diverged_at"]``. ``batch_at(step)`` picks the batch (not
    timed), ``loss_of(batch)`` runs the forward; ``after_step(steps_done, bar)`` runs after each
    finite step (evaluation, saving), ``bar`` being the progress bar or None."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=desc, file=sys.stderr, mininterval=5.0, dynamic_ncols=True)
    for step in range(steps):
        batch = batch_at(step)
        for group in opt.param_groups:
            floor = group.get("lr_floor")  # a group's own end of the decay (+lrf=F)
            lr = lr_at(step) if floor is None else lr_at(step, floor)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        t = time.perf_counter()
        loss = loss_of(batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t
        if step == 0:
            record["compile_s"] = elapsed
        else:
            record["step_s"].append(elapsed)
        record["train_loss"].append(loss.item())
        if not math.isfinite(record["train_loss"][-1]):
            record["diverged_at"] = step + 1
            break
        if after_step is not None:
            after_step(step + 1, bar)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
