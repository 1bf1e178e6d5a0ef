"""Capture: compile a workload with one ``PracBackend``, run one training step, and keep what
the diff reads.

``capture(work, backend)`` returns a ``Side``: the backend's ``GraphRecord`` per Dynamo graph,
what the diff needs from each Dynamo graph that the record does not keep (``DynamoInfo``), the
bytes ``saved_tensors_hooks`` saw for one forward, and the compile-and-step seconds.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from prac_fx.backend import PracBackend
from prac_fx.diff import memory
from prac_fx.diff.workload import Workload
from prac_fx.passes import torch_seam
from prac_fx.passes.paths import module_path
from prac_fx.report import GraphRecord


@dataclasses.dataclass
class DynamoInfo:
    """What the diff needs from a Dynamo graph that the backend's record does not keep."""

    inputs: list[str]  # per graph input: "parameter", "input" or "symint"
    modules: dict[str, str]  # node name -> module path of the call
    rows: dict[str, int]  # node name -> rows (numel / last dim) of its value


class _Recorder:
    """The backend ``torch.compile`` gets: notes the Dynamo graph's inputs and node metadata,
    then hands the graph to the ``PracBackend``."""

    def __init__(self, backend: PracBackend):
        self.backend = backend
        self.graphs: list[DynamoInfo] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        inputs = ["parameter" if isinstance(e, torch.nn.Parameter) else
                  "input" if isinstance(e, torch.Tensor) else "symint" for e in example_inputs]
        modules, rows = {}, {}
        for node in gm.graph.nodes:
            modules[node.name] = module_path(node)
            val = node.meta.get("example_value")
            if isinstance(val, torch.Tensor) and val.dim() >= 1 and isinstance(val.shape[-1], int) \
                    and val.shape[-1] > 0 and isinstance(val.numel(), int):
                rows[node.name] = val.numel() // val.shape[-1]
        self.graphs.append(DynamoInfo(inputs, modules, rows))
        return self.backend(gm, example_inputs)


@dataclasses.dataclass
class Side:
    records: list[GraphRecord]
    infos: list[DynamoInfo]
    measured: int  # saved_tensors_hooks bytes of one forward
    seconds: float


def capture(work: Workload, backend: PracBackend) -> Side:
    torch.compiler.reset()
    for p in work.params:
        p.grad = None
    recorder = _Recorder(backend)
    compiled = torch.compile(work.model, backend=recorder)
    start = time.perf_counter()
    # An AOTAutograd cache hit skips the compiler the backend records the partitioned graphs in.
    with torch_seam.autograd_cache_disabled():
        work.loss(compiled).backward()
        seconds = time.perf_counter() - start
        n_graphs = len(backend.graphs)
        measured = memory.saved_bytes(lambda: work.loss(compiled), work.params)
    for p in work.params:
        p.grad = None
    records = backend.graphs[:n_graphs]  # a recompile while measuring would add graphs
    return Side(records, recorder.graphs[:n_graphs], measured, seconds)
