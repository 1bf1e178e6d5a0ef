"""passes/chunked_ce.py: the chunked head + cross-entropy against eager F.linear + F.cross_entropy."""
import math

import pytest
import torch
import torch.nn.functional as F

from prac_fx.passes.chunked_ce import LinearCrossEntropy, chunk_rows_for

N_IN, VOCAB = 16, 37


def _inputs(shape, bias, ignore_rows=(), all_ignored=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, N_IN, generator=g, dtype=torch.float32)
    w = torch.randn(VOCAB, N_IN, generator=g) * 0.3
    b = torch.randn(VOCAB, generator=g) if bias else None
    rows = math.prod(shape)
    labels = torch.randint(0, VOCAB, (rows,), generator=g)
    for r in ignore_rows:
        labels[r] = -100
    if all_ignored:
        labels[:] = -100
    return x, w, b, labels


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _eager(x, w, b, labels, reduction, upcast=True):
    logits = F.linear(x, w, b)
    flat = (logits.float() if upcast else logits).reshape(-1, VOCAB)
    return F.cross_entropy(flat, labels, ignore_index=-100, reduction=reduction), logits


def _grads(loss, ts):
    ts = [t for t in ts if t is not None]
    return torch.autograd.grad(loss, ts, allow_unused=True)


EARLY = pytest.mark.parametrize("early", [False, True], ids=["recompute", "grad-in-forward"])


@EARLY
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(12,), (3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_loss_and_gradients_match_eager(reduction, bias, shape, chunk, early):
    x, w, b, labels = _inputs(shape, bias, ignore_rows=(0, 5, 7))
    ref_leaves, leaves = _leaves(x, w, b), _leaves(x, w, b)
    ref, _ = _eager(*ref_leaves, labels, reduction)
    got = LinearCrossEntropy.apply(*leaves, labels, -100, reduction, chunk, True, False, early)
    torch.testing.assert_close(got, ref)
    for a, e in zip(_grads(got, leaves), _grads(ref, ref_leaves)):
        torch.testing.assert_close(a, e)


@EARLY
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_label_ignored_matches_eager(reduction, early):
    """Mean over no valid row is 0/0 = NaN in eager; sum is 0; gradients are zero (or NaN) alike."""
    x, w, b, labels = _inputs((2, 4), True, all_ignored=True)
    ref_leaves, leaves = _leaves(x, w, b), _leaves(x, w, b)
    ref, _ = _eager(*ref_leaves, labels, reduction)
    got = LinearCrossEntropy.apply(*leaves, labels, -100, reduction, 3, True, False, early)
    torch.testing.assert_close(got, ref, equal_nan=True)
    assert torch.isnan(got).item() == torch.isnan(ref).item()
    for a, e in zip(_grads(got, leaves), _grads(ref, ref_leaves)):
        torch.testing.assert_close(a, e, equal_nan=True)


def test_other_ignore_index():
    x, w, b, labels = _inputs((10,), False)
    labels[[1, 2]] = 3
    ref = F.cross_entropy(F.linear(x, w), labels, ignore_index=3)
    got = LinearCrossEntropy.apply(x, w, None, labels, 3, "mean", 4, False, False)
    torch.testing.assert_close(got, ref)


def test_returned_logits_carry_their_gradient():
    """A gradient sent into the returned logits reaches x, W and b as through F.linear."""
    x, w, b, labels = _inputs((2, 6), True, ignore_rows=(3,))
    ref_leaves, leaves = _leaves(x, w, b), _leaves(x, w, b)
    ref_loss, ref_logits = _eager(*ref_leaves, labels, "mean")
    loss, logits = LinearCrossEntropy.apply(*leaves, labels, -100, "mean", 5, True, True)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(logits, ref_logits)
    assert logits.shape == (2, 6, VOCAB)
    aux = lambda lg: (lg.sin() * torch.arange(VOCAB)).mean()  # noqa: E731
    for a, e in zip(_grads(loss + aux(logits), leaves), _grads(ref_loss + aux(ref_logits), ref_leaves)):
        torch.testing.assert_close(a, e)


def test_grad_in_forward_returns_logits_without_a_path_until_attached():
    """With the gradients computed in the forward the op's logits carry no gradient path;
    ``attach_logits_grad`` gives it back, exact, and costs nothing when nothing uses it."""
    from prac_fx.passes.chunked_ce import attach_logits_grad

    x, w, b, labels = _inputs((2, 6), True, ignore_rows=(3,))
    ref_leaves, leaves = _leaves(x, w, b), _leaves(x, w, b)
    ref_loss, ref_logits = _eager(*ref_leaves, labels, "mean")
    loss, logits = LinearCrossEntropy.apply(*leaves, labels, -100, "mean", 5, True, True, True)
    assert not logits.requires_grad
    logits = attach_logits_grad(logits, *leaves)
    torch.testing.assert_close(logits, ref_logits)
    aux = lambda lg: (lg.sin() * torch.arange(VOCAB)).mean()  # noqa: E731
    for a, e in zip(_grads(loss + aux(logits), leaves), _grads(ref_loss + aux(ref_logits), ref_leaves)):
        torch.testing.assert_close(a, e)
    # the loss alone: the attached path's backward never runs
    loss, logits = LinearCrossEntropy.apply(*leaves, labels, -100, "mean", 5, True, True, True)
    logits = attach_logits_grad(logits, *leaves)
    with torch.profiler.profile() as prof:
        _grads(loss, leaves)
    assert not [e for e in prof.events() if "_LogitsGrad" in e.name]


@pytest.mark.parametrize("block", [1, 5, 16, 37, 100])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True])
def test_grad_in_forward_over_vocabulary_blocks_of_returned_logits(block, reduction, bias):
    """Returned logits are held in full, so the forward's gradients come from a pass over
    vocabulary blocks of them: exact for any block width, a last block narrower than the
    others, ignored rows, mean and sum, an incoming gradient other than 1."""
    from prac_fx.passes.chunked_ce import attach_logits_grad

    x, w, b, labels = _inputs((3, 7), bias, ignore_rows=(0, 4, 11))
    labels[5] = VOCAB - 1  # a label in the last block
    ref_leaves, leaves = _leaves(x, w, b), _leaves(x, w, b)
    ref_loss, ref_logits = _eager(*ref_leaves, labels, reduction)
    loss, logits = LinearCrossEntropy.apply(*leaves, labels, -100, reduction, 8, True, True,
                                            True, block)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(attach_logits_grad(logits, *leaves), ref_logits)
    scale = torch.tensor(0.75)
    got = [g for g in torch.autograd.grad(loss, [t for t in leaves if t is not None], scale)]
    exp = [g for g in torch.autograd.grad(ref_loss, [t for t in ref_leaves if t is not None], scale)]
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e)


def test_vocab_block_bounded():
    from prac_fx.passes.chunked_ce import (MAX_CHUNK_ELEMENTS, MAX_VOCAB_BLOCKS, MIN_VOCAB_BLOCK,
                                           vocab_block_for)

    block = vocab_block_for(512, 80000)  # 512 rows: 8192 columns fit the cap, 10 blocks
    assert block * 512 <= MAX_CHUNK_ELEMENTS and -(-80000 // block) == 10
    block = vocab_block_for(512, 150000)  # 19 blocks would fit the cap: 16, for the compile
    blocks = -(-150000 // block)
    assert blocks == MAX_VOCAB_BLOCKS
    assert 150000 - (blocks - 1) * block >= block - blocks  # spread evenly: no thin last block
    assert vocab_block_for(512, 150000, width=256) == block  # the block count rules there
    # the bench at vocabulary 2048: no larger than the head input, 8 blocks of 256 columns
    assert vocab_block_for(2048, 2048, width=256) == 256
    assert vocab_block_for(2048, 32000, width=256) == 2000  # 16 blocks
    many = vocab_block_for(1 << 20, 3000)  # many rows: the floor, spread over its 12 blocks
    assert many <= MIN_VOCAB_BLOCK and -(-3000 // many) == -(-3000 // MIN_VOCAB_BLOCK)
    assert -(-150000 // vocab_block_for(1 << 20, 150000)) == MAX_VOCAB_BLOCKS
    assert vocab_block_for(16, 37) == 37  # a vocabulary below the floor: one block


@pytest.mark.parametrize("scale", [3.5, 0.125])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_in_forward_scales_by_the_incoming_gradient(scale, reduction):
    """Loss scaling, or a division for gradient accumulation: the backward multiplies."""
    x, w, b, labels = _inputs((3, 5), True, ignore_rows=(2,))
    ref_leaves, leaves = _leaves(x, w, b), _leaves(x, w, b)
    ref, _ = _eager(*ref_leaves, labels, reduction)
    got = LinearCrossEntropy.apply(*leaves, labels, -100, reduction, 4, True, False, True)
    ones = torch.tensor(scale)
    for a, e in zip(torch.autograd.grad(got, leaves, ones), torch.autograd.grad(ref, ref_leaves, ones)):
        torch.testing.assert_close(a, e)


def test_grad_in_forward_frozen_weight():
    """A head whose weight takes no gradient (a frozen base under adapters): the input and
    bias gradients are exact and no weight gradient is computed or held."""
    x, w, b, labels = _inputs((10,), True)
    xr, br = x.clone().requires_grad_(), b.clone().requires_grad_()
    xl, bl = x.clone().requires_grad_(), b.clone().requires_grad_()
    ref, _ = _eager(xr, w, br, labels, "mean")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        got = LinearCrossEntropy.apply(xl, w, bl, labels, -100, "mean", 4, True, False, True)
    assert (VOCAB, N_IN) not in saved
    for a, e in zip(torch.autograd.grad(got, [xl, bl]), torch.autograd.grad(ref, [xr, br])):
        torch.testing.assert_close(a, e)


def _count_mm(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def test_grad_in_forward_does_no_extra_work_without_grad():
    """Under no_grad (eval) the op computes the logits and the loss, nothing more: one matmul per
    chunk, as without grad_in_forward; with grad, three per chunk in all, as Inductor's graph."""
    x, w, b, labels = _inputs((12,), True)
    chunks = 3  # 12 rows, 4 per chunk
    with torch.no_grad():
        assert _count_mm(lambda: LinearCrossEntropy.apply(x, w, b, labels, -100, "mean", 4, True,
                                                          False, True)) == chunks
    leaves = _leaves(x, w, b)

    def step(early):
        loss = LinearCrossEntropy.apply(*leaves, labels, -100, "mean", 4, True, False, early)
        loss.backward()

    assert _count_mm(lambda: step(True)) == 3 * chunks
    assert _count_mm(lambda: step(False)) == 4 * chunks  # the recompute


def test_grad_in_forward_under_bf16_autocast_accumulates_in_float32():
    x, w, b, labels = _inputs((64,), True)
    ref_leaves, leaves = _leaves(x, w, b), _leaves(x, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = _eager(*ref_leaves, labels, "mean")
        got = LinearCrossEntropy.apply(*leaves, labels, -100, "mean", 16, True, False, True)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    got_grads, ref_grads = _grads(got, leaves), _grads(ref, ref_leaves)
    assert all(g.dtype == torch.float32 for g in got_grads)
    # bf16 matmuls on both sides: agreement to bf16 precision
    for a, e in zip(got_grads, ref_grads):
        assert (a - e).norm() / e.norm() < 2e-2
    fp32 = _leaves(x, w, b)
    exact = _grads(_eager(*fp32, labels, "mean")[0], fp32)
    for a, e in zip(got_grads, exact):  # and to the float32 gradients, to bf16 precision
        assert (a - e).norm() / e.norm() < 2e-2


def test_grad_in_forward_rule():
    from prac_fx.passes.chunked_ce import grad_in_forward_pays

    bf16 = torch.bfloat16
    assert grad_in_forward_pays(2048, 32000, 256, True, bf16)  # the bench's 2048 rows, width 256
    assert grad_in_forward_pays(16384, 128000, 4096, True, bf16)  # a real batch of a wide model
    assert not grad_in_forward_pays(512, 150000, 4096, True, bf16)  # few rows, wide: recompute
    assert grad_in_forward_pays(512, 150000, 4096, False, bf16)  # frozen head: nothing more held
    # a float32 weight: the held gradient is the size of the one the backward makes anyway
    assert grad_in_forward_pays(512, 150000, 4096, True)
    assert grad_in_forward_pays(512, 150000, 512, True, torch.float32)


def test_no_upcast_keeps_dtype():
    x, w, b, labels = _inputs((8,), False)
    x, w = x.double(), w.double()
    got = LinearCrossEntropy.apply(x, w, None, labels, -100, "sum", 3, False, False)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, F.cross_entropy(F.linear(x, w), labels, reduction="sum"))


def test_saves_no_rows_by_vocab_tensor():
    x, w, b, labels = _inputs((64,), True)
    leaves = _leaves(x, w, b)
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        LinearCrossEntropy.apply(*leaves, labels, -100, "mean", 16, True, False)
    assert saved and all(s != (64, VOCAB) for s in saved), saved
    assert (64,) in saved  # the per-row log-sum-exp


def test_chunk_rows_bounded():
    assert chunk_rows_for(2048, 32000) * 32000 <= 1 << 22
    assert chunk_rows_for(10, 7) == 10
    assert chunk_rows_for(5, 1 << 30) == 5  # fewer rows than the floor: one chunk
    # past the element cap the floor wins: 128 rows, not 32, at vocab 128000
    assert chunk_rows_for(2048, 128000, width=256) == 128
    assert chunk_rows_for(4096, 1 << 30) == 128
    rows = chunk_rows_for(1000, 16384)  # spread evenly: no small last chunk
    assert -(-1000 // rows) * rows - 1000 < -(-1000 // rows)


def test_chunk_no_larger_than_the_head_input():
    # the bench's tiny models: 2048 rows, width 256, vocab 2048 -> logits of one chunk match
    # the (2048, 256) input: 256 rows, where the element cap alone allows all 2048
    assert chunk_rows_for(2048, 2048) == 2048
    assert chunk_rows_for(2048, 2048, width=256) == 256
    # the floor: at vocab 32000 the input-size rule would give 16 rows; 128 keep re-reads few
    assert chunk_rows_for(2048, 32000, width=256) == 128
    # a wide model: the element cap binds, as without the width
    assert chunk_rows_for(16384, 32000, width=4096) == chunk_rows_for(16384, 32000)
    assert chunk_rows_for(100, 2048, width=256) == 100  # fewer rows than the floor: one chunk


def test_bad_reduction():
    x, w, b, labels = _inputs((4,), False)
    with pytest.raises(ValueError, match="reduction"):
        LinearCrossEntropy.apply(x, w, None, labels, -100, "none", 2, True, False)
