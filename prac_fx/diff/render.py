"""Renderers of a ``prac_fx.diff.compare`` report: plain or coloured text, JSON, one HTML page.

All three read only the report dict, so they show the same content; none adds anything that
changes from run to run (no times, paths or versions), which keeps outputs comparable.
"""
from __future__ import annotations

import html
import json

from tabulate import tabulate
from torch.fx.graph import dtype_abbrs

from prac_fx.passes import kinds

_ANSI = {"bold": "\033[1m", "red": "\033[31m", "green": "\033[32m", "yellow": "\033[33m",
         "cyan": "\033[36m", "dim": "\033[2m", "reset": "\033[0m"}


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def human_flops(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} FLOP"


_DTYPE_ABBR = {str(dt).replace("torch.", ""): abbr for dt, abbr in dtype_abbrs.items()}


def _ratio(r) -> str:
    return "n/a" if r is None else f"x{r:.3f}"


def _config(report: dict) -> str:
    c = report["config"]
    text = f"rank={c['rank']} split={c['split']}"
    if c.get("bits") is not None:
        text += f" bits={c['bits']}" + (f" group_size={c['group_size']}" if c.get("group_size") else "")
        text += " residual" if c.get("residual") else ""
    return text + (f" exclude={','.join(c['exclude'])}" if c["exclude"] else "")


# -- sections as rows (shared by text and HTML) ---------------------------------------------------
def site_rows(report: dict) -> tuple[list[str], list[list]]:
    head = ["graph", "module", "node", "kind", "input group", "N", "n", "m", "r1", "r2", "status",
            "compressed copy", "format", "copy bytes"]
    rows = []
    for s in report["sites"]:
        status = kinds.REWRITTEN if s["status"] == kinds.REWRITTEN else f"skipped: {s['reason']}"
        rows.append([s["graph"], s["module"] or "(root)", s["node"], s["kind"], s["group"] or "",
                     _blank(s["N"]), _blank(s["n"]), _blank(s["m"]), _blank(s["r1"]), _blank(s["r2"]),
                     status, s["compressed_copy"], _blank(s["format"]), _blank(s["copy_bytes"])])
    return head, rows


def _blank(v):
    return "" if v is None else v


def _tensor(t: dict) -> str:
    dtype = _DTYPE_ABBR.get(t["dtype"], t["dtype"])
    return f"{dtype}[{','.join(str(d) for d in t['shape'])}]"


def saved_rows(report: dict) -> tuple[list[str], list[list], list[str]]:
    """Side-by-side rows of the counted tensors (parameters left out), and each row's change.

    ``bytes`` is what a tensor adds to the total: ``in X`` when it views storage already counted
    for ``X``."""
    several = len(report["graphs"]) > 1  # then a graph column: names repeat across graphs
    head = ["graph"] * several + ["inductor", "tensor", "bytes", "op", "prac", "tensor", "bytes", "op",
                                  "change"]
    rows, changes = [], []

    def cols(t):
        if t is None:
            return ["", "", "", ""]
        size = human_bytes(t["counted"]) if t["counted"] else f"in {t['storage']}"
        op = t["op"] if t["kind"] in ("activation", "input") else f"{t['op']} ({t['kind']})"
        return [t["name"], _tensor(t), size, op]

    for r in report["saved"]["rows"]:
        a, b = r["inductor"], r["prac"]
        if all(t is None or t["kind"] == "parameter" for t in (a, b)):
            continue
        rows.append([r["graph"]] * several + cols(a) + cols(b) + [r["change"]])
        changes.append(r["change"])
    return head, rows, changes


def flop_rows(report: dict) -> tuple[list[str], list[list]]:
    head = ["graph", "module", "N", "n", "m", "r", "exact", "factored", "ratio"]
    rows = [[f["graph"], f["module"] or "(root)", f["N"], f["n"], f["m"], f["r"] or "",
             human_flops(f["exact"]), human_flops(f["factored"]),
             _ratio(f["factored"] / f["exact"]) if f["exact"] else ""]
            for f in report["flops"]["sites"]]
    return head, rows


def saved_summary(report: dict) -> list[str]:
    s = report["saved"]
    t, m = s["totals"], s["measured"]
    lines = [f"total counted: {human_bytes(t['inductor'])} -> {human_bytes(t['prac'])} "
             f"({_ratio(t['ratio'])}, {human_bytes(t['prac'] - t['inductor'])}); "
             f"bytes {t['inductor']} -> {t['prac']}"]
    if t.get("bases"):
        lines.append(f"of which PRAC bases: {human_bytes(t['bases'])} (held by the backend between "
                     "steps anyway; counted because autograd keeps a reference)")
    check = "agrees" if s["agrees"] else "DIFFERS from the graph count: trust the measurement"
    lines.append(f"measured with saved_tensors_hooks: {m['inductor']} -> {m['prac']} bytes ({check})")
    n_params = {side: sum(1 for r in s["rows"] if r[side] and r[side]["kind"] == "parameter")
                for side in ("inductor", "prac")}
    lines.append(f"parameters and views of them saved (not counted): {n_params['inductor']} -> "
                 f"{n_params['prac']}")
    several = len(report["graphs"]) > 1

    def names(tensors):
        return ", ".join(f"{'g%d:' % t['graph'] if several else ''}{t['name']} "
                         f"({human_bytes(t['bytes'])})" for t in tensors)

    if s["removed"]:
        lines.append("removed by the pass: " + names(s["removed"]))
    if s["added"]:
        lines.append("added by the pass: " + names(s["added"]))
    return lines


def category_rows(report: dict) -> tuple[list[str], list[list]]:
    """Saved bytes by what keeps them (``prac_fx/diff/breakdown.py``), inductor -> prac."""
    head = ["kept by", "inductor", "prac", "change"]
    rows = [[name, human_bytes(v["inductor"]), human_bytes(v["prac"]),
             human_bytes(v["prac"] - v["inductor"])]
            for name, v in report["saved"].get("by_category", {}).items()]
    return head, rows


def head_table_rows(report: dict) -> tuple[list[str], list[list]]:
    head = ["graph", "loss node", "head", "rows", "vocab", "reduction", "chunk rows", "status",
            "logits kept before", "after"]
    rows = [[h["graph"], h["node"], h["module"], _blank(h["rows"]), _blank(h["vocab"]),
             h["reduction"], _blank(h["chunk_rows"]),
             h["status"] if h["status"] == "rewritten" else f"skipped: {h['reason']}",
             human_bytes(h["saved_before"]) if h["status"] == "rewritten" else "",
             human_bytes(h["saved_after"]) if h["status"] == "rewritten" else ""]
            for h in report.get("heads", [])]
    return head, rows


def flop_summary(report: dict) -> str:
    f = report["flops"]
    return (f"weight-gradient matmuls: {human_flops(f['exact'])} -> {human_flops(f['factored'])} "
            f"({_ratio(f['ratio'])}); the forward adds {human_flops(f['compress'])} for x @ P")


# -- text -----------------------------------------------------------------------------------------
def text(report: dict, *, color: bool = False) -> str:
    def c(style: str, s: str) -> str:
        return f"{_ANSI[style]}{s}{_ANSI['reset']}" if color else s

    out: list[str] = []
    summ = report["summary"]
    out.append(c("bold", f"prac-fx diff {report['model']['label']}  [{_config(report)}]"))
    out.append(f"{len(report['graphs'])} graph(s); {summ['rewritten']} of {summ['sites']} linear "
               f"sites with a trained weight rewritten, in {summ['groups']} input group(s)")
    out += [f"graph {g['index']}: {g['note']}" for g in report["graphs"] if g["note"]]
    out += [f"note: {n}" for n in report["notes"]]

    out += ["", c("bold", "Sites")]
    head, rows = site_rows(report)
    table = tabulate(rows, headers=head).splitlines()
    out += table[:2]
    for line, s in zip(table[2:], report["sites"]):
        out.append(c("green", line) if s["status"] == kinds.REWRITTEN else
                   c("dim", line) if s["kind"] not in kinds.LINEAR_KINDS else line)

    out += ["", c("bold", "Saved for backward (what the forward keeps), inductor | prac")]
    head, rows, changes = saved_rows(report)
    table = tabulate(rows, headers=head).splitlines()
    out += table[:2]
    for line, change in zip(table[2:], changes):
        style = {"removed": "red", "added": "green"}.get(change)
        out.append(c(style, line) if style else line)
    out += saved_summary(report)
    head, rows = category_rows(report)
    if rows:
        out += ["", c("bold", "Saved for backward by what keeps it")]
        out += tabulate(rows, headers=head).splitlines()
    head, rows = head_table_rows(report)
    if rows:
        out += ["", c("bold", "Output head and loss")]
        out += tabulate(rows, headers=head).splitlines()

    out += ["", c("bold", "Weight-gradient flops (per step)")]
    head, rows = flop_rows(report)
    out += tabulate(rows, headers=head).splitlines()
    out.append(flop_summary(report))

    for d in report["diffs"]:
        out += ["", c("bold", f"Graph {d['graph']} {d['kind']}: {d['changed']} line(s) changed")]
        if not d["lines"]:
            out.append("(no change)")
        for line in d["lines"]:
            if not color:
                out.append(line)
            elif line.startswith(("---", "+++")):
                out.append(c("bold", line))
            elif line.startswith("@@"):
                out.append(c("cyan", line))
            elif line.startswith("+"):
                out.append(c("green", line))
            elif line.startswith("-"):
                out.append(c("red", line))
            elif "# prac:" in line:
                out.append(c("yellow", line))
            else:
                out.append(line)
    return "\n".join(out) + "\n"


# -- JSON -----------------------------------------------------------------------------------------
def as_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False) + "\n"


# -- HTML -----------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;font:12px ui-monospace,monospace}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
tr.rewritten td,tr.added td{background:#e9f7ec} tr.removed td{background:#fdecea}
tr.other td{color:#888}
pre{font:12px ui-monospace,monospace;background:#fafafa;padding:8px;overflow-x:auto}
pre>span{display:block;min-height:1.2em} .head{font-weight:600}
.add{background:#e6ffec} .del{background:#ffebe9} .hunk{color:#0550ae} .mark{color:#9a6700}
summary{cursor:pointer;font-weight:600;margin:.5em 0}
"""


def _table(head: list[str], rows: list[list], classes: list[str] | None = None) -> str:
    e = html.escape
    parts = ["<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        parts.append(f"<tr{cls}>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>")
    return "\n".join(parts) + "</table>"


def _diff_line(line: str) -> str:
    """One diff line as a block span (so no newline is needed inside the ``<pre>``)."""
    e = html.escape(line)
    if "# prac:" in e:
        code, _, note = e.partition("# prac:")
        e = f'{code}<span class="mark"># prac:{note}</span>'
    cls = ("head" if line.startswith(("+++", "---")) else "hunk" if line.startswith("@@") else
           "add" if line.startswith("+") else "del" if line.startswith("-") else "ctx")
    return f'<span class="{cls}">{e}</span>'


def as_html(report: dict) -> str:
    e = html.escape
    summ = report["summary"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>prac-fx diff {e(report['model']['label'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>prac-fx diff {e(report['model']['label'])} <small>[{e(_config(report))}]</small></h1>",
        f"<p>{summ['rewritten']} of {summ['sites']} linear sites with a trained weight rewritten, in "
        f"{summ['groups']} input group(s).</p>",
    ]
    parts += [f"<p>graph {g['index']}: {e(g['note'])}</p>" for g in report["graphs"] if g["note"]]
    parts += [f"<p>note: {e(n)}</p>" for n in report["notes"]]
    head, rows = site_rows(report)
    classes = [kinds.REWRITTEN if s["status"] == kinds.REWRITTEN else
               "other" if s["kind"] not in kinds.LINEAR_KINDS else ""
               for s in report["sites"]]
    parts += ["<h2>Sites</h2>", _table(head, rows, classes)]
    head, rows, changes = saved_rows(report)
    parts += ["<h2>Saved for backward</h2>",
              _table(head, rows, [c if c != "kept" else "" for c in changes]),
              "<ul>" + "".join(f"<li>{e(line)}</li>" for line in saved_summary(report)) + "</ul>"]
    head, rows = category_rows(report)
    if rows:
        parts += ["<h2>Saved for backward by what keeps it</h2>", _table(head, rows)]
    head, rows = head_table_rows(report)
    if rows:
        parts += ["<h2>Output head and loss</h2>", _table(head, rows)]
    head, rows = flop_rows(report)
    parts += ["<h2>Weight-gradient flops</h2>", _table(head, rows), f"<p>{e(flop_summary(report))}</p>"]
    parts.append("<h2>Graph diffs</h2>")
    for d in report["diffs"]:
        body = "".join(_diff_line(l) for l in d["lines"]) or "(no change)"
        parts.append(f"<details><summary>graph {d['graph']} {e(d['kind'])}: {d['changed']} line(s) "
                     f"changed</summary><pre>{body}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
