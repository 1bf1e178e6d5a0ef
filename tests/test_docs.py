"""The README and docs/ as a reader meets them: a short README with the install command near the
top, and every relative link (file and heading anchor) resolving."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in re.sub(r"```.*?```", "", page.read_text(), flags=re.S).splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def test_readme_is_short_and_starts_with_the_install():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 15 * 1024
    lines = text.splitlines()
    install = next(i for i, line in enumerate(lines) if line.startswith("pip install"))
    assert install < 60
    assert "python -m pytest -q tests" in text  # the test command .ci/run runs
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


def test_docs_pages_exist():
    names = {p.name for p in PAGES}
    assert {"usage.md", "benchmarks.md", "convergence.md", "how-it-works.md", "diff.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link} does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{page.name}: no heading for #{anchor} in {path.name}"


def test_readme_quick_start_runs_as_written(capsys):
    """The first Python block of the README, executed as a user pastes it."""
    import torch._dynamo

    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    torch._dynamo.reset()
    exec(compile(code, "README.md", "exec"), {})
    table = capsys.readouterr().out
    assert "2 linear sites with a trained weight, 2 rewritten" in table
