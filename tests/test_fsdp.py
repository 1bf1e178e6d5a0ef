"""FSDP2 (``fully_shard``) over blocks compiled with the backend: two CPU processes with gloo on
127.0.0.1.

Each block of a small residual MLP stack is ``fully_shard``-ed and compiled on its own
(``block.compile(backend=...)``), then the root is ``fully_shard``-ed. FSDP2's hooks run outside
the compiled graphs: each block's graph receives the all-gathered (unsharded) parameters as plain
inputs, the gradients leave the graph unsharded and FSDP2 reduce-scatters them (gloo,
``ReduceOp.AVG``). Dynamo compiles one graph for the first block (its input needs no grad) and
reuses one graph for all the others, so each block must still get its own bases, found by the
weights the graph is called with.

Each worker (this file run as a script) trains four ways on its own fixed batch: without FSDP
on both ranks' batches together (the reference), plain FSDP2, FSDP2 with the blocks compiled at
full rank, and at low rank. Full rank must match plain FSDP2, which must match the reference
(the reduce-scatter averages the ranks' gradients); at low rank the reduced gradient must be the
mean of the two ranks' own compressed estimates (recomputed without FSDP), the ranks must agree
while drawing different bases (per-rank seeds), and the loss must go down. Then a
tiny transformers Llama with each decoder layer sharded and compiled with Inductor at full rank
must match plain FSDP2.
"""
import sys

import torch

import prac_fx
from toys import run_workers

WORLD, STEPS, BLOCKS = 2, 4, 3
KEYS = {"up", "down", "up@1", "down@1", "up@2", "down@2"}
LOW = {"rank": 8, "refresh_every": 2, "resample_every": 1, "compiler": "eager"}


class Block(torch.nn.Module):
    def __init__(self, n=32, hidden=64):
        super().__init__()
        self.up = torch.nn.Linear(n, hidden)
        self.down = torch.nn.Linear(hidden, n)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[Block() for _ in range(BLOCKS)])


def _batch(rank):
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, the same every step
    return torch.randn(4, 8, 32, generator=g), torch.randn(4, 8, 32, generator=g)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(rank, mode, backend=None):
    """mode: "reference" (no FSDP, both ranks' batches), "fsdp" (FSDP2, this rank's batch)."""
    from torch.distributed.fsdp import fully_shard

    torch._dynamo.reset()
    model = _model()
    if mode == "fsdp":
        for block in model:
            fully_shard(block)
            if backend is not None:
                block.compile(backend=backend)
        fully_shard(model)
        x, y = _batch(rank)
    else:
        batches = [_batch(r) for r in range(WORLD)]
        x, y = (torch.cat(t) for t in zip(*batches))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    losses, grads = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        # FSDP2 leaves each rank its shard of the averaged gradient: gather the whole of it
        grads.append({k: _full(p.grad).clone() for k, p in model.named_parameters()})
        opt.step()
        losses.append(loss.detach())
    result = {"losses": torch.stack(losses), "grads": grads,
              "params": {k: _full(p.detach()).clone() for k, p in model.named_parameters()},
              "dtensor": type(model[0].up.weight).__name__}
    if backend is not None:
        result["graphs"] = sum(g.training for g in backend.graphs)
        result["calls"] = {k: g.calls for k, g in backend.store.groups.items()}
        result["bases"] = {k: g.basis.clone() for k, g in backend.store.groups.items()}
        result["seed"] = backend.store.seed
    return result


def _local_grads(rank, backend):
    """The first step's gradient on this rank alone (no FSDP, no reduction), with the bases the
    FSDP2 run draws at that step (same seed, same activations, same order of draws)."""
    torch._dynamo.reset()
    model = _model()
    for block in model:
        block.compile(backend=backend)
    x, y = _batch(rank)
    (model(x) - y).square().mean().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _train_llama(rank, backend=None):
    """A tiny transformers Llama, each decoder layer ``fully_shard``-ed and compiled."""
    from torch.distributed.fsdp import fully_shard

    from prac_fx.diff import models

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.build("llama", layers=2, width=64, seq=16, vocab=128)
    for layer in model.model.layers:
        fully_shard(layer)
        if backend is not None:
            layer.compile(backend=backend)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = models.batch(128, 2, 16, seed=rank)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    result = {"losses": torch.stack(losses),
              "params": {k: _full(p.detach()).clone() for k, p in model.named_parameters()}}
    if backend is not None:
        result["graphs"] = sum(g.training for g in backend.graphs)
        result["calls"] = {k: g.calls for k, g in backend.store.groups.items()}
        result["rewritten"] = backend.report().sites_rewritten
    return result


def worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        results = {
            "reference": _train(rank, "reference"),
            "plain": _train(rank, "fsdp"),
            "full": _train(rank, "fsdp", prac_fx.backend(rank=1.0, compiler="eager")),
            "low": _train(rank, "fsdp", prac_fx.backend(**LOW)),
            "low_local": _local_grads(rank, prac_fx.backend(**LOW)),
            "llama_plain": _train_llama(rank),
            "llama_full": _train_llama(rank, prac_fx.backend(rank=1.0)),  # Inductor
        }
        torch.save(results, out)
    finally:
        dist.destroy_process_group()



def test_fsdp2_two_processes(tmp_path):
    res = run_workers(__file__, WORLD, tmp_path)

    ref = res[0]["reference"]
    for r in range(WORLD):
        plain, full, low = res[r]["plain"], res[r]["full"], res[r]["low"]
        assert plain["dtensor"] == full["dtensor"] == "DTensor"  # parameters are sharded
        # plain FSDP2 on gloo: the reduce-scatter averages the ranks' gradients
        for step in range(STEPS):
            for k, v in ref["grads"][step].items():
                torch.testing.assert_close(plain["grads"][step][k], v, rtol=1e-4, atol=1e-6)
        # full rank equals plain FSDP2 (each rank its own data: its own losses)
        torch.testing.assert_close(full["losses"], plain["losses"])
        for step in range(STEPS):
            for k, v in plain["grads"][step].items():
                torch.testing.assert_close(full["grads"][step][k], v, rtol=1e-5, atol=1e-6)
        for k, v in plain["params"].items():
            torch.testing.assert_close(full["params"][k], v, rtol=1e-5, atol=1e-6)
        # one graph for the first block, one reused by the others; each block its own bases,
        # counted once per step
        for run in (full, low):
            assert run["graphs"] == 2
            assert run["calls"] == {k: STEPS for k in KEYS}
            assert run["seed"] == 0 + 1_000_003 * r
        assert not torch.equal(low["bases"]["up"], low["bases"]["up@1"])
        assert torch.isfinite(low["losses"]).all() and (low["losses"].diff() < 0).all()
        # and by at least half as much as exact training
        assert low["losses"][0] - low["losses"][-1] > 0.5 * (plain["losses"][0] - plain["losses"][-1])
    # Llama with Inductor: both decoder layers run one graph (7 sites), each with its own bases
    llama_keys = {"self_attn.q_proj+k_proj+v_proj", "self_attn.o_proj", "mlp.gate_proj+up_proj",
                  "mlp.down_proj"}
    for r in range(WORLD):
        plain, full = res[r]["llama_plain"], res[r]["llama_full"]
        assert full["graphs"] == 1 and full["rewritten"] == 7
        assert full["calls"] == {k + s: STEPS for k in llama_keys for s in ("", "@1")}
        torch.testing.assert_close(full["losses"], plain["losses"])
        assert plain["losses"][-1] < plain["losses"][0]
        for k, v in plain["params"].items():
            torch.testing.assert_close(full["params"][k], v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((res[0]["plain"]["losses"] + res[1]["plain"]["losses"]) / 2,
                               ref["losses"])
    # low rank: the reduce-scatter averaged the two ranks' own compressed estimates
    local = [res[r]["low_local"] for r in range(WORLD)]
    for k in local[0]:
        assert not torch.allclose(local[0][k], local[1][k]), k
        torch.testing.assert_close(res[0]["low"]["grads"][0][k], (local[0][k] + local[1][k]) / 2,
                                   rtol=1e-4, atol=1e-6)
    # the ranks hold the same reduced gradient and parameters, yet drew their own bases, and
    # the compressed gradient differs from the exact one
    for step in range(STEPS):
        for k, v in res[0]["low"]["grads"][step].items():
            assert torch.equal(res[1]["low"]["grads"][step][k], v), (step, k)
    for k, v in res[0]["low"]["params"].items():
        assert torch.equal(res[1]["low"]["params"][k], v), k
    for k in KEYS:
        assert not torch.equal(res[0]["low"]["bases"][k], res[1]["low"]["bases"][k]), k
    assert not torch.allclose(res[0]["low"]["grads"][0]["1.up.weight"],
                              res[0]["plain"]["grads"][0]["1.up.weight"])


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
