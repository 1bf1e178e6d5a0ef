"""The callable the backend hands back to Dynamo for one rewritten graph.

Per training call it (1) refits the principal basis of every group that is due, by running the
probe graph (a no-grad forward that returns Gram matrices, with the RNG state restored after, so
dropout masks are the same as without the probe); (2) redraws random complements that are due, or moves cycling ones to their next block;
(3) calls the compiled graph with the bases appended to the arguments, and after them a fresh
leaf ``stats`` (sites, 3) whose gradient the backward fills with each site's squared norms
``[||A1||^2, ||A2||^2]``; (4) counts the call. The leaves of earlier calls are read when the next
training call starts or when ``collect()`` is called (by ``backend.report()``), once their
backward has run, and go into the store's running variance estimate.

A basis is only ever replaced by a new tensor, never written in place, so the saved copy a
backward reads always belongs to the basis its forward used.

Dynamo reuses one compiled graph for every instance of a module class whose guards pass (the
blocks of a model compiled one by one, as under FSDP2, differ only in their parameters, which
are graph inputs). So the runner finds each group's basis by the weight it is called with: the
first weight to arrive keeps the group's key, other weights get keys of their own
(``BasisStore.claim``), and each layer has its own bases and counters.
"""
from __future__ import annotations

import logging
import weakref
from typing import Callable, Sequence

import torch

from prac_fx.basis import BasisStore
from prac_fx.passes import codec, torch_seam
from prac_fx.passes.chunked_ce import attach_logits_grad
from prac_fx.passes.graph_state import Group

log = logging.getLogger("prac_fx")


def call_compiled(fn: Callable, args: list):
    # What a backend returns to Dynamo is called unboxed (``fn(*args)``), whatever its
    # ``_boxed_call`` attribute says (aot_module_simplified copies that from the inner function).
    return fn(*args)


class PracRunner:
    def __init__(self, compiled: Callable, probe: torch.fx.GraphModule | None,
                 groups: Sequence[Group], store: BasisStore, devices: list[torch.device],
                 owner_args: Sequence[int | None] | None = None,
                 names: Sequence[str] | None = None, logits_grads: Sequence[tuple] = ()):
        self.compiled = compiled
        self.probe = probe
        self.groups = list(groups)
        self.keys = [g.key for g in self.groups]  # the keys of the instance it was compiled for
        self.specs = [g.spec for g in self.groups]  # what each basis must be
        self.store = store
        self.cuda_devices = [d for d in devices if d.type == "cuda"]
        # per group: the position in the arguments of the weight that owns its basis (None: unknown)
        self.owner_args = list(owner_args) if owner_args is not None else [None] * len(self.groups)
        # per group: the name its weights claim a key under (the key before ``BasisStore.claim``)
        self.names = list(names) if names is not None else list(self.keys)
        self._bound: dict[tuple, tuple[list, list[str]]] = {}  # weight ids -> (weakrefs, keys)
        self.n_sites = sum(len(g.sites) for g in self.groups)  # rows of the stats input
        self.followed = sum(1 for g in self.groups if g.omega_placeholder)  # extra outputs
        self._pending: list[tuple[torch.Tensor, list[str]]] = []  # (stats leaf, keys) per call
        # the quantized groups, in the order of the ``prac_seeds`` rows (``Group.seed_row``)
        self.quantized = [i for i, g in enumerate(self.groups) if g.seed_row is not None]
        # returned logits to give back their gradient path (``GraphState.logits_grads``)
        self.logits_grads = list(logits_grads)

    def _keys(self, args: tuple) -> list[str]:
        """The store keys of this call's weights (cached per set of weights)."""
        if all(i is None for i in self.owner_args):
            return self.keys
        owners = [None if i is None else args[i] for i in self.owner_args]
        ident = tuple(map(id, owners))
        hit = self._bound.get(ident)
        if hit is not None and all((r is None and o is None) or (r is not None and r() is o)
                                   for r, o in zip(hit[0], owners)):
            return hit[1]
        keys = []
        for group, name, owner in zip(self.groups, self.names, owners):
            key = self.store.claim(name, owner)
            device = self.store.groups[group.key].device
            self.store.register(key, group.spec, device)
            keys.append(key)
        self._bound[ident] = ([None if o is None else weakref.ref(o) for o in owners], keys)
        return keys

    def _refresh(self, args: tuple, keys: list[str], due_keys: list[str]) -> None:
        # A following group refits Q1 in its own graph every call: at a refresh it only redraws
        # its random part, and the probe runs only for its very first basis.
        following = [k for k in due_keys if self.store.follows(k) and self.store.basis(k) is not None]
        for key in following:
            self.store.groups[key].refreshes += 1
            self.store.resample(key)
        due_keys = [k for k in due_keys if k not in following]
        if not due_keys:
            return
        if self.probe is None:  # no activation to fit to: keep (or draw) Q1, redraw Q2
            for key in due_keys:
                self.store.refresh(key, None)
            return
        with torch.no_grad(), torch.random.fork_rng(devices=self.cuda_devices):
            grams = self.probe(*args)
        due = set(due_keys)
        for key, gram in zip(keys, grams):
            if key in due:
                self.store.refresh(key, gram)
        log.debug("refreshed %d bases", len(due))

    def _stats(self, device, requires_grad: bool) -> list[torch.Tensor]:
        """The statistics input, as a list to append to the arguments: empty for a graph with
        no compressed site (only its head and loss rewritten)."""
        if not self.n_sites:
            return []
        return [torch.zeros(self.n_sites, 3, dtype=torch.float32, device=device,
                            requires_grad=requires_grad)]

    def _seeds(self, keys: list[str], device) -> list[torch.Tensor]:
        """The rounding seeds of the quantized groups, as a list to append to the arguments:
        a hash of the backend's seed, the group's key and its call counter (``codec.call_seeds``),
        so each call draws anew and a resumed run draws what the uninterrupted one would."""
        if not self.quantized:
            return []
        store = self.store
        rows = [codec.call_seeds(store.seed, keys[i], store.groups[keys[i]].calls)
                for i in self.quantized]
        return [torch.tensor(rows, dtype=torch.int64, device=device)]

    def collect(self) -> None:
        """Move the squared norms of every call whose backward has run into the store."""
        still = []
        for leaf, keys in self._pending:
            if leaf.grad is None:  # its backward has not run (yet, or never: a forward only)
                still.append((leaf, keys))
                continue
            start = 0
            for group, key in zip(self.groups, keys):
                self.store.observe(key, leaf.grad[start:start + len(group.sites)])
                start += len(group.sites)
        self._pending = still[-8:]  # forwards without a backward are dropped after a while

    def _shape_only(self, args: tuple):
        """A call on fake tensors (DDP's graph splitting runs each compiled piece once on fake
        inputs to learn its outputs' shapes): no refresh, no draw, no count."""
        bases = []
        for group, key in zip(self.groups, self.keys):
            basis = self.store.basis(key)
            if basis is None:  # under the caller's fake mode this makes a fake tensor
                basis = group.spec.zeros(self.store.groups[key].device)
            bases.append(basis)
        stats = self._stats(bases[0].device if bases else None, True)
        omegas = self._omegas(self.keys, bases, draw=False)
        seeds = self._seeds(self.keys, bases[self.quantized[0]].device) if self.quantized else []
        return self._split(call_compiled(self.compiled, [*args, *bases, *omegas, *stats, *seeds]),
                           args)[0]

    def _omegas(self, keys: list[str], bases: list, draw: bool) -> list[torch.Tensor]:
        """The held draws of the following groups, in group order. A group with none yet (a
        state loaded from a run that did not follow) draws one when ``draw``, which also
        rebuilds its basis in ``bases``; otherwise (a shape-only call) it gets zeros."""
        omegas = []
        for index, (group, key) in enumerate(zip(self.groups, keys)):
            if not group.omega_placeholder:
                continue
            state = self.store.groups[key]
            if state.omega is None and draw:
                self.store.resample(key)
                bases[index] = self.store.basis(key)
            omegas.append(state.omega if state.omega is not None else
                          torch.zeros(group.n, group.r2, dtype=torch.float32, device=state.device))
        return omegas

    def _split(self, out, args):
        """The graph's own outputs, and the bases its following groups built (``follow_basis``).

        Logits that a head-and-loss op returned without a gradient path (it computed the head's
        gradients in the forward) get it back here, outside the compiled graph: from the head
        input the graph returns after its own outputs and the head's weight and bias among
        ``args``. Its backward runs only if something differentiates through the logits."""
        kind, followed = type(out), []
        if self.followed:
            out, followed = out[:-self.followed], list(out[-self.followed:])
        if self.logits_grads:
            heads = len(self.logits_grads)
            own, head_inputs = list(out[:-heads]), out[-heads:]
            for (index, weight, bias), x in zip(self.logits_grads, head_inputs):
                own[index] = attach_logits_grad(own[index], x, args[weight],
                                                None if bias is None else args[bias])
            out = own
        return kind(out), followed

    def __call__(self, *args):
        if any(torch_seam.is_fake(a) for a in args):
            return self._shape_only(args)
        store = self.store
        keys = self._keys(args)
        training = torch.is_grad_enabled()
        if training:
            self.collect()
            due = [k for k in keys if store.due_refresh(k)]
            if due:
                self._refresh(args, keys, due)
            for key in keys:
                if key not in due and store.due_resample(key):
                    store.resample(key)
                elif key not in due and store.cycles(key):
                    store.next_block(key)
        else:
            for key in keys:
                if store.basis(key) is None:
                    store.refresh(key, None)
        bases = [store.basis(k) for k in keys]
        omegas = self._omegas(keys, bases, draw=True)
        for spec, key, basis in zip(self.specs, keys, bases):
            spec.check(basis, key)
        stats = self._stats(bases[0].device if bases else None, training)
        seeds = self._seeds(keys, bases[self.quantized[0]].device) if self.quantized else []
        out, followed = self._split(
            call_compiled(self.compiled, [*args, *bases, *omegas, *stats, *seeds]), args)
        if training:
            followers = [k for g, k in zip(self.groups, keys) if g.omega_placeholder]
            for key, basis in zip(followers, followed):
                store.follow(key, basis)
            if stats:
                self._pending.append((stats[0], keys))
            for key in keys:
                store.advance(key)
        return out
