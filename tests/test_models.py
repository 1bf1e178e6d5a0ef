"""Tiny GPT-2 and Llama from transformers, end to end through the backend."""
import pytest
import torch
import torch._dynamo

import prac_fx
from conftest import rel_err
from prac_fx.diff import memory, models

SIZE = dict(layers=2, width=64, seq=32, vocab=128)
BATCH = 2
# (sites rewritten, groups) with every site compressed (exact_heads=()): GPT-2 has c_attn, c_proj,
# c_fc, mlp.c_proj per block plus the tied lm_head; Llama has q/k/v (one group), o, gate/up (one
# group), down per block plus lm_head.
EXPECTED_SITES = {"gpt2": (9, 9), "llama": (15, 9)}


def _model(name):
    torch.manual_seed(0)
    return models.build(name, **SIZE)


def _ids():
    return models.batch(SIZE["vocab"], BATCH, SIZE["seq"])


def _step(model, ids, embeds=None):
    model.zero_grad()
    if embeds is not None:
        embeds = embeds.detach().clone().requires_grad_()
        loss = model(inputs_embeds=embeds, labels=ids).loss
    else:
        loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {k.removeprefix("_orig_mod."): p.grad.clone() for k, p in model.named_parameters()
             if p.grad is not None}
    return loss.detach(), (None if embeds is None else embeds.grad), grads


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_full_rank_gradients_match_eager(name, compiler):
    """Ladder eager -> aot_eager with the pass -> Inductor with the pass, fullgraph=True."""
    torch._dynamo.reset()
    model, ids = _model(name), _ids()
    ref_loss, _, ref = _step(model, ids)
    # head_loss=False: this counts the compressed head (tests/test_head_loss.py takes it whole)
    be = prac_fx.backend(rank=1.0, compiler=compiler, exact_heads=(), head_loss=False)
    loss, _, grads = _step(torch.compile(model, backend=be, fullgraph=True), ids)
    torch.testing.assert_close(loss, ref_loss)
    worst = max(rel_err(grads[k], ref[k]) for k in ref)
    assert worst < 1e-4, worst
    report = be.report()
    assert (report.sites_rewritten, sum(len(g.groups) for g in be.graphs)) == EXPECTED_SITES[name]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def low_rank(request):
    """One PRAC compile at rank n/8 and one plain Inductor compile per model, shared."""
    torch._dynamo.reset()
    name = request.param
    model, ids = _model(name), _ids()
    be = prac_fx.backend(rank=0.125)
    return name, model, ids, be, torch.compile(model, backend=be, fullgraph=True), torch.compile(model)


def test_low_rank_loss_and_input_grad_exact(low_rank):
    name, model, ids, be, compiled, _ = low_rank
    embeds = torch.randn(BATCH, SIZE["seq"], SIZE["width"]) * 0.02
    ref_loss, ref_gx, ref = _step(model, ids, embeds)
    loss, gx, grads = _step(compiled, ids, embeds)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-6)
    # weight gradients are compressed (and unbiased), not exact
    key = "model.layers.0.mlp.down_proj.weight" if name == "llama" else "transformer.h.0.mlp.c_proj.weight"
    assert rel_err(grads[key], ref[key]) > 1e-3


def test_output_head_stays_exact_by_default(low_rank):
    """lm_head is taken whole, with the loss, by the exact head-and-loss op (no site compresses
    it); Llama's untied head gets its exact gradient."""
    name, model, ids, be, compiled, _ = low_rank
    _, _, ref = _step(model, ids)
    _, _, grads = _step(compiled, ids)
    assert not [r for r in be.report().rows() if r["module"] == "lm_head"]
    heads = [h for g in be.graphs for h in g.head_losses]
    assert heads and all(h.status == "rewritten" and h.module == "lm_head" for h in heads), heads
    first = next(g for g in be.graphs if g.training)
    assert first.rewritten == EXPECTED_SITES[name][0] - 1
    if name == "llama":  # GPT-2's head weight is the tied embedding, which sums two gradients
        torch.testing.assert_close(grads["lm_head.weight"], ref["lm_head.weight"], rtol=1e-4, atol=1e-6)


def test_saved_bytes_below_inductor(low_rank):
    name, model, ids, be, compiled, inductor = low_rank
    params = list(model.parameters())
    for m in (compiled, inductor):
        _step(m, ids)  # compile outside the measurement
    prac_bytes = memory.saved_bytes(lambda: compiled(ids, labels=ids).loss, params)
    inductor_bytes = memory.saved_bytes(lambda: inductor(ids, labels=ids).loss, params)
    eager_bytes = memory.saved_bytes(lambda: model(ids, labels=ids).loss, params)
    assert prac_bytes < inductor_bytes < eager_bytes, (prac_bytes, inductor_bytes, eager_bytes)
    statuses = {r["compressed copy"] for r in be.report().rows(include_skipped=False)}
    assert statuses <= {"saved", "recomputed in backward", "not saved"} and "saved" in statuses


def test_new_sequence_length_shares_bases(low_rank):
    name, model, ids, be, compiled, _ = low_rank
    _step(compiled, ids)
    keys = set(be.store.groups)
    training_graphs = sum(g.training for g in be.graphs)
    short = ids[:, : SIZE["seq"] // 2]
    for _ in range(2):
        _step(compiled, short)
    assert set(be.store.groups) == keys  # the new graph found the same bases
    assert sum(g.training for g in be.graphs) <= training_graphs + 1


def test_exact_if_kept_leaves_free_sites_exact(low_rank):
    """``exact_if_kept``: the groups whose compressed copy the default compile does not save
    (the attention output under o_proj / attn.c_proj, kept for attention's backward anyway) stay
    exact, with their exact weight gradient; the others stay compressed, their copies saved; and
    the bytes saved for backward do not grow."""
    name, model, ids, _, _, _ = low_rank
    # fresh, static compiles of both (earlier tests ran the shared one at another length, which
    # makes Dynamo compile this model with a dynamic sequence length from then on)
    torch._dynamo.reset()
    be = prac_fx.backend(rank=0.125)
    compiled = torch.compile(model, backend=be, fullgraph=True)
    _step(compiled, ids)
    free = {r["module"] for r in be.report().rows(include_skipped=False)
            if r["compressed copy"] != "saved"}
    assert free, "expected a site whose copy is not saved (the output projection)"
    kept_be = prac_fx.backend(rank=0.125, exact_if_kept=True)
    kept = torch.compile(model, backend=kept_be, fullgraph=True)
    _, _, ref = _step(model, ids)
    _, _, grads = _step(kept, ids)
    graph = next(g for g in kept_be.graphs if g.training)
    exact = {s.module for s in graph.sites if s.reason == prac_fx.passes.kinds.KEPT_ANYWAY}
    assert exact == free
    assert {r["compressed copy"] for r in kept_be.report().rows(include_skipped=False)} == {"saved"}
    for module in exact:
        torch.testing.assert_close(grads[module + ".weight"], ref[module + ".weight"],
                                   rtol=1e-4, atol=1e-6)
    compressed = next(r["module"] for r in kept_be.report().rows(include_skipped=False))
    assert rel_err(grads[compressed + ".weight"], ref[compressed + ".weight"]) > 1e-3
    params = list(model.parameters())
    before = memory.saved_bytes(lambda: compiled(ids, labels=ids).loss, params)
    after = memory.saved_bytes(lambda: kept(ids, labels=ids).loss, params)
    assert after <= before, (after, before)


def test_exact_if_kept_under_a_memory_budget(low_rank):
    """Under ``memory_budget`` the partitioner recomputes more; with ``exact_if_kept`` every
    group it would recompute stays exact, so each copy that remains is saved, and the bytes
    kept are no more than PRAC's under the same budget."""
    name, model, ids, _, _, _ = low_rank
    torch._dynamo.reset()  # static compiles, as above
    params = list(model.parameters())
    kept_bytes = {}
    for flag in (False, True):
        be = prac_fx.backend(rank=0.125, memory_budget=0.5, exact_if_kept=flag)
        compiled = torch.compile(model, backend=be, fullgraph=True)
        _step(compiled, ids)
        kept_bytes[flag] = memory.saved_bytes(lambda: compiled(ids, labels=ids).loss, params)
        rows = be.report().rows(include_skipped=False)
        graph = next(g for g in be.graphs if g.training)
        reasons = {s.reason for s in graph.sites if s.kind in prac_fx.passes.kinds.LINEAR_KINDS}
        if flag:
            assert {r["compressed copy"] for r in rows} <= {"saved"}
            assert prac_fx.passes.kinds.KEPT_ANYWAY in reasons
        else:
            assert prac_fx.passes.kinds.KEPT_ANYWAY not in reasons
    assert kept_bytes[True] <= kept_bytes[False], kept_bytes
