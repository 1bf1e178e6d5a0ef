"""The same checks on a GPU (Triton code generation); skipped where no CUDA device exists."""
import pytest
import torch
import torch._dynamo

import prac_fx
from conftest import rel_err
from prac_fx.diff import models

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_full_rank_on_gpu(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.build(name, layers=2, width=64, seq=32, vocab=128).cuda()
    ids = models.batch(128, 2, 32).cuda()
    ref_loss = model(ids, labels=ids).loss
    ref_loss.backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    be = prac_fx.backend(rank=1.0)
    loss = torch.compile(model, backend=be, fullgraph=True)(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    grads = {k.removeprefix("_orig_mod."): p.grad for k, p in model.named_parameters()}
    # TF32 may be on for matmuls: a looser bound than on CPU
    assert max(rel_err(grads[k], ref[k]) for k in ref) < 1e-2
    assert all(g.basis.device.type == "cuda" for g in be.store.groups.values())


@cuda
def test_bf16_autocast_on_gpu():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.build("llama", layers=2, width=64, seq=32, vocab=128).cuda()
    ids = models.batch(128, 2, 32).cuda()
    be = prac_fx.backend(rank=0.25)
    compiled = torch.compile(model, backend=be)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    assert all(g.basis.dtype == torch.float32 for g in be.store.groups.values())
