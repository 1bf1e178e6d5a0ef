"""Small models and a two-process launcher shared by several test files (not collected)."""
import os
import socket
import subprocess
import sys

import torch

import prac_fx


class MLP(torch.nn.Module):
    """Three linear sites (two with bias) between a gelu and a relu."""

    def __init__(self, n=32, hidden=64, out=16):
        super().__init__()
        self.up = torch.nn.Linear(n, hidden)
        self.mid = torch.nn.Linear(hidden, n, bias=False)
        self.down = torch.nn.Linear(n, out)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.up(x))
        h = torch.relu(self.mid(h))
        return self.down(h)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, world: int, tmp_path, timeout: float = 240) -> list:
    """Run ``script RANK PORT OUT`` in ``world`` processes on 127.0.0.1 and load each ``OUT``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(prac_fx.__file__)))
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=path)
    port = _free_port()
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, script, str(r), str(port), str(outs[r])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return [torch.load(o) for o in outs]


class Attention(torch.nn.Module):
    """q/k/v read one input (one group), SDPA between, an output projection, a GELU MLP and an
    ``lm_head`` (an output head: exact by default)."""

    def __init__(self, n=32, heads=2, vocab=24):
        super().__init__()
        self.heads = heads
        self.q = torch.nn.Linear(n, n)
        self.k = torch.nn.Linear(n, n)
        self.v = torch.nn.Linear(n, n)
        self.out = torch.nn.Linear(n, n)
        self.up = torch.nn.Linear(n, 2 * n)
        self.down = torch.nn.Linear(2 * n, n)
        self.lm_head = torch.nn.Linear(n, vocab, bias=False)

    def forward(self, x):
        B, T, n = x.shape

        def split(t):
            return t.view(B, T, self.heads, n // self.heads).transpose(1, 2)

        a = torch.nn.functional.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(B, T, n))
        x = x + self.down(torch.nn.functional.gelu(self.up(x)))
        return self.lm_head(x)


class Conv1DLike(torch.nn.Module):
    """GPT-2's Conv1D (``torch.addmm`` with the weight stored (n, m)) and a parameter on the
    right of a matmul."""

    def __init__(self, n=32, m=48):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, m) / n**0.5)
        self.bias = torch.nn.Parameter(torch.zeros(m))
        self.proj = torch.nn.Parameter(torch.randn(m, n) / m**0.5)

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        h = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)
        return torch.tanh(h) @ self.proj
