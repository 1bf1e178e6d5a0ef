"""The ``prac-fx diff`` tool: what the PRAC pass changes in a model's graphs and what it saves.

One entry point, ``compare(workload, config)`` (the command line, ``prac_fx.diff.cli``, parses
arguments and prints). Modules, in the order a comparison runs:

- ``workload``: load the model to compare (a preset from ``models``, or a user factory);
- ``capture``: compile it with a ``PracBackend``, run one training step, keep the records;
- ``saved``: saved-tensor accounting from the partitioned graphs (``memory`` measures the same
  step with ``saved_tensors_hooks``);
- ``flops``: weight-gradient flops, exact against factored;
- ``graphs``: align and diff the Dynamo, forward and backward graphs (``graph_text``);
- ``compare``: put the report together (its docstring holds the JSON schema);
- ``render``: text, JSON and HTML output.

The benchmark suite (``python -m bench``, from a checkout) reuses ``models`` and ``memory``.
"""
from prac_fx.diff.compare import GRAPH_KINDS, SCHEMA, NoLinearSites, compare, config_summary, quiet_logs

__all__ = ["GRAPH_KINDS", "SCHEMA", "NoLinearSites", "compare", "config_summary", "quiet_logs"]
