"""The one place that touches torch's private APIs.

Checked on torch 2.13.0. When torch changes, this file changes and the suite says whether the
rest still holds. Everything here is a thin, named wrapper, so that a reader sees which internal
each caller depends on.
"""
from __future__ import annotations

import torch

CHECKED_ON = "2.13.0"


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


# -- activation checkpointing under Dynamo ---------------------------------------------------------
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
