"""Models for the ``prac-fx diff`` tests: ``tiny.py:build`` is the golden model.

Small enough to compile in seconds, and built to hit every site status: an input group of
three projections (q, k, v), attention, element-wise nonlinear ops, a frozen layer (no trainable
weight), an output head, a layer narrower than the rank, and layers a filter can exclude.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        b, s, d = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.gelu(self.up(x)))


class Tiny(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.block = Block(width)
        self.frozen = nn.Linear(width, width)
        self.frozen.requires_grad_(False)
        self.proj = nn.Linear(width, 4)
        self.tail = nn.Linear(4, 4)  # n = 4: narrower than an integer rank of 8
        self.head = nn.Linear(4, 1)  # an output head by name: stays exact by default

    def forward(self, x):
        return self.head(self.tail(torch.tanh(self.proj(self.frozen(self.block(x))))))


def build(batch: int = 2, seq: int = 8):
    """The golden model and an input spec: a shape, drawn by the CLI."""
    return Tiny(), (batch, seq, 32)


def no_linear():
    return nn.LayerNorm(8), (2, 8)


def raises():
    raise ValueError("this factory always fails")


NOT_CALLABLE = 3
