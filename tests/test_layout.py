"""Layout of 4-D layer outputs: channels-first by PyTorch's convention, channels-last only on
evidence (a shape only that reading fits, or what produced the output), refused only when nothing
settles it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cam_monitor as cm
from cam_monitor.layout import LayoutEvidence, module_layout, resolve_layout


def square_cnn(width: int) -> nn.Module:
    """Conv-BN-ReLU features whose output is (B, width, 16, 16) for 16 px images: C = h = w when width = 16."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                               nn.Conv2d(8, width, 3, padding=1), nn.BatchNorm2d(width),
                                               nn.ReLU(inplace=True)))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(width, 5))
    return model.eval()


class Residual(nn.Module):
    """A basic block ending in a functional residual sum and an activation module."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) + x)


class FunctionalConv(nn.Module):
    """Weights as parameters, the convolution in functional code: no submodule says anything."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, 3, 3) * 0.2)

    def forward(self, x):
        return F.gelu(F.conv2d(x, self.weight, padding=1))


class ChannelsLastBlock(nn.Module):
    """A Swin-like block on (B, h, w, C): LayerNorm and an MLP over the last axis, plus a residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(c), nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Net(nn.Module):
    """stem -> body (the layer under test) -> pooled head; ``last`` says whether body is channels-last."""

    def __init__(self, body: nn.Module, c: int, channels_last: bool = False) -> None:
        super().__init__()
        self.stem, self.body, self.head, self.channels_last = nn.Conv2d(3, c, 3, padding=1), body, nn.Linear(c, 4), channels_last

    def forward(self, x):
        h = self.stem(x)
        if self.channels_last:
            h = h.permute(0, 2, 3, 1)
        out = self.body(h)
        return self.head(out.mean((1, 2)) if self.channels_last else out.mean((2, 3)))


def images(size: int = 16, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("width", [16, 8])
def test_a_small_cnn_whose_channels_equal_its_grid_is_read_channels_first(width: int) -> None:
    model, x = square_cnn(width), images()
    result = cm.cam_pass(model, x, "features")
    assert result.layout == "nchw" and result.grid_size == (16, 16)
    torch.testing.assert_close(result.maps["gradcam"][:, 0], cm.compute_cams(model, x, "features", layout="nchw"))
    assert cm.compute_cams(model, x, "features.3").shape == (3, 16, 16)  # the conv itself, before BN


@pytest.mark.parametrize("body, channels_last", [
    (Residual(16), False),
    (FunctionalConv(16, 16), False),
    (ChannelsLastBlock(16), True),
], ids=["residual", "functional-conv", "channels-last-block"])
def test_what_produced_an_output_settles_its_layout_when_the_shape_cannot(body, channels_last) -> None:
    torch.manual_seed(0)
    model, x = Net(body, 16, channels_last).eval(), images()
    result = cm.cam_pass(model, x, "body")
    assert result.layout == ("nhwc" if channels_last else "nchw")
    explicit = cm.compute_cams(model, x, "body", layout=result.layout)
    torch.testing.assert_close(result.maps["gradcam"][:, 0], explicit)
    assert float(explicit.amax()) > 0


def test_an_output_nothing_settles_is_refused_with_the_fix() -> None:
    class Transposed(nn.Module):  # (B, 16, 16, 16) from a transpose: no module or operation says which axis is C
        def forward(self, x):
            return x.transpose(1, 3)

    torch.manual_seed(0)
    model, x = Net(Transposed(), 16).eval(), images()
    with pytest.raises(cm.LayoutError, match="pass layout='nchw' or layout='nhwc'"):
        cm.compute_cams(model, x, "body")
    assert cm.compute_cams(model, x, "body", layout="nchw").shape == (3, 16, 16)
    with pytest.raises(ValueError, match="layout must be one of"):
        cm.compute_cams(model, x, "body", layout="hwc")


def test_a_shape_only_one_reading_fits_decides_without_a_forward() -> None:
    asked = []
    assert resolve_layout((2, 512, 7, 7), (224, 224), "auto", "layer4", lambda: asked.append(1)) == "nchw"
    assert resolve_layout((2, 7, 7, 768), (224, 224), "auto", "norm", lambda: asked.append(1)) == "nhwc"
    assert not asked
    assert resolve_layout((2, 16, 16, 16), (16, 16), "auto", "x", lambda: "nhwc") == "nhwc"


@pytest.mark.parametrize("module, layout", [
    (nn.Conv2d(16, 16, 1), "nchw"), (nn.BatchNorm2d(16), "nchw"), (nn.MaxPool2d(1), "nchw"), (nn.GroupNorm(4, 16), "nchw"),
    (nn.Linear(16, 16), "nhwc"), (nn.LayerNorm(16), "nhwc"), (nn.ReLU(), None), (nn.Identity(), None),
])
def test_module_types_say_what_they_produce(module: nn.Module, layout: str | None) -> None:
    assert module_layout(module, torch.zeros(1, 16, 16, 16)) == layout


def test_a_layer_norm_named_2d_is_channels_first_and_a_permute_says_its_dims() -> None:
    from torchvision.models.convnext import LayerNorm2d
    from torchvision.ops.misc import Permute

    assert module_layout(LayerNorm2d(16), torch.zeros(1, 16, 16, 16)) == "nchw"
    assert module_layout(Permute([0, 2, 3, 1]), torch.zeros(1, 16, 16, 16)) == "nhwc"
    assert module_layout(Permute([0, 3, 1, 2]), torch.zeros(1, 16, 16, 16)) == "nchw"


def test_evidence_from_conflicting_branches_says_nothing() -> None:
    conv, lin = nn.Conv2d(8, 8, 1), nn.Linear(8, 8)
    evidence = LayoutEvidence()
    x = torch.randn(1, 8, 8, 8, requires_grad=True)
    with torch.enable_grad(), evidence.recording(conv), evidence.recording(lin):
        a, b = conv(x), lin(x)
    assert evidence.layout_of(a) == "nchw" and evidence.layout_of(b) == "nhwc"
    assert evidence.layout_of(F.relu(a + b)) is None


def test_the_automatic_pick_skips_attention_internals_of_timm_style_vits() -> None:
    class Attention(nn.Module):  # timm's layout: (B, heads, N, d) between qkv and the projection
        def __init__(self, dim: int, heads: int) -> None:
            super().__init__()
            self.heads, self.qkv, self.k_norm, self.proj = heads, nn.Linear(dim, 3 * dim), nn.LayerNorm(dim // heads), nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            k = self.k_norm(k)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))

    class TinyViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 16, 4, stride=4)
            self.cls = nn.Parameter(torch.randn(1, 1, 16) * 0.1)
            self.norm1, self.attn, self.head = nn.LayerNorm(16), Attention(16, 2), nn.Linear(16, 3)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
            t = t + self.attn(self.norm1(t))
            return self.head(t[:, 0])

    torch.manual_seed(0)
    result = cm.cam_pass(TinyViT().eval(), images(16), None)
    assert not result.layer_name.startswith("attn.k_norm") and result.grid_size == (4, 4)
    assert float(result.maps["gradcam"].amax()) > 0
