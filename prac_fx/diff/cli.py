"""The ``prac-fx`` command line (also ``python -m prac_fx``): parses arguments and prints.

``prac-fx diff MODEL``: what the PRAC pass changes in a model's graphs and what it saves
(``prac_fx.diff``). The benchmark suite is not part of the installed package: it runs from a
checkout as ``python -m bench`` (the library never imports it).

Exit status: 0 on success (also when the model has no linear site: nothing to compare), 2 on bad
input (one line on stderr, never a traceback), 1 when compiling fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

MODEL_HELP = """\
MODEL is one of
  gpt2, llama            a tiny built-in preset (random init, nothing downloaded); sized
                         by --layers --width --seq --batch --vocab; loss model(ids, labels=ids).loss
  FILE.py:FACTORY        a factory in a Python file
  MODULE:FACTORY         a factory in an importable module (package.module:build)

A factory is a callable returning (model, inputs) or (model, inputs, loss_fn):
  model    a torch.nn.Module, compiled as it is (train() or eval() as returned)
  inputs   a tensor or an input spec (one positional argument), a tuple/list (positional
           arguments) or a dict (keyword arguments); an input spec is a shape (a torch.Size
           or a tuple of ints), drawn as torch.randn(shape) from a fixed seed
  loss_fn  optional, output -> scalar tensor; by default output.loss, else output["loss"],
           else the sum of the (first tensor) output
It is called with batch= and seq= when those options are given and it accepts them, after
torch.manual_seed(0).

--rank is an int >= 1 (columns of the basis) or a float in (0, 1] (a fraction of each input
width), or per site KEY=RANK,... (KEY a module path substring, * every other site).
Exit status: 0 ok (also "no linear site"), 2 bad input, 1 compile failure.
"""


def _error(msg: str, status: int = 2) -> int:
    print(f"prac-fx: error: {msg}", file=sys.stderr)
    return status




def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prac-fx", description="Tools for the PRAC torch.compile backend.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    d = sub.add_parser(
        "diff", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=MODEL_HELP,
        help="show what the PRAC pass changes in a model's graphs and what it saves",
        description="Compile MODEL with plain Inductor and with the PRAC backend, run one "
                    "training step on each, and show the sites the pass rewrote or skipped, the "
                    "tensors saved for backward side by side, the weight-gradient flops and a "
                    "normalised diff of the Dynamo, forward and backward graphs.")
    d.add_argument("model", metavar="MODEL",
                   help="a preset (gpt2, llama), FILE.py:FACTORY or MODULE:FACTORY")
    d.add_argument("--rank", help="basis columns per input group: int >= 1 or float in (0, 1], "
                   "or per site '*=0.25,attn=0.125'; given alone, PRAC's projection in the "
                   "input's dtype (with neither --rank nor --bits: the backend's default copy)")
    d.add_argument("--split", default="0.5", help="principal share of the rank: float in [0, 1] "
                   "or int r1 (default 0.5)")
    d.add_argument("--bits", help="store the saved copy in 8, 4 or 2 bits (stochastic "
                   "rounding) or fp8; none keeps the input's dtype, or per site '*=8,down=4'; "
                   "without --rank (or with --rank 1.0) the input itself is quantized")
    d.add_argument("--group-size", help="columns per scale of a quantized copy: 32, 64, 128 or "
                   "row (one per row; the default beside --bits)")
    d.add_argument("--residual", action="store_true",
                   help="with --bits: a principal part of --rank columns beside the quantized "
                        "residual, in place of PRAC's random part")
    d.add_argument("--exclude", action="append", default=[], metavar="TEXT",
                   help="leave sites whose module path contains TEXT exact (repeatable)")
    d.add_argument("--compress-heads", action="store_true",
                   help="compress output heads too (lm_head, classifier, ...: exact by default)")
    d.add_argument("--exact-if-kept", action="store_true",
                   help="leave exact the groups whose input backward keeps anyway (exact_if_kept)")
    d.add_argument("--batch", type=_positive, help="batch size (preset default 4)")
    d.add_argument("--seq", type=_positive, help="sequence length (preset default 64)")
    d.add_argument("--layers", type=_positive, help="preset layers (default 2)")
    d.add_argument("--width", type=_positive, help="preset hidden width (default 64)")
    d.add_argument("--vocab", type=_positive, help="preset vocabulary (default 256)")
    d.add_argument("--graph", choices=("dynamo", "forward", "backward", "all", "none"),
                   action="append", help="which graph diffs to show (repeatable; default all)")
    d.add_argument("--context", type=int, default=3, metavar="N", help="diff context lines (default 3)")
    d.add_argument("--format", choices=("text", "json", "html"), default="text")
    d.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    d.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour text output (auto: only on a terminal, unless NO_COLOR is set)")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    d.add_argument("--traceback", action="store_true", help="show the traceback of a failure")
    return parser


def use_color(choice: str, stream, to_file: bool) -> bool:
    """``always``; ``never``; ``auto``: only to a terminal, unless NO_COLOR is set or TERM=dumb."""
    if choice != "auto":
        return choice == "always"
    return (not to_file and hasattr(stream, "isatty") and stream.isatty()
            and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb")


def _diff(args) -> int:
    from prac_fx import diff
    from prac_fx.config import PracConfig, exclude_filter, parse_bits, parse_number, parse_rank
    from prac_fx.diff import render, workload

    try:
        copy = {}  # what is not given keeps the backend's default (PracConfig's resolution)
        if args.rank is not None:
            copy["rank"] = parse_rank(args.rank, "rank")
        if args.bits is not None:
            copy["bits"] = parse_bits(args.bits)
        if args.group_size is not None:
            copy["group_size"] = None if args.group_size.strip().lower() in ("row", "none") else \
                parse_number(args.group_size, "group size")
        split = parse_number(args.split, "split")
        exclude = list(args.exclude)
        keep = exclude_filter(tuple(exclude)) if exclude else None
        heads = {"exact_heads": ()} if args.compress_heads else {}
        config = PracConfig(split=split, site_filter=keep, exact_if_kept=args.exact_if_kept,
                            residual=args.residual, **copy, **heads)
    except ValueError as err:
        return _error(str(err))
    kinds = args.graph or ["all"]
    kinds = diff.GRAPH_KINDS if "all" in kinds else tuple(k for k in diff.GRAPH_KINDS if k in kinds)
    if args.context < 0:
        return _error(f"--context must be >= 0, got {args.context}")
    def say(msg: str) -> None:
        if not args.quiet:
            print(f"prac-fx: {msg}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    try:
        say(f"building {args.model} ...")
        work = workload.load(args.model, batch=args.batch, seq=args.seq, layers=args.layers,
                             width=args.width, vocab=args.vocab)
        with diff.quiet_logs():
            report = diff.compare(work, config, graphs=kinds, context=args.context, exclude=exclude,
                                  progress=say)
    except workload.WorkloadError as err:
        if args.traceback:
            raise
        return _error(str(err))
    except diff.NoLinearSites as err:
        print(f"prac-fx: {err}")
        return 0
    except Exception as err:  # a compile failure: one line unless asked for the traceback
        if args.traceback:
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        return _error(f"compiling {args.model} failed: {type(err).__name__}: {first} "
                      "(--traceback shows where)", 1)
    say(f"done in {time.perf_counter() - start:.1f} s")

    to_file = args.output is not None
    color = use_color(args.color, sys.stdout, to_file)
    if args.format == "json":
        out = render.as_json(report)
    elif args.format == "html":
        out = render.as_html(report)
    else:
        out = render.text(report, color=color)
    if to_file:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(out)
        except OSError as err:
            return _error(f"cannot write {args.output}: {err.strerror}")
        say(f"wrote {args.output}")
    else:
        sys.stdout.write(out)
        sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command == "diff":
        return _diff(args)
    return _error(f"unknown command {args.command!r}")  # pragma: no cover (argparse checks)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
