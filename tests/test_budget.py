"""prac_fx/budget.py: memory_budget as a fraction of the uncompressed graph's saved bytes."""
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import prac_fx
from prac_fx import budget
from prac_fx.diff import memory


class Stack(torch.nn.Module):
    def __init__(self, width=64, layers=4, vocab=300):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, x, y):
        for block in self.blocks:
            x = F.gelu(block(x)) + x
        return F.cross_entropy(self.head(x), y)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(512, 64, generator=g), torch.randint(0, 300, (512,), generator=g)


def _run(memory_budget, compiler="eager"):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Stack()
    x, y = _data()
    # the head's gradients recomputed in the backward: at this shape the op would otherwise hold
    # them from the forward, and the compressed graph alone would meet the 0.7 budget
    be = prac_fx.backend(rank=0.25, compiler=compiler, memory_budget=memory_budget,
                         head_loss_grad_in_forward=False)
    compiled = torch.compile(model, backend=be)
    compiled(x, y).backward()
    saved = memory.saved_bytes(lambda: compiled(x, y), list(model.parameters()))
    return be, saved, [p.grad.clone() for p in model.parameters()]


def test_partitioner_budget_arithmetic():
    assert budget.partitioner_budget(0.5, 1000, 500) == 1.0  # compression alone reaches the target
    assert budget.partitioner_budget(0.25, 1000, 500) == 0.5
    assert budget.partitioner_budget(0.0, 1000, 500) == 0.0
    assert budget.partitioner_budget(0.3, 1000, 0) == 1.0


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_kept_bytes_fall_with_the_budget_and_stay_under_the_target(compiler):
    kept = {}
    for b in (1.0, 0.7, 0.5, 0.3):
        be, saved, _ = _run(b, compiler)
        record = be.graphs[0].budget
        assert record.asked == b
        assert record.uncompressed_bytes > record.rewritten_bytes > 0
        assert be.graphs[0].kept_bytes <= record.target_bytes, (b, be.graphs[0].kept_bytes, record)
        kept[b] = saved
        lines = be.report().budget_lines()
        assert lines and f"memory_budget {b:g}" in lines[0] and "MiB kept" in lines[0]
    assert kept[1.0] > kept[0.7] > kept[0.5] > kept[0.3], kept


def test_budget_only_for_its_own_compile():
    before = torch._functorch.config.activation_memory_budget
    _run(0.3)
    assert torch._functorch.config.activation_memory_budget == before


def test_budget_keeps_gradients():
    """Recomputation changes what is kept, not what is computed (rank 1.0: exact)."""
    torch._dynamo.reset()
    x, y = _data()
    grads = []
    for b in (None, 0.3):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = Stack()
        be = prac_fx.backend(rank=1.0, compiler="eager", memory_budget=b)
        torch.compile(model, backend=be)(x, y).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e)


def test_invalid_budget():
    with pytest.raises(ValueError, match="memory_budget"):
        prac_fx.backend(memory_budget=1.5)
    with pytest.raises(ValueError, match="memory_budget"):
        prac_fx.backend(memory_budget="half")
