"""passes/head_loss.py: which head + loss patterns the pass takes, which it leaves (and why), and
that the rewritten graph matches eager, through the backend."""
import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import prac_fx
from prac_fx.diff import memory, models

V, D = 50, 24


class Net(torch.nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        self.body = torch.nn.Linear(D, D)
        self.head = torch.nn.Linear(D, V, bias=bias)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def _data(shape=(3, 8), seed=0, ignore=(0, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, D, generator=g)
    y = torch.randint(0, V, shape, generator=g)
    flat = y.view(-1)
    for i in ignore:
        flat[i] = -100
    return x, y


# -- loss functions in the shapes users write them ---------------------------------------------------
def plain(net, x, y):
    return F.cross_entropy(net(x), y)


def plain_sum(net, x, y):
    return F.cross_entropy(net(x).view(-1, V), y.view(-1), reduction="sum")


def hf_style(net, x, y):
    """transformers 5.x ForCausalLMLoss: float cast, labels padded and shifted, view(-1, V)."""
    logits = net(x)
    labels = F.pad(y, (0, 1), value=-100)[..., 1:].contiguous()
    return F.cross_entropy(logits.float().view(-1, V), labels.view(-1), ignore_index=-100,
                           reduction="mean")


def shifted(net, x, y):
    """Older causal-LM losses: slice the logits, not the labels."""
    logits = net(x)[..., :-1, :].contiguous()
    return F.cross_entropy(logits.view(-1, V), y[..., 1:].reshape(-1))


def smoothing(net, x, y):
    return F.cross_entropy(net(x).view(-1, V), y.view(-1), label_smoothing=0.1)


def softcap(net, x, y):
    return F.cross_entropy((30 * torch.tanh(net(x) / 30)).view(-1, V), y.view(-1))


def z_loss(net, x, y):
    logits = net(x).view(-1, V)
    return F.cross_entropy(logits, y.view(-1)) + 1e-4 * torch.logsumexp(logits, -1).pow(2).mean()


def own_loss(net, x, y):
    logits = net(x)
    return -(torch.log_softmax(logits, -1).gather(-1, y.clamp_min(0).unsqueeze(-1))).mean()


def reduction_none(net, x, y):
    return F.cross_entropy(net(x).view(-1, V), y.view(-1), reduction="none").mean()


def returned_and_used(net, x, y):
    logits = net(x)
    return F.cross_entropy(logits.view(-1, V), y.view(-1)) + logits.square().mean()


def _run(fn, net, x, y, **options):
    torch._dynamo.reset()
    be = prac_fx.backend(rank=1.0, compiler="eager", **options)
    compiled = torch.compile(fn, backend=be, fullgraph=True)
    net.zero_grad()
    loss = compiled(net, x, y)
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    heads = [h for g in be.graphs for h in g.head_losses]
    return loss.detach(), grads, heads


def _eager(fn, net, x, y):
    net.zero_grad()
    loss = fn(net, x, y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.parameters()]


MODES = pytest.mark.parametrize("early", [False, True], ids=["recompute", "grad-in-forward"])


@MODES
@pytest.mark.parametrize("fn", [plain, plain_sum, hf_style, shifted])
@pytest.mark.parametrize("bias", [False, True])
def test_taken_and_exact(fn, bias, early):
    torch.manual_seed(0)
    net = Net(bias)
    x, y = _data(shape=(12,) if fn is plain else (3, 8))
    ref_loss, ref_grads = _eager(fn, net, x, y)
    loss, grads, heads = _run(fn, net, x, y, head_loss_grad_in_forward=early)
    assert heads[0].grad_in_forward is early
    assert [(h.status, h.reason) for h in heads] == [("rewritten", None)]
    assert heads[0].module == "head" and heads[0].vocab == V
    torch.testing.assert_close(loss, ref_loss)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e)


def test_two_dimensional_input():
    torch.manual_seed(0)
    net = Net(True)
    x, y = _data(shape=(10,))
    ref_loss, ref_grads = _eager(plain, net, x, y)
    loss, grads, heads = _run(plain, net, x, y, head_loss_chunk_rows=3)
    assert heads[0].status == "rewritten" and heads[0].chunk_rows == 3 and heads[0].rows == 10
    torch.testing.assert_close(loss, ref_loss)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_label_ignored(reduction):
    torch.manual_seed(0)
    net = Net()
    x, y = _data(ignore=range(24))

    def fn(net, x, y):
        return F.cross_entropy(net(x).view(-1, V), y.view(-1), reduction=reduction)

    ref_loss, ref_grads = _eager(fn, net, x, y)
    loss, grads, heads = _run(fn, net, x, y)
    assert heads[0].status == "rewritten"
    torch.testing.assert_close(loss, ref_loss, equal_nan=True)
    assert torch.isnan(loss).item() == (reduction == "mean") == torch.isnan(ref_loss).item()
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, equal_nan=True)


@pytest.mark.parametrize("fn, reason", [
    (smoothing, "label smoothing"),
    (softcap, "other op on the logits"),
    (z_loss, "logits used elsewhere"),
    (reduction_none, "reduction none"),
    (returned_and_used, "logits used elsewhere"),
])
def test_left_alone_with_reason(fn, reason):
    torch.manual_seed(0)
    net = Net()
    x, y = _data()
    ref_loss, ref_grads = _eager(fn, net, x, y)
    loss, grads, heads = _run(fn, net, x, y)
    assert [(h.status, h.reason) for h in heads] == [("skipped", reason)]
    torch.testing.assert_close(loss, ref_loss)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e)


def test_own_loss_is_no_cross_entropy():
    torch.manual_seed(0)
    net = Net()
    x, y = _data()
    _, _, heads = _run(own_loss, net, x, y)
    assert [(h.status, h.reason, h.module) for h in heads] == [
        ("skipped", "no cross-entropy on the logits", "head")]


def test_switch_off():
    torch.manual_seed(0)
    net = Net()
    x, y = _data(shape=(12,))
    _, _, heads = _run(plain, net, x, y, head_loss=False)
    assert [(h.status, h.reason) for h in heads] == [("skipped", "off")]


@MODES
def test_returned_logits_exact_and_differentiable(early):
    """The graph returns the logits next to the loss (as Hugging Face models do): they come back
    exact, and a gradient through them outside the compiled region is exact too (with the
    gradients computed in the forward, through the path the runner attaches)."""
    torch.manual_seed(0)
    net = Net(True)
    x, y = _data()

    def fn(net, x, y):
        logits = net(x)
        return F.cross_entropy(logits.view(-1, V), y.view(-1)), logits

    torch._dynamo.reset()
    be = prac_fx.backend(rank=1.0, compiler="eager", head_loss_grad_in_forward=early)
    loss, logits = torch.compile(fn, backend=be, fullgraph=True)(net, x, y)
    assert logits.requires_grad
    (loss + logits.sin().mean()).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    ref_loss, ref_logits = fn(net, x, y)
    (ref_loss + ref_logits.sin().mean()).backward()
    heads = [h for g in be.graphs for h in g.head_losses]
    assert heads[0].status == "rewritten" and heads[0].returns_logits
    torch.testing.assert_close(logits, ref_logits)
    for a, e in zip(grads, [p.grad for p in net.parameters()]):
        torch.testing.assert_close(a, e)


def test_frozen_head_is_taken_and_exact():
    """A head whose weight does not require grad (a frozen base under adapters): taken, the
    input and bias gradients exact, no weight gradient."""
    torch.manual_seed(0)
    net = Net(True)
    net.head.weight.requires_grad_(False)
    x, y = _data(shape=(12,))
    trained = [p for p in net.parameters() if p.requires_grad]
    ref_loss = plain(net, x, y)
    ref_grads = torch.autograd.grad(ref_loss, trained)
    torch._dynamo.reset()
    be = prac_fx.backend(rank=1.0, compiler="eager")
    net.zero_grad()
    loss = torch.compile(plain, backend=be, fullgraph=True)(net, x, y)
    loss.backward()
    heads = [h for g in be.graphs for h in g.head_losses]
    assert heads[0].status == "rewritten" and heads[0].grad_in_forward
    assert net.head.weight.grad is None
    torch.testing.assert_close(loss.detach(), ref_loss.detach())
    for a, e in zip([p.grad for p in trained], ref_grads):
        torch.testing.assert_close(a, e)


def test_config_validation():
    with pytest.raises(ValueError, match="head_loss_chunk_rows"):
        prac_fx.PracConfig(head_loss_chunk_rows=0)
    with pytest.raises(ValueError, match="head_loss must be"):
        prac_fx.PracConfig(head_loss="yes")
    with pytest.raises(ValueError, match="head_loss_grad_in_forward must be True, False or None"):
        prac_fx.PracConfig(head_loss_grad_in_forward="auto")


# -- Hugging Face models end to end --------------------------------------------------------------------
SIZE = dict(layers=1, width=32, seq=16, vocab=512)


@MODES
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_models_exact_and_keep_no_logits(name, early):
    """Tied (GPT-2) and untied (Llama) heads: loss, logits and every gradient equal eager's at
    rank 1.0, and the loss keeps far fewer bytes for backward than with the pass off."""
    torch.manual_seed(0)
    model = models.build(name, **SIZE)
    ids = models.batch(SIZE["vocab"], 2, SIZE["seq"])
    ref = model(ids, labels=ids)
    ref.loss.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    params = list(model.parameters())
    saved = {}
    for on in (True, False):
        torch._dynamo.reset()
        model.zero_grad()
        be = prac_fx.backend(rank=1.0, compiler="eager", head_loss=on,
                             head_loss_grad_in_forward=early)
        compiled = torch.compile(model, backend=be)
        out = compiled(ids, labels=ids)
        out.loss.backward()
        heads = [h for g in be.graphs for h in g.head_losses]
        assert [h.status for h in heads] == (["rewritten"] if on else ["skipped"])
        torch.testing.assert_close(out.loss, ref.loss)
        torch.testing.assert_close(out.logits, ref.logits)
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[k], msg=k)
        model.zero_grad()
        saved[on] = memory.saved_tensors(lambda: compiled(ids, labels=ids).loss, params)
    logits = (2, SIZE["seq"], SIZE["vocab"])
    # what the op holds instead of the logits: in the forward's gradient mode, the input and
    # weight gradients (forced here: at this shape the rule would recompute)
    assert not [t for t in saved[True] if len(t.shape) > 1 and t.shape[-1] == SIZE["vocab"]
                and t.dtype.startswith("float")], saved[True]
    held = 0 if not early else (2 * SIZE["seq"] + SIZE["vocab"]) * SIZE["width"] * 4
    drop = sum(t.bytes for t in saved[False]) - sum(t.bytes for t in saved[True])
    assert drop >= 0.9 * 4 * math.prod(logits) - held, (drop, held)


def test_inductor_compiles_the_chunked_op():
    """The same rewrite through Inductor (the ladder's last rung)."""
    torch.manual_seed(0)
    net = Net(True)
    x, y = _data()
    ref_loss, ref_grads = _eager(hf_style, net, x, y)
    torch._dynamo.reset()
    be = prac_fx.backend(rank=1.0, head_loss_chunk_rows=7)
    net.zero_grad()
    loss = torch.compile(hf_style, backend=be, fullgraph=True)(net, x, y)
    loss.backward()
    assert [h.status for g in be.graphs for h in g.head_losses] == ["rewritten"]
    torch.testing.assert_close(loss, ref_loss)
    for p, e in zip(net.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, e)


def test_report_table_lists_the_head():
    torch.manual_seed(0)
    net = Net()
    x, y = _data()
    torch._dynamo.reset()
    be = prac_fx.backend(rank=1.0, compiler="eager")
    torch.compile(smoothing, backend=be)(net, x, y).backward()
    rows = be.report().head_rows()
    assert [(r["module"], r["status"]) for r in rows] == [("head", "skipped: label smoothing")]
    assert "head + loss" in be.report().table() and "label smoothing" in be.report().table()
