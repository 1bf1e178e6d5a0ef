"""The ``prac-fx`` console script, run as a user runs it (a subprocess).

Golden outputs: ``tests/golden/tiny.txt`` and ``tiny.json`` hold ``prac-fx diff tiny.py:build
--rank 8 --exclude down`` run in ``tests/golden``. After an intended change, regenerate them with
``PRAC_FX_UPDATE_GOLDEN=1 pytest tests/test_cli.py`` and review the diff.
"""
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from prac_fx.diff import cli

GOLDEN = Path(__file__).parent / "golden"
TINY = ["tiny.py:build", "--rank", "8", "--exclude", "down"]
UPDATE = os.environ.get("PRAC_FX_UPDATE_GOLDEN") == "1"
SCRIPT = shutil.which("prac-fx")

pytestmark = pytest.mark.skipif(SCRIPT is None, reason="prac-fx is not installed (pip install -e .)")


REPO = Path(__file__).resolve().parent.parent


def run(*args, cwd=GOLDEN, env=None):
    # The script imports prac_fx from this checkout, whatever copy is installed.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    full_env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=path,
                    **(env or {}))
    full_env.pop("NO_COLOR", None)
    return subprocess.run([SCRIPT, *args], cwd=cwd, capture_output=True, text=True, env=full_env,
                          timeout=600)


def _normalise(text: str) -> str:
    """Line ends and trailing blanks: what editors and checkouts may change in a golden file."""
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").splitlines()) + "\n"


def _golden(name: str, out: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(out)
    assert _normalise(out) == _normalise(path.read_text()), \
        f"{name} differs from the golden file; if intended: PRAC_FX_UPDATE_GOLDEN=1 pytest {__file__}"


@pytest.fixture(scope="module")
def text_run():
    return run("diff", *TINY)


def test_golden_text(text_run):
    assert text_run.returncode == 0, text_run.stderr
    assert "\033[" not in text_run.stdout  # piped: no colour
    assert "compiling" in text_run.stderr  # progress goes to stderr
    _golden("tiny.txt", text_run.stdout)


def test_compress_heads_flag():
    """The output head is exact by default and compressed with --compress-heads (rank 2: the
    4-wide head is not too narrow)."""
    status = {}
    for flag in ((), ("--compress-heads",)):
        proc = run("diff", "tiny.py:build", "--rank", "2", *flag, "--format", "json", "--graph",
                   "none", "--quiet")
        assert proc.returncode == 0, proc.stderr
        sites = json.loads(proc.stdout)["sites"]
        status[flag] = next((s["status"], s["reason"]) for s in sites if s["module"] == "head")
    assert status[()] == ("skipped", "output head")
    assert status[("--compress-heads",)] == ("rewritten", None)


def test_exact_if_kept_flag():
    """--exact-if-kept under PRAC's projection (--rank 0.25): GPT-2's attention output
    projections, whose input attention's backward keeps anyway, stay exact with that reason;
    the other sites are compressed."""
    proc = run("diff", "gpt2", "--rank", "0.25", "--exact-if-kept", "--format", "json", "--graph",
               "none", "--quiet")
    assert proc.returncode == 0, proc.stderr
    sites = [s for s in json.loads(proc.stdout)["sites"] if s["kind"] in ("linear", "addmm")]
    kept = {s["module"] for s in sites if s["reason"] == "input kept for backward anyway: compressing saves nothing"}
    assert kept == {f"transformer.h.{i}.attn.c_proj" for i in range(2)}, sites
    assert any(s["status"] == "rewritten" for s in sites)


def test_golden_json():
    proc = run("diff", *TINY, "--format", "json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert json.loads(proc.stdout)["schema"] == "prac-fx-diff/3"
    _golden("tiny.json", proc.stdout)


def test_html_to_file_and_graph_selection(tmp_path):
    out = tmp_path / "report.html"
    proc = run("diff", *TINY, "--format", "html", "--graph", "forward", "-o", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    page = out.read_text()
    assert page.count("<details>") == 1 and "graph 0 forward" in page


E = "prac-fx: error: "
BAD = [  # (arguments, the start of the one-line message on stderr); exit status 2
    (["missing.py:build"], E + "no such file: missing.py"),
    (["tiny.py:nope"], E + "tiny.py has no attribute 'nope'"),
    (["tiny.py:NOT_CALLABLE"], E + "tiny.py:NOT_CALLABLE is not callable: int"),
    (["tiny.py:raises"], E + "factory tiny.py:raises raised ValueError: this factory always fails"),
    (["no_such_module_xyz:build"], E + "cannot import module 'no_such_module_xyz'"),
    (["gpt3"], E + "unknown model 'gpt3': choose a preset (gpt2, llama)"),
    (["gpt2", "--rank", "0"], E + "rank must be an int >= 1 or a float in (0, 1], got 0"),
    (["gpt2", "--rank", "1.5"], E + "rank as a float is a fraction of the input width and must lie"),
    (["gpt2", "--rank", "abc"], E + "invalid rank 'abc': give an int or a float"),
    (["gpt2", "--rank", "*=0.25,attn"], E + "rank: per-site ranks are written KEY=RANK"),
    (["gpt2", "--rank", "*=0.25,attn=2.5"], E + "rank as a float is a fraction of the input"),
    (["tiny.py:build", "--layers", "2"], E + "--layers applies to the presets (gpt2, llama) only"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_one_line_and_status_2(args, message):
    proc = run("diff", *args, "-q")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith(message), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stdout == "", proc.stderr


def test_no_linear_site_says_so_and_exits_0():
    proc = run("diff", "tiny.py:no_linear", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ("prac-fx: tiny.py:no_linear: no linear layer with a trained weight in "
                           "1 graph(s); nothing for PRAC to compress\n")
    assert proc.stderr == ""


def test_python_dash_m_and_help():
    proc = subprocess.run([sys.executable, "-m", "prac_fx", "diff", "--help"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0
    for text in ("FILE.py:FACTORY", "MODULE:FACTORY", "(model, inputs, loss_fn)", "--rank", "--graph"):
        assert text in proc.stdout
    top = run("--help")
    assert top.returncode == 0 and "diff" in top.stdout and "bench" not in top.stdout


def test_the_library_never_imports_the_benchmark():
    """Layers point one way: bench imports prac_fx, never the reverse. ``bench`` is not installed,
    it runs from a checkout (``python -m bench``), so ``prac-fx`` has no bench command."""
    code = ("import sys, prac_fx, prac_fx.diff, prac_fx.diff.cli, prac_fx.diff.workload; "
            "from prac_fx.diff import compare, capture, render; "
            "print(sorted(m for m in sys.modules if m == 'bench' or m.startswith('bench.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    bench = run("bench", "--quick")
    assert bench.returncode == 2 and "invalid choice: 'bench'" in bench.stderr


@pytest.mark.parametrize("choice,tty,no_color,expected", [
    ("auto", True, False, True), ("auto", False, False, False), ("auto", True, True, False),
    ("always", False, False, True), ("never", True, False, False),
])
def test_colour_only_on_a_terminal(monkeypatch, choice, tty, no_color, expected):
    stream = types.SimpleNamespace(isatty=lambda: tty)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    if no_color:
        monkeypatch.setenv("NO_COLOR", "1")
    assert cli.use_color(choice, stream, to_file=False) is expected
    assert cli.use_color("auto", stream, to_file=True) is False

