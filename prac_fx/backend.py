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
from typing import Callable, Sequence

import torch
import torch.fx

import passes
from passes import probe as probe_graph
from passes.sites import match
from prac_fx import budget as budget_mod
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


def _inductor(gm, example_inputs, inner_compile=None):
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    return compile_fx(gm, list(example_inputs), inner_compile=inner_compile or compile_fx_inner)


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

    # -- the backend protocol -------------------------------------------------------------------
    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence) -> Callable:
        record = GraphRecord(index=len(self.graphs), training=torch.is_grad_enabled())
        self.graphs.append(record)
        record.dynamo_code = gm.print_readable(print_output=False, include_stride=False,
                                               include_device=False)
        if not record.training or not self.rewrite:
            record.note = "grad disabled: compiled unchanged" if self.rewrite else "baseline"
            return self._compile(gm, example_inputs, record)
        try:
            work = probe_graph.clone(gm)
            state = passes.run(work, self.config)
        except Exception as err:  # never stop training on a graph the passes cannot handle
            log.warning("prac_fx: graph %d left unchanged (%s: %s)", record.index, type(err).__name__, err)
            record.note = f"fallback: {type(err).__name__}: {err}"
            return self._compile(gm, example_inputs, record)
        record.sites, record.groups, record.passes = state.sites, state.groups, state.results
        record.head_losses = state.head_losses
        log.info("prac_fx: graph %d: %d sites matched, %d rewritten in %d groups",
                 record.index, record.matched, record.rewritten, len(state.groups))
        for site in state.sites:  # once per module and backend, not once per recompile
            if site.reason == "too narrow for the rank" and site.module not in self._narrow:
                self._narrow.add(site.module)
                log.warning("prac_fx: %r (width %s) is narrower than rank=%r: left exact, "
                            "nothing compressed there", site.module, site.n, self.config.rank)
        if not state.groups and not any(h.status == "rewritten" for h in state.head_losses):
            record.note = "no linear site to compress"
            return self._compile(gm, example_inputs, record)
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
        examples = [work_nodes[g.basis_placeholder].meta.get("example_value") for g in state.groups]
        if any(e is None for e in examples):
            examples = [torch.zeros(g.n, g.rank, device=d) for g, d in zip(state.groups, devices)]
        try:
            record.budget = self._budget(gm, example_inputs, work, [*example_inputs, *examples])
            compiled = self._compile(work, [*example_inputs, *examples], record)
        except Exception as err:  # e.g. AOTAutograd or Inductor rejects the rewritten graph
            first_line = (str(err).strip().splitlines() or [""])[0]  # the rest is a traceback
            log.warning("prac_fx: graph %d: the rewritten graph failed to compile (%s: %s); "
                        "compiled unchanged", record.index, type(err).__name__, first_line)
            # as when the passes fail: the record lists no sites, its note says why
            record.note = f"fallback: rewritten graph failed to compile: {type(err).__name__}: {first_line}"
            record.sites, record.groups, record.rewritten_code = [], [], ""
            record.head_losses, record.budget = [], None
            record.placement.clear()
            return self._compile(gm, example_inputs, record)
        probe = None
        if any(g.r1 > 0 for g in state.groups):
            try:
                probe = probe_graph.build(gm, [g.input_node for g in state.groups])
            except ValueError as err:
                log.warning("prac_fx: graph %d: no activation probe (%s); principal bases stay "
                            "random orthonormal, which keeps gradients unbiased", record.index, err)
                record.note = f"no probe: {err}"
        return PracRunner(compiled, probe, state.groups, self.store, sorted(set(devices), key=str),
                          owner_args, names)

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

    def _budget(self, gm, example_inputs, work, work_inputs) -> budget_mod.BudgetRecord | None:
        """The partitioner budget that keeps ``memory_budget`` of what ``gm`` (unrewritten) keeps."""
        asked = self.config.memory_budget
        if asked is None:
            return None
        uncompressed = budget_mod.saved_bytes(gm, example_inputs)
        rewritten = budget_mod.saved_bytes(work, work_inputs)
        return budget_mod.BudgetRecord(asked, uncompressed, rewritten,
                                       budget_mod.partitioner_budget(asked, uncompressed, rewritten))

    def _compile(self, gm, example_inputs, record: GraphRecord):
        if self.config.memory_budget is not None and record.training and record.budget is None \
                and self.rewrite:
            # unrewritten (nothing to compress, or a fallback): the budget is the partitioner's own
            record.budget = budget_mod.BudgetRecord(self.config.memory_budget, 0, 0,
                                                    self.config.memory_budget)
        with budget_mod.applied(record.budget):
            return self._compile_inner(gm, example_inputs, record)

    def _compile_inner(self, gm, example_inputs, record: GraphRecord):
        if self.compiler == "eager":
            from torch._dynamo.backends.common import aot_autograd
            from torch._dynamo.backends.debugging import boxed_nop

            def keep(g, ex, is_backward=False):
                record.capture(g, is_backward, n_bases=len(record.groups))
                return boxed_nop(g, ex)

            fw = lambda g, ex: keep(g, ex, False)  # noqa: E731
            bw = lambda g, ex: keep(g, ex, True)  # noqa: E731
            partition = {}
            if self.config.memory_budget is not None:  # the default partitioner has no budget
                from torch._functorch.partitioners import min_cut_rematerialization_partition

                partition = {"partition_fn": min_cut_rematerialization_partition}
            return aot_autograd(fw_compiler=fw, bw_compiler=bw, **partition)(gm, list(example_inputs))

        from torch._inductor.compile_fx import compile_fx_inner

        def inner(g, ex, *args, **kwargs):
            record.capture(g, kwargs.get("is_backward", False), n_bases=len(record.groups))
            return compile_fx_inner(g, ex, *args, **kwargs)

        return _inductor(gm, example_inputs, inner)

    # -- introspection --------------------------------------------------------------------------
    def report(self) -> Report:
        return Report(self.graphs)

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


def prac_backend(gm: torch.fx.GraphModule, example_inputs: Sequence) -> Callable:
    """The backend registered as ``"prac"``: one process-wide ``PracBackend()`` with defaults."""
    global _default
    if _default is None:
        _default = PracBackend()
    return _default(gm, example_inputs)
