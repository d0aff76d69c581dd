"""The shape every kdfast op shares (kdfast/ops/_op.py), on a small op of its own: gradients
only for the inputs named in grads (None, or lists of None, for the others, derived from
the schema), no backward when no gradient reaches the loss, compute_grad honoured, eager
calls off the custom op's wrapper, traced calls through it."""
import pytest
import torch

from kdfast.ops._op import fused_op, traced


@fused_op("kdfast_test::weighted_sum", grads=("x", "ys"))
def weighted_sum(x: torch.Tensor, ys: list[torch.Tensor], zs: list[torch.Tensor], w: float, compute_grad: bool,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w · (sum x + sum ys + sum zs), and its gradient w.r.t. x (a by-product)."""
    loss = w * (x.sum() + sum(y.sum() for y in ys) + sum(z.sum() for z in zs))
    return loss, torch.full_like(x, w) if compute_grad else x.new_empty(0)


@weighted_sum.register_fake
def _(x, ys, zs, w, compute_grad, backend):
    return x.new_empty(()), torch.empty_like(x) if compute_grad else x.new_empty(0)


def _setup_context(ctx, inputs, output):
    ctx.w, ctx.y_shapes = inputs.w, [y.shape for y in inputs.ys]
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss):
    (grad_x,) = ctx.saved_tensors
    return grad_x * grad_loss, [torch.full(shape, ctx.w) * grad_loss for shape in ctx.y_shapes]


weighted_sum.register_autograd(_backward, setup_context=_setup_context)


@fused_op("kdfast_test::plain")
def plain(x: torch.Tensor, ys: list[torch.Tensor]) -> torch.Tensor:
    return x + sum(ys)


@plain.register_fake
def _(x, ys):
    return torch.empty_like(x)


def inputs():
    x = torch.randn(3, requires_grad=True)
    ys = [torch.randn(2, requires_grad=True), torch.randn(4, requires_grad=True)]
    zs = [torch.randn(5, requires_grad=True)]
    return x, ys, zs


@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_gradients_follow_grads_and_the_schema(path):
    x, ys, zs = inputs()
    op = weighted_sum if path == "eager" else weighted_sum.custom_op
    loss, _ = op(x, ys, zs, 2.0, True, "cpu")
    (3 * loss).backward()
    assert torch.equal(x.grad, torch.full((3,), 6.0))
    assert [y.grad.tolist() for y in ys] == [[6.0] * 2, [6.0] * 4]
    assert zs[0].grad is None  # not in grads: None, whatever requires_grad says


def test_no_backward_when_no_gradient_reaches_the_loss(monkeypatch):
    x, ys, zs = inputs()
    loss, by_product = weighted_sum(x, ys, zs, 2.0, True, "cpu")
    by_product.sum().backward()  # only a by-product is used: backward is not called
    assert x.grad is None and ys[0].grad is None


def test_a_call_without_compute_grad_refuses_to_backpropagate():
    x, ys, zs = inputs()
    loss, _ = weighted_sum(x, ys, zs, 2.0, False, "cpu")
    with pytest.raises(RuntimeError, match=r"kdfast_test::weighted_sum was called with compute_grad=False"):
        loss.backward()


def test_eager_calls_skip_the_custom_op_and_traced_calls_take_it(monkeypatch):
    x, ys, zs = inputs()
    reference = weighted_sum.custom_op(x, ys, zs, 2.0, True, "cpu")[0]
    calls = []
    custom_op = weighted_sum.custom_op
    monkeypatch.setattr(weighted_sum, "custom_op", lambda *a: calls.append(1) or custom_op(*a))
    assert not traced([x, ys, zs])
    assert torch.equal(weighted_sum(x, ys, zs, 2.0, True, "cpu")[0], reference) and not calls
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: weighted_sum(a, ys, zs, 2.0, True, "cpu")[0], fullgraph=True)
    assert torch.allclose(compiled(x), reference)
    (grad,) = torch.autograd.grad(compiled(x), x)
    assert torch.equal(grad, torch.full((3,), 2.0))


def test_an_op_without_autograd_runs_its_function_directly():
    x = torch.randn(3)
    ys = [torch.randn(3), torch.randn(3)]
    assert torch.equal(plain(x, ys), x + (ys[0] + ys[1]))
    torch.library.opcheck(plain.custom_op, (x, ys))


def test_opcheck():
    x, ys, zs = inputs()
    torch.library.opcheck(weighted_sum.custom_op, (x, ys, zs, 2.0, True, "cpu"))


def test_grads_must_name_arguments():
    def double(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    with pytest.raises(TypeError, match=r"kdfast_test::double: grads names \['y'\], not arguments of the op \(x\)"):
        fused_op("kdfast_test::double", grads=("y",))(double)
