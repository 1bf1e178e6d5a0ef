import os

# Set before torch starts its thread pool: on a shared 2-core machine OpenMP spin-waiting makes
# tiny Inductor kernels up to 100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Strict by default: a graph that falls back to plain Inductor raises prac_fx.FallbackError where
# it happens, instead of failing a test three assertions later as "nothing compressed". Tests of
# the fallback itself pass strict=False.
os.environ.setdefault("PRAC_FX_STRICT", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Many tests compile fresh instances of the same model class: without this, Dynamo stops
# compiling a code object after 8 variants and silently runs it eagerly.
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 256)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield
