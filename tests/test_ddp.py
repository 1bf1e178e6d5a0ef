"""DistributedDataParallel over a compiled model: two CPU processes with gloo on 127.0.0.1.

Each worker (this file run as a script) trains the same tiny MLP three ways on its own data:
plain DDP; DDP compiled with the backend at full rank with buckets small enough that Dynamo's
DDP optimizer splits the graph into one piece per layer (each piece is first run on fake
tensors, which must neither draw nor count); DDP compiled at low rank in one graph. Full rank
must match plain DDP; at low rank the ranks must stay in sync (DDP averages the gradients)
while drawing different bases (per-rank seeds).
"""
import sys

import torch

import prac_fx
from toys import MLP, run_workers

WORLD, STEPS = 2, 3


def _train(rank, backend=None, split=False):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    first = dist._DEFAULT_FIRST_BUCKET_BYTES
    if split:  # ~5 kB buckets: one per layer (the first bucket's cap must not exceed the others)
        dist._DEFAULT_FIRST_BUCKET_BYTES = 1000
        ddp = DDP(model, bucket_cap_mb=0.005)
    else:
        ddp = DDP(model)
    net = ddp if backend is None else torch.compile(ddp, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own data
        x, y = torch.randn(4, 8, 32, generator=g), torch.randn(4, 8, 16, generator=g)
        opt.zero_grad()
        loss = (net(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    dist._DEFAULT_FIRST_BUCKET_BYTES = first  # read by Dynamo at each compile
    result = {"losses": torch.stack(losses), "params": {k: v.clone() for k, v in model.state_dict().items()}}
    if backend is not None:
        result["graphs"] = sum(g.training for g in backend.graphs)
        result["calls"] = {k: g.calls for k, g in backend.store.groups.items()}
        result["bases"] = {k: g.basis.clone() for k, g in backend.store.groups.items()}
        result["seed"] = backend.store.seed
    return result


def worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        results = {
            "plain": _train(rank),
            # the backends are made before the process group would matter: the rank seed is
            # taken at the first compile
            "full": _train(rank, prac_fx.backend(rank=1.0, compiler="eager"), split=True),
            "low": _train(rank, prac_fx.backend(rank=8, refresh_every=2, resample_every=1,
                                                compiler="eager")),
        }
        torch.save(results, out)
    finally:
        dist.destroy_process_group()



def test_ddp_two_processes(tmp_path):
    res = run_workers(__file__, WORLD, tmp_path)

    for r in range(WORLD):
        plain, full, low = res[r]["plain"], res[r]["full"], res[r]["low"]
        # full rank equals plain DDP (its own data: losses differ between ranks)
        torch.testing.assert_close(full["losses"], plain["losses"])
        for k, v in plain["params"].items():
            torch.testing.assert_close(full["params"][k], v, rtol=1e-5, atol=1e-6)
        assert full["graphs"] == 3  # split per bucket
        assert full["calls"] == {"up": STEPS, "mid": STEPS, "down": STEPS}  # fake runs not counted
        assert low["graphs"] == 1 and low["calls"] == {"up": STEPS, "mid": STEPS, "down": STEPS}
        assert torch.isfinite(low["losses"]).all()
        assert low["seed"] == full["seed"] == 0 + 1_000_003 * r
    assert not torch.equal(res[0]["plain"]["losses"], res[1]["plain"]["losses"])
    # low rank: gradients were averaged, so the replicas agree bitwise, yet each rank drew its
    # own bases, and the compressed training moved away from the exact one
    for k, v in res[0]["low"]["params"].items():
        assert torch.equal(res[1]["low"]["params"][k], v), k
    for k in res[0]["low"]["bases"]:
        assert not torch.equal(res[0]["low"]["bases"][k], res[1]["low"]["bases"][k]), k
    assert not torch.allclose(res[0]["low"]["params"]["mid.weight"], res[0]["plain"]["params"]["mid.weight"])


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
