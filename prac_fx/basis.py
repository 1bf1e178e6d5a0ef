"""The basis store: one basis P = [Q1, sqrt(k) Q2] per input group, shared by every graph that
reads that group (recompiles for new shapes find the same bases under the same key).

- Q1 (n, r1): the top-r1 eigenvectors of the Gram matrix x^T x of the group's activation, i.e.
  the top right singular vectors of x, refitted every ``refresh_every`` training calls.
- Q2 (n, r2): a Gaussian draw projected onto the orthogonal complement of Q1 and orthonormalised
  by QR with sign correction, hence Haar-distributed in the complement:
  E[Q2 Q2^T] = r2 / (n - r1) (I - Q1 Q1^T). Redrawn at every refresh, and every
  ``resample_every`` calls where that is set. With ``complement="cycle"`` the draw is instead a
  whole Haar basis C (n, n - r1) of the complement, and the training calls of the window take
  its columns r2 at a time in turn (wrapping around): each block is itself a Haar r2-frame of the
  complement, and k consecutive blocks cover it exactly once.
- k = (n - r1) / r2 makes E[P P^T] = I, so x P P^T is an unbiased reconstruction of x with the
  least variance among such schemes (PRAC, arXiv 2602.23111).

Every update builds new tensors and rebinds them: a basis handed to a forward is never written
to, so its backward sees the same basis. Random draws come from the store's own seeded CPU
generator, outside any compiled graph.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import weakref

import torch

from prac_fx.config import PracConfig
from prac_fx.passes.graph_state import BasisSpec

log = logging.getLogger("prac_fx")


@dataclasses.dataclass
class GroupBasis:
    """One group's basis. P (``basis``, float32, on ``device``) is what is kept between steps: Q1
    is its first r1 columns and Q2 its other columns divided by sqrt(k), so ``q1`` and ``q2``
    are CPU copies made on demand (a refresh, a redraw, a checkpoint), not resident tensors.
    That halves the persistent bytes at the same rank (n r floats instead of 2 n r). On an
    accelerator Q1 alone is also kept on the host (n r1 floats), so that a redraw projects on
    the CPU without reading the device."""

    spec: BasisSpec
    device: torch.device
    basis: torch.Tensor | None = None  # (n, r1 + r2) float32, on ``device``
    calls: int = 0
    refreshes: int = 0
    resamples: int = 0
    omega: torch.Tensor | None = None  # (n, r2) float32 on ``device``: a following group's draw
    # (sites, 3) float32 on ``device``: moving averages of each site's [||A1||^2, ||A2||^2, q]
    stats: torch.Tensor | None = None
    # complement="cycle": (n, n - r1) float32 on the CPU, the window's Haar basis of Q1's
    # complement, and the block of it P holds now (block b: columns b r2 ... b r2 + r2 - 1, mod n - r1)
    cycle: torch.Tensor | None = None
    block: int = 0
    # (n, r2) float32 on the CPU: the window's raw Gaussian draw, kept where the random part is
    # redrawn less often than Q1 is refitted (T2 > T1): each refit projects it again
    draw: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.spec.n

    @property
    def r1(self) -> int:
        return self.spec.r1

    @property
    def r2(self) -> int:
        return self.spec.r2

    scale: float = 1.0  # k: P = [Q1, sqrt(k) Q2]
    _q1_new: torch.Tensor | None = dataclasses.field(default=None, repr=False)  # refit, not yet in P
    _q1_host: torch.Tensor | None = dataclasses.field(default=None, repr=False)  # off-CPU devices

    @property
    def has_q1(self) -> bool:
        """Whether a principal basis has been fitted (or drawn) yet."""
        return self.r1 > 0 and (self._q1_new is not None or self.basis is not None)

    @property
    def q1(self) -> torch.Tensor | None:
        """(n, r1) float32 on the CPU, or None before the first refresh."""
        if self._q1_new is not None:
            return self._q1_new
        if not self.has_q1:
            return None
        if self._q1_host is not None:
            return self._q1_host
        return self.basis[:, :self.r1].to("cpu", torch.float32).contiguous()

    @q1.setter
    def q1(self, value: torch.Tensor | None) -> None:
        self._q1_new = value

    @property
    def q2(self) -> torch.Tensor | None:
        """(n, r2) float32 on the CPU, or None: P's random columns without their scale."""
        if self.basis is None or self.r2 == 0:
            return None
        return (self.basis[:, self.r1:].to("cpu", torch.float64) / math.sqrt(self.scale)).float()

    @property
    def persistent_bytes(self) -> int:
        total = 0
        for t in (self.basis, self._q1_host, self.omega, self.cycle, self.draw):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def keep_q1_on_host(self) -> None:
        """Off the CPU, keep a host copy of Q1 (read before P moves or is replaced)."""
        q1 = self._q1_new if self._q1_new is not None else (
            self.basis[:, :self.r1].to("cpu", torch.float32).contiguous()
            if self.basis is not None and self.r1 > 0 and self.basis.device.type == "cpu" else self._q1_host)
        self._q1_host = q1 if torch.device(self.device).type != "cpu" else None


STATE_VERSION = 2  # 2: keys name modules as the model does, whatever Dynamo called its root
RANK_STRIDE = 1_000_003  # seed of process rank r: config.seed + RANK_STRIDE * r


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_seed(seed: int) -> int:
    """``seed`` in a single process; ``seed + RANK_STRIDE * rank`` under torch.distributed, so
    that data-parallel ranks draw independent bases and their averaged gradient errors shrink."""
    if _distributed():
        import torch.distributed as dist

        return seed + RANK_STRIDE * dist.get_rank()
    return seed


class BasisStore:
    def __init__(self, config: PracConfig):
        self.config = config
        self.groups: dict[str, GroupBasis] = {}
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(config.seed)
        self.seed = config.seed  # the generator's seed (per rank, fixed at the first register)
        self._seeded = False  # True once the rank is known or a state was loaded
        self._warned: set[str] = set()
        self._owners: dict[str, weakref.ref] = {}  # key -> the parameter whose basis it holds
        # key -> the key a state saved before paths were root-independent holds it under
        self._legacy: dict[str, str] = {}

    def claim(self, key: str, owner: torch.Tensor | None) -> str:
        """The key under which the group of ``owner`` (the real weight of its first site) keeps its
        basis: ``key`` for the first live weight to claim it, ``key@1``, ``key@2``, ... for other
        weights that arrive under the same name.

        Keys name modules relative to the compiled frame, so the blocks of a model compiled one
        by one (``block.compile(...)``, as under FSDP2) all give ``up``, ``down``, ...: without
        this each layer would read and refit the others' bases. Claims are made in call order,
        hence the same on every rank and in every run. ``owner=None`` (unknown) keeps ``key``.
        """
        if owner is None:
            return key
        index = 0
        while True:
            name = key if index == 0 else f"{key}@{index}"
            ref = self._owners.get(name)
            held = None if ref is None else ref()
            if held is None or held is owner:  # free, freed (a deleted model), or its own
                self._owners[name] = weakref.ref(owner)
                return name
            index += 1

    def register(self, key: str, spec: BasisSpec, device) -> GroupBasis:
        self._ensure_seeded()  # the first compile: the process group, if any, exists by now
        device = torch.device(device)
        group = self.groups.get(key)
        if group is None and self._legacy.get(key) in self.groups:
            group = self.groups[key] = self.groups.pop(self._legacy.pop(key))
        if group is None:
            group = self.groups[key] = GroupBasis(spec, device)
        elif group.spec != spec:
            raise ValueError(
                f"group {key!r} was registered with (n, r1, r2) = {(group.n, group.r1, group.r2)} "
                f"and is now seen with {(spec.n, spec.r1, spec.r2)}"
            )
        elif group.device != device:  # loaded from a checkpoint before the graph was compiled
            group.device = device
            group.keep_q1_on_host()
            if group.basis is not None:
                group.basis = group.basis.to(device).contiguous()
            if group.omega is not None:
                group.omega = group.omega.to(device).contiguous()
        return group

    def _ensure_seeded(self) -> None:
        if not self._seeded:
            self._seeded = True
            seed = rank_seed(self.config.seed)
            if seed != self.seed:
                self.seed = seed
                self.generator.manual_seed(seed)
                log.info("prac_fx: distributed rank seed %d", seed)

    # -- when -----------------------------------------------------------------------------------
    def due_refresh(self, key: str) -> bool:
        g = self.groups[key]
        return g.r1 > 0 and (not g.has_q1 or g.calls % self.config.refresh_every == 0
                             or g.calls in self.config.early_refit_calls)

    def due_resample(self, key: str) -> bool:
        g = self.groups[key]
        return g.basis is None or (g.r2 > 0 and g.calls % self.config.resample_period == 0)

    def cycles(self, key: str) -> bool:
        """Whether the group's random part moves to the next block of its complement basis at
        every training call (``complement="cycle"``)."""
        return self.groups[key].cycle is not None

    # -- what -----------------------------------------------------------------------------------
    def refresh(self, key: str, gram: torch.Tensor | None) -> None:
        """Refit Q1 to a Gram matrix (n, n); a non-finite or failed one keeps the old Q1."""
        g = self.groups[key]
        q1 = None
        if g.r1 == 0:  # random part only: nothing to fit
            gram = None
        if gram is not None:
            gram = gram.detach().to("cpu", torch.float64)
            if torch.isfinite(gram).all():
                try:
                    _, vecs = torch.linalg.eigh(gram)
                    q1 = vecs[:, -g.r1:].flip(-1).float().contiguous()  # descending
                except RuntimeError as err:  # eigh failed to converge
                    self._warn_once(key, f"basis refresh of {key!r} failed ({err}); keeping the previous basis")
            else:
                self._warn_once(key, f"activation of {key!r} has NaN/Inf at a refresh; keeping the previous basis")
        if q1 is None and not g.has_q1 and g.r1:
            # No usable activation yet: any orthonormal Q1 keeps P unbiased; draw one.
            q1 = self._orthonormal(torch.randn(g.n, g.r1, generator=self.generator, dtype=torch.float64))
        if q1 is not None:
            g.q1 = q1
            g.refreshes += 1
        # a refit within the random part's window keeps its draw, projected against the new Q1
        self.resample(key, redraw=g.draw is None or self.due_resample(key))

    def follows(self, key: str) -> bool:
        """Whether the group's principal basis follows each call's input in the graph."""
        return self.config.subspace_iters > 0 and self.groups[key].r1 > 0

    def follow(self, key: str, basis: torch.Tensor) -> None:
        """Keep the basis a following group's graph built for this call: the next call's warm
        start. Rebinds (the tensor the graph returned is new), never copies in place. Q1 is
        now P's first columns: a pending refit or a host copy of an older Q1 no longer holds."""
        g = self.groups[key]
        g.basis = basis.detach()
        g.q1 = None
        g._q1_host = None

    def keeps_draw(self, key: str) -> bool:
        """Whether the group holds its raw draw between redraws: its random part outlives a
        refit of Q1 (``resample_every`` > ``refresh_every``, the draw held and not cycled)."""
        config = self.config
        return (config.resample_period > config.refresh_every and config.complement == "held"
                and not self.follows(key) and self.groups[key].r1 > 0)

    def resample(self, key: str, redraw: bool = True) -> None:
        """Rebuild P from the current Q1 and a random part: a new Gaussian draw, or with
        ``redraw=False`` the held one (``keeps_draw``) projected against Q1 again. The held
        draw is isotropic and drawn before the refits it meets, so each rebuilt Q2 is again
        Haar in the complement of the new Q1, and the random subspace moves only as far as Q1
        does."""
        g = self.groups[key]
        q1_now = g.q1  # (n, r1) on the CPU: the refit one, else P's own first columns
        parts = [] if q1_now is None else [q1_now]
        if g.r2 > 0:
            q1 = None if q1_now is None else q1_now.double()
            if redraw or g.draw is None:
                draw = torch.randn(g.n, g.r2, generator=self.generator, dtype=torch.float64)
                g.draw = draw.float() if self.keeps_draw(key) else None
            else:
                draw = g.draw.double()
            cycle = self.config.complement == "cycle"
            if cycle:  # a whole basis of the complement, n - r1 columns (drawn after the (n, r2)
                # draw above, which it replaces: the generator's sequence is the one the
                # measured runs used)
                draw = torch.randn(g.n, g.n - g.r1, generator=self.generator, dtype=torch.float64)
            if self.follows(key):
                # the raw Gaussian draw: the graph projects it against each call's own Q1, and
                # only an isotropic draw gives a Haar complement whatever that Q1 is
                g.omega = draw.float().to(g.device).contiguous()
            for _ in range(2):  # project twice: one pass leaves O(eps * cond) leakage into Q1
                if q1 is not None:
                    draw = draw - q1 @ (q1.t() @ draw)
            q2 = self._orthonormal(draw)
            if cycle:
                g.cycle, g.block = q2.contiguous(), 0
                q2 = self._block(g)
            scale = self.config.complement_scale
            k = (g.n - g.r1) / g.r2 if scale is None else float(scale)
            g.scale = k
            parts.append((math.sqrt(k) * q2).float())
        g.q1 = q1_now
        g.keep_q1_on_host()
        g.q1 = None  # now P's first r1 columns (and the host copy, off the CPU)
        # no part at all: a quantized copy of x itself (codec.IDENTITY) keeps an (n, 0) basis
        basis = torch.cat(parts, dim=1) if parts else torch.zeros(g.n, 0)
        g.basis = basis.to(g.device).contiguous()
        g.resamples += int(redraw)

    @staticmethod
    def _block(g: GroupBasis) -> torch.Tensor:
        """(n, r2) float32 on the CPU: block ``g.block`` of the group's complement basis."""
        width = g.cycle.shape[1]  # n - r1
        columns = (g.block * g.r2 + torch.arange(g.r2)) % width
        return g.cycle[:, columns]

    def next_block(self, key: str) -> None:
        """Move a cycling group's random part to the next block of its complement basis. P is
        rebuilt as a new tensor (the previous one may still be saved for a backward)."""
        g = self.groups[key]
        g.block += 1
        q2 = self._block(g).to(g.basis.device)
        g.basis = torch.cat([g.basis[:, :g.r1], math.sqrt(g.scale) * q2], dim=1).contiguous()

    @staticmethod
    def _orthonormal(a: torch.Tensor) -> torch.Tensor:
        q, r = torch.linalg.qr(a)
        signs = torch.sign(torch.diagonal(r))
        signs[signs == 0] = 1
        return (q * signs).float()  # sign fix makes Q Haar-distributed

    # -- the running variance estimate -------------------------------------------------------
    STATS_DECAY = 0.9  # moving average over about ten training calls

    def observe(self, key: str, rows: torch.Tensor) -> None:
        """One backward's ``[||A1||^2, ||A2||^2, q]`` (sites, 3) of a group's sites
        (``passes.ops``), folded into the moving averages on the device: no host sync."""
        g = self.groups.get(key)
        if g is None:
            return
        rows = torch.nan_to_num(rows.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
        if g.stats is None or g.stats.shape != rows.shape:
            g.stats = rows.clone()
        else:
            g.stats.mul_(self.STATS_DECAY).add_(rows, alpha=1.0 - self.STATS_DECAY)

    def running_variance(self, key: str, site: int) -> float | None:
        """The site's relative weight-gradient variance ``E||G^ - G||^2 / ||G||^2`` as the
        moving averages estimate it, ``(k - 1) ||A2||^2 / (||A1||^2 + ||A2||^2)``
        (``prac_fx.variance``); None before its first backward, or with a ``complement_scale``
        other than the unbiased one (the identity does not hold there)."""
        from prac_fx.variance import _k_of, has_estimate, running_estimate

        g = self.groups.get(key)
        if g is None or not has_estimate(g) or site >= g.stats.shape[0] \
                or self.config.complement_scale is not None:
            return None
        a1_sq, a2_sq, rounding = g.stats[site].tolist()
        return running_estimate(a1_sq, a2_sq, _k_of(g), rounding)

    def basis(self, key: str) -> torch.Tensor:
        return self.groups[key].basis

    def persistent_bytes(self) -> int:
        """Bytes the store keeps between steps (the bases P; Q1 and Q2 are not kept apart)."""
        return sum(g.persistent_bytes for g in self.groups.values())

    def advance(self, key: str) -> None:
        self.groups[key].calls += 1

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # -- checkpointing --------------------------------------------------------------------------
    def _legacy_key(self, saved: str) -> str:
        """The key to load a version-1 group under. Version 1 spelled a model entered through a
        wrapper (Dynamo's ``L['args'][0]``, transformers 5.24) with a leading ``0.``: its key is
        adopted under the root-independent name, now if that group is registered, else when a
        graph first registers it. Any other key is loaded as it is (version 1 and 2 agree)."""
        head, _, rest = saved.partition(".")
        if not (head.isdigit() and rest):
            return saved
        if rest in self.groups:
            return rest
        self._legacy[rest] = saved
        return saved

    def state_dict(self) -> dict:
        self._ensure_seeded()
        return {
            "version": STATE_VERSION,
            "generator": self.generator.get_state(),
            "seed": self.seed,
            "groups": {
                key: {
                    "n": g.n, "r1": g.r1, "r2": g.r2, "calls": g.calls,
                    "refreshes": g.refreshes, "resamples": g.resamples,
                    "q1": g.q1, "q2": g.q2,
                    "basis": None if g.basis is None else g.basis.cpu(),
                    "omega": None if g.omega is None else g.omega.cpu(),
                    "cycle": g.cycle, "block": g.block, "draw": g.draw,
                }
                for key, g in self.groups.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        saved_seed = state.get("seed")
        mine = rank_seed(self.config.seed) if not self._seeded else self.seed
        if saved_seed is not None and saved_seed != mine and _distributed():
            log.warning("prac_fx: loading a basis state saved with seed %d into a process whose "
                        "rank seed is %d: ranks that load the same state share their bases "
                        "(still unbiased, but their errors no longer average out); save and "
                        "load one state per rank", saved_seed, mine)
        self.generator.set_state(state["generator"])
        self._seeded = True  # the loaded generator state wins over any rank seed
        if saved_seed is not None:
            self.seed = saved_seed
        version = state.get("version", 1)
        if version > STATE_VERSION:
            raise ValueError(f"this PRAC state has version {version}; this prac_fx reads states up "
                             f"to version {STATE_VERSION}: upgrade prac_fx to load it")
        for saved_key, s in state["groups"].items():
            key = saved_key
            if version < 2:
                key = self._legacy_key(saved_key)
            g = self.groups.get(key)
            device = g.device if g is not None else torch.device("cpu")
            g = self.groups[key] = GroupBasis(BasisSpec(s["n"], s["r1"], s["r2"]), device)
            g.calls, g.refreshes, g.resamples = s["calls"], s["refreshes"], s["resamples"]
            scale = self.config.complement_scale
            g.scale = ((g.n - g.r1) / g.r2 if g.r2 else 1.0) if scale is None else float(scale)
            basis = s["basis"]
            g.basis = None if basis is None else basis.contiguous()  # on the CPU first: Q1 from it
            g.keep_q1_on_host()
            g.basis = None if basis is None else basis.to(device).contiguous()
            if g.basis is None and s.get("q1") is not None:
                g.q1 = s["q1"]  # fitted, never drawn: the next resample builds P from it
            omega = s.get("omega")
            g.omega = None if omega is None else omega.to(device).contiguous()
            g.draw = s.get("draw") if self.keeps_draw(key) else None
            cycling = self.config.complement == "cycle"
            g.cycle, g.block = (s.get("cycle"), s.get("block", 0)) if cycling else (None, 0)
            if cycling and g.cycle is None and g.basis is not None and g.r2:
                # saved by a run that held its draw: keep Q1, and let the next call draw a cycle
                g.q1 = g.basis[:, :g.r1].to("cpu", torch.float32).contiguous() if g.r1 else None
                g.basis = None
