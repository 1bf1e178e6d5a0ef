"""python -m bench: memory, step time and convergence of PRAC against eager, Inductor and the
memory-saving alternatives.

    python -m bench [--quick]                    memory / speed suite (tiny GPT-2 and Llama)
    python -m bench convergence [--quick]        pre-training on Shakespeare, validation perplexity
    python -m bench finetune                     MiniLM on movie-review sentiment, held-out accuracy
    python -m bench variance                     weight-gradient variance of each PRAC variant
    python -m bench staleness                    how fast a principal basis goes stale in training
    python -m bench gpu --out DIR [--dry]        one prepared GPU run: CUDA tests, kernels, memory
                                                 and step at real sizes, convergence at width 768

The suite re-executes itself once with the allocator settings that make peak-memory figures true
on CPU (``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``: large blocks come from mmap
and go back to the OS when freed, so the peak resident size tracks live bytes) and with OpenMP
told not to spin-wait. Long runs are cached under ``bench/results/`` (or ``$PRAC_BENCH_CACHE``)
with their configuration; the suite table shows the perplexity of every variant whose
convergence run is cached.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from typing import Callable

_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_WAIT_POLICY": "PASSIVE"}
COMMANDS = ("suite", "convergence", "finetune", "variance", "staleness", "gpu")


def _reexec_with_env(threads: int) -> None:
    want = dict(_ENV, OMP_NUM_THREADS=str(threads))
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    os.environ.update(want)
    os.execv(sys.executable, [sys.executable, "-m", "bench", *sys.argv[1:]])


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", action="store_true", help="print tables as GitHub markdown")
    p.add_argument("--csv", metavar="FILE", help="also write the rows as CSV")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--plot", metavar="PNG", help="also draw the figure to this PNG file")
    p.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)  # --jobs workers


def parse(argv):
    command = argv[0] if argv and argv[0] in COMMANDS else "suite"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    p = argparse.ArgumentParser(prog=f"python -m bench {command}".replace(" suite", ""),
                                description=__doc__.split("\n")[0])
    _common(p)
    if command == "suite":
        p.add_argument("--models", default="gpt2,llama", help="comma-separated presets (gpt2, llama)")
        p.add_argument("--quick", action="store_true",
                       help="the main variants, 5 timing rounds (default: all variants, 11 rounds)")
        p.add_argument("--variants", help="comma-separated variant names (see bench/variants.py)")
        p.add_argument("--repeats", type=int, default=None, help="timing rounds (overrides --quick)")
        p.add_argument("--layers", type=int, default=4)
        p.add_argument("--width", type=int, default=256)
        p.add_argument("--seq", type=int, default=256)
        p.add_argument("--batch", type=int, default=8)
        p.add_argument("--vocab", type=int, default=2048,
                       help="vocabulary size (the logits grow with it: try 32000)")
        p.add_argument("--autocast", choices=["bfloat16"], default=None,
                       help="every step under torch.autocast in this dtype (the linears read "
                            "bf16 casts: a copy counts against bf16 inputs)")
        p.add_argument("--plane", metavar="PNG",
                       help="also draw perplexity gap against step peak (needs cached runs)")
        p.add_argument("--ppl-steps", type=int, default=2000,
                       help="convergence runs of this length (cached) give the perplexity columns")
        p.add_argument("--warm-cache", action="store_true",
                       help="let Inductor reuse compiled graphs from its on-disk cache (compile_s "
                            "then measures a cache hit, not a compile)")
    elif command == "convergence":
        p.add_argument("--models", "--model", default="gpt2", help="comma-separated presets")
        p.add_argument("--variants", default="inductor,prac-n/4")
        p.add_argument("--steps", type=int, default=2000)
        p.add_argument("--quick", action="store_true", help="200 steps, evaluated every 50")
        p.add_argument("--eval-every", type=int, default=None)
        p.add_argument("--jobs", type=int, default=1,
                       help="train this many variants at once, each in its own process")
        p.add_argument("--cached-only", action="store_true",
                       help="only print what is cached; train nothing")
        p.add_argument("--seeds", default="0", help="comma-separated model seeds (weights init; "
                       "the data order stays the same)")
    elif command == "variance":
        p.add_argument("--models", default="gpt2,llama",
                       help="comma-separated presets (gpt2, llama) or minilm, the pretrained "
                            "MiniLM-L6 on movie reviews")
        p.add_argument("--variants", default="prac-n/4,prac-n/4+S=1,prac-n/4+S=2")
        p.add_argument("--steps", type=int, default=100,
                       help="training steps before measuring (0: one call at the initial weights)")
        p.add_argument("--draws", type=int, default=16, help="draws of the random part per site")
        p.add_argument("--window", type=int, default=0,
                       help="also the error of the gradient summed over this many calls at fixed "
                            "weights, next to the per-step error over them (0: not measured)")
        p.add_argument("--bias-calls", type=int, default=0,
                       help="also check unbiasedness: this many calls on the held-out batch at "
                            "fixed weights, for variants with T2=1 (0: not checked)")
        p.add_argument("--schedule", type=int, default=0,
                       help="instead: train as the convergence runs do, cosine over this many "
                            "steps, and measure the window's errors and Adam's view at --at")
        p.add_argument("--at", default=None,
                       help="comma-separated steps for --schedule (default: its quarters)")
        p.add_argument("--seeds", default="0", help="model seeds for --schedule")
    elif command == "gpu":
        p.add_argument("--out", required=True, help="folder for the JSON records and summary.md")
        p.add_argument("--dry", action="store_true",
                       help="the same code on the CPU at tiny sizes (a few minutes)")
        p.add_argument("--budget-s", type=float, default=480.0,
                       help="seconds for the whole run; parts that would overrun are skipped")
        p.add_argument("--batches", default=None,
                       help="candidate batches, largest first (default 16,8,4,2,1; --dry: 2)")
        p.add_argument("--conv-steps", type=int, default=None,
                       help="convergence steps per variant (default 600; --dry: 6)")
        p.add_argument("--parts", default="tests,kernels,memory,convergence")
    elif command == "staleness":
        p.add_argument("--models", default="gpt2,llama", help="comma-separated presets")
        p.add_argument("--fit-at", type=int, default=300, help="training steps before the fit")
        p.add_argument("--ages", default="1,25,50,100,200,400",
                       help="comma-separated steps after the fit at which to measure")
    else:
        p.add_argument("--variants", default="inductor,prac-n/4")
        p.add_argument("--steps", type=int, default=300)
        p.add_argument("--seeds", default="0", help="comma-separated seeds (head init, data "
                       "order: seed + 1, dropout); with several, the table adds their mean")
        p.add_argument("--jobs", type=int, default=1)
        p.add_argument("--cached-only", action="store_true")
    args = p.parse_args(rest)
    args.command = command
    return args


def _write(rows, header: dict, args) -> None:
    if not rows:
        return
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(rows[0])])
            w.writeheader()
            w.writerows(dataclasses.asdict(r) for r in rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(header | {"rows": [dataclasses.asdict(r) for r in rows]}, f, indent=2)


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parallel(argv_of, items: list[str], jobs: int) -> None:
    """Run ``python -m bench <argv_of(item)>`` for the items, ``jobs`` at a time."""
    running: list[subprocess.Popen] = []
    for item in items:
        while len(running) >= jobs:
            running.pop(0).wait()
        running.append(subprocess.Popen([sys.executable, "-m", "bench", *argv_of(item)]))
    for proc in running:
        proc.wait()


def suite(args) -> int:
    import torch

    from bench import report, variants
    from bench.harness import Setup, machine, run_suite

    torch.set_num_threads(args.threads)
    if not args.warm_cache:
        import torch._inductor.config

        torch._inductor.config.fx_graph_cache = False
    repeats = args.repeats or (5 if args.quick else 11)
    names = _names(args.variants) if args.variants else (variants.QUICK if args.quick else variants.FULL)
    setup = Setup(layers=args.layers, width=args.width, seq=args.seq, batch=args.batch,
                  vocab=args.vocab, autocast=args.autocast, repeats=repeats, refresh_repeats=2 if args.quick else 3)
    rows = run_suite(_names(args.models), [variants.by_name(n) for n in names], setup,
                     progress=lambda s: print(s, file=sys.stderr, flush=True))
    ppl = report.attach_perplexity(rows, names, setup, args.ppl_steps)
    header = report.suite_header(setup, machine())
    print(header)
    print(report.suite_table(rows, markdown=args.markdown, perplexity=ppl))
    print(report.SUITE_NOTES.format(steps=args.ppl_steps))
    if args.plot:
        report.plot_tradeoff(rows, args.plot, title=header.splitlines()[-1])
    if args.plane:
        report.plot_plane(rows, args.plane, title=header.splitlines()[-1])
    _write(rows, {"machine": machine(), "setup": dataclasses.asdict(setup)}, args)
    return 0


def _train_missing(configs: list, train: Callable[[object], dict], args,
                   worker_argv: Callable[[object], list[str]]) -> list[dict]:
    """Train the configurations without a finished cached run (unless ``--cached-only``): here,
    or ``--jobs`` at a time in worker processes that run ``python -m bench <worker_argv(c)>``
    and print no table. Returns the finished runs, in the order of ``configs``."""
    import torch

    from bench.convergence import load  # one cache lookup for training and fine-tuning runs

    todo = [c for c in configs if load(c) is None]
    if todo and not args.cached_only:
        if args.jobs > 1:
            _parallel(lambda c: [*worker_argv(c), "--threads", str(args.threads), "--no-table"],
                      todo, args.jobs)
        else:
            torch.set_num_threads(args.threads)
            for c in todo:
                train(c)
    return [r for r in (load(c) for c in configs) if r is not None]


def convergence(args) -> int:
    from bench import convergence as conv
    from bench import report

    steps = 200 if args.quick else args.steps
    every = args.eval_every or (50 if args.quick else 250)
    models, names = _names(args.models), _names(args.variants)
    try:
        seeds = [int(t) for t in _names(args.seeds)]
    except ValueError:
        print(f"--seeds takes comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    configs = [conv.TrainConfig(model=m, variant=v, steps=steps, eval_every=every, seed=s)
               for s in seeds for m in models for v in names]
    results = _train_missing(configs, conv.train, args, lambda c: [
        "convergence", "--models", c.model, "--variants", c.variant, "--steps", str(steps),
        "--eval-every", str(every), "--seeds", str(c.seed)])
    if args.no_table:
        return 0
    if not results:
        print("no finished run cached for this configuration", file=sys.stderr)
        return 1
    rows = report.convergence_rows(results)
    print(report.convergence_header(results[0]))
    print(report.convergence_table(rows, markdown=args.markdown))
    if args.plot:
        report.plot_curves(results, args.plot)
    _write(rows, {"machine": results[0]["machine"], "config": results[0]["config"]}, args)
    return 0


def finetune(args) -> int:
    from bench import finetune as ft
    from bench import report

    names = _names(args.variants)
    try:
        seeds = [int(t) for t in _names(args.seeds)]
    except ValueError:
        print(f"--seeds takes comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    configs = [ft.FinetuneConfig(variant=v, steps=args.steps, seed=s, data_seed=s + 1)
               for s in seeds for v in names]
    results = _train_missing(configs, ft.train, args, lambda c: [
        "finetune", "--variants", c.variant, "--steps", str(args.steps), "--seeds", str(c.seed)])
    if args.no_table:
        return 0
    if not results:
        print("no finished run cached for this configuration", file=sys.stderr)
        return 1
    rows = report.finetune_rows(results)
    print(report.finetune_header(results[0]))
    print(report.finetune_table(rows, markdown=args.markdown))
    _write(rows, {"machine": results[0]["machine"], "config": results[0]["config"]}, args)
    return 0


def variance(args) -> int:
    import torch

    from bench import variance as var
    from bench.harness import machine

    torch.set_num_threads(args.threads)
    if args.schedule:
        return _variance_along(args)
    if "minilm" in _names(args.models) and (args.window or args.bias_calls):
        print("--window and --bias-calls are measured on the bench's own models, not on minilm",
              file=sys.stderr)
        return 2
    rows = []
    for m in _names(args.models):
        for v in _names(args.variants):
            if m == "minilm":
                rows.append(var.measure_pretrained(v, steps=args.steps, draws=args.draws))
            else:
                rows.append(var.measure_variant(m, v, steps=args.steps, draws=args.draws,
                                                window=args.window, bias_calls=args.bias_calls))
            print(f"{m}/{v}: {dataclasses.asdict(rows[-1])}", file=sys.stderr, flush=True)
    print(f"{machine()}, {args.threads} thread(s), float32; gpt2/llama 4 x 256, batch 8, seq 256, "
          f"seed 0, one held-out Shakespeare batch; minilm pretrained MiniLM-L6, batch 16, seq 64, "
          f"dropout off, one held-out movie-review batch; {args.draws} draws per site")
    print(var.table(rows, markdown=args.markdown))
    _write(rows, {"machine": machine(), "steps": args.steps, "draws": args.draws}, args)
    return 0


def _variance_along(args) -> int:
    from bench import variance as var
    from bench.harness import machine

    n = args.schedule
    at = [int(a) for a in _names(args.at)] if args.at else [n // 4, n // 2, 3 * n // 4, n]
    window = args.window or 16
    rows = []
    for m in _names(args.models):
        for s in _names(args.seeds):
            for v in _names(args.variants):
                rows += var.measure_along(m, v, schedule=n, at=at, window=window, seed=int(s))
                print(f"{m}/{v}/seed {s}: {[dataclasses.asdict(r) for r in rows[-len(at):]]}",
                      file=sys.stderr, flush=True)
    print(f"{machine()}, float32; models 4 x 256, batch 8, seq 256; "
          f"trained as the convergence runs, cosine over {n} steps; errors and Adam's view over "
          f"{window} calls at the weights reached, from a probe stream (the run is not disturbed)")
    print(var.along_table(rows, markdown=args.markdown))
    _write(rows, {"machine": machine(), "schedule": n, "window": window}, args)
    return 0


def staleness(args) -> int:
    import torch

    from bench import staleness as st
    from bench.harness import machine

    torch.set_num_threads(args.threads)
    ages = [int(a) for a in _names(args.ages)]
    rows = [row for m in _names(args.models) for row in st.measure(m, args.fit_at, ages)]
    print(f"{machine()}, {args.threads} thread(s), float32; models 4 x 256, batch 8, seq 256, "
          f"seed 0, exact training (no compression); rank n/4, r1 = r2; one held-out batch")
    print(st.table(rows, markdown=args.markdown))
    _write(rows, {"machine": machine(), "fit_at": args.fit_at}, args)
    return 0


def gpu(args) -> int:
    import pathlib

    from bench import gpu as g

    batches = [int(b) for b in (args.batches or ("2" if args.dry else "16,8,4,2,1")).split(",")]
    parts = tuple(_names(args.parts))
    unknown = set(parts) - {"tests", "kernels", "memory", "convergence"}
    if unknown:
        raise SystemExit(f"unknown part(s) {sorted(unknown)}; choose from tests, kernels, memory, convergence")
    records = g.run(pathlib.Path(args.out), dry=args.dry, budget_s=args.budget_s, batches=batches,
                    conv_steps=args.conv_steps, parts=parts)
    print((pathlib.Path(args.out) / "summary.md").read_text())
    kernels = records.get("kernels")
    return 0 if kernels is None or kernels["ok"] else 1


def cli(argv: list[str]) -> int:
    """``prac-fx bench ARGS``: ``python -m bench ARGS`` in a fresh process that starts with the
    measuring environment (allocator and OpenMP settings must be in place before start-up)."""
    env = dict(os.environ, **_ENV)
    return subprocess.call([sys.executable, "-m", "bench", *argv], env=env)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if argv is None:
        _reexec_with_env(args.threads)
    return {"suite": suite, "convergence": convergence, "finetune": finetune,
            "variance": variance, "staleness": staleness, "gpu": gpu}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
