"""find_sites: classify the nodes of a Dynamo (torch IR) graph that the PRAC rewrite may touch.

Matches
-------
- ``F.linear`` / ``torch._C._nn.linear`` (``kind="linear"``, weight ``(m, n)``);
- ``torch.addmm(bias, x, W)`` with ``beta == alpha == 1`` (``kind="addmm"``, GPT-2's Conv1D,
  weight ``(n, m)``);
- ``torch.matmul`` / ``operator.matmul`` / ``torch.mm`` / ``Tensor.matmul`` with the trained
  parameter on the right (``kind="matmul"``, weight ``(n, m)``).

A site is named by the module that calls it (``nn_module_stack``; for a functional call in the
compiled frame itself, by its weight's owner). A site is a candidate when its weight is a graph
input that requires grad (a trained parameter, tied or not), 2-D and floating point, and its
input has at least two dimensions. Skipped with that reason are candidates in an output head
(``policy.is_head``: ``lm_head``, a classifier), those the site filter rejects, those the
policy names as kept anyway (``policy.kept_anyway``: the backend found their input saved for
another op's backward, so a compressed copy would save nothing), those whose width n is below
the rank, and those whose input has so few rows N that the factored weight
gradient would cost more than the exact one (r (N + n) >= N n with r < n: a pooled or classifier
input with one row per sample). A rank equal to the width keeps every direction and is never
skipped for its rows (the exact mode the tests use).

Linear sites inside an activation-checkpointed region (``torch.utils.checkpoint``, which Dynamo
traces as a ``tag_activation_checkpoint`` call on a subgraph) are recorded as skipped: the
region's activations are recomputed in the backward and never saved, so there is nothing to
compress; under a selective-checkpoint policy (``context_fn``) the policy decides what is saved,
and the region is left to it.

Attention ops (SDPA, flash/efficient attention) and element-wise nonlinear ops are recorded as
skipped (``attention`` / ``nonlinear``) and never touched: compressing the input of a nonlinear
operator biases its gradient (arXiv 2605.01255), and attention keeps its own saved tensors. A
matmul of two activations (attention scores in eager attention) is skipped as ``no trainable
weight``.

Does not change the graph.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from prac_fx.passes import kinds, torch_seam
from prac_fx.passes.graph_state import GraphState, PassResult, Site, SitePolicy
from prac_fx.passes.paths import module_path, parameter_path

_LINEAR = torch_seam.LINEAR_FNS

CHECKPOINTED, SELECTIVE = kinds.CHECKPOINTED, kinds.SELECTIVE
_ADDMM = {torch.addmm}
_MATMUL = {torch.matmul, operator.matmul, torch.mm}
_MATMUL_METHODS = {"matmul", "mm", "__matmul__"}

_ATTENTION = torch_seam.attention_ops()

_NONLINEAR = {
    F.gelu, F.silu, F.relu, F.tanh, F.sigmoid, F.softmax, F.layer_norm, F.rms_norm, F.mish,
    torch.tanh, torch.sigmoid, torch.relu, torch.softmax,
    torch.rsqrt, torch.exp, torch.layer_norm, F.dropout, F.elu, F.leaky_relu, torch.erf,
} | torch_seam.C_NN_NONLINEAR_FNS
_NONLINEAR_METHODS = {"tanh", "sigmoid", "relu", "softmax", "rsqrt", "exp", "pow", "erf"}

def _val(node):
    if isinstance(node, torch.fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return None


def _rows(x_val: torch.Tensor) -> int | None:
    """N, the rows of the flattened input (all but the last dimension), where known: a symbolic
    size counts by its hint, and None (unknown) never skips a site."""
    rows = 1
    for size in x_val.shape[:-1]:
        if not isinstance(size, int):
            size = getattr(getattr(size, "node", None), "hint", None)
            if not isinstance(size, int):
                return None
        rows *= size
    return rows


def _is_trained_weight(node) -> bool:
    v = _val(node)
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "placeholder"
        and isinstance(v, torch.Tensor)
        and v.requires_grad
        and v.dim() == 2
        and v.is_floating_point()
    )


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def match(node: torch.fx.Node):
    """(kind, x, weight, bias) for a linear-like node, else None. Does not check the weight."""
    if node.op == "call_function" and node.target in _LINEAR:
        return kinds.LINEAR, _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if node.op == "call_function" and node.target in _ADDMM:
        if _arg(node, 3, "beta", 1) != 1 or _arg(node, 4, "alpha", 1) != 1:
            return kinds.UNSUPPORTED, None, None, None
        return kinds.ADDMM, _arg(node, 1, "mat1"), _arg(node, 2, "mat2"), _arg(node, 0, "input")
    if (node.op == "call_function" and node.target in _MATMUL) or (
        node.op == "call_method" and node.target in _MATMUL_METHODS
    ):
        return kinds.MATMUL, node.args[0], node.args[1], None
    return None


def _classify_other(node: torch.fx.Node) -> str | None:
    if node.op == "call_function" and node.target in _ATTENTION:
        return kinds.ATTENTION
    if (node.op == "call_function" and node.target in _NONLINEAR) or (
        node.op == "call_method" and node.target in _NONLINEAR_METHODS
    ):
        return kinds.NONLINEAR
    return None


def _checkpointed_sites(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[Site]:
    """The linear sites inside a checkpointed region, each skipped with the reason: a region's
    activations are recomputed in the backward, not saved, so there is nothing to compress."""
    found = torch_seam.checkpoint_body(gm, node)
    if found is None:
        return []
    body, operands, selective = found
    outer = dict(zip([n for n in body.graph.nodes if n.op == "placeholder"], operands))
    sites = []
    for inner in body.graph.nodes:
        m = match(inner)
        if m is None or m[0] == "unsupported":
            continue
        kind, _, weight, _ = m
        weight = outer.get(weight, weight)
        if not _is_trained_weight(weight):
            continue
        site = Site(node=f"{node.name}.{inner.name}", kind=kind,
                    reason=SELECTIVE if selective else CHECKPOINTED)
        site.weight = parameter_path(weight) or weight.name
        site.module = module_path(inner) or site.weight.rpartition(".")[0]
        w_val = _val(weight)
        site.n, site.m = (w_val.shape[1], w_val.shape[0]) if kind == "linear" else tuple(w_val.shape)
        site.n, site.m = int(site.n), int(site.m)
        sites.append(site)
    return sites


def _itemsize_read(x_val: torch.Tensor) -> int:
    """Bytes per element of the input as the linear reads it: a float32 input under an autocast
    of a 16-bit dtype (the caller's, active while the backend compiles, as Dynamo guards on it)
    is read as a bf16/fp16 cast, which is what an exact graph would keep for the backward."""
    device = x_val.device.type
    if x_val.dtype == torch.float32 and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if dtype in (torch.bfloat16, torch.float16):
            return dtype.itemsize
    return x_val.element_size()


def run(state: GraphState, policy: SitePolicy) -> PassResult:
    result = PassResult("find_sites")
    sites: list[Site] = []
    for node in state.gm.graph.nodes:
        checkpointed = _checkpointed_sites(state.gm, node)
        if checkpointed:
            sites.extend(checkpointed)
            continue
        m = match(node)
        if m is None:
            other = _classify_other(node)
            if other is not None:
                sites.append(Site(node=node.name, kind=other, reason=other))
            continue
        kind, x, weight, bias = m
        site = Site(node=node.name, kind=kind)
        sites.append(site)
        if kind == kinds.UNSUPPORTED:
            site.reason = kinds.UNSUPPORTED_PATTERN
            continue
        if not _is_trained_weight(weight):
            # A parameter on the left of a matmul is a pattern this pass does not rewrite.
            site.reason = (
                kinds.UNSUPPORTED_PATTERN if kind == kinds.MATMUL and _is_trained_weight(x)
                else kinds.NO_TRAINABLE_WEIGHT
            )
            continue
        x_val = _val(x)
        if not isinstance(x_val, torch.Tensor) or x_val.dim() < 2 or not x_val.is_floating_point():
            site.reason = kinds.UNSUPPORTED_PATTERN
            continue
        if bias is not None and not isinstance(bias, torch.fx.Node):
            site.reason = kinds.UNSUPPORTED_PATTERN
            continue
        w_val = _val(weight)
        site.weight = parameter_path(weight) or weight.name
        site.module = module_path(node) or (
            site.weight.rsplit(".", 1)[0] if "." in site.weight else site.weight)
        site.input_node = x.name
        site.n, site.m = (w_val.shape[1], w_val.shape[0]) if kind == kinds.LINEAR else tuple(w_val.shape)
        site.n, site.m = int(site.n), int(site.m)
        if policy.is_head(site.module):
            site.reason = kinds.OUTPUT_HEAD
            continue
        if not policy.include(site.module):
            site.reason = kinds.FILTERED
            continue
        if node.name in getattr(policy, "kept_anyway", ()):
            site.reason = kinds.KEPT_ANYWAY
            continue
        rank_for = getattr(policy, "rank_for", None)  # optional: a rank per module path
        if rank_for is not None and rank_for(site.module) is None:
            site.reason = kinds.FILTERED  # a rank mapping that names no rank for this module
            continue
        ranks = policy.ranks(site.n, site.module)
        if ranks is None:
            site.reason = kinds.TOO_NARROW
            continue
        rows, rank = _rows(x_val), ranks[0] + ranks[1]
        if rows is not None and rank < site.n and rank * (rows + site.n) >= rows * site.n:
            # The factored weight gradient costs r (N + n) m flops against N n m for the exact
            # one, and the copy saves (n - r) N elements: with this few rows (a pooled or
            # classifier input of one vector per sample) compressing gains nothing and adds noise.
            site.reason = kinds.TOO_FEW_ROWS
            continue
        site.r1, site.r2 = ranks
        site.rows, site.itemsize = rows, _itemsize_read(x_val)
        format_for = getattr(policy, "format_for", None)
        if format_for is not None:
            site.fmt = format_for(site.n, site.module)
        site.reason = None
        site.status = kinds.CANDIDATE
        result.sites_matched += 1
    state.sites = sites
    skipped = {}
    for s in sites:
        if s.reason:
            skipped[s.reason] = skipped.get(s.reason, 0) + 1
    result.notes = [f"skipped {k}: {v}" for k, v in sorted(skipped.items())]
    return result
