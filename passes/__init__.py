"""FX passes that rewrite linear/matmul sites of a Dynamo graph into PRAC-compressed ops.

Modules: ``head_loss`` (an output head and its cross-entropy loss become one exact chunked op,
``chunked_ce``), ``sites`` (find and classify), ``grouping`` (share one basis per input),
``rewrite`` (insert the compressed ops and basis inputs), ``ops`` (the ops themselves),
``probe`` (the graph that measures activations for a basis refresh), ``pipeline`` (the order).
This package never imports ``prac_fx``.
"""
from passes.graph_state import GraphState, Group, PassResult, Site, SitePolicy
from passes.pipeline import PIPELINE, run

__all__ = ["GraphState", "Group", "PassResult", "Site", "SitePolicy", "PIPELINE", "run"]
