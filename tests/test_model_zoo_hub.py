"""The models users train come from timm and Hugging Face transformers (random weights, nothing
downloaded): for each, target_layer=None picks a layer whose maps explain the class, the maps equal
pytorch-grad-cam's at that layer, and a two-epoch CAMMonitor fit on tiny random data works with
default arguments."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cam_monitor as cm
from cam_monitor.engine import default_output_transform
from lightning_helpers import fit_classifier

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

NUM_CLASSES = 4


def hf(config_name: str, model_name: str, **config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return getattr(transformers, model_name)(getattr(transformers, config_name)(num_labels=NUM_CLASSES, **config))
    return build


def timm_model(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)


# name: (builder, image size, the pick's grid, how the peer reads the picked layer)
ZOO = {
    "timm_resnet50": (timm_model("resnet50"), 96, (3, 3), None),
    "timm_convnext_tiny": (timm_model("convnext_tiny"), 96, (3, 3), None),
    "timm_efficientnet_b0": (timm_model("efficientnet_b0"), 96, (3, 3), None),
    "timm_regnety_002": (timm_model("regnety_002"), 96, (3, 3), None),
    "timm_vit_small": (timm_model("vit_small_patch16_224", img_size=64), 64, (4, 4), "tokens"),
    "timm_deit_small": (timm_model("deit_small_patch16_224", img_size=64), 64, (4, 4), "tokens"),
    "timm_swin_tiny": (timm_model("swin_tiny_patch4_window7_224", img_size=128, window_size=4), 128, (4, 4), "nhwc"),
    "hf_vit": (hf("ViTConfig", "ViTForImageClassification", image_size=64, patch_size=8, hidden_size=64,
                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=128), 64, (8, 8), "tokens"),
    "hf_convnext": (hf("ConvNextConfig", "ConvNextForImageClassification", hidden_sizes=[16, 32, 64, 128],
                       depths=[1, 1, 1, 1]), 128, (4, 4), None),
    "hf_swin": (hf("SwinConfig", "SwinForImageClassification", image_size=64, patch_size=4, embed_dim=16,
                   depths=[1, 1, 1], num_heads=[2, 2, 2], window_size=4), 64, (4, 4), "tokens"),
}
SLOW = {"timm_resnet50", "timm_convnext_tiny", "timm_swin_tiny", "timm_vit_small", "timm_deit_small"}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ZOO[name][0]().eval()


class Logits(nn.Module):
    """The model with its output reduced to the logits (pytorch-grad-cam needs a tensor)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return default_output_transform(self.model(x))


def peer_reshape(kind: str | None, grid: tuple[int, int]):
    if kind == "nhwc":
        return lambda t: t.permute(0, 3, 1, 2)
    if kind == "tokens":
        h, w = grid
        return lambda t: t[:, t.shape[1] - h * w:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
    return None


def display(maps: torch.Tensor, size: int) -> torch.Tensor:
    """pytorch-grad-cam's display scaling (per layer, resize, and again after aggregation)."""
    def mm(m):
        m = m - m.amin(dim=(-2, -1), keepdim=True)
        return m / (m.amax(dim=(-2, -1), keepdim=True) + 1e-7)
    return mm(F.interpolate(mm(maps)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0])


def params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


@pytest.mark.parametrize("name", params(ZOO))
def test_the_automatic_pick_explains_the_class_and_equals_pytorch_grad_cam(name: str) -> None:
    _, size, grid, kind = ZOO[name]
    model = build(name)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    result = cm.cam_pass(model, x, None)
    maps = result.maps["gradcam"][:, 0]
    assert result.grid_size == grid and torch.isfinite(maps).all()
    assert int((maps.flatten(1).amax(1) > 0).sum()) >= 2 and not bool(result.zero_gradient)
    assert result.layout == ("nhwc" if kind == "nhwc" else "nchw")

    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = model.get_submodule(result.layer_name)
    targets = result.targets[:, 0]
    with pgc.GradCAM(model=Logits(model), target_layers=[module], reshape_transform=peer_reshape(kind, grid)) as peer:
        theirs = torch.from_numpy(peer(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in targets]))
    alive = maps.flatten(1).amax(1) > 0
    torch.testing.assert_close(display(maps, size)[alive], theirs[alive], atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_a_default_monitor_fits_two_epochs(name: str, tmp_path) -> None:
    _, size, grid, _ = ZOO[name]
    monitor = cm.CAMMonitor()
    fit_classifier(tmp_path, build(name), monitor, size, NUM_CLASSES)
    assert [h["epoch"] for h in monitor.history] == [0, 1] and monitor.faults == {}
    assert monitor.layer_name is not None and monitor.last_evaluation.maps.shape[-2:] == grid


class SquareCNN(nn.Module):
    """``net.2`` outputs (B, 32, 32, 32) for 32 px images: channels = height = width."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.head = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.net(x).mean((2, 3)))


@pytest.mark.parametrize("target_layer", ["model.net.2", None])
def test_a_cnn_whose_channels_equal_its_grid_fits_with_the_default_layout(target_layer, tmp_path) -> None:
    torch.manual_seed(0)
    monitor = cm.CAMMonitor(target_layer=target_layer, discovery=False, probe_settings=cm.ProbeSettings(num_probes=8),
                            cams=cm.CAMSettings(faithfulness=False))
    fit_classifier(tmp_path, SquareCNN(), monitor, 32, NUM_CLASSES)
    assert len(monitor.history) == 2 and monitor.faults == {} and monitor.layer_name in ("model.net.2", "model.net")
    assert monitor.last_evaluation.maps.shape[-2:] == (32, 32)
