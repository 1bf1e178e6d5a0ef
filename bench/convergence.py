"""Pre-train tiny GPT-2 / Llama models from scratch on Shakespeare, one run per variant.

Every variant starts from the same weights (``seed``) and sees the same batches in the same
order (``data_seed``); only how activations are kept for backward differs. Validation loss is the
mean over a fixed set of held-out windows (``eval_batches`` x batch x seq tokens), evaluated under
``torch.no_grad()`` every ``eval_every`` steps and at the end (the PRAC backend compiles
no-grad graphs unchanged, so evaluation is exact for every variant).

A finished run is cached as JSON under ``cache/convergence/`` keyed by a hash of its
configuration; an unfinished one is written there as it goes (``"done": false``), so a table can
be reprinted, or a long run watched, without re-running.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
from typing import Callable

import torch

from bench import data, training
from prac_fx.diff import models


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "gpt2"
    variant: str = "inductor"
    steps: int = 2000
    layers: int = 4
    width: int = 256
    seq: int = 256
    batch: int = 8
    vocab: int = 2048
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    data_seed: int = 1
    eval_every: int = 250
    eval_batches: int = 16
    dtype: str = "float32"

    def key(self) -> str:
        return training.config_key(self, "shakespeare-bpe-v1")

    def path(self, cache: pathlib.Path) -> pathlib.Path:
        return training.cache_path(self, cache, "convergence", self.model)


def lr_at(step: int, cfg: TrainConfig, floor: float | None = None) -> float:
    """Linear warm-up, then cosine decay to ``floor * lr`` at the last step (``floor`` defaults
    to ``cfg.min_lr_ratio``; a variant's ``+lrf=F`` gives the compressed weights their own)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    low = cfg.min_lr_ratio if floor is None else floor
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * t)))


def schedule(cfg: TrainConfig) -> Callable[..., float]:
    """``lr_at`` for ``cfg`` as ``training.train_loop`` calls it: ``(step)``, or ``(step, floor)``
    for a param group with its own ``"lr_floor"``."""
    return lambda step, floor=None: lr_at(step, cfg, floor)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, lr_scale: float | None = None,
               lr_floor: float | None = None) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only. With ``lr_scale`` (a variant's ``+lrb=F``), the
    weights of the blocks' linear layers (the sites PRAC compresses: every ``nn.Linear`` but the
    output heads) take ``F`` times the scheduled learning rate; with ``lr_floor`` (``+lrf=F``)
    their cosine decays to ``F`` times the peak instead of ``min_lr_ratio``. Both go in their
    group (``"lr_scale"``, ``"lr_floor"``), which ``training.train_loop`` applies."""
    scaled: set[int] = set()
    if lr_scale is not None or lr_floor is not None:
        import prac_fx

        heads = prac_fx.PracConfig()
        scaled = {id(m.weight) for path, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not heads.is_head(path)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in scaled]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    if scaled:
        group = {"params": [p for p in model.parameters() if id(p) in scaled],
                 "weight_decay": cfg.weight_decay, "lr_scale": 1.0 if lr_scale is None else lr_scale}
        if lr_floor is not None:
            group["lr_floor"] = lr_floor
        groups.append(group)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _evaluate(fn, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return statistics.fmean(float(fn(ids, labels=ids).loss) for ids in batches)


def weight_rms(model: torch.nn.Module) -> dict[str, float]:
    """Root-mean-square of each matrix weight (embeddings and linear layers), by parameter name:
    how far and how evenly the blocks' weights move and grow under a variant."""
    return {name: float(p.detach().float().pow(2).mean().sqrt())
            for name, p in model.named_parameters() if p.dim() == 2}


def load(cfg, cache: pathlib.Path = data.CACHE) -> dict | None:
    """The cached record of a finished run of ``cfg`` (any config with ``path(cache)``), or None."""
    return training.load(cfg, cache)


def setup(cfg: TrainConfig, cache: pathlib.Path = data.CACHE, eval_batches: int | None = None):
    """``(model, fn, opt, train_batches, val)`` for a run of ``cfg``: the model from its seed,
    the variant's callable, the optimizer, the training stream and the validation batches
    (``eval_batches`` of them; default the config's)."""
    from bench import variants

    tokens = data.shakespeare(cfg.vocab, cache)
    train_batches = data.Batches(tokens["train"], cfg.batch, cfg.seq, cfg.data_seed)
    val = data.eval_batches(tokens["val"], cfg.batch, cfg.seq, eval_batches or cfg.eval_batches)
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, layers=cfg.layers, width=cfg.width, seq=cfg.seq,
                         vocab=tokens["vocab"]).to(getattr(torch, cfg.dtype))
    model.train()
    fn = variants.by_name(cfg.variant).make(model)
    opt = _optimizer(model, cfg, getattr(fn, "lr_scale", None), getattr(fn, "lr_floor", None))
    return model, fn, opt, train_batches, val


def train(cfg: TrainConfig, cache: pathlib.Path = data.CACHE, progress: bool = True) -> dict:
    """Run (or load from the cache) one training run; returns its record."""
    cached = load(cfg, cache)
    if cached is not None:
        return cached
    from bench.harness import machine

    model, fn, opt, train_batches, val = setup(cfg, cache)

    record = {"config": dataclasses.asdict(cfg), "machine": machine(), "done": False,
              "eval": [], "train_loss": [], "step_s": [], "compile_s": None,
              "val_tokens": cfg.eval_batches * cfg.batch * cfg.seq}
    path = cfg.path(cache)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)

    def evaluate(done: int, bar) -> None:
        if done % cfg.eval_every == 0 or done == cfg.steps:
            v = _evaluate(fn, val)
            record["eval"].append({"step": done, "val_loss": v})
            backend = getattr(fn, "prac_backend", None)
            if backend is not None:  # which sites are noisy, and when
                from prac_fx.variance import running

                record.setdefault("variance", []).append({"step": done, **running(backend)})
            record.setdefault("weights", []).append({"step": done, **weight_rms(model)})
            if bar is not None:
                bar.set_postfix(val_loss=f"{v:.3f}", ppl=f"{math.exp(v):.1f}")
            save()

    record["eval"].append({"step": 0, "val_loss": _evaluate(fn, val)})
    training.train_loop(model, opt, record, steps=cfg.steps, lr_at=schedule(cfg),
                        batch_at=lambda step: train_batches.next(),
                        loss_of=lambda ids: fn(ids, labels=ids).loss, clip=cfg.clip,
                        desc=f"{cfg.model}/{cfg.variant}", progress=progress, after_step=evaluate)
    record["done"] = True
    save()
    return record
