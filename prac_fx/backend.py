"""The torch.compile backend: rewrite each Dynamo graph with the PRAC passes, compile it with
Inductor, and return a runner that feeds it the bases.

``torch.compile(model, backend=prac_fx.backend(rank=0.25))`` gives the model its own backend and
basis store; ``backend="prac"`` uses one process-wide backend with the default configuration.

Graphs compiled with grad disabled (``torch.no_grad()``, inference) go to Inductor unchanged:
inference is exact and does no extra work. A graph the passes fail on, or whose rewritten form
fails to compile, falls back to plain Inductor with a logged reason instead of stopping training.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Callable, Sequence

import torch
import torch.fx

import passes
from passes import probe as probe_graph
from passes.sites import CHECKPOINTED, SELECTIVE, match
from prac_fx.basis import BasisStore
from prac_fx.config import PracConfig
from prac_fx.report import GraphRecord, Report
from prac_fx.runner import PracRunner

log = logging.getLogger("prac_fx")


def _real_tensor(node: torch.fx.Node) -> torch.Tensor | None:
    """The real tensor Dynamo traced a graph input with (its parameter), when it recorded one."""
    grapharg = node.meta.get("grapharg")
    try:
        example = grapharg.example if grapharg is not None else None
    except Exception:  # the weak reference died
        return None
    return example if isinstance(example, torch.Tensor) else None


def _inductor(gm, example_inputs, inner_compile=None, config_patches=None):
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    return compile_fx(gm, list(example_inputs), inner_compile=inner_compile or compile_fx_inner,
                      config_patches=config_patches or None)


def inductor_patches(mode: str | None = None, options: dict | None = None) -> dict:
    """The Inductor configuration ``torch.compile(mode=..., options=...)`` would apply, checked
    the way ``torch.compile`` checks it: a mode Inductor knows, option names it has (``-`` or
    ``_``), values of the declared type. Raises ValueError otherwise."""
    import torch._inductor as inductor
    from torch._inductor import config

    if mode is not None and options is not None:
        raise ValueError("give mode= or options=, not both (as torch.compile requires)")
    patches: dict = {}
    if mode not in (None, "default"):
        try:
            patches.update(inductor.list_mode_options(mode))
        except RuntimeError as err:
            raise ValueError(f"unknown compile mode {mode!r}: {err}") from None
    if options is not None:
        if not isinstance(options, dict):
            raise ValueError(f"options must be a dict of Inductor settings, got {options!r}")
        current = config.get_config_copy()
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


def _is_dynamo_control_flow(err: BaseException) -> bool:
    """Dynamo signals with exceptions: a restart of its analysis (``RestartAnalysis`` and its
    subclasses, e.g. ``TensorifyScalarRestartAnalysis`` under ``dynamic=True``), a frame to skip,
    a graph break, a reset. Those must reach Dynamo untouched; only the wrappers Dynamo puts
    around a genuine failure count as a failure of the rewrite."""
    from torch._dynamo import exc

    failures = (exc.BackendCompilerFailed, exc.InternalTorchDynamoError, exc.TorchRuntimeError)
    return isinstance(err, exc.TorchDynamoException) and not isinstance(err, failures)


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

    # -- the backend protocol -------------------------------------------------------------------
    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence, *,
                 mode: str | None = None, options: dict | None = None) -> Callable:
        """Dynamo calls this with ``mode=``/``options=`` when ``torch.compile`` was given them:
        they apply to Inductor as they would to ``backend="inductor"``."""
        patches = inductor_patches(mode, options)
        if patches and self.compiler != "inductor":
            raise ValueError(f"mode={mode!r} / options={options!r} configure Inductor; this "
                             f"backend runs compiler={self.compiler!r}, which has no such settings")
        record = GraphRecord(index=len(self.graphs), training=torch.is_grad_enabled())
        self.graphs.append(record)
        try:
            return self._build(gm, example_inputs, record, patches)
        except Exception as err:
            if _is_dynamo_control_flow(err):  # Dynamo will call again: this attempt never ran
                self.graphs.remove(record)
            raise

    def _build(self, gm, example_inputs, record: GraphRecord, patches: dict) -> Callable:
        record.dynamo_code = gm.print_readable(print_output=False, include_stride=False,
                                               include_device=False)
        if not record.training or not self.rewrite:
            record.note = "grad disabled: compiled unchanged" if self.rewrite else "baseline"
            return self._compile(gm, example_inputs, record, patches)
        try:
            work = probe_graph.clone(gm)
            state = passes.run(work, self.config)
        except Exception as err:  # never stop training on a graph the passes cannot handle
            if _is_dynamo_control_flow(err):
                raise
            log.warning("prac_fx: graph %d left unchanged (%s: %s)", record.index, type(err).__name__, err)
            record.note = f"fallback: {type(err).__name__}: {err}"
            return self._compile(gm, example_inputs, record, patches)
        record.sites, record.groups, record.passes = state.sites, state.groups, state.results
        log.info("prac_fx: graph %d: %d sites matched, %d rewritten in %d groups",
                 record.index, record.matched, record.rewritten, len(state.groups))
        for site in state.sites:  # once per module and backend, not once per recompile
            if site.reason == "too narrow for the rank" and site.module not in self._narrow:
                self._narrow.add(site.module)
                log.warning("prac_fx: %r (width %s) is narrower than rank=%r: left exact, "
                            "nothing compressed there", site.module, site.n, self.config.rank)
        if not state.groups:
            checkpointed = sorted({s.reason for s in state.sites
                                   if s.reason in (CHECKPOINTED, SELECTIVE)})
            record.note = "; ".join(checkpointed) or "no linear site to compress"
            if checkpointed:
                log.info("prac_fx: graph %d: %s", record.index, record.note)
            return self._compile(gm, example_inputs, record, patches)
        record.rewritten_code = work.print_readable(print_output=False, include_stride=False,
                                                    include_device=False)

        devices = []
        by_name = {n.name: n for n in gm.graph.nodes}
        names = [g.key for g in state.groups]  # before each weight claims its own key
        owner_args = self._claim(gm, state)
        for group in state.groups:
            val = by_name[group.input_node].meta.get("example_value")
            device = val.device if isinstance(val, torch.Tensor) else torch.device("cpu")
            devices.append(device)
            self.store.register(group.key, group.n, group.r1, group.r2, device)
        # The bases' example values are the static fake tensors the rewrite gave their
        # placeholders: a real tensor here would be fakeified with symbolic sizes.
        work_nodes = {n.name: n for n in work.graph.nodes}
        extra = [g.basis_placeholder for g in state.groups]
        extra += [g.omega_placeholder for g in state.groups if g.omega_placeholder]
        extra.append(state.stats_placeholder)
        examples = [work_nodes[name].meta.get("example_value") for name in extra]
        if any(e is None for e in examples):
            examples = [torch.zeros(g.n, g.rank, device=d) for g, d in zip(state.groups, devices)]
            examples += [torch.zeros(g.n, g.r2, device=d) for g, d in zip(state.groups, devices)
                         if g.omega_placeholder]
            examples.append(torch.zeros(sum(len(g.sites) for g in state.groups), 2,
                                        device=devices[0], requires_grad=True))
        try:
            compiled = self._compile(work, [*example_inputs, *examples], record, patches)
        except Exception as err:  # e.g. AOTAutograd or Inductor rejects the rewritten graph
            if _is_dynamo_control_flow(err):
                raise
            first_line = (str(err).strip().splitlines() or [""])[0]  # the rest is a traceback
            log.warning("prac_fx: graph %d: the rewritten graph failed to compile (%s: %s); "
                        "compiled unchanged", record.index, type(err).__name__, first_line)
            # as when the passes fail: the record lists no sites, its note says why
            record.note = f"fallback: rewritten graph failed to compile: {type(err).__name__}: {first_line}"
            record.sites, record.groups, record.rewritten_code = [], [], ""
            record.placement.clear()
            return self._compile(gm, example_inputs, record, patches)
        probe = None
        if any(g.r1 > 0 for g in state.groups):
            try:
                probe = probe_graph.build(gm, [g.input_node for g in state.groups])
            except ValueError as err:
                log.warning("prac_fx: graph %d: no activation probe (%s); principal bases stay "
                            "random orthonormal, which keeps gradients unbiased", record.index, err)
                record.note = f"no probe: {err}"
        runner = PracRunner(compiled, probe, state.groups, self.store, sorted(set(devices), key=str),
                            owner_args, names)
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
            key = self.store.claim(group.key, _real_tensor(weight))
            if key != group.key:
                for name in group.sites:
                    sites[name].group = key
                group.key = key
        return owner_args

    def _compile(self, gm, example_inputs, record: GraphRecord, patches: dict | None = None):
        if self.compiler == "eager":
            from torch._dynamo.backends.common import aot_autograd
            from torch._dynamo.backends.debugging import boxed_nop

            def keep(g, ex, is_backward=False):
                record.capture(g, is_backward)
                return boxed_nop(g, ex)

            fw = lambda g, ex: keep(g, ex, False)  # noqa: E731
            bw = lambda g, ex: keep(g, ex, True)  # noqa: E731
            return aot_autograd(fw_compiler=fw, bw_compiler=bw)(gm, list(example_inputs))

        from torch._inductor.compile_fx import compile_fx_inner

        def inner(g, ex, *args, **kwargs):
            record.capture(g, kwargs.get("is_backward", False))
            return compile_fx_inner(g, ex, *args, **kwargs)

        return _inductor(gm, example_inputs, inner, patches)

    # -- introspection --------------------------------------------------------------------------
    def report(self) -> Report:
        self.collect()
        return Report(self.graphs, self.store)

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


def backend(*, rank: int | float = 0.25, compiler: str = "inductor", **options) -> PracBackend:
    """A PRAC torch.compile backend: ``torch.compile(model, backend=prac_fx.backend(rank=0.25))``.

    Keyword arguments are the fields of ``PracConfig`` (``rank``, ``split``, ``refresh_every``,
    ``resample_every``, ``seed``, ``site_filter``, ``complement_scale``, ``exact_heads``);
    ``compiler="eager"`` runs the rewritten graph through AOTAutograd without Inductor (for
    debugging).
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(PracConfig)}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; allowed: "
                         f"{[f.name for f in dataclasses.fields(PracConfig)]}")
    return PracBackend(PracConfig(rank=rank, **options), compiler=compiler)


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
