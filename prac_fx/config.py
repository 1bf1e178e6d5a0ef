"""Configuration of the PRAC backend."""
from __future__ import annotations

import dataclasses
import functools
import numbers
import os
from typing import Callable, Mapping

from prac_fx.passes import codec


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


HEADS = ("lm_head", "output", "head", "score", "classifier")


class _Default:
    """The value of ``rank``, ``bits`` and ``group_size`` left unset: resolved together when the
    config is made (``PracConfig.__post_init__``), so that a rank given alone means PRAC's float
    projection and none given means the default copy."""

    def __repr__(self) -> str:
        return "DEFAULT"

    def __reduce__(self):
        return "DEFAULT"


DEFAULT = _Default()
# The saved copy with nothing set: the input itself (rank 1.0) in these integers with stochastic
# rounding. Of the points measured within the noise of exact training (docs/convergence.md,
# "Quantized copies"), the one with the lowest step peak and the fastest step: on the bench
# models the partitioner recomputes every linear input's copy in the backward from what the
# nonlinear ops keep, so int4 and int2 keep no fewer bytes (docs/benchmarks.md)
DEFAULT_BITS = 8
DEFAULT_GROUP_SIZE = None  # one scale per row

ENV_PREFIX = "PRAC_FX_"
# PracConfig fields settable from the environment (site_filter, a callable, is not; its
# environment form is PRAC_FX_EXCLUDE, comma-separated substrings of module paths to keep exact)
_ENV_FIELDS = ("rank", "split", "refresh_every", "early_refits", "resample_every", "seed",
               "complement_scale", "exact_heads", "subspace_iters", "complement", "exact_if_kept",
               "strict", "bits", "group_size", "scale_dtype", "residual")
_FLAGS = {"1": True, "true": True, "0": False, "false": False}


def _env_strict() -> bool:
    """``strict``'s default: ``PRAC_FX_STRICT`` (``1``/``true``), unset False. Read whenever a
    config is made, so that one variable makes every backend of a process strict (the test
    suite sets it)."""
    text = os.environ.get(ENV_PREFIX + "STRICT", "0").strip().lower()
    if text not in _FLAGS:
        raise ValueError(f"{ENV_PREFIX}STRICT must be 1, true, 0 or false, got {text!r}")
    return _FLAGS[text]
COMPLEMENTS = ("held", "cycle")  # how the random part moves between redraws


def parse_number(text: str, what: str) -> int | float:
    """``text`` as an int where it is one, else as a float (a rank or split as a user types it);
    ValueError naming ``what`` otherwise."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"invalid {what} {text!r}: give an int or a float") from None


def _check_rank(rank, split) -> None:
    if not _is_number(rank):
        raise ValueError(f"rank must be an int >= 1 or a float in (0, 1], got {rank!r}")
    if isinstance(rank, numbers.Integral):
        if rank < 1:
            raise ValueError(f"rank must be an int >= 1 or a float in (0, 1], got {rank!r}")
    elif not 0.0 < rank <= 1.0:
        raise ValueError(
            f"rank as a float is a fraction of the input width and must lie in (0, 1], "
            f"got {rank!r}; pass an int for a column count"
        )
    if _is_number(split) and isinstance(split, numbers.Integral):
        if not isinstance(rank, numbers.Integral):
            raise ValueError(
                f"an integer split (r1 = {split}) needs an integer rank, got rank={rank!r}; "
                "use a float split in [0, 1] with a fractional rank"
            )
        if split > rank:
            raise ValueError(f"split (r1 = {split}) must not exceed rank ({rank})")


def parse_rank(text: str, what: str = "rank") -> int | float | dict[str, int | float]:
    """A rank as a user types it: ``0.25``, ``32``, or per site ``*=0.25,attn=0.125`` (module
    path substrings, as ``PracConfig.rank`` takes them as a mapping)."""
    if "=" not in text:
        return parse_number(text, what)
    ranks = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what}: per-site ranks are written KEY=RANK, comma-separated "
                             f"(KEY a module path substring or *), got {part!r}")
        ranks[key.strip()] = parse_number(value.strip(), what)
    return ranks


def parse_bits(text: str, what: str = "bits") -> int | str | None | dict[str, int | str | None]:
    """``bits`` as a user types it: ``8``, ``4``, ``2``, ``fp8``, ``none``, or per site
    ``*=8,attn=4`` (module path substrings, as ``rank`` takes them)."""
    def one(value: str):
        value = value.strip().lower()
        if value in ("none", ""):
            return None
        if value == codec.FP8:
            return codec.FP8
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"invalid {what} {value!r}: give 8, 4, 2, fp8 or none") from None
    if "=" not in text:
        return one(text)
    out = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what}: per-site bits are written KEY=BITS, comma-separated "
                             f"(KEY a module path substring or *), got {part!r}")
        out[key.strip()] = one(value)
    return out


def _by_path(mapping: Mapping, module_path: str):
    """The entry of the longest key ``module_path`` contains, else ``"*"``'s (None without)."""
    keys = [k for k in mapping if k != "*" and k in module_path]
    if keys:
        return mapping[max(keys, key=len)]
    return mapping.get("*")


def exclude_filter(parts: tuple[str, ...]) -> Callable[[str], bool]:
    def keep(path: str) -> bool:
        return not any(part in path for part in parts)

    keep.__qualname__ = f"exclude{parts!r}"
    return keep


@dataclasses.dataclass(frozen=True)
class PracConfig:
    """How the backend compresses the inputs of linear layers.

    Args:
        rank: columns of the basis P per input group. An ``int`` >= 1 is a column count; a
            ``float`` in (0, 1] is a fraction of the input width n (rounded, at least 1).
            ``1.0`` keeps every direction: no basis, the copy is the input itself (exact
            gradients with ``bits=None``, for testing). Unset, with ``bits`` unset too: the
            default copy, ``rank=1.0, bits=8`` (the input in 8-bit integers with stochastic
            rounding, one bf16 scale per row: a quarter of a float32 input's bytes, inside the
            noise of exact training over two seeds of both bench models, docs/convergence.md).
            A rank given alone keeps the copy in the input's dtype
            (PRAC's projection, as in arXiv 2602.23111). A site whose width
            is below an integer rank is left exact and reported as "too narrow for the rank".
            A mapping gives ranks per site: ``{"*": 0.25, "attn": 0.125, "mlp.up_proj": 0.375}``.
            Keys are substrings of the module path; the longest key the path contains wins,
            and ``"*"`` is the rank of sites no other key names. Without ``"*"`` such sites
            stay exact (reported as filtered). Sites that share one input (q, k and v) share
            one basis, which takes the largest rank among them.
        split: how the rank divides into the principal part r1 and the random part r2. A
            ``float`` in [0, 1] is the principal fraction (``0.5``: r1 = r2, the paper's
            default; ``0.0``: random only; ``1.0``: principal only, which is biased); an
            ``int`` is r1 itself and then needs an integer ``rank`` it does not exceed.
        refresh_every: T1, training calls between refits of the principal basis Q1 to the
            current activation (paper: 500 for pre-training, 200 for fine-tuning).
        early_refits: extra refits of Q1 in the first window, at calls ``refresh_every / 2**j``
            for j = ``early_refits``, ..., 1 (500 and 4: calls 31, 62, 125 and 250). The first fit
            sees the activations of the initial weights, which the first steps change most; a
            principal basis kept from it makes the first window's estimate about as noisy as
            the random part alone. 0: refits only every ``refresh_every`` calls. A refit
            redraws the random part too, unless ``resample_every`` holds the draw longer.
        resample_every: T2, training calls between fresh draws of the random complement Q2.
            None (the default): only at each refresh, i.e. every ``refresh_every`` calls. A
            random part held for a whole refresh window trained better under Adam than one
            redrawn every 50 calls or every call (README, "Convergence"): Adam normalises each
            coordinate, so a fixed subspace gives consistent updates, while per-step redraws
            mostly inflate its second-moment estimate. Longer than ``refresh_every``: the raw
            Gaussian draw is kept for the window, and each refit of Q1 within it projects the
            same draw against the new Q1 (Haar in the new complement again), so the random
            subspace moves only as far as Q1 does.
        seed: seeds the generator of every random draw, which runs outside the graph.
        site_filter: ``(module_path) -> bool``; only sites for which it returns True are
            compressed, e.g. ``lambda fqn: "blocks.0." not in fqn``. None: every site (but the
            output heads, see ``exact_heads``).
        exact_heads: names of output-head modules whose sites stay exact, matched against the
            last component of the module path (``lm_head`` matches ``model.lm_head``). The
            default names the heads of common model families (Hugging Face causal LMs, decoder
            and encoder classifiers; ``output`` and ``head`` elsewhere). Compressing the output
            projection lets its weight-gradient noise reach every vocabulary row, and, with tied
            weights, the input embedding; on tiny GPT-2 at rank n/4 (T2 = 50) compressing it
            took the perplexity gap to Inductor from 8.2% to 11.7% (README, "Convergence").
            ``()`` compresses heads too.
        subspace_iters: principal bases that follow each call's input. With ``s > 0`` every
            training call refines Q1 inside the compiled graph by ``s`` subspace iterations
            ``Q1 <- orth(x^T (x Q1))`` on the activation it compresses, warm-started from the
            previous call's Q1, and rebuilds the random part against it from a Gaussian draw
            held for ``resample_every`` calls; the weight gradient stays unbiased (the draw is
            independent of the data). 0 (the default): Q1 is refitted only every
            ``refresh_every`` calls.
        complement: how the random part Q2 moves between its redraws (every ``resample_every``
            calls). ``"held"`` (the default) keeps one Haar draw for the whole window.
            ``"cycle"`` draws one random orthonormal basis of Q1's complement per window and
            uses a different block of r2 of its columns at each training call, in turn. Each
            block is Haar in the complement, so every step stays unbiased with the same
            per-step variance; and k consecutive blocks cover the complement exactly once
            (their P P^T sum to k I), so the errors of consecutive steps cancel instead of
            adding up in the optimizer's moving averages. It keeps that basis on the host,
            n (n - r1) floats per group, and needs ``subspace_iters=0``.
        complement_scale: the factor k on the random part (P = [Q1, sqrt(k) Q2]). None uses
            the unbiased, minimum-variance k = (n - r1) / r2 (PRAC, arXiv 2602.23111); other
            values exist for ablations and make the weight gradient biased.
        head_loss: whether an output head that feeds a cross-entropy loss and the loss become
            one exact op that computes the loss chunk by chunk over rows and keeps no logits
            for backward (``passes/head_loss.py``; it saves the head input, the labels and a
            per-row log-sum-exp; see ``head_loss_grad_in_forward`` for its gradients). Loss and
            gradients stay exact. False leaves the head and loss as they are. It takes the
            head whatever ``exact_heads`` says: the loss's input gradient needs the exact
            logits, which a compressed copy of the head input cannot give, so the op saves
            the head input itself (still far less than the logits).
        head_loss_chunk_rows: rows per chunk of that op. None chooses them from the sizes, so
            that rows x vocabulary per chunk stays within 2**22 elements (16 MiB in float32) and
            a chunk's logits are no larger than the head input, but at least 128 rows (each
            chunk re-reads the head weight) (``passes.chunked_ce.chunk_rows_for``).
        head_loss_grad_in_forward: whether that op computes the head's gradients in the forward,
            chunk by chunk (the loss is the graph's last op, so its gradient with respect to the
            logits is known there up to the scalar the backward brings): three head matmuls in
            all, as Inductor's graph runs, keeping the input gradient and a float32 weight
            gradient (vocab x width) until the backward. False recomputes each chunk's logits in
            the backward instead (a fourth matmul; keeps the head input). None (the default)
            decides per graph: in the forward for a float32 or frozen head weight, and for a
            16-bit one unless its held float32 gradient would exceed half of the float32 logits
            plain Inductor keeps (``2 width > rows``) (``passes.chunked_ce.grad_in_forward_pays``). Logits the model returns beside the
            loss keep an exact gradient path either way.
        memory_budget: None, or a fraction in [0, 1] of what the *uncompressed* graph would keep
            for backward. The backend measures that and the rewritten graph's default, and hands
            the min-cut partitioner the ``activation_memory_budget`` that keeps this many bytes,
            for that graph's compile only (``prac_fx/budget.py``). Where compression alone keeps
            no more, nothing is recomputed. The report shows the budget asked for and the bytes
            kept.
        exact_if_kept: leave exact the input groups whose compressed copy the partitioned graph
            would not save: their input is kept for another op's backward anyway (the attention
            output under ``o_proj`` / GPT-2's ``attn.c_proj``, which attention's backward needs),
            or, under a memory budget, recomputed from what is. Compressing them saves no memory
            and only adds weight-gradient noise. The backend finds them by partitioning the
            rewritten graph once (tracing only, under the budget the compile will use) and
            rewrites the graph again without them; the report gives their reason
            (``kinds.KEPT_ANYWAY``). Costs one more trace of each training graph at compile time.
        bits: how the saved copy is stored (``passes/codec.py``). Unset: ``8`` when ``rank``
            is unset too (the default copy), else None. None: in the input's dtype, as PRAC's
            projection alone. ``8``, ``4`` or ``2``: integers with
            stochastic rounding (unbiased), 4 and 2 bits packed into bytes; ``"fp8"``:
            float8_e4m3fn with round-to-nearest (biased, as GPU float8 training stores it). What
            gets quantized follows from ``rank`` and ``residual``: with a rank covering the whole
            width (``rank=1.0``) the input itself (no basis, no refit); below it, PRAC's
            projection ``x P``; with ``residual=True``, the residual beside a principal part. A
            mapping gives bits per site, keyed as ``rank``'s (``{"*": 8, "down_proj": 4}``);
            a site no key names keeps None. Sites sharing an input share one format.
        group_size: columns per scale of a quantized copy: None (the default, one scale per
            row) or 32, 64, 128. A width the group does not divide is padded with zeros (the
            padding is stored; ``saved_bytes`` counts it).
        scale_dtype: the scales' dtype, ``"bfloat16"`` (the default; rounded up, so no value
            leaves the range) or ``"float32"``. Their bytes count in the copy's.
        residual: with ``bits``, save a principal part ``x Q1`` of ``rank`` columns (Q1 refitted
            as PRAC's, every ``refresh_every`` calls; kept in 16 bits) and the quantized residual
            ``x - (x Q1) Q1^T`` in place of PRAC's random part; ``split`` is not used. The weight
            gradient ``(dY^T (x Q1)) Q1^T + dY^T decode(q(R))`` stays unbiased, and the principal
            part takes the few directions that carry the outliers, so the residual quantizes
            with a smaller scale.
        strict: raise ``prac_fx.FallbackError`` where a training graph would fall back to plain
            Inductor (the passes fail on it, or its rewritten form fails to compile), naming the
            cause, instead of warning once and training uncompressed. The default is the
            ``PRAC_FX_STRICT`` environment variable (``1``/``true``), read when the config is
            made; unset, False.
    """

    rank: int | float | Mapping[str, int | float] = DEFAULT
    split: int | float = 0.5
    refresh_every: int = 500
    early_refits: int = 0
    resample_every: int | None = None
    seed: int = 0
    site_filter: Callable[[str], bool] | None = None
    complement_scale: float | None = None
    exact_heads: tuple[str, ...] = HEADS
    subspace_iters: int = 0
    head_loss: bool = True
    head_loss_chunk_rows: int | None = None
    head_loss_grad_in_forward: bool | None = None
    memory_budget: float | None = None
    complement: str = "held"
    exact_if_kept: bool = False
    bits: int | str | None | Mapping[str, int | str | None] = DEFAULT
    group_size: int | None = DEFAULT
    scale_dtype: str = "bfloat16"
    residual: bool = False
    strict: bool = dataclasses.field(default_factory=_env_strict)

    def __post_init__(self):
        self._resolve_defaults()
        rank, split = self.rank, self.split
        if isinstance(rank, Mapping):
            if not rank or not all(isinstance(k, str) and k for k in rank):
                raise ValueError(f"rank as a mapping needs at least one entry, each keyed by a "
                                 f"non-empty substring of a module path (or '*'), got {rank!r}")
            rank = dict(rank)
            object.__setattr__(self, "rank", rank)
            values = list(rank.values())
        else:
            values = [rank]
        for value in values:
            _check_rank(value, split)
        if not _is_number(split):
            raise ValueError(f"split must be an int >= 0 or a float in [0, 1], got {split!r}")
        if isinstance(split, numbers.Integral):
            if split < 0:
                raise ValueError(f"split as an int is r1 and must be >= 0, got {split!r}")
        elif not 0.0 <= split <= 1.0:
            raise ValueError(f"split as a float is the principal fraction, in [0, 1]; got {split!r}")
        for name in ("refresh_every", "resample_every"):
            value = getattr(self, name)
            if value is None and name == "resample_every":
                continue
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                none = " or None" if name == "resample_every" else ""
                raise ValueError(f"{name} must be an int >= 1 (training calls){none}, got {value!r}")
        early = self.early_refits
        if not isinstance(early, numbers.Integral) or isinstance(early, bool) or not 0 <= early <= 16:
            raise ValueError(f"early_refits must be an int in [0, 16] (refits in the first window), "
                             f"got {early!r}")
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.site_filter is not None and not callable(self.site_filter):
            raise ValueError(f"site_filter must be callable (module_path) -> bool or None, got {self.site_filter!r}")
        heads = self.exact_heads
        if isinstance(heads, str) or not isinstance(heads, (tuple, list, frozenset, set)) or not all(
                isinstance(h, str) and h and "." not in h for h in heads):
            raise ValueError(f"exact_heads must be a tuple of module names without dots (the last "
                             f"component of a module path), got {heads!r}")
        object.__setattr__(self, "exact_heads", tuple(heads))
        if not isinstance(self.subspace_iters, numbers.Integral) or isinstance(self.subspace_iters, bool) \
                or not 0 <= self.subspace_iters <= 8:
            raise ValueError(f"subspace_iters must be an int in [0, 8] (subspace iterations per "
                             f"training call), got {self.subspace_iters!r}")
        bits = self.bits
        if isinstance(bits, Mapping):
            if not bits or not all(isinstance(k, str) and k for k in bits):
                raise ValueError(f"bits as a mapping needs at least one entry, each keyed by a "
                                 f"non-empty substring of a module path (or '*'), got {bits!r}")
            object.__setattr__(self, "bits", dict(bits))
            bit_values = list(bits.values())
        else:
            bit_values = [bits]
        for value in bit_values:
            codec.check(value, self.group_size, self.scale_dtype)
        if not bit_values:
            codec.check(None, self.group_size, self.scale_dtype)
        if self.residual is True and all(v is None for v in bit_values):
            raise ValueError("residual=True saves a quantized residual beside the principal part "
                             f"and needs bits (one of {codec.BITS}), got bits={self.bits!r}")
        for name in ("head_loss", "exact_if_kept", "strict", "residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        budget = self.memory_budget
        if budget is not None and (not _is_number(budget) or not 0.0 <= budget <= 1.0):
            raise ValueError(f"memory_budget must be None or a fraction in [0, 1] of what the "
                             f"uncompressed graph keeps for backward, got {budget!r}")
        if self.head_loss_grad_in_forward not in (None, True, False):
            raise ValueError(f"head_loss_grad_in_forward must be True, False or None (decide per "
                             f"graph), got {self.head_loss_grad_in_forward!r}")
        chunk = self.head_loss_chunk_rows
        if chunk is not None and (not isinstance(chunk, numbers.Integral) or isinstance(chunk, bool)
                                  or chunk < 1):
            raise ValueError(f"head_loss_chunk_rows must be an int >= 1 (rows per chunk) or None, "
                             f"got {chunk!r}")
        if self.complement not in COMPLEMENTS:
            raise ValueError(f"complement must be one of {COMPLEMENTS}, got {self.complement!r}")
        if self.complement == "cycle" and self.subspace_iters:
            raise ValueError("complement='cycle' walks through one fixed basis of Q1's complement, "
                             "which a principal basis that follows each call (subspace_iters="
                             f"{self.subspace_iters}) would move every call; use one or the other")
        if self.complement_scale is not None and (
            not _is_number(self.complement_scale) or self.complement_scale <= 0
        ):
            raise ValueError(f"complement_scale must be a positive number or None, got {self.complement_scale!r}")

    def _resolve_defaults(self) -> None:
        """Unset ``rank``, ``bits`` and ``group_size`` (``DEFAULT``): with neither ``rank`` nor
        ``bits`` given, the default copy (rank 1.0, ``DEFAULT_BITS``, ``DEFAULT_GROUP_SIZE``);
        a rank given alone keeps the input's dtype (PRAC's projection as in the papers); bits
        given without a rank quantize the input itself; a group size unset beside given bits is
        one scale per row."""
        if self.residual is True and self.rank is DEFAULT:
            raise ValueError("residual=True saves a principal part of `rank` columns beside the "
                             "quantized residual and needs that rank (e.g. rank=0.0625, bits=4)")
        default_copy = self.rank is DEFAULT and self.bits is DEFAULT
        if self.bits is DEFAULT:
            object.__setattr__(self, "bits", DEFAULT_BITS if default_copy else None)
        if self.group_size is DEFAULT:
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE if default_copy else None)
        if self.rank is DEFAULT:
            object.__setattr__(self, "rank", 1.0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "PracConfig":
        """The configuration the ``PRAC_FX_*`` environment variables give, for tools that take
        only a backend name (``backend="prac"``, a trainer's ``torch_compile_backend``).

        ``PRAC_FX_RANK`` (an int or a float, as in Python, or per site ``*=0.25,attn=0.125``),
        ``PRAC_FX_SPLIT`` (an int or a float),
        ``PRAC_FX_REFRESH_EVERY``, ``PRAC_FX_EARLY_REFITS``, ``PRAC_FX_RESAMPLE_EVERY`` (an int
        or ``none``),
        ``PRAC_FX_SEED``, ``PRAC_FX_COMPLEMENT_SCALE`` (a number or ``none``),
        ``PRAC_FX_SUBSPACE_ITERS``, ``PRAC_FX_COMPLEMENT`` (``held`` or ``cycle``),
        ``PRAC_FX_BITS`` (``8``, ``4``, ``2``, ``fp8``, ``none``, or per site ``*=8,attn=4``),
        ``PRAC_FX_GROUP_SIZE`` (32, 64, 128, or ``row``/``none``), ``PRAC_FX_SCALE_DTYPE``
        (``bfloat16`` or ``float32``),
        ``PRAC_FX_EXACT_IF_KEPT``, ``PRAC_FX_RESIDUAL`` and ``PRAC_FX_STRICT`` (``1``/``true`` or
        ``0``/``false``),
        ``PRAC_FX_EXACT_HEADS`` (comma-separated module names; empty compresses heads too) and
        ``PRAC_FX_EXCLUDE`` (comma-separated substrings of module paths left exact). Unset ones
        keep their defaults. Values are checked like ``PracConfig(...)`` arguments; an unknown
        ``PRAC_FX_*`` name is an error, so a typo never passes silently.
        """
        environ = os.environ if environ is None else environ
        names = {ENV_PREFIX + f.upper(): f for f in _ENV_FIELDS}
        allowed = sorted([*names, ENV_PREFIX + "EXCLUDE"])
        kwargs: dict = {}
        for key, text in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            if key == ENV_PREFIX + "EXCLUDE":
                parts = tuple(p.strip() for p in text.split(",") if p.strip())
                if parts:
                    kwargs["site_filter"] = exclude_filter(parts)
                continue
            field = names.get(key)
            if field is None:
                raise ValueError(f"unknown environment variable {key}; prac_fx reads {allowed}")
            text = text.strip()
            if field in ("complement", "scale_dtype"):
                kwargs[field] = text
            elif field == "bits":
                kwargs[field] = parse_bits(text, key)
            elif field == "group_size":
                kwargs[field] = None if text.lower() in ("none", "row", "") else parse_number(text, key)
            elif field in ("exact_if_kept", "strict", "residual"):
                flag = _FLAGS.get(text.lower())
                if flag is None:
                    raise ValueError(f"{key} must be 1, true, 0 or false, got {text!r}")
                kwargs[field] = flag
            elif field == "exact_heads":
                kwargs[field] = tuple(p.strip() for p in text.split(",") if p.strip())
            elif field == "rank":
                kwargs[field] = parse_rank(text, key)
            elif field in ("resample_every", "complement_scale") and text.lower() == "none":
                kwargs[field] = None
            else:
                kwargs[field] = parse_number(text, key)
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"from the {ENV_PREFIX}* environment: {err}") from None

    # -- the SitePolicy the passes read ---------------------------------------------------------
    def rank_for(self, module_path: str) -> int | float | None:
        """The rank of the site at ``module_path``: ``rank`` itself, or from a mapping the entry
        of the longest key the path contains, else its ``"*"`` entry; None when neither."""
        if not isinstance(self.rank, Mapping):
            return self.rank
        return _by_path(self.rank, module_path)

    def bits_for(self, module_path: str) -> int | str | None:
        """The ``bits`` of the site at ``module_path`` (a mapping read as ``rank_for`` reads one)."""
        return _by_path(self.bits, module_path) if isinstance(self.bits, Mapping) else self.bits

    def _covers(self, n: int, module_path: str) -> bool:
        rank = self.rank_for(module_path)
        if isinstance(rank, numbers.Integral):
            return rank >= n
        return rank is not None and min(n, max(1, round(rank * n))) >= n

    def format_for(self, n: int, module_path: str = "") -> codec.Format:
        """The saved copy's format and layout at ``module_path`` for an input of width ``n``:
        unquantized projection without ``bits``; with them, the input itself where the rank
        covers the width, a principal part plus a quantized residual under ``residual``, else
        the quantized projection."""
        bits = self.bits_for(module_path)
        if bits is None:
            return codec.Format()
        if self._covers(n, module_path):
            layout = codec.IDENTITY
        else:
            layout = codec.RESIDUAL if self.residual else codec.PROJECT
        return codec.Format(bits, self.group_size, self.scale_dtype, layout)

    def ranks(self, n: int, module_path: str = "") -> tuple[int, int] | None:
        """(r1, r2) for an input of width ``n`` at ``module_path``; None when ``n`` is below an
        integer rank or the rank mapping names no rank for the path."""
        rank = self.rank_for(module_path)
        if rank is None:
            return None
        if isinstance(rank, numbers.Integral):
            if rank > n:
                return None
            r = int(rank)
        else:
            r = min(n, max(1, round(rank * n)))
        layout = self.format_for(n, module_path).layout
        if layout == codec.IDENTITY:
            return 0, 0  # no basis: the quantized copy is of x itself
        if layout == codec.RESIDUAL:
            return r, 0  # the rank is the principal part's; the residual replaces Q2
        r1 = int(self.split) if isinstance(self.split, numbers.Integral) else round(self.split * r)
        return r1, r - r1

    @functools.cached_property  # read per group at every training call
    def early_refit_calls(self) -> frozenset[int]:
        """The training calls of the first window at which Q1 is refitted early."""
        return frozenset(c for j in range(1, self.early_refits + 1)
                         if 0 < (c := self.refresh_every // 2 ** j) < self.refresh_every)

    @property
    def resample_period(self) -> int:
        """T2 in training calls: ``resample_every``, or ``refresh_every`` when that is None."""
        return self.refresh_every if self.resample_every is None else int(self.resample_every)

    def include(self, module_path: str) -> bool:
        return True if self.site_filter is None else bool(self.site_filter(module_path))

    def is_head(self, module_path: str) -> bool:
        return module_path.rsplit(".", 1)[-1] in self.exact_heads
