"""What the passes share: the graph being rewritten, the sites and groups found so far, and the
record of what each pass did.

Invariants every pass keeps (checked by tests): each node a pass creates carries
``meta["example_value"]`` (a fake tensor, so later passes and AOTAutograd see shapes); no pass
makes an output alias an input; basis placeholders come after every original placeholder, in
group order, so the runner can append the bases to the original arguments.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import torch.fx


class SitePolicy(Protocol):
    """What the passes need from a configuration (``prac_fx.PracConfig`` implements it)."""

    def ranks(self, n: int) -> tuple[int, int] | None:
        """(r1, r2) for an input of width n, or None when n is too narrow for the rank."""

    def include(self, module_path: str) -> bool:
        """Whether the site of the module at ``module_path`` may be rewritten."""

    def is_head(self, module_path: str) -> bool:
        """Whether the module at ``module_path`` is an output head that stays exact."""

    # Optional (read with getattr; defaults True and None): ``head_loss``, whether the head and
    # cross-entropy loss become one chunked op; ``head_loss_chunk_rows``, its rows per chunk.


@dataclasses.dataclass
class Site:
    """One node the passes looked at.

    ``status`` is ``"rewritten"`` or ``"skipped"``; a skipped site names its ``reason``:
    ``attention``, ``nonlinear``, ``no trainable weight``, ``output head``, ``filtered``, ``too
    narrow for the rank``, ``too few rows to gain``, ``unsupported pattern``.
    """

    node: str
    kind: str
    module: str = ""
    weight: str = ""
    input_node: str = ""
    n: int | None = None
    m: int | None = None
    status: str = "skipped"
    reason: str | None = None
    group: str | None = None
    r1: int = 0
    r2: int = 0


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

    @property
    def rank(self) -> int:
        return self.r1 + self.r2


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
    head_losses: list = dataclasses.field(default_factory=list)  # head_loss.HeadLoss records

    def node(self, name: str) -> torch.fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def sites_in(self, group: Group) -> list[Site]:
        names = set(group.sites)
        return [s for s in self.sites if s.node in names]


PassFn = Callable[[GraphState, SitePolicy], PassResult]
