"""rewrite_sites on small captured graphs, run eagerly (no AOTAutograd, no Inductor): the graph
invariants after every pass, exact forward values, the factored weight gradient, and the tags."""
import pytest
import torch

from invariants import capture, run_checked
from prac_fx import PracConfig
from prac_fx.passes import kinds
from prac_fx.passes.ops import compress, compressed_linear
from toys import MLP, Attention, Conv1DLike


def _run(gm, *args):
    # As AOTAutograd runs a Dynamo graph: node by node (its printed code names the Function's
    # ``apply`` by a module path that does not resolve).
    return torch.fx.Interpreter(gm).run(*args)


def _stats(state):
    """The statistics input: a leaf whose gradient receives [||A1||^2, ||A2||^2, q] per site."""
    return torch.zeros(sum(len(g.sites) for g in state.groups), 3, requires_grad=True)


def _rewritten(model, x, **config):
    (gm, args), = capture(model, x)
    reference = gm(*args)
    state = run_checked(gm, PracConfig(**config))
    return gm, args, state, reference


@pytest.mark.parametrize("make", [MLP, Attention, Conv1DLike])
def test_forward_exact_and_invariants_hold(make):
    torch.manual_seed(0)
    gm, args, state, reference = _rewritten(make(), torch.randn(2, 8, 32), rank=4)
    assert state.groups and all(s.status != kinds.CANDIDATE for s in state.sites)
    bases = [torch.linalg.qr(torch.randn(g.spec.shape))[0] for g in state.groups]
    out = _run(gm, *args, *bases, _stats(state))
    torch.testing.assert_close(out, reference)


def test_tags_name_every_inserted_node():
    torch.manual_seed(0)
    gm, _, state, _ = _rewritten(Attention(), torch.randn(2, 8, 32), rank=4)
    tags = {n.name: n.meta[kinds.TAG] for n in gm.graph.nodes if kinds.TAG in n.meta}
    by_role = {}
    for name, tag in tags.items():
        by_role.setdefault(tag["role"], []).append((tag["group"], name))
    # no following, no loss, nothing quantized
    not_here = {kinds.ROLE_OMEGA, kinds.ROLE_FOLLOW, kinds.ROLE_HEAD_LOSS, kinds.ROLE_SEEDS,
                kinds.ROLE_SEED_ROW, kinds.ROLE_PART}
    assert sorted(by_role) == sorted(set(kinds.ROLES) - not_here)
    assert [name for _, name in by_role[kinds.ROLE_BASIS]] == [g.basis_placeholder for g in state.groups]
    assert [name for _, name in by_role[kinds.ROLE_COMPRESS]] == [g.compressed_node for g in state.groups]
    assert [g for g, _ in by_role[kinds.ROLE_SITE]] == [0, 0, 0, 1, 2, 3]  # q, k, v, out, up, down
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, tag in tags.items():
        if tag["role"] == kinds.ROLE_SITE:
            assert nodes[name].target is compressed_linear and tag["kind"] == kinds.LINEAR
        elif tag["role"] == kinds.ROLE_COMPRESS:
            assert nodes[name].target is compress


def test_weight_gradient_is_factored_through_the_basis():
    """grad_weight = grad_out^T @ x  ~=  (grad_out^T @ (x @ P)) @ P^T, and exact for P = I."""
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(2, 8, 32)
    gm, args, state, _ = _rewritten(model, x, rank=1.0, site_filter=lambda p: p == "up")
    (group,) = state.groups
    assert group.spec.shape == (32, 32)
    weight = next(a for a in args if a is model.up.weight)
    # grad_out of ``up``, from the exact model
    h = model.up(x)
    h.retain_grad()
    out = model.down(torch.relu(model.mid(torch.nn.functional.gelu(h))))
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    g2d, x2d = h.grad.reshape(-1, 64), x.reshape(-1, 32)
    projection = torch.zeros(group.spec.shape)
    projection[:, :8] = torch.linalg.qr(torch.randn(32, 8))[0]  # 8 orthonormal columns
    for basis in (projection, torch.eye(32)):
        (result,) = _run(gm, *args, basis, _stats(state))
        torch.testing.assert_close(result, out.detach())  # the forward stays exact
        (grad,) = torch.autograd.grad(result, [weight], grad_out)
        expected = (g2d.t() @ (x2d @ basis)) @ basis.t()
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, g2d.t() @ x2d, rtol=1e-4, atol=1e-5)  # P = I: exact


def test_following_group_builds_its_basis_in_the_graph():
    """With subspace_iters the graph takes a draw per group, builds P from it and the input,
    compresses with that P and returns it after its own outputs; forward values stay exact."""
    torch.manual_seed(0)
    gm, args, state, reference = _rewritten(MLP(), torch.randn(2, 8, 32), rank=8, subspace_iters=1)
    assert state.followed == len(state.groups) and all(g.omega_placeholder for g in state.groups)
    bases = [torch.linalg.qr(torch.randn(g.spec.shape))[0] for g in state.groups]
    omegas = [torch.randn(g.n, g.r2) for g in state.groups]
    out = _run(gm, *args, *bases, *omegas, _stats(state))
    (own,), built = out[:1], out[1:]
    torch.testing.assert_close(own, reference[0])
    for group, basis in zip(state.groups, built):
        assert basis.shape == group.spec.shape
        p = basis.double()
        gram = p.t() @ p
        k = (group.n - group.r1) / group.r2
        expected = torch.diag(torch.tensor([1.0] * group.r1 + [k] * group.r2, dtype=torch.float64))
        torch.testing.assert_close(gram, expected, rtol=1e-4, atol=1e-4)  # [Q1, sqrt(k) Q2]
