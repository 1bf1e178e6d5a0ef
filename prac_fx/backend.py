"""The torch.compile backend: rewrite each Dynamo graph with the PRAC passes, compile it with
Inductor, and return a runner that feeds it the bases.

``torch.compile(model, backend=prac_fx.backend())`` gives the model its own backend and
basis store (the default copy: each linear input in 8-bit integers; ``rank=0.25`` for PRAC's
projection); ``backend="prac"`` uses one process-wide backend with the default configuration.

Graphs compiled with grad disabled (``torch.no_grad()``, inference) go to Inductor unchanged:
inference is exact and does no extra work. A graph the passes fail on, or whose rewritten form
fails to compile, falls back to plain Inductor instead of stopping training: the first fallback
of a backend logs a warning that names the cause and the torch release, ``report()`` counts
them, and ``strict=True`` (``PRAC_FX_STRICT=1``) raises ``FallbackError`` instead. An
activation checkpoint that Dynamo breaks out of the graph (a side effect in its forward) counts
the same way: the backend sees it at its next call and in ``report()``, where it names the
remedy, ``allow_checkpoint_side_effects()``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from typing import Callable, Mapping, Sequence

import torch
import torch.fx

from prac_fx import budget as budget_mod
from prac_fx import passes
from prac_fx.basis import BasisStore
from prac_fx.config import DEFAULT, PracConfig
from prac_fx.passes import kinds, torch_seam
from prac_fx.passes import probe as probe_graph
from prac_fx.passes.graph_state import GraphState
from prac_fx.passes.sites import match
from prac_fx.report import GraphRecord, Report, placement
from prac_fx.runner import PracRunner

log = logging.getLogger("prac_fx")


class FallbackError(RuntimeError):
    """A graph would have fallen back to plain Inductor (nothing compressed) under
    ``strict=True``; the message names the cause, the cause is chained."""


def inductor_patches(mode: str | None = None, options: dict | None = None) -> dict:
    """The Inductor configuration ``torch.compile(mode=..., options=...)`` would apply, checked
    the way ``torch.compile`` checks it: a mode Inductor knows, option names it has (``-`` or
    ``_``), values of the declared type. Raises ValueError otherwise."""
    if mode is not None and options is not None:
        raise ValueError("give mode= or options=, not both (as torch.compile requires)")
    patches: dict = {}
    if mode not in (None, "default"):
        try:
            patches.update(torch_seam.inductor_mode_options(mode))
        except RuntimeError as err:
            raise ValueError(f"unknown compile mode {mode!r}: {err}") from None
    if options is not None:
        if not isinstance(options, dict):
            raise ValueError(f"options must be a dict of Inductor settings, got {options!r}")
        current = torch_seam.inductor_settings()
        for key, value in options.items():
            name = str(key).replace("-", "_")
            if name not in current:
                raise ValueError(f"unknown Inductor option {key!r} (see torch._inductor.list_options())")
            declared = type(current[name])
            if current[name] is not None and not isinstance(value, declared) and not (
                    declared is float and isinstance(value, int) and not isinstance(value, bool)):
                raise ValueError(f"Inductor option {key!r} takes a {declared.__name__}, "
                                 f"got {type(value).__name__}")
            patches[name] = value
    return patches


@dataclasses.dataclass
class _Plan:
    """A rewritten graph ready to compile: nothing outside it has changed yet."""

    work: torch.fx.GraphModule  # the rewritten copy of the Dynamo graph
    state: GraphState  # sites, groups and pass results
    devices: list[torch.device]  # per group: the device of its input (and basis)
    examples: list  # the example values of the inputs the rewrite appended (bases, draws, stats)


class _KeptExact:
    """``config`` as the passes' policy, with the site nodes named in ``kept_anyway`` left exact
    (``SitePolicy.kept_anyway``)."""

    def __init__(self, config: PracConfig, kept_anyway: frozenset[str]):
        self._config = config
        self.kept_anyway = kept_anyway

    def __getattr__(self, name):
        return getattr(self._config, name)


class PracBackend:
    """A torch.compile backend with its own configuration and basis store.

    Attributes:
        config: the ``PracConfig``.
        store: the ``BasisStore`` (bases, call counters, random generator).
        graphs: one ``GraphRecord`` per graph compiled, in order.
    """

    def __init__(self, config: PracConfig | None = None, *, compiler: str = "inductor",
                 rewrite: bool = True):
        if compiler not in ("inductor", "eager"):
            raise ValueError(f"compiler must be 'inductor' or 'eager', got {compiler!r}")
        self.config = config or PracConfig()
        self.compiler = compiler
        self.rewrite = rewrite  # False: compile unchanged but record (a baseline to compare with)
        self.store = BasisStore(self.config)
        self.graphs: list[GraphRecord] = []
        self._narrow: set[str] = set()  # modules already reported too narrow for the rank
        self._runners: list[weakref.ref] = []  # the runners handed to Dynamo (for collect())
        self._warned_fallback = False  # a fallback warns once per backend, then logs at INFO
        self._breaks_before = torch_seam.graph_breaks()  # Dynamo's, counted process-wide
        self._checkpoint_breaks_seen = 0  # of those since, the checkpoint breaks warned of

    def _graph_breaks(self):
        """Dynamo's graph breaks since this backend was made (reason -> count)."""
        breaks = torch_seam.graph_breaks()
        breaks.subtract(self._breaks_before)
        return +breaks

    def _check_checkpoint_breaks(self) -> None:
        """Warn (once per backend), or under ``strict`` raise ``FallbackError``, when Dynamo has
        broken an activation checkpoint out of the graph since the last look: the checkpointed
        layers then ran uncompiled, and nothing is compressed in them. Dynamo counts the break
        before it compiles the graph that ends there, so the next backend call sees it; with
        nothing compiled around the checkpoint, ``report()`` does."""
        count = self._graph_breaks().get(kinds.CHECKPOINT_BREAK, 0)
        if count <= self._checkpoint_breaks_seen:
            return
        first = self._checkpoint_breaks_seen == 0
        self._checkpoint_breaks_seen = count
        message = (f"prac_fx: Dynamo broke the graph {count} time(s) at a {kinds.CHECKPOINT_BREAK}: "
                   f"{kinds.CHECKPOINT_UNCOMPILED}; remedy: {kinds.CHECKPOINT_REMEDY}")
        if self.config.strict:
            raise FallbackError(message)
        if first:
            log.warning("%s. Training goes on exactly; report() counts the breaks.", message)
        else:
            log.info("%s", message)

    def _fall_back(self, record: GraphRecord, cause: str, err: BaseException) -> None:
        """Record that ``record``'s graph compiles unchanged because of ``cause``; under
        ``strict`` raise ``FallbackError`` instead (chained to ``err``)."""
        record.note = f"fallback: {cause}"
        record.fallback = cause
        message = (f"prac_fx: graph {record.index} fell back to plain Inductor, nothing "
                   f"compressed in it: {cause}; torch {torch.__version__}")
        if self.config.strict:
            raise FallbackError(message) from err
        if self._warned_fallback:
            log.info("%s", message)
            return
        self._warned_fallback = True
        log.warning("%s. Training goes on exactly, as under plain Inductor. Releases tested: "
                    "torch %s (README, 'Compatibility'); strict=True or PRAC_FX_STRICT=1 raises "
                    "at the failure with its traceback. Later fallbacks of this backend are "
                    "logged at INFO; report() counts them.", message,
                    ", ".join(torch_seam.CHECKED_ON))

    # -- the backend protocol -------------------------------------------------------------------
    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence, *,
                 mode: str | None = None, options: dict | None = None) -> Callable:
        """Plan (run the passes on a copy: no side effects), compile (with the fallback to the
        unchanged graph), bind (claim store keys and register the bases, only once the
        rewritten graph compiled) and return the runner.

        Dynamo passes ``mode=``/``options=`` when ``torch.compile`` was given them: they apply to
        Inductor as they would to ``backend="inductor"``. Dynamo's own control-flow exceptions
        (a restart of its analysis) pass through, and the abandoned attempt leaves no record."""
        patches = inductor_patches(mode, options)
        self._check_checkpoint_breaks()
        if patches and self.compiler != "inductor":
            raise ValueError(f"mode={mode!r} / options={options!r} configure Inductor; this "
                             f"backend runs compiler={self.compiler!r}, which has no such settings")
        record = GraphRecord(index=len(self.graphs), training=torch.is_grad_enabled())
        self.graphs.append(record)
        try:
            return self._build(gm, example_inputs, record, patches)
        except Exception as err:
            if torch_seam.is_dynamo_control_flow(err):  # Dynamo will call again
                self.graphs.remove(record)
            raise

    def _build(self, gm, example_inputs, record: GraphRecord, patches: dict) -> Callable:
        record.dynamo_code = gm.print_readable(print_output=False, include_stride=False,
                                               include_device=False)
        if not record.training or not self.rewrite:
            record.note = "grad disabled: compiled unchanged" if self.rewrite else "baseline"
            return self._compile(gm, example_inputs, record, patches)
        plan = self._plan(gm, record)
        uncompressed = None  # what gm keeps for backward, once measured (memory_budget)
        if plan is not None and self.config.exact_if_kept:
            plan, uncompressed = self._without_kept(gm, example_inputs, record, plan, patches)
        if plan is None:
            return self._compile(gm, example_inputs, record, patches)
        try:
            record.budget = self._budget(gm, example_inputs, plan.work,
                                         [*example_inputs, *plan.examples], uncompressed)
            compiled = self._compile(plan.work, [*example_inputs, *plan.examples], record, patches)
        except Exception as err:  # e.g. AOTAutograd or Inductor rejects the rewritten graph
            if torch_seam.is_dynamo_control_flow(err):
                raise
            first_line = (str(err).strip().splitlines() or [""])[0]  # the rest is a traceback
            self._fall_back(record, f"the rewritten graph failed to compile "
                                    f"({type(err).__name__}: {first_line})", err)
            # as when the passes fail: the record lists no sites, its note says why
            record.sites, record.groups, record.rewritten_code, record.tags = [], [], "", {}
            record.head_losses, record.budget = [], None
            record.placement.clear()
            return self._compile(gm, example_inputs, record, patches)
        return self._bind(gm, plan, compiled, record)

    def _plan(self, gm: torch.fx.GraphModule, record: GraphRecord,
              kept_anyway: frozenset[str] = frozenset()) -> _Plan | None:
        """Run the passes on a copy of ``gm`` and fill ``record``; None when nothing is to be
        rewritten (the record's note says why). Touches neither ``gm`` nor the store. The site
        nodes named in ``kept_anyway`` stay exact (``kinds.KEPT_ANYWAY``)."""
        policy = _KeptExact(self.config, kept_anyway) if kept_anyway else self.config
        try:
            work = probe_graph.clone(gm)
            state = passes.run(work, policy)
        except Exception as err:  # never stop training on a graph the passes cannot handle
            if torch_seam.is_dynamo_control_flow(err):
                raise
            self._fall_back(record, f"the passes failed ({type(err).__name__}: {err})", err)
            return None
        record.sites, record.groups, record.passes = state.sites, state.groups, state.results
        record.head_losses = state.head_losses
        log.info("prac_fx: graph %d: %d sites matched, %d rewritten in %d groups",
                 record.index, record.matched, record.rewritten, len(state.groups))
        for site in state.sites:  # once per module and backend, not once per recompile
            if site.reason == kinds.TOO_NARROW and site.module not in self._narrow:
                self._narrow.add(site.module)
                log.warning("prac_fx: %r (width %s) is narrower than rank=%r: left exact, "
                            "nothing compressed there", site.module, site.n, self.config.rank)
        checkpointed = sorted({s.reason for s in state.sites
                               if s.reason in (kinds.CHECKPOINTED, kinds.SELECTIVE)})
        if not state.groups and checkpointed:  # say why, whether or not the head was rewritten
            record.note = "; ".join(checkpointed)
            log.info("prac_fx: graph %d: %s", record.index, record.note)
        if not state.groups and not any(h.status == kinds.REWRITTEN for h in state.head_losses):
            record.note = record.note or "no linear site to compress"
            return None
        record.rewritten_code = work.print_readable(print_output=False, include_stride=False,
                                                    include_device=False)
        record.tags = {n.name: dict(n.meta[kinds.TAG]) for n in work.graph.nodes if kinds.TAG in n.meta}
        by_name = {n.name: n for n in gm.graph.nodes}
        devices = []
        for group in state.groups:
            val = by_name[group.input_node].meta.get("example_value")
            devices.append(val.device if isinstance(val, torch.Tensor) else torch.device("cpu"))
        # The bases' example values are the static fake tensors the rewrite gave their
        # placeholders: a real tensor here would be fakeified with symbolic sizes.
        work_nodes = {n.name: n for n in work.graph.nodes}
        extra = [g.basis_placeholder for g in state.groups]
        extra += [g.omega_placeholder for g in state.groups if g.omega_placeholder]
        if state.stats_placeholder:
            extra.append(state.stats_placeholder)
        if state.seeds_placeholder:
            extra.append(state.seeds_placeholder)
        examples = [work_nodes[name].meta.get("example_value") for name in extra]
        if any(e is None for e in examples):
            examples = [g.spec.zeros(d) for g, d in zip(state.groups, devices)]
            examples += [torch.zeros(g.n, g.r2, device=d) for g, d in zip(state.groups, devices)
                         if g.omega_placeholder]
            if state.stats_placeholder:
                examples.append(torch.zeros(sum(len(g.sites) for g in state.groups), 3,
                                            device=devices[0], requires_grad=True))
            if state.seeds_placeholder:
                quantized = [d for g, d in zip(state.groups, devices) if g.fmt.quantized]
                examples.append(torch.zeros(len(quantized), 2, dtype=torch.int64,
                                            device=quantized[0]))
        return _Plan(work, state, devices, examples)

    def _without_kept(self, gm, example_inputs, record: GraphRecord, plan: _Plan,
                      patches: dict) -> tuple[_Plan | None, int | None]:
        """``exact_if_kept``: partition the rewritten graph as its compile will (tracing only:
        the same partitioner, settings and budget) and plan again without the groups whose
        compressed copy the forward does not save; ``plan`` itself when every copy is saved.
        Also returns the bytes ``gm`` keeps for backward when the budget measured them (None
        otherwise), so that they are not measured again."""
        inputs = [*example_inputs, *plan.examples]
        if self.compiler == "inductor":
            partitioner = "inductor"
        else:  # as _compile_inner's aot_eager: min-cut only under a budget
            partitioner = "min_cut" if self.config.memory_budget is not None else "default"
        forwards: list[torch.fx.GraphModule] = []
        budget = self._budget(gm, example_inputs, plan.work, inputs)
        uncompressed = budget.uncompressed_bytes if budget is not None else None
        try:
            with budget_mod.applied(budget), \
                    torch_seam.inductor_config(patches):
                torch_seam.partition_only(plan.work, inputs, lambda fw, bw: forwards.append(fw),
                                          partitioner)
        except Exception as err:  # the check is an optimisation: keep the plan as it is
            if torch_seam.is_dynamo_control_flow(err):
                raise
            log.warning("prac_fx: graph %d: exact_if_kept could not partition the rewritten "
                        "graph (%s: %s); every group stays compressed", record.index,
                        type(err).__name__, err)
            return plan, uncompressed
        if not forwards:  # no backward to partition for
            return plan, uncompressed
        status, _ = placement(forwards[0].graph, record.tags)
        kept = [g for index, g in enumerate(plan.state.groups) if status.get(index) != "saved"]
        if not kept:
            return plan, uncompressed
        log.info("prac_fx: graph %d: %d group(s) left exact, their input kept for backward "
                 "anyway: %s", record.index, len(kept), ", ".join(g.key for g in kept))
        return self._plan(gm, record, frozenset(name for g in kept for name in g.sites)), uncompressed

    def _bind(self, gm: torch.fx.GraphModule, plan: _Plan, compiled: Callable,
              record: GraphRecord) -> PracRunner:
        """Give the compiled graph its bases: claim each group's store key, register the
        groups, build the probe, and return the runner."""
        state = plan.state
        names = [g.key for g in state.groups]  # before each weight claims its own key
        owner_args = self._claim(gm, state)
        # the partitioned graphs were recorded under the names; the report reads the keys
        by_name = dict(record.placement)
        record.placement = {g.key: by_name[name] for name, g in zip(names, state.groups)
                            if name in by_name}
        for group, device in zip(state.groups, plan.devices):
            self.store.register(group.key, group.spec, device)
        probe = None
        if any(g.r1 > 0 for g in state.groups):
            try:
                probe = probe_graph.build(gm, [g.input_node for g in state.groups])
            except ValueError as err:
                log.warning("prac_fx: graph %d: no activation probe (%s); principal bases stay "
                            "random orthonormal, which keeps gradients unbiased", record.index, err)
                record.note = f"no probe: {err}"
        runner = PracRunner(compiled, probe, state.groups, self.store,
                            sorted(set(plan.devices), key=str), owner_args, names,
                            state.logits_grads)
        self._runners.append(weakref.ref(runner))
        return runner

    def _claim(self, gm: torch.fx.GraphModule, state) -> list[int | None]:
        """Give each group the store key of its own weight (``BasisStore.claim``): a block class
        compiled once per layer names its modules alike (``up``, ``down``) in every layer.

        Returns, per group, the position among the graph's inputs of the weight that owns its
        basis, so that the runner can do the same for instances that reuse this graph."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        by_name = {n.name: n for n in gm.graph.nodes}
        sites = {s.node: s for s in state.sites}
        owner_args: list[int | None] = []
        for group in state.groups:
            weight = match(by_name[group.sites[0]])[2]
            index = placeholders.index(weight) if weight in placeholders else None
            owner_args.append(index)
            key = self.store.claim(group.key, torch_seam.traced_tensor(weight))
            if key != group.key:
                for name in group.sites:
                    sites[name].group = key
                group.key = key
        return owner_args

    def _budget(self, gm, example_inputs, work, work_inputs,
                uncompressed: int | None = None) -> budget_mod.BudgetRecord | None:
        """The partitioner budget that keeps ``memory_budget`` of what ``gm`` (unrewritten) keeps;
        ``uncompressed``: that figure when already measured."""
        asked = self.config.memory_budget
        if asked is None:
            return None
        if uncompressed is None:
            uncompressed = budget_mod.saved_bytes(gm, example_inputs)
        rewritten = budget_mod.saved_bytes(work, work_inputs)
        return budget_mod.BudgetRecord(asked, uncompressed, rewritten,
                                       budget_mod.partitioner_budget(asked, uncompressed, rewritten))

    def _compile(self, gm, example_inputs, record: GraphRecord, patches: dict | None = None):
        if self.config.memory_budget is not None and record.training and record.budget is None \
                and self.rewrite:
            # unrewritten (nothing to compress, or a fallback): the budget is the partitioner's own
            record.budget = budget_mod.BudgetRecord(self.config.memory_budget, 0, 0,
                                                    self.config.memory_budget)
        with budget_mod.applied(record.budget):
            return self._compile_inner(gm, example_inputs, record, patches)

    def _compile_inner(self, gm, example_inputs, record: GraphRecord, patches: dict | None = None):
        if self.compiler == "eager":
            # the default partitioner has no budget: with one, the min-cut partitioner
            return torch_seam.aot_eager(
                gm, example_inputs, lambda g, is_backward: record.capture(g, is_backward),
                min_cut=self.config.memory_budget is not None)

        def inner(g, ex, *args, **kwargs):
            record.capture(g, kwargs.get("is_backward", False))
            return torch_seam.inductor_inner_compile(g, ex, *args, **kwargs)

        return torch_seam.inductor_compile(gm, example_inputs, inner, patches)

    # -- introspection --------------------------------------------------------------------------
    def report(self) -> Report:
        """What the backend compiled and rewrote (``Report``), with Dynamo's graph breaks since
        the backend was made. Under ``strict``, raises ``FallbackError`` where an activation
        checkpoint broke out of the graph and no backend call has raised it yet."""
        self.collect()
        self._check_checkpoint_breaks()
        return Report(self.graphs, self.store, self._graph_breaks())

    def collect(self) -> None:
        """Read the running variance statistics of every backward that has run since the last
        training call (the runners read them at each call; this catches up the last one)."""
        alive = []
        for ref in self._runners:
            runner = ref()
            if runner is not None:
                runner.collect()
                alive.append(ref)
        self._runners = alive

    def state_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.config) | {"site_filter": None},
                "store": self.store.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore bases, call counters and the generator from ``state_dict()``.

        Load before the first compiled call or after it: a graph compiled later finds the loaded
        group under its key (and moves its basis to the activation's device), one compiled
        before reads the loaded basis from its next call on. A state saved with another
        ``rank``, ``split`` or ``complement_scale`` is refused (its bases have other shapes or
        scales); other settings may differ (the new ``refresh_every``/``resample_every`` apply
        to the loaded call counters; the seed no longer matters, the generator state is loaded).
        """
        saved = state.get("config") or {}
        differ = [f"{name}: saved {saved[name]!r}, now {getattr(self.config, name)!r}"
                  for name in ("rank", "split", "complement_scale")
                  if name in saved and saved[name] != getattr(self.config, name)]
        if differ:
            raise ValueError("PRAC state was saved with another configuration (" + "; ".join(differ) + ")")
        self.store.load_state_dict(state["store"])


def backend(*, rank: int | float | Mapping[str, int | float] = DEFAULT, compiler: str = "inductor",
            **options) -> PracBackend:
    """A PRAC torch.compile backend: ``torch.compile(model, backend=prac_fx.backend())``.

    With neither ``rank`` nor ``bits``, each linear layer saves its input in 8-bit integers
    with stochastic rounding, one scale per row (``PracConfig``'s default copy);
    ``rank=0.25`` alone saves PRAC's projection ``x P`` in the input's dtype instead.

    Keyword arguments are the fields of ``PracConfig`` (``rank``, a number or per-site mapping,
    ``split``, ``refresh_every``, ``early_refits``, ``resample_every``, ``seed``,
    ``site_filter``, ``complement_scale``, ``exact_heads``, ``subspace_iters``, ``head_loss``,
    ``head_loss_chunk_rows``, ``head_loss_grad_in_forward``, ``memory_budget``, ``complement``,
    ``exact_if_kept``, ``bits``, ``group_size``, ``scale_dtype``, ``residual``, ``strict``);
    ``compiler="eager"`` runs the rewritten graph through AOTAutograd without Inductor (for
    debugging).
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(PracConfig)}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; allowed: "
                         f"{[f.name for f in dataclasses.fields(PracConfig)]}")
    return PracBackend(PracConfig(rank=rank, **options), compiler=compiler)


class allow_checkpoint_side_effects(contextlib.ContextDecorator):
    """A context (or decorator) in which Dynamo traces activation-checkpointed regions whose
    forward has a side effect, instead of breaking the graph out of them and running them
    uncompiled::

        with prac_fx.allow_checkpoint_side_effects():
            loss = compiled(ids, labels=ids).loss
            loss.backward()

    transformers' attention layers set a context variable in their forward, so every
    checkpointed layer of a Hugging Face model (``gradient_checkpointing_enable()``) breaks
    out without it. Inside, Dynamo does not replay the side effect when the backward recomputes
    the region (``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint``): safe
    where the recomputed forward does not depend on it (a context variable set and reset, a
    log, a counter), not where it does (state the forward reads back and changes). Only
    compiles started inside take it: wrap every call that may compile, a recompile included,
    e.g. the whole training loop. The setting is restored on leaving; nothing global changes.
    """

    def __init__(self):
        self._patches = []  # one per nested entry (a decorated function may recurse)

    def __enter__(self):
        patch = torch_seam.checkpoint_side_effects_allowed()
        patch.__enter__()
        self._patches.append(patch)
        return self

    def __exit__(self, *exc):
        return self._patches.pop().__exit__(*exc)


_default: PracBackend | None = None


def default_backend() -> PracBackend:
    """The process-wide backend behind ``backend="prac"``, made at its first use with the
    configuration the ``PRAC_FX_*`` environment variables give (``PracConfig.from_env``)."""
    global _default
    if _default is None:
        _default = PracBackend(PracConfig.from_env())
    return _default


def prac_backend(gm: torch.fx.GraphModule, example_inputs: Sequence, **kwargs) -> Callable:
    """The backend registered as ``"prac"``: ``default_backend()``, for tools that take only a
    backend name. ``mode=`` and ``options=`` pass through to Inductor."""
    return default_backend()(gm, example_inputs, **kwargs)
