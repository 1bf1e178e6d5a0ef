"""FX passes that rewrite linear/matmul sites of a Dynamo graph into PRAC-compressed ops.

Modules: ``head_loss`` (an output head and its cross-entropy loss become one exact chunked op,
``chunked_ce``), ``sites`` (find and classify), ``grouping`` (share one basis per input),
``rewrite`` (insert the compressed ops and basis inputs), ``ops`` (the ops themselves),
``probe`` (the graph that measures activations for a basis refresh), ``pipeline`` (the order),
``paths`` (module and parameter paths), ``kinds`` (the names of kinds, statuses, skip reasons
and node tags), ``torch_seam`` (every private torch API the project uses).
The folder is ``passes/``; it installs as ``prac_fx.passes`` and imports nothing else of
``prac_fx`` (the backend imports it, never the reverse).
"""
from prac_fx.passes.graph_state import BasisSpec, GraphState, Group, PassResult, Site, SitePolicy
from prac_fx.passes.pipeline import PIPELINE, run

__all__ = ["BasisSpec", "GraphState", "Group", "PassResult", "Site", "SitePolicy", "PIPELINE", "run"]
