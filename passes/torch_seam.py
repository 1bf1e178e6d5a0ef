"""The one place that touches torch's private APIs.

Checked on torch 2.13.0, 2.14.1 and 2.15.0 (``CHECKED_ON``; ``pyproject.toml`` declares
``torch>=2.13,<2.16`` and CI runs the suite on 2.13.0 and the graph tests on 2.14.1). When torch
changes, this file changes and the suite says whether the rest still holds. Everything here is a thin, named
wrapper, so that a reader sees which internal each caller depends on. Where a public API exists
the project uses it directly instead (``torch.compiler.reset``, ``torch.compiler.list_backends``).

What the project relies on, by area:

- Dynamo's graph: a placeholder's source object (``node._dynamo_source``) and the real tensor it
  was traced from (``node.meta["grapharg"]``); the Dynamo node each AOTAutograd node was traced
  from (``node.meta["from_node"]``); the calling module of a node as Dynamo prints it
  (``node.meta["nn_module_stack"]``, parsed in ``paths.py`` only); the source classes
  (``torch._dynamo.source``); the backend registry.
- Fake tensors: the tracing context's fake mode (``torch._guards``), ``FakeTensor``.
- FX: how a graph calls an ``autograd.Function`` (``graph_function``); a graph's code generator (``graph._codegen``, copied with a graph); the grad-mode switch
  Dynamo records as ``torch._C._set_grad_enabled``; the ``torch._C._nn`` functions Dynamo
  records for ``F.linear`` / ``F.gelu`` / ``F.silu``; the aten attention ops.
- Compilers: Inductor (``compile_fx`` with an ``inner_compile``), AOTAutograd without Inductor
  (``aot_autograd`` + ``boxed_nop``), the AOTAutograd cache and the partitioner's memory budget
  (``torch._functorch.config``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx

CHECKED_ON = ("2.13.0", "2.14.1", "2.15.0")


# -- Dynamo sources (torch._dynamo.source) ---------------------------------------------------------
def source_name(source) -> str:
    """A source's printed name (a property in 2.13, a method in older releases)."""
    name = source.name
    return name() if callable(name) else str(name)


def is_module_source(source) -> bool:
    """Whether Dynamo marks this link of a source chain as an ``nn.Module``."""
    from torch._dynamo.source import NNModuleSource

    return isinstance(source, NNModuleSource)


def source_step(source) -> str | None:
    """The path component one link of a source chain adds: an attribute name or a subscript;
    None for links that only mark or wrap (module markers, ``UnspecializedBuiltin...``)."""
    from torch._dynamo.source import AttrSource, DictGetItemSource, GetItemSource, NNModuleSource

    if isinstance(source, NNModuleSource):
        return None
    if isinstance(source, AttrSource):
        return str(source.member)
    if isinstance(source, (GetItemSource, DictGetItemSource)):
        index = source.index
        return str(index) if isinstance(index, (str, int)) else None
    return None


# -- Dynamo graph nodes ----------------------------------------------------------------------------
def node_source(node: torch.fx.Node):
    """The source object Dynamo gave a placeholder (None for inputs a pass added)."""
    return getattr(node, "_dynamo_source", None)


def set_node_source(node: torch.fx.Node, source) -> None:
    """Set a placeholder's source: Dynamo reads it from every placeholder of the graph a backend
    compiles, so a placeholder a pass adds needs one (None: not a frame input)."""
    node._dynamo_source = source


def traced_tensor(node: torch.fx.Node) -> torch.Tensor | None:
    """The real tensor Dynamo traced a graph input with (its parameter), when it recorded one."""
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return None
    try:
        example = grapharg.example
    except AssertionError:  # the weak reference to the tensor died (2.13 asserts)
        return None
    return example if isinstance(example, torch.Tensor) else None


def innermost_module(node: torch.fx.Node) -> str | None:
    """The source string of the module whose forward made ``node`` (``"L['self'].model.lm_head"``),
    as Dynamo keeps it in ``nn_module_stack``; None outside any module."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return str(list(stack.values())[-1][0])


def dynamo_origins(node: torch.fx.Node) -> list[str]:
    """The names of the nodes an AOTAutograd graph's node was traced from, nearest first, down
    to the Dynamo graph's (``node.meta["from_node"]``, a chain of ``NodeSource``)."""
    names = []
    chain = node.meta.get("from_node") or []
    while chain:
        source = chain[-1]
        names.append(source.name)
        chain = getattr(source, "from_node", None) or []
    return names


# -- FX ----------------------------------------------------------------------------------------------
def graph_function(function: type, module: str, name: str) -> Callable:
    """A plain Python function ``name`` of ``module`` that calls ``function.apply``: the target a
    pass gives a ``call_function`` node that runs the ``autograd.Function``.

    FX prints every target by its module and name. Up to 2.13 ``Function.apply`` was a Python
    classmethod (module ``torch.autograd.function``); from 2.14 it is a C builtin whose
    ``__module__`` is None, and code generation fails with "cannot find module for <built-in
    method apply ...>". A module-level function has a name on every release. It stays plain
    Python (not a ``torch.library.custom_op``), so AOTAutograd traces through it into aten ops:
    Inductor fuses the compression and the factored weight gradient with their neighbours, and
    the min-cut partitioner may recompute ``x @ P`` in the backward, which an opaque custom op
    would prevent. The caller binds the result to ``name`` in ``module`` so that it imports."""

    def call(*args):
        return function.apply(*args)

    call.__module__, call.__name__, call.__qualname__ = module, name, name
    call.__doc__ = f"``{function.__name__}.apply(*args)``, as a graph calls it."
    return call


def copy_codegen(source: torch.fx.Graph, target: torch.fx.Graph) -> None:
    """Give ``target`` a copy of ``source``'s code generator (Dynamo's graphs carry their own,
    which the copy must keep to print and run the same)."""
    import copy

    target._codegen = copy.deepcopy(source._codegen)


GRAD_MODE_FNS = frozenset({torch._C._set_grad_enabled})  # how Dynamo records torch.no_grad()
LINEAR_FNS = frozenset({torch._C._nn.linear, torch.nn.functional.linear})
C_NN_NONLINEAR_FNS = frozenset({torch._C._nn.gelu, torch._C._nn.silu})


def attention_ops() -> frozenset:
    """The scaled-dot-product attention functions and aten ops this torch build has."""
    ops = {torch.nn.functional.scaled_dot_product_attention}
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    ):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            ops.add(op)
            ops.add(op.default)
    return frozenset(ops)


# -- fake tensors ------------------------------------------------------------------------------------
def is_fake(value) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)


def fake_mode(gm: torch.fx.GraphModule):
    """The fake mode AOTAutograd will trace ``gm`` in: the tracing context's, else the one of the
    graph's example inputs; None when there is neither."""
    from torch._guards import TracingContext, detect_fake_mode

    context = TracingContext.try_get()
    if context is not None and context.fake_mode is not None:
        return context.fake_mode
    vals = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


# -- compilers ---------------------------------------------------------------------------------------
def inductor_compile(gm: torch.fx.GraphModule, example_inputs: list,
                     inner_compile: Callable | None = None,
                     config_patches: dict | None = None) -> Callable:
    """Inductor on a Dynamo graph, as ``backend="inductor"`` does; ``inner_compile`` wraps
    ``compile_fx_inner`` (it sees each partitioned forward and backward graph first);
    ``config_patches`` are Inductor settings in force for this compile only."""
    from torch._inductor.compile_fx import compile_fx

    kwargs = {"config_patches": config_patches} if config_patches else {}
    if inner_compile is not None:
        kwargs["inner_compile"] = inner_compile
    return compile_fx(gm, list(example_inputs), **kwargs)


def inductor_config(patches: dict | None):
    """A context with Inductor settings ``patches`` in force (nothing when empty)."""
    import contextlib

    if not patches:
        return contextlib.nullcontext()
    from torch._inductor import config

    return config.patch(patches)


def inductor_mode_options(mode: str) -> dict:
    """The Inductor settings a ``torch.compile`` mode stands for; RuntimeError for an unknown
    mode (public: ``torch._inductor.list_mode_options``)."""
    import torch._inductor

    return dict(torch._inductor.list_mode_options(mode))


def inductor_settings() -> dict:
    """Every Inductor setting and its current value (``torch._inductor.config``)."""
    from torch._inductor import config

    return config.get_config_copy()


def is_dynamo_control_flow(err: BaseException) -> bool:
    """Dynamo signals with exceptions: a restart of its analysis (``RestartAnalysis`` and its
    subclasses, e.g. ``TensorifyScalarRestartAnalysis`` under ``dynamic=True``), a frame to skip,
    a graph break, a reset. Those must reach Dynamo untouched; only the wrappers Dynamo puts
    around a genuine failure count as a failure."""
    from torch._dynamo import exc

    failures = (exc.BackendCompilerFailed, exc.InternalTorchDynamoError, exc.TorchRuntimeError)
    return isinstance(err, exc.TorchDynamoException) and not isinstance(err, failures)


def run_and_get_code(fn: Callable) -> tuple[object, list[str]]:
    """``fn()``'s result and the source of every module Inductor generated while it ran
    (``torch._inductor.utils.run_and_get_code``): Triton kernels on a GPU, C++ on the CPU."""
    from torch._inductor.utils import run_and_get_code as run

    return run(fn)


def graph_breaks():
    """Dynamo's graph breaks so far in this process, as a ``collections.Counter`` keyed by the
    first two lines of each reason, joined (``torch._dynamo.utils.counters["graph_break"]``:
    the break and Dynamo's explanation); a break out of an activation checkpoint by a side effect
    in its forward is keyed ``kinds.CHECKPOINT_BREAK`` instead (``is_checkpoint_side_effect``)."""
    from collections import Counter

    from torch._dynamo.utils import counters

    from prac_fx.passes import kinds

    out = Counter()
    for reason, count in counters.get("graph_break", {}).items():
        if is_checkpoint_side_effect(str(reason)):
            out[kinds.CHECKPOINT_BREAK] += count
            continue
        lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
        out["; ".join(lines[:2])] += count
    return out


def is_checkpoint_side_effect(reason: str) -> bool:
    """Whether a Dynamo graph-break reason is a side effect inside an activation checkpoint.
    Read from the whole text: its first line names only a higher-order op ("HOP: Unsafe side
    effect"); the hint names checkpointing and the setting that lifts it."""
    if _CHECKPOINT_FLAG in reason:
        return True
    text = reason.lower()
    return "side effect" in text and "hop" in text and "checkpoint" in text


_CHECKPOINT_FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def inductor_inner_compile(gm: torch.fx.GraphModule, example_inputs, *args, **kwargs):
    """Inductor's compiler for one partitioned graph (``kwargs["is_backward"]`` says which)."""
    from torch._inductor.compile_fx import compile_fx_inner

    return compile_fx_inner(gm, example_inputs, *args, **kwargs)


def aot_eager(gm: torch.fx.GraphModule, example_inputs: list,
              see: Callable[[torch.fx.GraphModule, bool], None], min_cut: bool = False) -> Callable:
    """AOTAutograd without Inductor: the partitioned graphs run as FX code; ``see(graph,
    is_backward)`` is called with each first. ``min_cut``: partition with the min-cut
    partitioner (Inductor's), which honours ``activation_memory_budget``."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    def forward(g, ex):
        see(g, False)
        return boxed_nop(g, ex)

    def backward(g, ex):
        see(g, True)
        return boxed_nop(g, ex)

    partition = {}
    if min_cut:
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        partition = {"partition_fn": min_cut_rematerialization_partition}
    return aot_autograd(fw_compiler=forward, bw_compiler=backward, **partition)(gm, list(example_inputs))


def autograd_cache_disabled():
    """A context without AOTAutograd's cache (a hit skips the compilers that record graphs)."""
    return torch._functorch.config.patch(enable_autograd_cache=False)


def activation_memory_budget(budget: float):
    """A context in which the min-cut partitioner keeps saved activations within ``budget``
    (a fraction of what it would save, 0 = recompute everything)."""
    return torch._functorch.config.patch(activation_memory_budget=budget)


def partition_only(gm: torch.fx.GraphModule, example_inputs: list,
                   see: Callable[[torch.fx.GraphModule, torch.fx.GraphModule], None],
                   partitioner: str = "min_cut") -> None:
    """Trace ``gm`` with AOTAutograd and partition it, compiling nothing; ``see(forward,
    backward)`` receives the partition (read it there: AOTAutograd compiles the backward lazily,
    at its first call). ``partitioner``: ``"min_cut"`` (the min-cut partitioner alone),
    ``"inductor"`` (as ``torch.compile`` partitions: Inductor's decompositions, its joint-graph
    passes, then min-cut with Inductor's fusion rules) or ``"default"`` (AOTAutograd's default,
    which ``aot_eager`` uses)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch import partitioners

    extra = {}
    if partitioner == "inductor":
        from torch._inductor.compile_fx import partition_fn as split
        from torch._inductor.decomposition import select_decomp_table

        extra["decompositions"] = select_decomp_table()
    elif partitioner == "min_cut":
        split = partitioners.min_cut_rematerialization_partition
    elif partitioner == "default":
        split = partitioners.default_partition
    else:
        raise ValueError(f"partitioner must be 'min_cut', 'inductor' or 'default', got {partitioner!r}")

    def partition(joint, joint_inputs, **kwargs):
        fw_module, bw_module = split(joint, joint_inputs, **kwargs)
        see(fw_module, bw_module)
        return fw_module, bw_module

    def nop(g, ex):
        return make_boxed_func(g.forward)

    aot_autograd(fw_compiler=nop, bw_compiler=nop, partition_fn=partition, **extra)(
        gm, list(example_inputs))


# -- the backend registry ----------------------------------------------------------------------------
def register_backend(name: str, compiler_fn: Callable) -> bool:
    """Register ``compiler_fn`` as ``torch.compile(backend=name)`` unless the name is known.

    A name is known when a backend was registered under it or an installed package declares it
    in the ``torch_dynamo_backends`` entry-point group (the registry loads that one at first
    use): ``torch.compiler.list_backends`` lists both. Returns whether it registered."""
    if name in torch.compiler.list_backends(exclude_tags=()):
        return False
    from torch._dynamo import register_backend as register

    register(compiler_fn=compiler_fn, name=name)
    return True


# -- activation checkpointing under Dynamo ---------------------------------------------------------
def checkpoint_side_effects_allowed():
    """A context in which Dynamo traces an activation-checkpointed region whose forward has a
    side effect (``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint``: the
    effect is not replayed when the backward recomputes the region) instead of breaking the
    graph out of the checkpoint and running the region uncompiled. transformers 5.25's
    ``kernels`` layers set a context variable in every attention forward, so a checkpointed
    Hugging Face model needs it. Raises RuntimeError where the release lacks the setting."""
    if not hasattr(torch._dynamo.config, _CHECKPOINT_FLAG):
        raise RuntimeError(f"torch {torch.__version__} has no torch._dynamo.config.{_CHECKPOINT_FLAG}: "
                           f"an activation checkpoint with a side effect in its forward runs "
                           f"uncompiled on this release")
    return torch._dynamo.config.patch(**{_CHECKPOINT_FLAG: True})


def checkpoint_body(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """For a ``tag_activation_checkpoint`` node (``torch.utils.checkpoint`` traced by Dynamo):
    ``(body, operands, selective)``, the region's graph module, the outer nodes bound to its
    placeholders, and whether a ``context_fn`` (a selective-checkpoint policy) decides what it
    saves. None for any other node."""
    op = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    if op is None or node.op != "call_function" or node.target is not op:
        return None
    body_ref = node.args[0] if node.args else None
    if not isinstance(body_ref, torch.fx.Node) or body_ref.op != "get_attr":
        return None
    body = getattr(gm, str(body_ref.target), None)
    if not isinstance(body, torch.fx.GraphModule):
        return None
    selective = body.meta.get("_checkpoint_context_fn") is not None
    return body, list(node.args[1:]), selective
