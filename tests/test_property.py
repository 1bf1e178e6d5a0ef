"""Property: for any small stack of linear and element-wise layers, any rank and split, the
backend's forward output and input gradient equal eager's, and every weight gradient is finite
and of its parameter's shape."""
import math

import torch
import torch._dynamo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prac_fx

ACTIVATIONS = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh,
               "silu": torch.nn.SiLU}


@st.composite
def cases(draw):
    layers = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(4, 32), min_size=layers + 1, max_size=layers + 1))
    bias = draw(st.lists(st.booleans(), min_size=layers, max_size=layers))
    acts = draw(st.lists(st.sampled_from(sorted(ACTIVATIONS)), min_size=layers, max_size=layers))
    final_act = draw(st.booleans())  # end on a nonlinear layer or on a linear one
    rank = draw(st.one_of(st.integers(1, 40), st.floats(0.01, 1.0)))
    split = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0)))
    lead = draw(st.one_of(st.tuples(st.integers(1, 96)),  # 2-D input (N, n)
                          st.tuples(st.integers(1, 4), st.integers(1, 24))))  # 3-D (B, S, n)
    seed = draw(st.integers(0, 2**16))
    return dict(widths=widths, bias=bias, acts=acts, final_act=final_act, rank=rank,
                split=split, lead=lead, seed=seed)


def _stack(widths, bias, acts, final_act):
    mods = []
    for i, (a, b, use_bias, act) in enumerate(zip(widths, widths[1:], bias, acts)):
        mods.append(torch.nn.Linear(a, b, bias=use_bias))
        if i < len(acts) - 1 or final_act:
            mods.append(ACTIVATIONS[act]())
    return torch.nn.Sequential(*mods)


def _run(model, x, grad_out):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(grad_out)
    return out.detach(), x.grad


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_random_stacks_forward_and_input_grad_exact(case):
    torch._dynamo.reset()
    torch.manual_seed(case["seed"])
    model = _stack(case["widths"], case["bias"], case["acts"], case["final_act"])
    x = torch.randn(*case["lead"], case["widths"][0])
    grad_out = torch.randn(*case["lead"], case["widths"][-1])
    ref_out, ref_gx = _run(model, x, grad_out)

    be = prac_fx.backend(rank=case["rank"], split=case["split"], refresh_every=2,
                         resample_every=1, compiler="eager")
    compiled = torch.compile(model, backend=be)
    for _ in range(3):  # refresh, resample, refresh again
        out, gx = _run(compiled, x, grad_out)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(gx, ref_gx)
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.shape == p.shape, name
            assert torch.isfinite(p.grad).all(), name

    rows = [r for r in be.report().rows() if r["kind"] == "linear"]
    assert len(rows) == len(case["widths"]) - 1
    rows_n = math.prod(case["lead"])
    for row in rows:  # rewritten unless the integer rank exceeds the width or too few rows pay
        ranks = be.config.ranks(row["n"])
        if ranks is None:
            expected = "skipped: too narrow for the rank"
        elif sum(ranks) < row["n"] and sum(ranks) * (rows_n + row["n"]) >= rows_n * row["n"]:
            expected = "skipped: too few rows to gain"
        else:
            expected = "rewritten"
        assert row["status"] == expected, row
    for g in be.store.groups.values():
        assert g.basis.shape == (g.n, g.r1 + g.r2) and torch.isfinite(g.basis).all()
