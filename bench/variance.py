"""The weight-gradient variance of each PRAC variant, measured with ``prac_fx.variance``.

For each model and variant: build the bench's tiny model (seeded), train it ``steps`` steps on
Shakespeare with the variant itself (AdamW, the convergence runs' learning rate, no schedule),
so that the basis state is what training leaves; then, at fixed weights, measure on a held-out
batch the relative variance ``sum E||G^ - G||^2 / sum ||G||^2`` over the compressed weights:

- ``state``: with the bases as the run left them (what the next step would use: a stale Q1 for
  the default, the Q1 the graph would build on this batch for ``+S=s``);
- ``batch``: with Q1 refitted to the held-out batch itself (the best a principal basis from
  activations can do);
- ``running``: the backend's own moving estimate at the end of training (no extra work).

``draws`` independent draws of the random part per site; the identity's value is printed next
to the sampled one as a check.
"""
from __future__ import annotations

import dataclasses

import torch

from bench import data, variants
from prac_fx.diff import models
from prac_fx import variance as pv


@dataclasses.dataclass
class VarianceRow:
    model: str
    variant: str
    steps: int
    state: float
    state_identity: float
    batch: float
    running: float | None
    median_site_state: float


def _backend(fn):
    backend = getattr(fn, "prac_backend", None)
    if backend is None:
        raise ValueError("not a PRAC variant: nothing to measure")
    return backend


def measure_variant(model_name: str, variant: str, *, steps: int, draws: int, layers: int = 4,
                    width: int = 256, seq: int = 256, batch: int = 8, vocab: int = 2048,
                    seed: int = 0, data_seed: int = 1, lr: float = 1e-3) -> VarianceRow:
    tokens = data.shakespeare(vocab)
    stream = data.Batches(tokens["train"], batch, seq, data_seed)
    held_out = data.eval_batches(tokens["val"], batch, seq, 1)[0]
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = models.build(model_name, layers=layers, width=width, seq=seq, vocab=tokens["vocab"])
    model.train()
    fn = variants.by_name(variant).make(model)
    backend = _backend(fn)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    for _ in range(max(1, steps)):
        ids = stream.next()
        fn(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    running = pv.running(backend).get("total")
    loss = lambda: model(held_out, labels=held_out).loss  # noqa: E731  (eager: the exact gradient)
    state = pv.measure(backend, model, loss, fit="state", draws=draws)
    fitted = pv.measure(backend, model, loss, fit="batch", draws=draws)
    per_site = sorted(r.relative for r in state)
    return VarianceRow(model_name, variant, steps, pv.total(state), pv.total(state, "identity"),
                       pv.total(fitted), running, per_site[len(per_site) // 2] if per_site else 0.0)


def table(rows: list[VarianceRow], markdown: bool = False) -> str:
    from tabulate import tabulate

    body = [[r.model, r.variant, r.steps, r.state, r.state_identity, r.batch, r.running,
             r.median_site_state] for r in rows]
    headers = ["model", "variant", "trained steps", "rel. var (state)", "identity", "rel. var (Q1 fit to batch)",
               "running estimate", "median site (state)"]
    return tabulate(body, headers=headers, tablefmt="github" if markdown else "simple", floatfmt=".3f")
