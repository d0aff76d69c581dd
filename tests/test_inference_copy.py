"""kdfast.layers.inference_copy and its OnePixelConv2d: a one-pixel convolution computed as
one matrix product gives nn.Conv2d's numbers (float64 reference, the tolerance table), every
other convolution is nn.Conv2d's own, and the copied model is left as found."""
import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE, assert_close
from torch import nn

from kdfast.layers import OnePixelConv2d, get_model_layers, inference_copy

# (input H, W), kernel, stride, padding -> the one output pixel's visible window (h, w)
ONE_PIXEL = [
    ((1, 1), 3, 1, 1, (1, 1)),            # ResNet's last stage on 32x32 images: the centre tap
    ((2, 2), 3, 2, 1, (2, 2)),            # its first block: stride 2 from 2x2
    ((2, 2), 1, 2, 0, (1, 1)),            # its downsample: a 1x1 kernel, stride 2
    ((3, 3), 3, 1, 0, (3, 3)),            # a valid convolution as large as its input
    ((1, 2), (3, 2), 1, (1, 0), (1, 2)),  # rectangular kernel and padding
    ((1, 1), 1, 3, 1, (0, 0)),            # the window sees padding only: the output is the bias
    ((5, 4), (7, 6), 4, 1, (5, 4)),       # a window larger than the input, stride larger than one step
]
# convolutions with more than one output pixel, or not plain: nn.Conv2d's own forward
OTHER = [
    dict(size=(4, 4), kernel_size=3, padding=1),
    dict(size=(3, 3), kernel_size=3, stride=1, padding=1),
    dict(size=(1, 1), kernel_size=3, padding=1, groups=2),
    dict(size=(3, 3), kernel_size=2, dilation=2),
    dict(size=(1, 1), kernel_size=3, padding=1, padding_mode="circular"),
    dict(size=(2, 2), kernel_size=3, padding="same"),
]


@torch.no_grad()
def reference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                    conv.stride, conv.padding, conv.dilation, conv.groups)


def one_pixel_conv(kernel, stride, padding, bias=True, dtype=torch.float32, c_in=6, c_out=5, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias).to(dtype)
    conv.__class__ = OnePixelConv2d
    return conv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("case", ONE_PIXEL, ids=lambda c: repr(c[:4]) if isinstance(c, tuple) else None)
def test_one_pixel_output_is_one_product(case, layout, bias, dtype):
    (H, W), kernel, stride, padding, window = case
    conv = one_pixel_conv(kernel, stride, padding, bias, dtype)
    x = torch.randn(7, 6, H, W + (3 if layout == "strided" else 0)).to(dtype)
    if layout == "strided":
        x = x[..., 3:]  # a view with a row stride larger than its width
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert conv._visible_window(x) == window  # the product path runs
    with torch.no_grad():
        y = conv(x)
    assert y.shape == (7, 5, 1, 1) and y.dtype == dtype
    expected = reference(conv, x)
    assert_close(y, expected, TOLERANCE[dtype], f"{case}", floor=float(expected.abs().max()) + 1e-30)


@pytest.mark.parametrize("options", OTHER, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items() if k != "size"))
def test_other_convolutions_are_nn_conv2d(options):
    options = dict(options)
    size = options.pop("size")
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 6, **options)
    conv = nn.Conv2d(4, 6, **options)
    conv.load_state_dict(plain.state_dict())
    conv.__class__ = OnePixelConv2d
    x = torch.randn(3, 4, *size)
    assert conv._visible_window(x) is None
    assert torch.equal(conv(x), plain(x))


def test_batches_of_one_and_none():
    conv = one_pixel_conv(3, 1, 1)
    for n in (1, 0):
        x = torch.randn(n, 6, 1, 1)
        assert_close(conv(x).detach(), reference(conv, x), TOLERANCE[torch.float32], f"batch {n}")


def test_gradients_through_the_product():
    """A layer that trains (weight requiring grad) differentiates through the product, and
    keeps no gathered weight: each call reads the current one."""
    conv = one_pixel_conv(3, 2, 1, dtype=torch.float64)
    x = torch.randn(4, 6, 2, 2, dtype=torch.float64, requires_grad=True)
    assert conv._visible_window(x) == (2, 2)
    torch.autograd.gradcheck(conv, (x,))
    g = torch.randn(4, 5, 1, 1, dtype=torch.float64)
    grads = torch.autograd.grad(conv(x), (x, conv.weight, conv.bias), g)
    ref = nn.Conv2d(6, 5, 3, stride=2, padding=1).double()
    ref.load_state_dict(conv.state_dict())
    ref_grads = torch.autograd.grad(ref(x), (x, ref.weight, ref.bias), g)
    for a, e, name in zip(grads, ref_grads, ("input", "weight", "bias")):
        assert_close(a, e, TOLERANCE[torch.float64], name)
    assert "_taps" not in conv.__dict__


def test_the_gathered_taps_follow_the_weight():
    """Frozen weights' visible taps are gathered once, again after an in-place change or a
    new weight tensor (a cast, a device move)."""
    conv = one_pixel_conv(3, 1, 1).requires_grad_(False)
    x = torch.randn(4, 6, 1, 1)
    conv(x)
    taps = conv.__dict__["_taps"][1]
    conv(x)
    assert conv.__dict__["_taps"][1] is taps
    conv.weight.mul_(2)
    assert_close(conv(x), reference(conv, x), TOLERANCE[torch.float32], "after an in-place change")
    conv.double()
    y = conv(x.double())
    assert y.dtype == torch.float64
    assert_close(y, reference(conv, x), TOLERANCE[torch.float64], "after a cast")


def test_compiles_without_a_graph_break():
    conv = one_pixel_conv(3, 2, 1).requires_grad_(False)
    x = torch.randn(4, 6, 2, 2)
    compiled = torch.compile(conv, backend="eager", fullgraph=True)
    assert_close(compiled(x), reference(conv, x), TOLERANCE[torch.float32], "compiled")


class WeightStandardised(nn.Conv2d):
    """A user's convolution with its own forward: inference_copy keeps it."""

    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


def resnet_like():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        WeightStandardised(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),   # 2x2 -> 1x1
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),             # 1x1 -> 1x1
        nn.Flatten(), nn.Linear(32, 10)).train()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_inference_copy(dtype):
    model = resnet_like()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = inference_copy(model, dtype)
    # the model as found
    assert model.training and all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert [type(m) for m in model] == [type(m) for m in resnet_like()]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # the copy: frozen, same layer names, plain convolutions replaced, the user's own kept
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert get_model_layers(frozen) == get_model_layers(model)
    assert [type(m).__name__ for m in frozen if isinstance(m, nn.Conv2d)] == \
        ["OnePixelConv2d", "WeightStandardised", "OnePixelConv2d", "OnePixelConv2d"]
    assert all(p.dtype == (dtype or torch.float32) for p in frozen.parameters())
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
        y = frozen(x.to(dtype or torch.float32))
    assert_close(y.float(), expected, TOLERANCE[dtype or torch.float32], "logits",
                 floor=float(expected.abs().max()))


def test_resnet18_on_32x32_images():
    """torchvision's ResNet-18: its last stage runs as products on 32x32 images; logits as
    the model's within float32 rounding."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    frozen = inference_copy(model)
    x = torch.randn(4, 3, 32, 32)
    stage4 = [m for m in frozen.layer4.modules() if isinstance(m, OnePixelConv2d)]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(m._visible_window(args[0]))) for m in stage4]
    with torch.no_grad():
        y, expected = frozen(x), model(x)
    for h in hooks:
        h.remove()
    assert len(stage4) == 5 and all(w is not None for w in seen)
    assert_close(y, expected, TOLERANCE[torch.float32], "logits", floor=float(expected.abs().max()))


def test_bad_arguments():
    with pytest.raises(TypeError, match="inference_copy: model must be a torch.nn.Module, got function"):
        inference_copy(lambda x: x)
    for dtype in (torch.int8, "bfloat16"):
        with pytest.raises(TypeError, match="inference_copy: dtype must be a floating torch.dtype"):
            inference_copy(resnet_like(), dtype)
