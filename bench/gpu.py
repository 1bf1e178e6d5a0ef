"""python -m bench gpu --out DIR: what only a GPU can measure, in one prepared command.

Four parts, each written to ``DIR`` as a JSON record as soon as it ends (a run cut short keeps
what it finished), then ``DIR/summary.md``:

1. ``tests.json``: the tests that need CUDA (``tests/test_cuda.py``), run with pytest.
2. ``kernels.json``: plain Inductor, the default (an int8 copy of each linear input) and PRAC's
   projection at n/4 compile the same small GPT-2 and Llama; per variant the generated code's
   kernels (Triton on a GPU, C++ on the CPU) and extern matmul calls are counted, forward and
   backward, with the sites the backend rewrote and the graphs that fell back (strict: a
   fallback fails the part). The projection's extra matmuls are ``x @ P`` and the factored
   weight gradient; the int8 copy's encode and decode are element-wise kernels.
3. ``memory.json``: a training step at real sizes, random init, bf16 weights: a GPT-2 124M shape
   (12 x 768, vocab 50257) and a ~1B Llama shape (16 x 2048, vocab 32000), sequence 2048, at
   the largest batch of ``--batches`` that fits for Inductor. Variants (``VARIANTS``, in order
   of priority when time runs short): inductor, the default int8 copy, Inductor's budget 0.5,
   headloss, int4 in groups of 64, fp8 (e4m3, a scale per row), a principal part n/16 beside
   an int4 residual, PRAC n/4, checkpointing; and torchao's float8 training
   (``torchao-fp8``) where torchao is installed. Under bf16 weights the copies count against
   bf16 inputs: int8 is half their bytes, not a quarter. Measures: peak memory above the step's
   start (``torch.cuda.max_memory_allocated``), median step time, tokens/s, compile time.
4. ``convergence.json``: Inductor against the default (int8) and int4 in groups of 64 at width
   768 (the GPT-2 124M shape, vocabulary 2048 of the bench's Shakespeare text), same weights
   and batches, for ``--conv-steps`` steps; validation perplexity at the end. Does the gap
   measured at width 256 hold at width 768?

``--dry`` runs the same code on the CPU at tiny sizes in a few minutes (the test suite calls
it, so the script cannot rot). On a device, each part checks the time left (``--budget-s``,
default 480 s) and records itself as skipped rather than overrun; parts 3 and 4 are sized for
about 3 minutes each on one H200. The convergence part needs the tokenised text in the bench
cache (``bench/results/data/``, made by any run of ``python -m bench convergence`` or by
``--dry``): a device without network gets it by carrying that folder.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

import torch

from prac_fx.diff import models

GPU_SIZES = {"gpt2-124m": dict(model="gpt2", layers=12, width=768, vocab=50257),
             "llama-1b": dict(model="llama", layers=16, width=2048, vocab=32000)}
DRY_SIZES = {"gpt2-tiny": dict(model="gpt2", layers=2, width=64, vocab=512)}  # one: the same code
# inductor first (the batch is the largest it fits), then the default, then the formats and the
# exact alternatives; the order is the order of priority when the time runs short
VARIANTS = ("inductor", "prac-n+q=8", "budget=0.5", "headloss", "prac-n+q=4g64", "prac-n+q=fp8",
            "prac-n/16+res+q=4g64", "prac-n/4", "ckpt")
# torchao's float8 training (an fp8 copy of each linear's input, and fp8 matmuls), beside the
# formats where torchao is installed and the device has CUDA (``pip install torchao``)
TORCHAO = "torchao-fp8"
CONV_VARIANTS = ("inductor", "prac-n+q=8", "prac-n+q=4g64")  # convergence at width 768


# --dry (the CPU, tiny sizes; the test suite runs it): the default, a packed format and the
# projection, so that the code path cannot rot without the whole list's compile time
DRY_VARIANTS = ("inductor", "prac-n+q=8", "prac-n+q=4g64", "prac-n/4")


def variants_for(device: torch.device, dry: bool = False) -> tuple[str, ...]:
    """The memory part's variants on ``device``: ``VARIANTS`` (``DRY_VARIANTS`` with ``dry``),
    and torchao's float8 training after them where it can run."""
    import importlib.util

    if dry:
        return DRY_VARIANTS
    if device.type == "cuda" and importlib.util.find_spec("torchao") is not None:
        return (*VARIANTS, TORCHAO)
    return VARIANTS


@dataclasses.dataclass
class Clock:
    """The time left of the run's budget."""
    budget_s: float
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write(out: pathlib.Path, name: str, record: dict) -> dict:
    (out / name).write_text(json.dumps(record, indent=1, default=str))
    return record


def environment(device: torch.device) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": sys.version.split()[0], "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# -- 1. tests -------------------------------------------------------------------------------------
def run_tests(timeout_s: float) -> dict:
    """``tests/test_cuda.py`` in a subprocess; its summary line and exit code."""
    root = pathlib.Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                              timeout=max(10.0, timeout_s))
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[2:]), "returncode": None, "summary": "timed out"}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"command": " ".join(cmd[2:]), "returncode": proc.returncode,
            "summary": lines[-1] if lines else proc.stderr.strip()[-500:]}


# -- 2. kernels -----------------------------------------------------------------------------------
def count_kernels(codes: list[str], device: torch.device) -> dict:
    """Kernels and extern matmul calls in Inductor's generated code, per module of it."""
    kernel = r"@triton\.jit" if device.type == "cuda" else r"cpp_fused_\w+ = "
    return {"kernels": [len(re.findall(kernel, c)) for c in codes],
            "extern_mm": [len(re.findall(r"extern_kernels\.(?:mm|addmm|bmm)\(", c)) for c in codes]}


def kernels(device: torch.device, dry: bool) -> dict:
    import prac_fx
    from prac_fx.passes import torch_seam

    size = dict(layers=2, width=64 if dry else 256, seq=32 if dry else 256, vocab=512 if dry else 2048)
    out = {"size": size, "models": {}}
    for name in models.PRESETS:
        ids = models.batch(size["vocab"], 2, size["seq"]).to(device)
        row = {}
        for label in ("inductor", "prac", "prac-n/4"):
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = models.build(name, **size).to(device)
            # the default (an int8 copy of x, no projection) and PRAC's projection at n/4
            be = ("inductor" if label == "inductor" else prac_fx.backend(strict=True)
                  if label == "prac" else prac_fx.backend(rank=0.25, bits=None, strict=True))

            def step():
                loss = torch.compile(model, backend=be)(ids, labels=ids).loss
                loss.backward()
                return loss

            _, codes = torch_seam.run_and_get_code(step)
            counts = count_kernels(codes, device)
            row[label] = {"code_modules": len(codes), **counts,
                          "kernels_total": sum(counts["kernels"]),
                          "extern_mm_total": sum(counts["extern_mm"])}
            if label != "inductor":
                report = be.report()
                row[label].update(sites_rewritten=report.sites_rewritten,
                                  sites_matched=report.sites_matched,
                                  fallbacks=len(report.fallbacks),
                                  placement=sorted({s for g in report.graphs
                                                    for s in g.placement.values()}))
        row["extra_mm_for_compression"] = row["prac-n/4"]["extern_mm_total"] - row["inductor"]["extern_mm_total"]
        out["models"][name] = row
    out["ok"] = all(r[v]["fallbacks"] == 0 and r[v]["sites_rewritten"] > 0 and r[v]["kernels_total"] > 0
                    for r in out["models"].values() for v in ("prac", "prac-n/4"))
    return out


# -- 3. memory and step time at real sizes ------------------------------------------------------
def _peak_step(step, device: torch.device) -> int:
    """Bytes by which one call of ``step`` raised the peak above the memory in use before it."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from prac_fx.diff.memory import peak_rss_above

    return peak_rss_above(step)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _one_variant(spec: str, size: dict, batch: int, seq: int, dtype, device, repeats: int) -> dict:
    from bench import variants

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.build(size["model"], layers=size["layers"], width=size["width"], seq=seq,
                         vocab=size["vocab"]).to(device=device, dtype=dtype)
    model.train()
    params = list(model.parameters())
    fn = variants.by_name(spec).make(model)
    ids = models.batch(size["vocab"], batch, seq).to(device)

    def step():
        fn(ids, labels=ids).loss.backward()
        for p in params:
            p.grad = None

    t = time.perf_counter()
    step()
    _sync(device)
    compile_s = time.perf_counter() - t
    peak = _peak_step(step, device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    backend = getattr(fn, "prac_backend", None)
    fallbacks = len(backend.report().fallbacks) if backend is not None else 0
    step_s = statistics.median(times)
    del fn, model, params
    return {"variant": spec, "batch": batch, "seq": seq, "peak_mib": peak / 2**20,
            "step_ms": step_s * 1e3, "tokens_per_s": batch * seq / step_s,
            "compile_s": compile_s - step_s, "fallbacks": fallbacks}


def _fits(spec: str, size: dict, batch: int, seq: int, dtype, device, repeats: int) -> dict | None:
    """``_one_variant``'s row, or None when the step ran out of memory (the cache emptied)."""
    try:
        return _one_variant(spec, size, batch, seq, dtype, device, repeats)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _is_oom(err):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def memory_table(device, dry: bool, batches: list[int], clock: Clock, out: pathlib.Path) -> dict:
    sizes = DRY_SIZES if dry else GPU_SIZES
    seq = 64 if dry else 2048
    dtype = torch.float32 if dry else torch.bfloat16
    repeats = 2 if dry else 5
    record = {"seq": seq, "dtype": str(dtype).removeprefix("torch."), "rows": [], "skipped": []}
    for label, size in sizes.items():
        batch = None
        for candidate in batches:  # largest first: the first that Inductor fits
            if clock.left() < 60:
                break
            row = _fits("inductor", size, candidate, seq, dtype, device, repeats)
            if row is None:
                continue
            batch = candidate
            record["rows"].append({"model": label, **size, **row})
            break
        if batch is None:
            record["skipped"].append(f"{label}: no batch of {batches} fitted Inductor in the time left")
            continue
        for spec in variants_for(device, dry)[1:]:
            if clock.left() < 45:
                record["skipped"].append(f"{label}/{spec}: out of time")
                continue
            row = _fits(spec, size, batch, seq, dtype, device, repeats) or \
                {"variant": spec, "batch": batch, "seq": seq, "error": "out of memory"}
            record["rows"].append({"model": label, **size, **row})
            _write(out, "memory.json", record)  # as it goes
    base = {r["model"]: r for r in record["rows"] if r["variant"] == "inductor"}
    for r in record["rows"]:
        ref = base.get(r["model"])
        if ref and "peak_mib" in r:
            r["peak_vs_inductor"] = r["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] else math.nan
            r["step_vs_inductor"] = r["step_ms"] / ref["step_ms"]
    return record


# -- 4. convergence at width 768 ------------------------------------------------------------------
def convergence(device, dry: bool, steps: int, clock: Clock) -> dict:
    from bench import convergence as conv
    from bench import data, variants

    cfg = conv.TrainConfig(model="gpt2", layers=2 if dry else 12, width=64 if dry else 768,
                           seq=64 if dry else 256, batch=4 if dry else 16, steps=steps,
                           warmup=max(1, steps // 20), eval_batches=2 if dry else 16)
    tokens = data.shakespeare(cfg.vocab)
    val = [b.to(device) for b in data.eval_batches(tokens["val"], cfg.batch, cfg.seq, cfg.eval_batches)]
    record = {"config": dataclasses.asdict(cfg), "runs": {}}
    for spec in CONV_VARIANTS:
        if clock.left() < 30:
            record["runs"][spec] = {"skipped": "out of time"}
            continue
        torch._dynamo.reset()
        torch.manual_seed(cfg.seed)
        model = models.build("gpt2", layers=cfg.layers, width=cfg.width, seq=cfg.seq,
                             vocab=tokens["vocab"]).to(device)
        model.train()
        fn = variants.by_name(spec).make(model)
        opt = conv._optimizer(model, cfg)
        batches = data.Batches(tokens["train"], cfg.batch, cfg.seq, cfg.data_seed)
        losses, t0, done = [], time.perf_counter(), 0
        for step in range(cfg.steps):
            if clock.left() < 20:
                break
            for group in opt.param_groups:
                group["lr"] = conv.lr_at(step, cfg)
            ids = batches.next().to(device)
            loss = fn(ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            done = step + 1
        _sync(device)
        val_loss = conv._evaluate(fn, val)
        record["runs"][spec] = {"steps": done, "wall_s": time.perf_counter() - t0,
                                "final_train_loss": losses[-1] if losses else None,
                                "val_loss": val_loss, "val_ppl": math.exp(val_loss)}
    runs = record["runs"]
    ref = runs.get("inductor", {})
    record["ppl_gap"] = {s: runs[s]["val_ppl"] / ref["val_ppl"] - 1 for s in CONV_VARIANTS[1:]
                         if "val_ppl" in runs.get(s, {}) and "val_ppl" in ref
                         and runs[s]["steps"] == ref["steps"]}
    return record


# -- summary --------------------------------------------------------------------------------------
def summary(records: dict) -> str:
    from tabulate import tabulate

    env = records["environment"]
    lines = [f"# `python -m bench gpu`{' --dry' if records['dry'] else ''}", "",
             ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    tests = records.get("tests")
    if tests:
        lines += [f"**Tests** (`{tests['command']}`): {tests['summary']} (exit {tests['returncode']})", ""]
    kern = records.get("kernels")
    if kern:
        rows = [{"model": name, "variant": v, "kernels": r[v]["kernels_total"],
                 "extern mm": r[v]["extern_mm_total"],
                 "sites rewritten": r[v].get("sites_rewritten", ""),
                 "fell back": r[v].get("fallbacks", "")}
                for name, r in kern["models"].items() for v in ("inductor", "prac", "prac-n/4")]
        lines += [f"**Generated code** (2 layers, width {kern['size']['width']}, seq "
                  f"{kern['size']['seq']}); all rewritten, none fell back: {kern['ok']}", "",
                  tabulate(rows, headers="keys", tablefmt="github"), ""]
    mem = records.get("memory")
    if mem:
        rows = [{"model": r["model"], "variant": r["variant"], "batch": r["batch"],
                 "peak MiB": round(r["peak_mib"], 1) if "peak_mib" in r else r.get("error"),
                 "peak / ind.": round(r.get("peak_vs_inductor", math.nan), 3),
                 "step ms": round(r["step_ms"], 1) if "step_ms" in r else "",
                 "step / ind.": round(r.get("step_vs_inductor", math.nan), 3),
                 "tokens/s": round(r["tokens_per_s"]) if "tokens_per_s" in r else "",
                 "compile s": round(r["compile_s"], 1) if "compile_s" in r else ""}
                for r in mem["rows"]]
        lines += [f"**Memory and step** (seq {mem['seq']}, {mem['dtype']}, random init)", "",
                  tabulate(rows, headers="keys", tablefmt="github"), ""]
        lines += [f"- skipped: {s}" for s in mem["skipped"]]
    conv = records.get("convergence")
    if conv:
        c = conv["config"]
        rows = [{"variant": k, **v} for k, v in conv["runs"].items()]
        lines += ["", f"**Convergence** (GPT-2 {c['layers']} x {c['width']}, vocab 2048, batch "
                  f"{c['batch']} x {c['seq']}, {c['steps']} steps asked)", "",
                  tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g"), "",
                  "perplexity gap to Inductor (variant / Inductor - 1): " + (", ".join(
                      f"{k} {v:+.2%}" for k, v in conv.get("ppl_gap", {}).items()) or "n/a")]
    return "\n".join(lines) + "\n"


def run(out: pathlib.Path, *, dry: bool, budget_s: float, batches: list[int], conv_steps: int | None,
        parts: tuple[str, ...] = ("tests", "kernels", "memory", "convergence")) -> dict:
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    if not dry and device.type != "cuda":
        raise SystemExit("python -m bench gpu: no CUDA device here; --dry runs the same code on the CPU")
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(budget_s)
    records = {"dry": dry, "environment": _write(out, "environment.json", environment(device))}
    if "tests" in parts:
        records["tests"] = _write(out, "tests.json", run_tests(min(120.0, clock.left())))
    if "kernels" in parts:
        records["kernels"] = _write(out, "kernels.json", kernels(device, dry))
    if "memory" in parts:
        records["memory"] = _write(out, "memory.json", memory_table(device, dry, batches, clock, out))
    if "convergence" in parts:
        steps = conv_steps or (6 if dry else 600)
        records["convergence"] = _write(out, "convergence.json", convergence(device, dry, steps, clock))
    (out / "summary.md").write_text(summary(records))
    return records
