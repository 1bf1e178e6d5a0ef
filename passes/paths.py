"""Module and parameter paths of a Dynamo graph, independent of how Dynamo spells the root.

Dynamo names a graph input by its *source*: the chain of lookups from a local or global of the
compiled frame to the tensor. The root of that chain depends on how the model was entered:
``L['self']`` for ``torch.compile(model)`` on older transformers releases, ``L['args'][0]`` where
a wrapper enters the forward (transformers 5.24, ``model.compile()``), ``L['model']`` for a
function that takes the model as an argument, ``G['model']`` for a global. The paths the
project shows and keys its bases by are the model's own ``named_parameters()`` /
``named_modules()`` names: the root and everything Dynamo spells on the way to the root module
(``['args'][0]``) are dropped, and so are the containers (``_modules``, ``_parameters``,
``_buffers``) and the wrappers that ``torch.compile`` and activation checkpointing put around a
module (``_orig_mod``, ``_checkpoint_wrapped_module``, ``_fsdp_wrapped_module``).

- ``parameter_path(node)`` reads the placeholder's source *object* (``node._dynamo_source``), a
  chain of ``AttrSource`` / ``GetItemSource`` / ``DictGetItemSource`` links, and takes the root
  as everything below the first link that Dynamo marks as a module (``NNModuleSource`` and its
  subclasses). Where no link is so marked it falls back to the rule for strings below.
- ``module_path(node)`` reads ``node.meta["nn_module_stack"]``, which Dynamo keeps only as
  strings (``"L['args'][0].model.layers.0"``); they are tokenised, and the root is the leading
  ``L[...]`` / ``G[...]`` with every subscript that directly follows it.

Both end in ``_join``, so a parameter and the module that owns it always agree, and the diff
tool and the passes name a site the same way.
"""
from __future__ import annotations

import re

import torch.fx

from prac_fx.passes import torch_seam

CONTAINERS = frozenset({"_modules", "_parameters", "_buffers"})
WRAPPERS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})

# One token of a source string: a root local/global, an attribute, or a subscript.
_TOKEN = re.compile(
    r"(?P<root>[LG])\[(?P<rq>['\"])(?P<rname>.*?)(?P=rq)\]"
    r"|\.(?P<attr>\w+)"
    r"|\[(?P<q>['\"])(?P<key>.*?)(?P=q)\]"
    r"|\[(?P<index>-?\d+)\]"
)


def _join(parts: list[str]) -> str:
    return ".".join(p for p in parts if p not in CONTAINERS and p not in WRAPPERS)


def tokens(text: str) -> list[tuple[str, str]]:
    """``"L['args'][0].model._modules['lm_head']"`` -> ``[("root", "args"), ("item", "0"),
    ("attr", "model"), ("attr", "_modules"), ("item", "lm_head")]``. Unparsed text ends the
    list (a spelling this module does not know yields a shorter path, never an exception)."""
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            break
        if m.group("root") is not None:
            out.append(("root", m.group("rname")))
        elif m.group("attr") is not None:
            out.append(("attr", m.group("attr")))
        elif m.group("key") is not None:
            out.append(("item", m.group("key")))
        else:
            out.append(("item", m.group("index")))
        pos = m.end()
    return out


def path_from_text(text: str) -> str:
    """The dotted path of a source string, its root stripped (see the module docstring)."""
    toks = tokens(text)
    if not toks or toks[0][0] != "root":
        return ""
    i = 1
    while i < len(toks) and toks[i][0] == "item":  # ['args'][0], ['kwargs']['model']
        i += 1
    return _join([value for _, value in toks[i:]])


def path_from_source(source) -> str:
    """The dotted path of a Dynamo source object, its root stripped."""
    chain = []  # leaf first
    link = source
    while link is not None:
        chain.append(link)
        link = getattr(link, "base", None)
    chain.reverse()  # root first
    marked = [i for i, link in enumerate(chain) if torch_seam.is_module_source(link)]
    if not marked:
        return path_from_text(torch_seam.source_name(source))
    parts = []
    for link in chain[marked[0] + 1:]:
        part = torch_seam.source_step(link)
        if part is not None:
            parts.append(part)
    return _join(parts)


def parameter_path(node: torch.fx.Node) -> str:
    """Dotted path of a Dynamo graph input (``"model.layers.0.q_proj.weight"``), or ``""``."""
    source = torch_seam.node_source(node)
    return "" if source is None else path_from_source(source)


def module_path(node: torch.fx.Node) -> str:
    """Dotted path of the module whose forward made ``node`` (``"lm_head"``), or ``""``.

    This names the calling module even where the weight belongs to another one (GPT-2's
    ``lm_head`` reads the tied ``transformer.wte.weight``)."""
    text = torch_seam.innermost_module(node)
    return "" if text is None else path_from_text(text)
