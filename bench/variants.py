"""The training set-ups a user would choose between, each as a ``Variant``."""
from __future__ import annotations

import torch

import prac_fx
from bench.harness import Variant


def eager() -> Variant:
    return Variant("eager", lambda model: model)


def inductor() -> Variant:
    return Variant("inductor", lambda model: torch.compile(model))


def prac(rank: float | int, label: str | None = None, **options) -> Variant:
    def make(model):
        return torch.compile(model, backend=prac_fx.backend(rank=rank, **options))

    return Variant(label or f"prac r={rank}", make)


def default_set() -> list[Variant]:
    return [eager(), inductor(), prac(0.125, "prac r=n/8")]
