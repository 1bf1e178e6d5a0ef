"""``prac_fx.diff.compare`` on the golden model: what it reports, checked against independent
measurements. One compiled comparison is shared by the module."""
import json
import os
from pathlib import Path

import pytest
import torch

import prac_fx
from prac_fx import diff
from prac_fx.diff import breakdown
from prac_fx.diff import memory, render, workload
from prac_fx.config import PracConfig

GOLDEN = Path(__file__).parent / "golden"
SPEC = "tiny.py:build"  # relative to GOLDEN, so that the report names no machine path
RANK = 8
EXCLUDE = ["down"]


def _config():
    return PracConfig(rank=RANK, site_filter=lambda path: not any(t in path for t in EXCLUDE))


def _compare():
    cwd = os.getcwd()
    os.chdir(GOLDEN)
    try:
        work = workload.load(SPEC)
        return diff.compare(work, _config(), exclude=EXCLUDE)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def report():
    return _compare()


def _sites(report, **match):
    return [s for s in report["sites"] if all(s[k] == v for k, v in match.items())]


def test_every_site_status_is_reported(report):
    reasons = {s["reason"] for s in report["sites"] if s["status"] == "skipped"}
    assert reasons == {"attention", "nonlinear", "no trainable weight", "filtered",
                       "too narrow for the rank", "output head"}
    assert _sites(report, module="head")[0]["reason"] == "output head"
    assert _sites(report, module="block.down")[0]["reason"] == "filtered"
    assert _sites(report, module="frozen")[0]["reason"] == "no trainable weight"
    assert _sites(report, module="tail")[0]["reason"] == "too narrow for the rank"
    rewritten = _sites(report, status="rewritten")
    assert sorted(s["module"] for s in rewritten) == ["block.k", "block.out", "block.q", "block.up",
                                                      "block.v", "proj"]
    # q, k and v read the same input: one group, one basis.
    assert len({s["group"] for s in rewritten if s["module"] in ("block.q", "block.k", "block.v")}) == 1
    assert all((s["r1"], s["r2"], s["N"]) == (4, 4, 16) for s in rewritten)
    assert report["summary"] == {"sites": 9, "rewritten": 6, "groups": 4}


def _independent_saved_bytes(make_backend) -> int:
    """Saved bytes of one forward, through saved_tensors_hooks, on a fresh compile."""
    torch._dynamo.reset()
    cwd = os.getcwd()
    os.chdir(GOLDEN)
    try:
        work = workload.load(SPEC)
    finally:
        os.chdir(cwd)
    compiled = torch.compile(work.model, backend=make_backend())
    work.loss(compiled).backward()  # compile forward and backward first
    return memory.saved_bytes(lambda: work.loss(compiled), work.params)


def test_saved_totals_equal_saved_tensors_hooks(report):
    totals = report["saved"]["totals"]
    assert totals["inductor"] == _independent_saved_bytes(lambda: "inductor")
    assert totals["prac"] == _independent_saved_bytes(
        lambda: prac_fx.backend(rank=RANK, site_filter=_config().site_filter))
    assert report["saved"]["agrees"]
    assert totals["prac"] < totals["inductor"]


def test_compressed_copies_replace_saved_inputs(report):
    rows = report["saved"]["rows"]
    added = [r["prac"] for r in rows if r["change"] == "added"]
    removed = [r["inductor"] for r in rows if r["change"] == "removed"]
    # Each group saved as its compressed copy adds one (N, r) = (16, 8) mm output...
    saved_groups = {s["group"] for s in _sites(report, compressed_copy="saved")}
    copies = [t for t in added if t["op"] == "mm" and t["shape"] == [16, RANK]]
    assert len(copies) == len(saved_groups) == 3
    # ...and the exact activations those sites saved are gone.
    assert sum(t["counted"] for t in removed) > sum(t["counted"] for t in copies)
    assert [t["name"] for t in report["saved"]["removed"]] == [t["name"] for t in removed
                                                               if t["counted"]]
    assert [t["bytes"] for t in report["saved"]["added"]] == [t["counted"] for t in added
                                                              if t["counted"]]
    # Counted bytes sum to the totals; parameters never count.
    for side in ("inductor", "prac"):
        tensors = [r[side] for r in rows if r[side]]
        assert sum(t["counted"] for t in tensors) == report["saved"]["totals"][side]
        assert all(t["counted"] == 0 for t in tensors if t["kind"] == "parameter")


def test_weight_gradient_flops(report):
    flops = report["flops"]
    for row in flops["sites"]:
        N, n, m, r = row["N"], row["n"], row["m"], row["r"]
        assert row["exact"] == 2 * N * n * m
        assert row["factored"] == (2 * (N * r * m + m * r * n) if r else row["exact"])
    assert flops["exact"] == sum(r["exact"] for r in flops["sites"])
    assert flops["factored"] == sum(r["factored"] for r in flops["sites"])
    # One x @ P per group: q/k/v, out, up (n = 32) and proj (n = 32), r = 8, N = 16.
    assert flops["compress"] == 4 * 2 * 16 * 32 * RANK


def test_graph_diffs_mark_the_rewrite(report):
    kinds = [(d["graph"], d["kind"]) for d in report["diffs"]]
    assert kinds == [(0, "dynamo"), (0, "forward"), (0, "backward")]
    text = {d["kind"]: "\n".join(d["lines"]) for d in report["diffs"]}
    assert "# prac: rewritten, group" in text["dynamo"]
    assert "# prac: skipped: filtered" in text["dynamo"]
    assert "# prac: x @ P, group" in text["forward"]
    assert "# prac: weight gradient, low-rank part (grad_out with x @ P), group" in text["backward"]
    assert "# prac: weight gradient, back through P, group" in text["backward"]
    for d in report["diffs"]:
        assert d["lines"][0].startswith("--- graph 0") and d["changed"] > 0
        files = [l.split("# File: ")[-1].split(":")[0] for l in d["lines"] if "# File: " in l]
        assert files and not any("/" in f for f in files)  # basenames, no machine paths


def _check_schema(report):
    """The JSON schema documented in prac_fx/diff.py."""
    assert report["schema"] == diff.SCHEMA
    assert set(report) == {"schema", "model", "config", "graphs", "graph_breaks", "notes", "summary",
                           "sites", "saved", "heads", "flops", "diffs"}
    assert all(isinstance(c, int) and c > 0 for c in report["graph_breaks"].values())
    assert all(set(g) == {"index", "note"} for g in report["graphs"])
    assert set(report["model"]) == {"spec", "label", "settings"}
    assert set(report["config"]) == {"rank", "split", "bits", "group_size", "residual", "exclude"}
    site_keys = {"graph", "node", "module", "kind", "weight", "group", "N", "n", "m", "r1", "r2",
                 "status", "reason", "compressed_copy", "format", "copy_bytes"}
    assert all(set(s) == site_keys for s in report["sites"])
    saved = report["saved"]
    assert set(saved) == {"rows", "totals", "measured", "agrees", "removed", "added", "by_category"}
    assert set(saved["by_category"]) <= set(breakdown.CATEGORIES)
    assert all(set(v) == {"inductor", "prac"} for v in saved["by_category"].values())
    head_keys = {"graph", "node", "module", "rows", "vocab", "reduction", "chunk_rows",
                 "returns_logits", "status", "reason", "saved_before", "saved_after",
                 "grad_in_forward", "grad_bytes"}
    assert all(set(h) == head_keys for h in report["heads"])
    assert set(saved["totals"]) == {"inductor", "prac", "ratio", "bases"}
    tensor_keys = {"name", "shape", "dtype", "bytes", "op", "kind", "storage", "counted", "category"}
    for row in saved["rows"]:
        assert row["change"] in ("kept", "removed", "added")
        for side in ("inductor", "prac"):
            assert row[side] is None or set(row[side]) == tensor_keys
    assert set(report["flops"]) == {"sites", "exact", "factored", "ratio", "compress"}
    for d in report["diffs"]:
        assert set(d) == {"graph", "kind", "before", "after", "changed", "lines"}


def test_json_follows_the_documented_schema(report):
    _check_schema(json.loads(render.as_json(report)))


def test_two_runs_give_identical_output(report):
    again = _compare()
    assert render.as_json(again) == render.as_json(report)
    assert render.text(again) == render.text(report)


def test_outputs_match_golden_files(report):
    """The in-process render equals what the console script wrote (tests/test_cli.py)."""
    assert render.text(report) == (GOLDEN / "tiny.txt").read_text()
    assert render.as_json(report) == (GOLDEN / "tiny.json").read_text()


def test_colour_only_when_asked(report):
    assert "\033[" not in render.text(report)
    coloured = render.text(report, color=True)
    assert "\033[32m+" in coloured and "\033[31m-" in coloured


def test_html_is_one_self_contained_page(report):
    page = render.as_html(report)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page and "http" not in page and "<link" not in page
    assert page.count("<details>") == len(report["diffs"])
    assert '<span class="add">' in page and '<span class="del">' in page


def test_no_linear_site_is_not_an_error():
    cwd = os.getcwd()
    os.chdir(GOLDEN)
    try:
        work = workload.load("tiny.py:no_linear")
    finally:
        os.chdir(cwd)
    with pytest.raises(diff.NoLinearSites, match="no linear layer with a trained weight"):
        diff.compare(work, PracConfig(rank=RANK))


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_preset_totals_agree_with_hooks(preset):
    """Graph-derived totals equal the hooks' measurement on both presets."""
    work = workload.load(preset, layers=1, width=32, seq=16, batch=2, vocab=64)
    rep = diff.compare(work, PracConfig(rank=8), graphs=())
    assert rep["saved"]["agrees"], (rep["saved"]["totals"], rep["saved"]["measured"])
    # every linear site; lm_head went, with the loss, to the exact head-and-loss op
    assert rep["summary"]["rewritten"] == rep["summary"]["sites"] > 0
    assert rep["diffs"] == []


def test_saved_bytes_by_category_add_up(report):
    """The breakdown splits the counted totals, nothing more and nothing lost."""
    by = report["saved"]["by_category"]
    for side in ("inductor", "prac"):
        assert sum(v[side] for v in by.values()) == report["saved"]["totals"][side]
    assert by["bases"]["inductor"] == 0 and by["bases"]["prac"] == report["saved"]["totals"]["bases"] > 0
    assert by["linear inputs and copies"]["prac"] < by["linear inputs and copies"]["inductor"]


def test_head_rewrite_is_shown():
    """A causal LM: the head + loss row, its bytes before and after, the mark in the graph diff,
    and the logits gone from the "head and loss" category."""
    work = workload.load("gpt2", layers=1, width=32, seq=16, batch=2, vocab=512)
    rep = diff.compare(work, PracConfig(rank=8), graphs=("dynamo",))
    (head,) = rep["heads"]
    assert head["status"] == "rewritten" and head["module"] == "lm_head" and head["vocab"] == 512
    assert head["saved_before"] == 2 * 16 * 512 * 4
    # a float32 head computes its gradients in the forward: nothing of the logits is kept, and
    # the held input and weight gradients are counted under their own name
    assert head["grad_in_forward"] and head["saved_after"] == 0
    assert head["grad_bytes"] == 2 * 16 * 32 * 4 + 512 * 32 * 4
    by = rep["saved"]["by_category"]["head and loss"]
    assert by["inductor"] >= head["saved_before"] and by["prac"] <= head["saved_after"]
    assert rep["saved"]["by_category"]["head gradients"]["prac"] >= 512 * 32 * 4  # dW
    assert rep["saved"]["agrees"], (rep["saved"]["totals"], rep["saved"]["measured"])
    text = render.text(rep)
    assert "Output head and loss" in text and "head + loss -> chunked LinearCrossEntropy" in text
    assert "Saved for backward by what keeps it" in render.as_html(rep)
