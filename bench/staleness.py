"""How fast a principal basis goes stale while the weights train, from the variance identity.

Train the bench's tiny model (eager, AdamW at the convergence runs' learning rate with their
warm-up, no compression and no gradient clipping: the exact trajectory; it does not go through
``bench.training.train_loop``, whose clipping the convergence runs use) for ``fit_at`` steps; fit Q1 of every linear
site (top r1 = r/2 eigenvectors of x^T x, r = n/4, the default split) to the next training
batch; train on; after each of ``ages`` further steps evaluate, on one fixed held-out batch,

    sum_sites (k - 1) ||G (I - Q1 Q1^T)||^2 / sum_sites ||G||^2,   k = (n - r1) / r2,

the relative variance of the default estimator (exact, no sampling) with Q1:

- ``stale``: fitted ``age`` steps earlier (what the default uses between refreshes);
- ``other batch``: fitted now, to another training batch (a refresh at this step);
- ``own batch``: fitted to the held-out batch itself (a basis that follows the batch).
"""
from __future__ import annotations

import dataclasses

import torch

from bench import data
from prac_fx import variance as pv
from prac_fx.diff import models


@dataclasses.dataclass
class StalenessRow:
    model: str
    fit_at: int
    age: int
    stale: float
    other_batch: float
    own_batch: float


def _linear_sites(model):
    """The modules the backend would compress by default: linear layers but the output heads."""
    from transformers.pytorch_utils import Conv1D

    from prac_fx import PracConfig

    config = PracConfig()
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and not config.is_head(name)}


def measure(model_name: str, fit_at: int, ages: list[int], seed: int = 0) -> list[StalenessRow]:
    from bench.convergence import TrainConfig, lr_at

    cfg = TrainConfig(model=model_name, seed=seed)
    tokens = data.shakespeare(cfg.vocab)
    batches = data.Batches(tokens["train"], cfg.batch, cfg.seq, cfg.data_seed)
    held_out = data.eval_batches(tokens["val"], cfg.batch, cfg.seq, 1)[0]
    torch.manual_seed(seed)
    model = models.build(model_name, layers=cfg.layers, width=cfg.width, seq=cfg.seq,
                         vocab=tokens["vocab"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    captured: dict[str, list] = {}
    capturing = [False]

    def hook(name):
        def fn(module, args, out):
            if capturing[0]:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                captured[name] = [x, None]
                out.register_hook(lambda g: captured[name].__setitem__(
                    1, g.detach().reshape(-1, g.shape[-1]).double()))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in _linear_sites(model).items()]

    def grab(ids):  # per site (x, dY) of one batch, at fixed weights
        capturing[0] = True
        captured.clear()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        capturing[0] = False
        model.zero_grad()
        return dict(captured)

    def ranks(n):  # the default: rank n/4, r1 = r2
        r = round(n / 4)
        return r // 2, r - r // 2

    def fit(sites):
        return {name: pv.principal_basis(x, ranks(x.shape[1])[0]) for name, (x, _) in sites.items()}

    def relative_variance(sites, q1s):
        num = den = 0.0
        for name, (x, dy) in sites.items():
            g = dy.t() @ x
            num += pv.identity_variance(g, q1s[name], ranks(x.shape[1])[1])
            den += float(g.square().sum())
        return num / den

    step = 0

    def train_to(target):
        nonlocal step
        while step < target:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            ids = batches.next()
            opt.zero_grad()
            model(ids, labels=ids).loss.backward()
            opt.step()
            step += 1

    train_to(fit_at)
    stale = fit(grab(batches.next()))
    rows = []
    for age in sorted(ages):
        train_to(fit_at + age)
        sites = grab(held_out)
        rows.append(StalenessRow(model_name, fit_at, age, relative_variance(sites, stale),
                                 relative_variance(sites, fit(grab(batches.next()))),
                                 relative_variance(sites, fit(sites))))
    for h in handles:
        h.remove()
    return rows


def table(rows: list[StalenessRow], markdown: bool = False) -> str:
    from tabulate import tabulate

    return tabulate([dataclasses.astuple(r) for r in rows],
                    headers=["model", "fit at step", "age (steps)", "stale Q1", "Q1 of another batch",
                             "Q1 of this batch"],
                    tablefmt="github" if markdown else "simple", floatfmt=".3f")
