"""python -m bench: the benchmark suite (memory, step time) against eager and Inductor.

Re-executes itself once with the allocator settings that make peak-memory figures true on CPU
(``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``: large blocks come from mmap and go
back to the OS when freed, so the peak resident size tracks live bytes) and with OpenMP told not
to spin-wait.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_WAIT_POLICY": "PASSIVE"}


def _reexec_with_env(threads: int) -> None:
    want = dict(_ENV, OMP_NUM_THREADS=str(threads))
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    os.environ.update(want)
    os.execv(sys.executable, [sys.executable, "-m", "bench", *sys.argv[1:]])


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="gpt2,llama", help="comma-separated presets (gpt2, llama)")
    p.add_argument("--quick", action="store_true", help="fewer timing rounds (5 instead of 11)")
    p.add_argument("--repeats", type=int, default=None, help="timing rounds (overrides --quick)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warm-cache", action="store_true",
                   help="let Inductor reuse compiled graphs from its on-disk cache (compile_s then "
                        "measures a cache hit, not a compile)")
    p.add_argument("--markdown", action="store_true", help="print the table as GitHub markdown")
    p.add_argument("--csv", metavar="FILE", help="also write the rows as CSV")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if argv is None:
        _reexec_with_env(args.threads)
    import torch
    from tabulate import tabulate

    from bench import variants
    from bench.harness import Setup, machine, run_suite

    torch.set_num_threads(args.threads)
    if not args.warm_cache:
        import torch._inductor.config

        torch._inductor.config.fx_graph_cache = False
    repeats = args.repeats or (5 if args.quick else 11)
    setup = Setup(layers=args.layers, width=args.width, seq=args.seq, batch=args.batch,
                  repeats=repeats)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    rows = run_suite(names, variants.default_set(), setup,
                     progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"Machine: {machine()}")
    print(f"Models: {setup.layers} layers, width {setup.width}, vocab {setup.vocab}; "
          f"{setup.dtype}, batch {setup.batch}, seq {setup.seq}; median of {repeats} "
          "alternating steps (forward + backward)")
    cols = ["model", "variant", "saved_mib", "saved_vs_eager", "saved_vs_inductor", "peak_mib",
            "peak_vs_inductor", "step_ms", "step_vs_eager", "step_vs_inductor", "tokens_per_s",
            "compile_s"]
    table = [[getattr(r, c) for c in cols] for r in rows]
    print(tabulate(table, headers=cols, floatfmt=".3g",
                   tablefmt="github" if args.markdown else "simple"))
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(rows[0])])
            w.writeheader()
            w.writerows(dataclasses.asdict(r) for r in rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "setup": dataclasses.asdict(setup),
                       "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
