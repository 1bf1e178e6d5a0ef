"""``memory_budget``: one number, a fraction of what the *uncompressed* graph would keep for
backward, turned into the partitioner's ``activation_memory_budget`` for the rewritten graph.

The min-cut partitioner reads ``torch._functorch.config.activation_memory_budget`` as a fraction
of the rewritten graph's own default saved set (0: recompute all it can, 1: its default choice;
in between it picks recomputations by a knapsack, ``choose_saved_values_set``). A user thinks of
the model as it was: ``memory_budget=0.5`` should mean "keep half of what plain compilation
keeps". So, per training graph:

1. ``saved_bytes(gm)`` partitions the *unrewritten* graph and the rewritten one at budget 1
   (AOTAutograd with no-op compilers: tracing and partitioning only, no Inductor) and measures
   what each forward hands its backward, graph inputs (parameters, ids) excluded:
   ``uncompressed`` and ``rewritten``.
2. The bytes asked for are ``target = memory_budget * uncompressed``. The partitioner's budget
   is ``target / rewritten`` (clamped to [0, 1]): the partitioner's scale runs from what it must
   keep at 0 (the graph inputs, which both figures exclude) to ``rewritten`` at 1. Where
   compression alone already keeps no more than the target, the budget is 1 and nothing is
   recomputed.
3. The patch is in force only around that graph's own compile (``applied``), never process-wide.

The report (``GraphRecord.budget``, ``Report.budget_lines``) shows the budget asked for, both
measured figures, the partitioner budget used, and the bytes the compiled graph keeps
(``GraphRecord.kept_bytes``, read from the backward it compiled).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

import torch
import torch.fx

from prac_fx.passes import torch_seam


@dataclasses.dataclass
class BudgetRecord:
    asked: float  # memory_budget, a fraction of ``uncompressed_bytes``
    uncompressed_bytes: int  # what the unrewritten graph keeps for backward (inputs excluded)
    rewritten_bytes: int  # what the rewritten graph keeps at partitioner budget 1
    partitioner_budget: float  # activation_memory_budget used for the rewritten graph's compile

    @property
    def target_bytes(self) -> int:
        return int(self.asked * self.uncompressed_bytes)


def _saved_of_backward(bw: torch.fx.GraphModule) -> int:
    """Bytes of the backward's inputs that the forward computed (not tangents, not graph inputs)."""
    total = 0
    for node in bw.graph.nodes:
        if node.op != "placeholder" or node.name.startswith(("tangents", "primals")):
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            numel = 1
            for d in val.shape:
                numel *= int(d) if isinstance(d, int) else int(getattr(d.node, "hint", None) or 1)
            total += numel * val.element_size()
    return total


def saved_bytes(gm: torch.fx.GraphModule, example_inputs: Sequence) -> int:
    """What ``gm``'s forward keeps for its backward under the partitioner's default (budget 1)."""
    seen: list[int] = []
    with torch_seam.activation_memory_budget(1.0):
        torch_seam.partition_only(gm, list(example_inputs),
                                  lambda fw, bw: seen.append(_saved_of_backward(bw)))
    return seen[0] if seen else 0


def partitioner_budget(asked: float, uncompressed: int, rewritten: int) -> float:
    """The partitioner's budget that keeps ``asked * uncompressed`` bytes of a graph whose default
    partition keeps ``rewritten`` (see the module docstring)."""
    if rewritten <= 0:
        return 1.0
    return min(1.0, max(0.0, asked * uncompressed / rewritten))


@contextlib.contextmanager
def applied(record: BudgetRecord | None):
    """The partitioner budget of ``record`` in force for one compile; nothing when None."""
    if record is None:
        yield
        return
    with torch_seam.activation_memory_budget(record.partitioner_budget):
        yield
