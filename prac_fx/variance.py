"""How noisy is the compressed weight gradient? A per-site diagnostic.

For a site with exact weight gradient ``G = dY^T X`` (m, n) and basis ``P = [Q1, sqrt(k) Q2]``
(Q2 Haar in the orthogonal complement of Q1, ``k = (n - r1) / r2``), the estimate the backward
computes is ``G^ = (dY^T (X P)) P^T = G P P^T``. It is unbiased, and

    E ||G^ - G||_F^2 = (k - 1) ||G (I - Q1 Q1^T)||_F^2                               (1)

(expand ``G P P^T - G = G_perp (k Q2 Q2^T - I)`` with ``G_perp = G (I - Q1 Q1^T)`` and use
``E[Q2 Q2^T] = (I - Q1 Q1^T) / k``). The figure reported is the relative variance
``E ||G^ - G||^2 / ||G||^2``: what matters is the *gradient's* energy outside Q1, and ``k``.

Three ways to get it, each a function here:

- ``sampled_variance``: the exact ``G`` and many independent draws of Q2 (the measurement);
- ``identity_variance``: (1) evaluated on the exact ``G`` (the check of the measurement);
- ``running_estimate``: what the backward can see at no cost. With ``A = dY^T (X P)`` (m, r),
  the product the factored gradient computes first, ``A1 = G Q1`` is exact and
  ``A2 = sqrt(k) G Q2`` has ``E ||A2||^2 = ||G_perp||^2``, so
  ``(k - 1) ||A2||^2 / (||A1||^2 + ||A2||^2)`` estimates the relative variance from one draw.

``measure(backend, model, loss_fn)`` applies the first two to every site a backend rewrote, on one
batch: with Q1 as the backend's state holds it (``fit="state"``: fitted to whichever batch the
last refresh saw, the condition training runs in; with ``subspace_iters`` the Q1 the graph would
build on this batch from the state's) or refitted to this very batch
(``fit="batch"``: the best a principal basis from activations can do).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from prac_fx.passes import codec
from prac_fx.passes.ops import follow_basis

FITS = ("state", "batch")


def complement_draw(q1: torch.Tensor | None, n: int, r2: int, generator: torch.Generator) -> torch.Tensor:
    """Q2 (n, r2), float64, Haar-distributed in the orthogonal complement of ``q1`` (n, r1)."""
    draw = torch.randn(n, r2, generator=generator, dtype=torch.float64)
    if q1 is not None and q1.shape[1]:
        q1 = q1.double()
        for _ in range(2):  # a second projection removes what rounding left in span(Q1)
            draw = draw - q1 @ (q1.t() @ draw)
    q2, _ = torch.linalg.qr(draw)
    return q2


def _k(n: int, r1: int, r2: int) -> float:
    return (n - r1) / r2


def identity_variance(grad: torch.Tensor, q1: torch.Tensor | None, r2: int) -> float:
    """(k - 1) ||G (I - Q1 Q1^T)||^2 for ``grad`` (m, n): equation (1)."""
    g = grad.double()
    n = g.shape[1]
    r1 = 0 if q1 is None else q1.shape[1]
    perp = g if q1 is None or not r1 else g - (g @ q1.double()) @ q1.double().t()
    return (_k(n, r1, r2) - 1.0) * perp.square().sum().item()


def sampled_variance(grad: torch.Tensor, q1: torch.Tensor | None, r2: int, draws: int,
                     generator: torch.Generator) -> float:
    """Mean of ||G P P^T - G||^2 over ``draws`` independent draws of Q2."""
    g = grad.double()
    n = g.shape[1]
    r1 = 0 if q1 is None else q1.shape[1]
    k = _k(n, r1, r2)
    total = 0.0
    for _ in range(draws):
        q2 = complement_draw(q1, n, r2, generator)
        parts = [q2 * math.sqrt(k)] if q1 is None or not r1 else [q1.double(), q2 * math.sqrt(k)]
        p = torch.cat(parts, dim=1)
        total += ((g @ p) @ p.t() - g).square().sum().item()
    return total / draws


def running_estimate(a1_sq: float, a2_sq: float, k: float, rounding: float = 0.0) -> float | None:
    """Relative variance from one draw: ``((k - 1) ||A2||^2 + q) / (||A1||^2 + ||A2||^2)``.

    ``q`` (``rounding``) is a quantized copy's expected rounding error carried to the weight
    gradient (``passes.codec.weight_grad``; 0 unquantized). For the identity and residual
    layouts ``||A2||^2`` is the estimate of the energy outside Q1 (all of it without Q1) and
    ``k = 1``: only the rounding is noise there. None where the gradient's energy estimate is
    not positive (no gradient yet, or an estimated rounding term above the whole squared
    gradient, as the ``s^2 / 6`` model can give at 2 bits): no estimate rather than a false 0."""
    denom = a1_sq + a2_sq
    return ((k - 1.0) * a2_sq + rounding) / denom if denom > 0 else None


def _k_of(g) -> float:
    """k of a store group: ``(n - r1) / r2``, 1 without a random part."""
    return (g.n - g.r1) / g.r2 if g.r2 else 1.0


def has_estimate(g) -> bool:
    """Whether a store group's stats give a variance estimate: a random part, or rounding (a
    principal part alone, or fp8's deterministic rounding, is biased and has none)."""
    return g.stats is not None and (g.r2 > 0 or bool((g.stats[:, 2] > 0).any()))


def principal_basis(x: torch.Tensor, r1: int) -> torch.Tensor:
    """Top-``r1`` right singular vectors of ``x`` (..., n), as the store's refresh computes them."""
    x2d = x.detach().reshape(-1, x.shape[-1]).double()
    _, vecs = torch.linalg.eigh(x2d.t() @ x2d)
    return vecs[:, -r1:].flip(-1) if r1 else vecs[:, :0]


@dataclasses.dataclass
class SiteVariance:
    """One rewritten site: its relative variance, measured and by the identity."""

    group: str
    module: str
    n: int
    r1: int
    r2: int
    grad_sq: float  # ||G||^2
    sampled: float  # E||G^ - G||^2 over the draws
    identity: float  # (k - 1) ||G_perp||^2

    @property
    def k(self) -> float:
        return _k(self.n, self.r1, self.r2) if self.r2 else 1.0

    @property
    def relative(self) -> float:
        return self.sampled / self.grad_sq if self.grad_sq else 0.0

    @property
    def relative_identity(self) -> float:
        return self.identity / self.grad_sq if self.grad_sq else 0.0

    @property
    def energy_outside(self) -> float:
        """||G_perp||^2 / ||G||^2: the share of the gradient Q1 does not hold."""
        return self.identity / (self.k - 1.0) / self.grad_sq if self.grad_sq and self.k > 1 else 0.0


def total(rows: list[SiteVariance], which: str = "sampled") -> float:
    """sum E||G^ - G||^2 / sum ||G||^2 over the sites."""
    denom = sum(r.grad_sq for r in rows)
    return sum(getattr(r, which) for r in rows) / denom if denom else 0.0


def _rewritten_groups(backend):
    """(group, [sites]) per group key of the backend's training graphs, first graph first."""
    seen, out = set(), []
    for record in backend.graphs:
        sites = {s.node: s for s in record.sites}
        for group in record.groups:
            if group.key in seen:
                continue
            seen.add(group.key)
            out.append((group, [sites[name] for name in group.sites]))
    return out


def measure(backend, model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], *,
            fit: str = "state", draws: int = 32, seed: int = 0) -> list[SiteVariance]:
    """The relative variance of every site ``backend`` rewrote, on the batch ``loss_fn`` runs.

    ``backend`` must have compiled ``model`` and run at least one training call (it knows the
    sites, groups and bases). ``loss_fn()`` runs the *uncompiled* ``model`` on the batch to
    measure and returns the loss: its exact gradient is the reference. The model's ``.grad``
    fields are left as they were. Sites whose weight also serves another site (a tied or reused
    weight) are left out: their ``.grad`` is not the site's own gradient.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    groups = _rewritten_groups(backend)
    if not groups:
        raise ValueError("the backend has rewritten no site yet: compile the model with it and "
                         "run a training step first")
    weights = [s.weight for _, sites in groups for s in sites]
    shared = {w for w in weights if weights.count(w) > 1}
    params = dict(model.named_parameters())

    inputs: dict[str, torch.Tensor] = {}
    handles = []
    following = {group.key for group, _ in groups
                 if group.key in backend.store.groups and backend.store.follows(group.key)}
    quantized = {group.key for group, _ in groups if group.fmt.quantized}
    out_grads: dict[str, torch.Tensor] = {}  # per quantized site's module: its output gradient
    modules = dict(model.named_modules())
    for group, sites in groups:
        if group.key not in quantized:
            continue
        for site in sites:
            module = modules.get(site.module)
            if module is None:
                raise ValueError(f"no module {site.module!r} in the model to read the output "
                                 f"gradient of site {site.node!r} from")

            def keep_grad(mod, args, out, path=site.module):
                if isinstance(out, torch.Tensor) and out.requires_grad and path not in out_grads:
                    out.register_hook(lambda g: out_grads.setdefault(path, g.detach()))

            handles.append(module.register_forward_hook(keep_grad))
    if fit == "batch" or following or quantized:
        for group, sites in groups:
            if fit == "state" and group.key not in following | quantized:
                continue
            module = modules.get(sites[0].module)
            if module is None:
                raise ValueError(f"no module {sites[0].module!r} in the model to read the input of "
                                 f"group {group.key!r} from")

            def keep(mod, args, key=group.key):
                inputs.setdefault(key, args[0].detach())

            handles.append(module.register_forward_pre_hook(keep))
    saved = {name: p.grad for name, p in params.items()}
    try:
        for p in params.values():
            p.grad = None
        loss_fn().backward()
        grads = {name: None if p.grad is None else p.grad.detach().clone()
                 for name, p in params.items()}
    finally:
        for h in handles:
            h.remove()
        for name, p in params.items():
            p.grad = saved[name]

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for group, sites in groups:
        if fit == "batch":
            q1 = principal_basis(inputs[group.key], group.r1)
        elif group.key in following:  # what the graph would build on this batch
            state = backend.store.groups[group.key]
            basis = state.basis.detach().cpu().float()
            omega = torch.zeros(group.n, group.r2) if state.omega is None else state.omega.cpu()
            p = follow_basis(inputs[group.key].cpu(), basis, omega, group.r1,
                             backend.config.subspace_iters, 1.0)
            q1 = p[:, :group.r1].double()
        else:
            state = backend.store.groups.get(group.key)
            q1 = None if state is None or state.q1 is None else state.q1
        for site in sites:
            grad = grads.get(site.weight)
            if site.weight in shared or grad is None:
                continue
            if group.fmt.quantized:
                g = grad if site.kind == "linear" else grad.t()  # (m, n)
                rows.append(_quantized_site(group, site, g, inputs[group.key],
                                            out_grads[site.module], q1, draws, generator))
                continue
            if site.r2 == 0:
                continue  # r2 = 0 (split=1.0): no random part, a biased estimate with no variance
            g = grad if site.kind == "linear" else grad.t()  # (m, n)
            rows.append(SiteVariance(
                group=group.key, module=site.module, n=site.n, r1=site.r1, r2=site.r2,
                grad_sq=g.double().square().sum().item(),
                sampled=sampled_variance(g, q1, site.r2, draws, generator),
                identity=identity_variance(g, q1, site.r2)))
    return rows


def _quantized_site(group, site, grad: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor,
                    q1: torch.Tensor | None, draws: int, generator: torch.Generator) -> SiteVariance:
    """A quantized copy's variance at one site, from the site's own input and output gradient:
    ``draws`` independent rounding draws (and, for a projection, draws of Q2 with them), each
    decoded into the weight gradient exactly as the backward does (``codec.weight_grad``). The
    "identity" figure is what the running estimate would say: the projection's (k - 1)
    ||G_perp||^2 plus the expected rounding term ``q`` of one encode."""
    fmt = group.fmt
    n, r1, r2 = group.n, group.r1, group.r2
    x2d = x.detach().reshape(-1, n).float().cpu()
    dy = grad_out.detach().reshape(x2d.shape[0], -1).float().cpu()
    q1 = None if q1 is None or not r1 else q1.float().cpu()[:, :r1]
    g = grad.double().cpu()
    sampled, rounding = 0.0, 0.0
    for _ in range(draws):
        parts = [] if q1 is None else [q1]
        if r2:
            k = _k(n, r1, r2)
            parts.append((complement_draw(q1, n, r2, generator) * math.sqrt(k)).float())
        basis = torch.cat(parts, dim=1) if parts else torch.zeros(n, 0)
        seeds = torch.randint(0, 2 ** 31, (2,), generator=generator, dtype=torch.int64)
        principal, codes, scales = codec.compress(x2d, basis, seeds, r1, fmt.spec, fmt.layout)
        estimate, stats = codec.weight_grad(dy, principal, codes, scales, basis, r1, fmt.spec,
                                            fmt.layout, True)
        sampled += (estimate.double() - g).square().sum().item()
        rounding += stats[2].item()
    projection = identity_variance(g, q1, r2) if r2 else 0.0
    return SiteVariance(group=group.key, module=site.module, n=n, r1=r1, r2=r2,
                        grad_sq=g.square().sum().item(), sampled=sampled / draws,
                        identity=projection + rounding / draws)


def table(rows: list[SiteVariance], title: str = "") -> str:
    from tabulate import tabulate

    body = [{"module": r.module, "group": r.group, "n": r.n, "r1": r.r1, "r2": r.r2,
             "k": round(r.k, 2), "outside Q1": round(r.energy_outside, 3),
             "rel. var (sampled)": round(r.relative, 3),
             "rel. var (identity)": round(r.relative_identity, 3)} for r in rows]
    head = (f"{title}total relative variance {total(rows):.3f} sampled, "
            f"{total(rows, 'identity'):.3f} by the identity, over {len(rows)} sites")
    return head + ("\n" + tabulate(body, headers="keys") if body else "")


def running(backend) -> dict[str, float]:
    """The backend's running estimate per site (``"group/index"``) and in total,
    ``sum ((k - 1) ||A2||^2 + q) / sum (||A1||^2 + ||A2||^2)`` over its sites (``"total"``): the
    gradient-energy-weighted relative variance. Empty before the first backward. A site whose
    energy estimate is not positive (``running_estimate`` gives None) has no entry, and then
    there is no ``"total"`` either: leaving its noise out would understate the sum."""
    backend.collect()
    out, num, den, whole = {}, 0.0, 0.0, True
    for key, g in backend.store.groups.items():
        if not has_estimate(g) or backend.config.complement_scale is not None:
            continue
        k = _k_of(g)
        for index, (a1_sq, a2_sq, rounding) in enumerate(g.stats.tolist()):
            value = running_estimate(a1_sq, a2_sq, k, rounding)
            if value is None:
                whole = whole and a1_sq + a2_sq == 0 and rounding == 0  # a site with no gradient
                continue
            out[f"{key}/{index}"] = value
            num += (k - 1.0) * a2_sq + rounding
            den += a1_sq + a2_sq
    if den > 0 and whole:
        out["total"] = num / den
    return out
