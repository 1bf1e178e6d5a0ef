"""What the passes share: the graph being rewritten, the sites and groups found so far, and the
record of what each pass did.

Invariants every pass keeps (``tests/invariants.py`` checks them after every pass): each node
a pass creates carries ``meta["example_value"]`` (a fake tensor, so later passes and AOTAutograd
see shapes); no pass makes an output alias an input; basis placeholders come after every
original placeholder, in group order, so the runner can append the bases to the original
arguments; a ``PassResult`` counts the nodes its pass created and erased.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import torch
import torch.fx

from prac_fx.passes import codec, kinds


class SitePolicy(Protocol):
    """What the passes need from a configuration (``prac_fx.PracConfig`` implements it)."""

    def ranks(self, n: int, module_path: str = "") -> tuple[int, int] | None:
        """(r1, r2) for an input of width n at ``module_path``, or None when n is too narrow
        for the rank."""

    def include(self, module_path: str) -> bool:
        """Whether the site of the module at ``module_path`` may be rewritten."""

    def is_head(self, module_path: str) -> bool:
        """Whether the module at ``module_path`` is an output head that stays exact."""

    subspace_iters: int  # > 0: principal bases follow each call's input (``passes.rewrite``)
    # Optional too: ``format_for(n, module_path)``, the saved copy's ``codec.Format`` (default
    # unquantized projection).
    complement_scale: float | None  # k on the random part; None: (n - r1) / r2
    # Optional (read with getattr; defaults True, None and ()): ``head_loss``, whether the head
    # and cross-entropy loss become one chunked op; ``head_loss_chunk_rows``, its rows per chunk;
    # ``head_loss_grad_in_forward``, True/False/None (None: ``chunked_ce.grad_in_forward_pays``);
    # ``rank_for(module_path)``, None where a per-site rank mapping names no rank (the site is
    # left exact as filtered); ``kept_anyway``, names of site nodes left exact because the
    # partitioned graph keeps their input for backward anyway (``kinds.KEPT_ANYWAY``).


@dataclasses.dataclass
class Site:
    """One node the passes looked at.

    ``kind`` is one of ``kinds.KINDS``. ``status`` is ``"skipped"``, ``"candidate"`` (found by
    ``find_sites``, not yet rewritten) or ``"rewritten"`` (``kinds.STATUSES``); a skipped site
    names its ``reason`` (``kinds.REASONS``): ``attention``, ``nonlinear``, ``no trainable
    weight``, ``output head``, ``filtered``, ``too narrow for the rank``, ``too few rows to
    gain``, ``unsupported pattern``, the two
    checkpoint reasons (``kinds.CHECKPOINTED``, ``kinds.SELECTIVE``) and ``kinds.KEPT_ANYWAY``. A candidate that ``rewrite_sites`` did not reach (a graph
    whose rewrite failed) keeps ``"candidate"``.
    """

    node: str
    kind: str
    module: str = ""
    weight: str = ""
    input_node: str = ""
    n: int | None = None
    m: int | None = None
    status: str = kinds.SKIPPED
    reason: str | None = None
    group: str | None = None
    r1: int = 0
    r2: int = 0
    stat_index: int | None = None  # its row of the graph's ``prac_stats`` input, once rewritten
    fmt: codec.Format = codec.Format()  # how its saved copy is stored (``passes/codec.py``)
    rows: int | None = None  # N, the input's rows (None where a dimension is symbolic)
    itemsize: int = 4  # bytes per element of the input (its dtype, autocast's where it applies)

    @property
    def saved_bytes(self) -> int | None:
        """Bytes of its group's saved copy (shared by the group's sites): ``x P`` in the input's
        dtype, or the quantized copy's codes, scales and principal part (``Format.saved_bytes``);
        None with symbolic rows."""
        if self.rows is None:
            return None
        width = self.n if self.fmt.layout != codec.PROJECT else self.r1 + self.r2
        return self.fmt.saved_bytes(self.rows, width, self.r1, self.itemsize)

    @property
    def input_bytes(self) -> int | None:
        """Bytes of the input it would keep uncompressed: ``rows x n`` in the input's dtype (bf16
        under bf16 autocast, where the linear reads a bf16 cast), None with symbolic rows."""
        if self.rows is None or self.n is None:
            return None
        return self.rows * self.n * self.itemsize


@dataclasses.dataclass(frozen=True)
class BasisSpec:
    """What a group's basis P is: ``(n, r1 + r2)``, ``dtype`` (float32 also under autocast; the
    compressed copy takes the activation's dtype). The rewrite gives the basis placeholder a
    value of this spec, the store builds P to it, and the runner checks each P against it."""

    n: int
    r1: int
    r2: int
    dtype: torch.dtype = torch.float32

    @property
    def rank(self) -> int:
        return self.r1 + self.r2

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.rank)

    def empty(self, device) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=device)

    def zeros(self, device) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=device)

    def check(self, basis: torch.Tensor, key: str) -> None:
        """Raise ValueError unless ``basis`` has this spec's shape and dtype."""
        if tuple(basis.shape) != self.shape or basis.dtype != self.dtype:
            raise ValueError(f"basis of group {key!r} has shape {tuple(basis.shape)} and dtype "
                             f"{basis.dtype}; its graph was compiled for {self.shape}, {self.dtype}")


@dataclasses.dataclass
class Group:
    """Sites that read the same input: one basis and one compressed copy for all of them."""

    key: str
    input_node: str
    n: int
    r1: int
    r2: int
    sites: list[str]
    basis_placeholder: str = ""
    compressed_node: str = ""
    omega_placeholder: str = ""  # a following group's random draw input ("" when not following)
    followed_node: str = ""  # the node computing a following group's basis in the graph
    fmt: codec.Format = codec.Format()  # its saved copy's format and layout
    seed_row: int | None = None  # a quantized group's row of the ``prac_seeds`` input

    @property
    def rank(self) -> int:
        return self.r1 + self.r2

    @property
    def spec(self) -> BasisSpec:
        return BasisSpec(self.n, self.r1, self.r2)


@dataclasses.dataclass
class PassResult:
    name: str
    nodes_created: int = 0
    nodes_erased: int = 0
    sites_matched: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GraphState:
    gm: torch.fx.GraphModule
    sites: list[Site] = dataclasses.field(default_factory=list)
    groups: list[Group] = dataclasses.field(default_factory=list)
    results: list[PassResult] = dataclasses.field(default_factory=list)
    stats_placeholder: str = ""  # the ``prac_stats`` input the rewrite adds after the bases
    seeds_placeholder: str = ""  # ``prac_seeds`` (quantized groups, 2) int64, after the stats
    followed: int = 0  # extra outputs: the bases of following groups, after the graph's own
    head_losses: list = dataclasses.field(default_factory=list)  # head_loss.HeadLoss records
    # Logits returned by a head-and-loss op that computed its gradients in the forward, without
    # a gradient path: per op (logits' index among the graph's own outputs, the weight's and the
    # bias's index among its inputs, None without bias); the head input is an extra output after
    # the graph's own, in this order, before the followed bases. The runner attaches the path
    # (``passes.chunked_ce.attach_logits_grad``) and strips the extra outputs.
    logits_grads: list = dataclasses.field(default_factory=list)


PassFn = Callable[[GraphState, SitePolicy], PassResult]
