"""The training set-ups a user would choose between, each as a ``Variant``, and their names.

Names (``by_name``) are what the command line takes; ``R`` is a rank written ``n/16``, ``n/8``,
``n/4`` or ``0.6n`` (a fraction of each layer's input width n):

==================  ===========================================================================
``eager``           the model as it is
``inductor``        ``torch.compile`` (Inductor)
``ckpt``            Inductor, every transformer block under ``torch.utils.checkpoint``
                    (non-reentrant): only block inputs are kept, the rest recomputed
``budget``          Inductor with ``torch._functorch.config.activation_memory_budget = 0.5``:
                    the partitioner recomputes cheap ops until half the activations are saved
``prac-R``          PRAC at rank R, r1 = r2 (the paper's split); the output head (``lm_head``)
                    stays exact, as by default
``prac-R+budget``   PRAC and the memory budget: the partitioner recomputes what it can and
                    keeps compressed copies for the rest; ``+budget=B`` sets another budget
                    (a fraction of the graph's own saved bytes, which PRAC has already cut)
``prac-R+T1=a+T2=b`` PRAC refitting the principal basis every a steps and redrawing the random
                    part every b steps (defaults: 500, and only at refreshes); with b > a the
                    draw is held and projected against each refitted Q1
``prac-R+E=j``      PRAC with j early refits of the principal basis in the first window
                    (``early_refits``: calls T1/2^j, ..., T1/2)
``prac-R+S=s``      PRAC whose principal basis follows each batch: s subspace iterations in
                    the graph per step (``subspace_iters``), the random draw held for T2
``prac-R+cyc``      PRAC whose random part cycles through one basis of the complement, a new
                    block of it each step (``complement="cycle"``)
``prac-R+ek``       PRAC leaving exact the input groups whose compressed copy the partitioned
                    graph would not save (``exact_if_kept``: the attention output under the
                    output projection, and under a budget whatever is recomputed)
``budget=B``        Inductor with ``activation_memory_budget = B``
``torchao-fp8``     torchao's float8 training, then Inductor (GPU only; torchao installed)
``headloss``        exact: prac_fx with no linear site compressed (``site_filter`` passes only the
                    output heads, which stay exact), so only the head-and-loss pass acts; ``headloss+budget[=B]`` adds the
                    partitioner budget (0.5 by default), as ``budget`` does for Inductor
``prac-R+mb=B``     PRAC with ``memory_budget=B``: B is a fraction of what the *uncompressed*
                    graph keeps; the backend sets the partitioner's budget per graph
``prac-R+r.W=R2``  PRAC with per-site ranks: sites whose module path contains W take rank R2
                    (a name above or a fraction), the others R (``rank={"*": R, W: R2}``);
                    several may be given
``prac-R+ps=N``     PRAC drawing its random parts from seed N (``seed``; default 0). The
                    convergence runs' ``--seeds`` set the weights' initialisation only, so
                    without it every seed of a variant meets the same sequence of draws
``prac-R+sp=f``     PRAC with the principal part's share of the rank set to f (``split``;
                    default 0.5, the paper's r1 = r2)
``prac-R+q=F``      PRAC whose saved copy is quantized (``bits``, ``group_size``): F is ``8``,
                    ``4g64``, ``2g64``, ``fp8`` (bits, then ``gG`` for G columns per scale; one
                    scale per row without). ``prac-n+q=F`` (rank n: the whole width) quantizes
                    x itself, with no basis
``prac-R+res+q=F``  a principal part of rank R beside the quantized residual (``residual``)
``prac-R+skip=W``   ablation: PRAC leaving exact every site whose module path contains W
                    (``skip=attn``: only the MLPs compressed; ``skip=mlp``: only attention)
``prac-R+nohead``   PRAC with the head-and-loss pass off (``head_loss=False``): the head and
                    the loss keep their logits as Inductor does
``prac-R+hr``,      the head-and-loss op recomputing its logits in the backward
``headloss+hr``     (``head_loss_grad_in_forward=False``) instead of the rule's choice
``prac-R+allsites`` PRAC on every linear site, the output head too (``exact_heads=()``; in
                    GPT-2 the head is tied to the input embedding)
``random-R``        ablation: random part only (r1 = 0, k = n / r)
``principal-R``     ablation: principal part only (r2 = 0; biased)
``resample1-R``     ablation: the random part redrawn every step (T2 = 1)
``refresh1-R``      the principal basis refitted every step (T1 = 1): the refresh step's cost
``V+lrb=F``         any variant V whose blocks' linear weights (the sites PRAC compresses)
                    train at F times the learning rate in the convergence runs
``V+lrf=F``         any variant V whose blocks' linear weights end the cosine decay at F times
                    the peak learning rate (the others at ``min_lr_ratio``)
==================  ===========================================================================
"""
from __future__ import annotations

from typing import Callable

import torch

import prac_fx
from prac_fx.config import exclude_filter
from prac_fx.passes import torch_seam
from bench.harness import Variant

RANKS = {"n/16": 1 / 16, "n/8": 1 / 8, "n/4": 1 / 4, "0.6n": 0.6, "n": 1.0}


def parse_quant(text: str) -> dict | None:
    """``+q=`` of a prac variant: ``8``, ``4g64``, ``2g32``, ``fp8`` (bits, then ``gG`` for G
    columns per scale, one scale per row without) -> the backend's options; None if malformed."""
    bits, _, group = text.partition("g")
    if bits not in ("8", "4", "2", "fp8") or (group and group not in ("32", "64", "128")):
        return None
    return {"bits": bits if bits == "fp8" else int(bits), "group_size": int(group) if group else None}
BUDGET = 0.5


def _with_budget(backend: Callable, budget: float) -> Callable:
    """``backend`` compiling under ``activation_memory_budget = budget``. The partitioner reads
    the budget when it splits the joint graph, which happens inside the backend call (the first
    forward), so patching the call is exact. A backend of its own also keeps Dynamo from reusing
    another variant's compiled code for this model (it would, for two plain Inductor compiles
    of equal models)."""

    def compile_with_budget(gm, example_inputs):
        with torch_seam.activation_memory_budget(budget):
            return backend(gm, example_inputs)

    return compile_with_budget


def _inductor_backend(gm, example_inputs):
    return torch_seam.inductor_compile(gm, example_inputs)


def _checkpoint_blocks(model: torch.nn.Module) -> torch.nn.Module:
    model.train()
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def eager() -> Variant:
    return Variant("eager", lambda model: model)


def inductor() -> Variant:
    return Variant("inductor", lambda model: torch.compile(model))


def torchao_fp8() -> Variant:
    """torchao's float8 training (``convert_to_float8_training``: fp8 matmuls and an fp8 copy of
    each linear's input, the output head left in high precision), then Inductor. Needs torchao
    (an optional extra: ``pip install torchao``) and a GPU with float8 matmuls."""

    def make(model):
        try:
            from torchao.float8 import convert_to_float8_training
        except ImportError as err:
            raise RuntimeError("the torchao-fp8 variant needs torchao: pip install torchao") from err
        heads = prac_fx.PracConfig().is_head
        convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: not heads(fqn))
        return torch.compile(model)

    return Variant("torchao-fp8", make)


def checkpoint() -> Variant:
    return Variant("inductor+ckpt", lambda model: torch.compile(_checkpoint_blocks(model)))


def _heads_only(module_path: str) -> bool:
    """A site filter passing only the output heads: they stay exact as heads, and the
    head-and-loss pass (which honours the filter) may still take them."""
    return prac_fx.PracConfig().is_head(module_path)


def headloss(value: float | None = None, recompute: bool = False) -> Variant:
    """Exact training through prac_fx: no linear site compressed, the head and the loss taken
    by the head-and-loss pass; with ``value``, under that partitioner budget; ``recompute``:
    its gradients recomputed in the backward (``head_loss_grad_in_forward=False``), not the
    rule's choice."""

    def make(model):
        options = {"head_loss_grad_in_forward": False} if recompute else {}
        backend = prac_fx.backend(site_filter=_heads_only, **options)
        fn = torch.compile(model, backend=backend if value is None else _with_budget(backend, value))
        fn.prac_backend = backend
        return fn

    name = "headloss" if value is None else f"headloss budget={value:g}"
    return Variant(name + (" +hr" if recompute else ""), make)


def budget(value: float = BUDGET) -> Variant:
    return Variant(f"inductor budget={value}",
                   lambda model: torch.compile(model, backend=_with_budget(_inductor_backend, value)))


def prac(rank: float | int, label: str | None = None, *, with_budget: float | None = None,
         **options) -> Variant:
    def make(model):
        backend = prac_fx.backend(rank=rank, **options)
        compiler = backend if with_budget is None else _with_budget(backend, with_budget)
        fn = torch.compile(model, backend=compiler)
        fn.prac_backend = backend
        return fn

    return Variant(label or f"prac r={rank}", make)


# the learning-rate suffixes of any variant: what the convergence runs' optimizer reads off the
# callable, the label, the values taken, and how the error message names them
LR_SUFFIXES = {
    "lrb": ("lr_scale", "lr x{:g}", lambda x: 0.0 < x <= 10.0, "a learning-rate factor in (0, 10]"),
    "lrf": ("lr_floor", "lr floor {:g}", lambda x: 0.0 <= x <= 1.0,
            "the decay's end as a fraction of the peak in [0, 1]"),
}


def _with_lr(variant: Variant, attr: str, value: float, label: str) -> Variant:
    """``variant`` whose callable carries ``attr = value`` (``lr_scale``: its blocks' linear
    weights train at that factor of the learning rate; ``lr_floor``: their cosine ends there)."""

    def make(model):
        fn = variant.make(model)
        setattr(fn, attr, value)
        return fn

    return Variant(f"{variant.name} {label}", make)


def _fraction(text: str) -> bool:
    try:
        return 0.0 < float(text) <= 1.0
    except ValueError:
        return False


def by_name(spec: str) -> Variant:
    """The variant a command-line name stands for (see the module docstring)."""
    spec = spec.strip()
    base, plus, last = spec.rpartition("+")
    key, eq, value = last.partition("=")
    if plus and eq and key in LR_SUFFIXES:
        attr, label, ok, what = LR_SUFFIXES[key]
        try:
            x = float(value)
        except ValueError:
            x = float("nan")
        if not ok(x):
            raise ValueError(f"{key}=F takes {what}, got {spec!r}")
        return _with_lr(by_name(base), attr, x, label.format(x))
    fixed = {"eager": eager, "inductor": inductor, "ckpt": checkpoint, "budget": budget,
             "torchao-fp8": torchao_fp8}
    if spec in fixed:
        return fixed[spec]()
    if spec.startswith("budget=") and _fraction(spec[7:]):
        return budget(float(spec[7:]))
    if spec == "headloss":
        return headloss()
    if spec == "headloss+hr":
        return headloss(recompute=True)
    if spec == "headloss+budget":
        return headloss(BUDGET)
    if spec.startswith("headloss+budget=") and _fraction(spec[16:]):
        return headloss(float(spec[16:]))
    kind, _, rest = spec.partition("-")
    rank_name, *extras = rest.split("+")
    timing = {e for e in extras if e.startswith(("T1=", "T2=")) and e[3:].isdigit()}
    follow = {e for e in extras if e.startswith("S=") and e[2:].isdigit()}
    early = {e for e in extras if e.startswith("E=") and e[2:].isdigit()}
    draw_seed = {e for e in extras if e.startswith("ps=") and e[3:].isdigit()}
    splits = {e for e in extras if e.startswith("sp=") and _fraction(e[3:])}
    budgets = [e for e in extras if e == "budget" or (e.startswith("budget=") and _fraction(e[7:]))]
    mbs = [e for e in extras if e.startswith("mb=") and _fraction(e[3:]) or e == "mb=0"]
    skips = {e for e in extras if e.startswith("skip=") and e[5:].replace("_", "").isalnum()}
    per_site = {e for e in extras if e.startswith("r.") and "=" in e
                and e[2:].partition("=")[0].replace("_", "").replace(".", "").isalnum()
                and (e.partition("=")[2] in RANKS or _fraction(e.partition("=")[2]))}
    quant = [e for e in extras if e.startswith("q=") and parse_quant(e[2:]) is not None]
    unknown = (set(extras) - {"allsites", "nohead", "hr", "cyc", "ek", "res"} - timing - follow - set(budgets)
               - set(quant)
               - set(mbs) - skips - early - per_site - draw_seed - splits)
    if rank_name not in RANKS or unknown or len(set(extras)) != len(extras) or (extras and kind != "prac"):
        raise ValueError(f"unknown variant {spec!r}; names: eager, inductor, ckpt, budget, torchao-fp8, "
                         f"budget=B, headloss[+hr][+budget[=B]], prac-R[+q=F][+res][+budget[=B]][+mb=B][+allsites][+nohead][+hr][+cyc][+ek][+skip=W][+r.W=R][+ps=N][+sp=f][+T1=a][+T2=b][+E=j][+S=s], random-R, principal-R, resample1-R, "
                         f"refresh1-R with R in {list(RANKS)}; any of them +lrb=F (the compressed "
                         f"weights' lr factor) or +lrf=F (their decay's floor)")
    rank = RANKS[rank_name]
    if kind == "prac":
        label = f"prac r={rank_name}" + "".join(f" {e}" if e in timing | follow | early else f" +{e}"
                                                 for e in extras)
        options = {"exact_heads": ()} if "allsites" in extras else {}
        if "nohead" in extras:
            options["head_loss"] = False
        if "hr" in extras:  # the head's gradients recomputed in the backward
            options["head_loss_grad_in_forward"] = False
        if "cyc" in extras:
            options["complement"] = "cycle"
        if "ek" in extras:
            options["exact_if_kept"] = True
        if len(quant) > 1 or ("res" in extras and not quant):
            raise ValueError(f"one +q=F per variant, and +res needs one, got {spec!r}")
        if quant:
            options.update(parse_quant(quant[0][2:]))
        if "res" in extras:
            options["residual"] = True
        if per_site:
            ranks = {"*": rank}
            for e in sorted(per_site):
                word, _, value = e[2:].partition("=")
                ranks[word] = RANKS.get(value) or float(value)
            rank = ranks
        if skips:
            options["site_filter"] = exclude_filter(tuple(sorted(e[5:] for e in skips)))
        if mbs:
            options["memory_budget"] = float(mbs[0][3:])
        for e in timing:
            options["refresh_every" if e.startswith("T1") else "resample_every"] = int(e[3:])
        for e in early:
            options["early_refits"] = int(e[2:])
        for e in draw_seed:
            options["seed"] = int(e[3:])
        for e in splits:  # sp=f: the principal part's share of the rank (split; default 0.5)
            options["split"] = float(e[3:])
        for e in follow:  # S=s: principal bases follow each batch with s subspace iterations
            options["subspace_iters"] = int(e[2:])
        if len(budgets) > 1:
            raise ValueError(f"one budget per variant, got {spec!r}")
        value = (BUDGET if budgets[0] == "budget" else float(budgets[0][7:])) if budgets else None
        return prac(rank, label, with_budget=value, **options)
    if kind == "random":
        return prac(rank, f"random-only r={rank_name}", split=0.0)
    if kind == "principal":
        return prac(rank, f"principal-only r={rank_name}", split=1.0)
    if kind == "resample1":
        return prac(rank, f"prac r={rank_name} T2=1", resample_every=1)
    if kind == "refresh1":
        return prac(rank, f"prac r={rank_name} T1=1", refresh_every=1)
    raise ValueError(f"unknown variant kind {kind!r} in {spec!r}")


# prac-n+q=8 is the backend's default copy (rank 1.0, bits 8)
FULL = ["eager", "inductor", "ckpt", "budget", "headloss", "headloss+budget", "prac-n+q=8", "prac-n+q=4g64",
        "prac-n/16", "prac-n/8", "prac-n/4", "prac-0.6n",
        "prac-n/4+budget", "prac-n/4+budget=0.7", "prac-n/4+allsites+budget", "random-n/4",
        "principal-n/4", "resample1-n/4", "refresh1-n/4"]
QUICK = ["eager", "inductor", "ckpt", "budget", "headloss", "headloss+budget", "prac-n+q=8", "prac-n/8", "prac-n/4",
         "prac-n/4+budget", "prac-n/4+budget=0.7", "prac-n/4+allsites+budget"]

