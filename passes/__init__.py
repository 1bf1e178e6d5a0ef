"""FX passes that rewrite linear/matmul sites of a Dynamo graph into PRAC-compressed ops.

Modules: ``sites`` (find and classify), ``grouping`` (share one basis per input),
``rewrite`` (insert the compressed ops and basis inputs), ``ops`` (the ops themselves),
``probe`` (the graph that measures activations for a basis refresh), ``pipeline`` (the order).
This package never imports ``prac_fx``.
"""
from prac_fx.passes.graph_state import GraphState, Group, PassResult, Site, SitePolicy
from prac_fx.passes.pipeline import PIPELINE, run

__all__ = ["GraphState", "Group", "PassResult", "Site", "SitePolicy", "PIPELINE", "run"]
