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

Unbiasedness (``bias_calls`` > 0, for variants whose draw is renewed every call, ``+T2=1``,
and the principal part alone, the biased control; other rows leave it blank):
per compressed weight, ``z = ||sum_t (G^_t - G)||^2 / sum_t ||G^_t - G||^2`` over
``bias_calls`` calls on the held-out batch at fixed weights (``bias_check``): about 1 for an
unbiased estimate, about ``bias_calls`` for one whose error is all bias.

What the optimizer sees (``window`` > 0): at the same fixed weights, the compiled variant and
the exact model each take the gradient on ``window`` consecutive training batches, the variant's
bases and draws moving from call to call as in training (the optimizer does not step). Over the
compressed weights:

- ``window``: ``||sum_t (G^_t - G_t)||^2 / ||sum_t G_t||^2``, the error of the gradient summed
  over a window of about Adam's horizon;
- ``per-step``: ``sum_t ||G^_t - G_t||^2 / sum_t ||G_t||^2`` over the same calls, the realised
  per-step relative error.

Errors independent from step to step shrink in the sum (the window figure falls below the
per-step one by up to the window's length); errors that persist, as a held draw's do, stay.
Over the same calls, ``AdamView``: what Adam, started from zero with the runs' betas, makes of
the estimated gradients against the exact ones (its second moment, and its update's error,
length along the exact update and cosine).

Along a schedule (``measure_along``, ``--schedule N``): the model is trained as the
convergence runs train it (cosine over ``N`` steps), and the window's errors and Adam's view
are measured at checkpoints of the run, next to the validation perplexity there, so that what
the optimizer sees can be read against where the run falls behind.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch

from bench import data, variants
from prac_fx.diff import models
from prac_fx import variance as pv
from prac_fx.passes import kinds


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
    window: float | None = None
    per_step: float | None = None
    window_steps: int = 0
    bias_z_median: float | None = None
    bias_z_max: float | None = None
    bias_calls: int = 0
    copy_bytes: float | None = None  # the saved copies' bytes over their inputs' own, all sites


def copy_fraction(backend) -> float | None:
    """The bytes of the compressed copies over the bytes of the inputs they stand for, summed
    over the rewritten sites (a copy shared by a group's sites counted once); None before any
    site was rewritten or with symbolic rows."""
    saved = full = 0
    seen = set()
    for g in backend.report().graphs:
        for s in g.sites:
            if s.status != kinds.REWRITTEN or (g.index, s.group) in seen:
                continue
            seen.add((g.index, s.group))
            if s.saved_bytes is None or not s.input_bytes:
                return None
            saved, full = saved + s.saved_bytes, full + s.input_bytes
    return saved / full if full else None


def _train(loss_at, opt, steps: int) -> None:
    """``steps`` optimizer steps on ``loss_at(step)``; 0: one call at the initial weights and no
    step (the backend learns its sites and fits its bases, the weights stay)."""
    for step in range(max(1, steps)):
        loss_at(step).backward()
        if steps:
            opt.step()
        opt.zero_grad(set_to_none=True)


def _measured(model_name: str, variant: str, steps: int, backend, model, loss, draws: int) -> VarianceRow:
    running = pv.running(backend).get("total")
    state = pv.measure(backend, model, loss, fit="state", draws=draws)
    fitted = pv.measure(backend, model, loss, fit="batch", draws=draws)
    per_site = sorted(r.relative for r in state)
    return VarianceRow(model_name, variant, steps, pv.total(state), pv.total(state, "identity"),
                       pv.total(fitted), running, per_site[len(per_site) // 2] if per_site else 0.0,
                       copy_bytes=copy_fraction(backend))


def measure_pretrained(variant: str, *, steps: int, draws: int, batch: int = 16, seq: int = 64,
                       seed: int = 0, data_seed: int = 1, lr: float = 1e-4) -> VarianceRow:
    """The same measurement on real activations: the pretrained MiniLM-L6 of ``bench finetune``
    (its encoder pretrained, the new two-way head seeded by ``seed``) on movie-review batches.
    ``steps`` fine-tuning steps (AdamW at ``lr``, constant) first; 0: one call at the
    pretrained weights, no step. Dropout is off, so that the exact gradient the estimate is
    measured against is the one the compiled call would take on the same batch."""
    from bench import finetune

    train_pairs, test_pairs = data.movie_reviews()
    torch._dynamo.reset()
    model, tokenizer = finetune.load_model(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    ids, mask, labels = finetune._encode(tokenizer, train_pairs, seq)
    held = finetune._encode(tokenizer, test_pairs[:batch], seq)
    fn = variants.by_name(variant).make(model)
    backend = _backend(fn)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(data_seed))

    def call(step: int) -> torch.Tensor:
        idx = order[(step * batch) % (len(ids) - batch):][:batch]
        return fn(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss

    _train(call, opt, steps)
    loss = lambda: model(input_ids=held[0], attention_mask=held[1], labels=held[2]).loss  # noqa: E731
    return _measured("minilm", variant, steps, backend, model, loss, draws)


def _backend(fn):
    backend = getattr(fn, "prac_backend", None)
    if backend is None:
        raise ValueError("not a PRAC variant: nothing to measure")
    return backend


def _gradient_pairs(fn, model: torch.nn.Module, backend, batches: list[torch.Tensor]):
    """Yield ``(hat, exact)`` per batch: the compressed weights' gradients (float64, by
    parameter name) from the compiled variant ``fn`` and from ``model``, its exact, uncompiled
    self, at the model's current weights. Weights that serve several sites are left out (their
    ``.grad`` is not one site's). Leaves every ``.grad`` as it found it."""
    weights = [s.weight for _, sites in pv._rewritten_groups(backend) for s in sites]
    names = sorted({w for w in weights if weights.count(w) == 1})
    params = dict(model.named_parameters())
    saved = {name: p.grad for name, p in params.items()}

    def grads(run) -> dict[str, torch.Tensor]:
        for p in params.values():
            p.grad = None
        run().backward()
        return {n: params[n].grad.detach().double().clone() for n in names
                if params[n].grad is not None}

    try:
        for ids in batches:
            hat = grads(lambda: fn(ids, labels=ids).loss)
            exact = grads(lambda: model(ids, labels=ids).loss)
            keep = exact.keys() & hat.keys()
            yield {n: hat[n] for n in keep}, {n: exact[n] for n in keep}
    finally:
        for name, p in params.items():
            p.grad = saved[name]


def window_terms(fn, model: torch.nn.Module, backend,
                 batches: list[torch.Tensor]) -> dict[str, tuple[float, float, float, float]]:
    """Per compressed weight, ``(||sum_t (G^_t - G_t)||^2, ||sum_t G_t||^2, sum_t ||G^_t -
    G_t||^2, sum_t ||G_t||^2)`` over ``batches`` at the model's current weights; ``fn`` is the
    compiled variant (its bases and draws moving from call to call as in training), ``model``
    its exact, uncompiled self (see ``_gradient_pairs``)."""
    return _window_and_adam(fn, model, backend, batches, adam=False)[0]


@dataclasses.dataclass
class AdamView:
    """What Adam makes of the same calls' gradients, exact against estimated, both started from
    a zero state with the convergence runs' betas, over the compressed weights: ``v_ratio`` the
    second moment's sum (bias-corrected) under the estimate over the exact one (the inflation
    that shrinks Adam's steps); for the update ``u = m / (sqrt(v) + eps)`` after the last call,
    ``update_error = ||u^ - u||^2 / ||u||^2``, ``along = <u^, u> / ||u||^2`` (the estimated
    update's length along the exact one: below 1, Adam moves less far in the right direction)
    and ``cosine``."""
    v_ratio: float
    update_error: float
    along: float
    cosine: float


def _window_and_adam(fn, model, backend, batches, betas=(0.9, 0.95), eps=1e-8, adam=True):
    sum_hat, sum_exact, err_sq, norm_sq = {}, {}, {}, {}
    state = {}  # name -> [m^, v^, m, v]
    for hat, exact in _gradient_pairs(fn, model, backend, batches):
        for n in exact:
            sum_hat[n] = sum_hat.get(n, 0) + hat[n]
            sum_exact[n] = sum_exact.get(n, 0) + exact[n]
            err_sq[n] = err_sq.get(n, 0.0) + (hat[n] - exact[n]).square().sum().item()
            norm_sq[n] = norm_sq.get(n, 0.0) + exact[n].square().sum().item()
            if not adam:
                continue
            s = state.setdefault(n, [torch.zeros_like(exact[n]) for _ in range(4)])
            for m, v, g in ((s[0], s[1], hat[n]), (s[2], s[3], exact[n])):
                m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
                v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    terms = {n: ((sum_hat[n] - sum_exact[n]).square().sum().item(),
                 sum_exact[n].square().sum().item(), err_sq[n], norm_sq[n]) for n in sorted(sum_exact)}
    if not state:
        return terms, None
    t = len(batches)
    c1, c2 = 1 - betas[0] ** t, 1 - betas[1] ** t
    v_hat = v_exact = err = dot = uu_hat = uu = 0.0
    for m_h, v_h, m_e, v_e in state.values():
        u_h = (m_h / c1) / ((v_h / c2).sqrt() + eps)
        u_e = (m_e / c1) / ((v_e / c2).sqrt() + eps)
        v_hat += (v_h / c2).sum().item()
        v_exact += (v_e / c2).sum().item()
        err += (u_h - u_e).square().sum().item()
        dot += (u_h * u_e).sum().item()
        uu_hat += u_h.square().sum().item()
        uu += u_e.square().sum().item()
    view = AdamView(v_hat / v_exact if v_exact else 0.0, err / uu if uu else 0.0,
                    dot / uu if uu else 0.0, dot / (uu_hat * uu) ** 0.5 if uu and uu_hat else 0.0)
    return terms, view


def _window_ratios(terms: dict[str, tuple[float, float, float, float]]) -> tuple[float, float]:
    """(window, per-step) relative error over the compressed weights from ``window_terms``."""
    t = list(terms.values())
    ratio = lambda num, den: num / den if den else 0.0  # noqa: E731
    return (ratio(sum(x[0] for x in t), sum(x[1] for x in t)),
            ratio(sum(x[2] for x in t), sum(x[3] for x in t)))


def window_error(fn, model: torch.nn.Module, backend, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(window, per-step) relative error of the compressed weights' gradients over ``batches``
    at the model's current weights (see the module docstring and ``window_terms``)."""
    return _window_ratios(window_terms(fn, model, backend, batches))


def bias_check(fn, model: torch.nn.Module, backend, batch: torch.Tensor,
               calls: int) -> dict[str, float]:
    """Per compressed weight, ``z = calls * ||mean G^ - G||^2 / mean ||G^ - G||^2`` over
    ``calls`` calls on one ``batch`` at fixed weights, for a variant whose draw is renewed every
    call. Unbiased and independent draws give E[z] = 1 whatever ``calls`` is; a bias (say a
    group whose basis or draw another group shifts) makes z grow in proportion to ``calls``."""
    out = {}
    for name, (win, _, step, _) in window_terms(fn, model, backend, [batch] * calls).items():
        out[name] = win / step if step else 0.0  # = calls ||mean - G||^2 / mean ||G^ - G||^2
    return out


def measure_variant(model_name: str, variant: str, *, steps: int, draws: int, layers: int = 4,
                    width: int = 256, seq: int = 256, batch: int = 8, vocab: int = 2048,
                    seed: int = 0, data_seed: int = 1, lr: float = 1e-3,
                    window: int = 0, bias_calls: int = 0) -> VarianceRow:
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

    def call(_step: int) -> torch.Tensor:
        ids = stream.next()
        return fn(ids, labels=ids).loss

    _train(call, opt, steps)
    loss = lambda: model(held_out, labels=held_out).loss  # noqa: E731  (eager: the exact gradient)
    row = _measured(model_name, variant, steps, backend, model, loss, draws)
    if window > 0:  # the next training batches, at the weights training left
        row.window, row.per_step = window_error(fn, model, backend,
                                                [stream.next() for _ in range(window)])
        row.window_steps = window
    # the check needs draws renewed every call (T2 = 1), or none at all (the principal part
    # alone, the biased control); a held draw repeats its error on a repeated batch
    checkable = backend.config.resample_period == 1 or backend.config.split == 1.0
    if bias_calls > 0 and checkable:  # the held-out batch, seen bias_calls times
        z = sorted(bias_check(fn, model, backend, held_out, bias_calls).values())
        row.bias_z_median, row.bias_z_max = z[len(z) // 2], z[-1]
        row.bias_calls = bias_calls
    return row


@dataclasses.dataclass
class AlongRow:
    """One checkpoint of ``measure_along``."""
    model: str
    variant: str
    seed: int
    step: int
    schedule: int
    lr: float
    val_ppl: float
    per_step: float | None = None
    window: float | None = None
    v_ratio: float | None = None
    update_error: float | None = None
    along: float | None = None
    cosine: float | None = None


def measure_along(model_name: str, variant: str, *, schedule: int, at: list[int], window: int,
                  seed: int = 0, eval_batches: int = 4) -> list[AlongRow]:
    """Train ``variant`` as the convergence runs do (``bench.convergence.TrainConfig`` with
    ``steps=schedule``: the same weights, batches, warm-up, cosine decay, clipping and AdamW),
    and at each step in ``at`` measure, at the weights the run has reached, the per-step and
    window errors and what Adam makes of them (``AdamView``) over ``window`` calls, next to the
    validation perplexity (``eval_batches`` held-out batches) at that step.

    The window's batches come from a stream of their own, and the backend's state (bases, draws,
    call counters, generator) is saved before the window and restored after it, so the run
    itself goes on as it would have without the measurements. A variant without a PRAC backend
    (``inductor``) gives the perplexity alone."""
    from bench import convergence, training

    if not at or max(at) > schedule or min(at) < 1:
        raise ValueError(f"checkpoints {at} must lie in 1..{schedule}")
    cfg = convergence.TrainConfig(model=model_name, variant=variant, steps=schedule, seed=seed)
    torch._dynamo.reset()
    model, fn, opt, stream, val = convergence.setup(cfg, eval_batches=eval_batches)
    probes = data.Batches(stream.tokens, cfg.batch, cfg.seq, cfg.data_seed + 1000)
    backend = getattr(fn, "prac_backend", None)
    rows: list[AlongRow] = []

    def checkpoint(done: int, _bar) -> None:
        if done not in at:
            return
        lr = convergence.lr_at(done - 1, cfg)
        ppl = math.exp(convergence._evaluate(fn, val))
        row = AlongRow(model_name, variant, seed, done, schedule, lr, ppl)
        if backend is not None and window > 0:
            saved = copy.deepcopy(backend.state_dict())
            terms, view = _window_and_adam(fn, model, backend, [probes.next() for _ in range(window)])
            backend.load_state_dict(saved)
            row.window, row.per_step = _window_ratios(terms)
            row.v_ratio, row.update_error = view.v_ratio, view.update_error
            row.along, row.cosine = view.along, view.cosine
        rows.append(row)

    training.train_loop(model, opt, {"train_loss": [], "step_s": []}, steps=max(at),
                        lr_at=convergence.schedule(cfg),
                        batch_at=lambda step: stream.next(),
                        loss_of=lambda ids: fn(ids, labels=ids).loss, clip=cfg.clip,
                        desc=f"{model_name}/{variant}", progress=True, after_step=checkpoint)
    return rows


def along_table(rows: list[AlongRow], markdown: bool = False) -> str:
    from tabulate import tabulate

    base = {(r.model, r.seed, r.step): r.val_ppl for r in rows if r.variant == "inductor"}
    f = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
    body = []
    for r in rows:
        ref = base.get((r.model, r.seed, r.step))
        gap = None if ref is None else f"{100 * (r.val_ppl / ref - 1):+.2f}%"
        body.append([r.model, r.variant, r.step, f"{r.lr:.2e}", f"{r.val_ppl:.2f}", gap]
                    + [f(x) for x in (r.per_step, r.window, r.v_ratio, r.update_error, r.along,
                                      r.cosine)])
    headers = ["model", "variant", "step", "lr", "val ppl", "gap to inductor", "per-step error",
               "window error", "Adam v ratio", "update error", "update along exact", "update cosine"]
    return tabulate(body, headers=headers, tablefmt="github" if markdown else "simple",
                    disable_numparse=True)


def table(rows: list[VarianceRow], markdown: bool = False) -> str:
    from tabulate import tabulate

    body = [[r.model, r.variant, r.steps, r.state, r.state_identity, r.batch, r.running,
             r.median_site_state] for r in rows]
    headers = ["model", "variant", "trained steps", "rel. var (state)", "identity", "rel. var (Q1 fit to batch)",
               "running estimate", "median site (state)"]
    if any(r.copy_bytes is not None for r in rows):
        for line, r in zip(body, rows):
            line.insert(2, None if r.copy_bytes is None else round(r.copy_bytes, 3))
        headers.insert(2, "copy bytes / input")
    if any(r.window_steps for r in rows):
        for line, r in zip(body, rows):
            line += [r.per_step, r.window]
        steps = max(r.window_steps for r in rows)
        headers += [f"per-step error ({steps} calls)", f"window error ({steps} calls)"]
    if any(r.bias_calls for r in rows):
        for line, r in zip(body, rows):
            line += [r.bias_z_median, r.bias_z_max]
        calls = max(r.bias_calls for r in rows)
        headers += [f"bias z, median site ({calls} calls)", "bias z, largest"]
    return tabulate(body, headers=headers, tablefmt="github" if markdown else "simple", floatfmt=".4g")
