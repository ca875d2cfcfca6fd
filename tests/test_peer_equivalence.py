"""Same maps as the libraries users already trust: pytorch-grad-cam, captum and torchcam.

The peers are in the ``dev`` extra; the tests skip only where a peer is not installed.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import cam_monitor as cm


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max scaling as the peers do before display (their epsilon included)."""
    maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return maps / (maps.amax(dim=(-2, -1), keepdim=True) + 1e-7)


def pgc_display(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """pytorch-grad-cam's display map: scaled per layer, resized, and scaled again after the
    layers are aggregated (the second pass matters when raw maps are far below its 1e-7 epsilon)."""
    up = F.interpolate(minmax(maps)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return minmax(up)


class Scaled(nn.Module):
    """Multiplies the logits so that gradients dwarf pytorch-grad-cam's Grad-CAM++ epsilon (1e-6).

    Grad-CAM++'s closed form is not invariant to the score's scale, so both sides see the same
    scaled model; with random weights and raw logits the peer's epsilon dominates the denominator.
    """

    def __init__(self, net: nn.Module, factor: float) -> None:
        super().__init__()
        self.net, self.factor = net, factor

    def forward(self, x):
        return self.net(x) * self.factor


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 64, 64, generator=g), torch.tensor([1, 2, 3, 4])


@pytest.mark.parametrize("method, peer_name", [
    ("gradcam", "GradCAM"), ("gradcam++", "GradCAMPlusPlus"), ("xgradcam", "XGradCAM"),
    ("hirescam", "HiResCAM"), ("layercam", "LayerCAM"),
])
def test_same_maps_as_pytorch_grad_cam(resnet, batch, method: str, peer_name: str) -> None:
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = Scaled(resnet, 1e3) if method == "gradcam++" else resnet
    x, t = batch
    peer = getattr(pgc, peer_name)(model=model, target_layers=[resnet.layer4])
    theirs = torch.from_numpy(peer(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t]))
    ours = cm.compute_cams(model, x, resnet.layer4, targets=t, method=method)
    ours_display = F.interpolate(minmax(ours)[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(ours_display, theirs, atol=1e-4, rtol=0)


def test_same_raw_maps_as_captum_layer_gradcam(resnet, batch) -> None:
    captum_attr = pytest.importorskip("captum.attr")
    x, t = batch
    theirs = captum_attr.LayerGradCam(resnet, resnet.layer4).attribute(x, target=t, relu_attributions=True)[:, 0]
    ours = cm.compute_cams(resnet, x, "layer4", targets=t)
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method, peer_name", [("gradcam", "GradCAM"), ("xgradcam", "XGradCAM"), ("layercam", "LayerCAM")])
def test_same_normalised_maps_as_torchcam(resnet, batch, method: str, peer_name: str) -> None:
    """torchcam's Grad-CAM++ is left out: it sums g^3 * A per pixel instead of eq. 19's (sum A) g^3."""
    methods = pytest.importorskip("torchcam.methods")
    x, t = batch
    model = resnet
    with getattr(methods, peer_name)(model, target_layer=resnet.layer4, input_shape=(3, 64, 64)) as extractor:
        with torch.enable_grad():
            scores = model(x)
        theirs = extractor(class_idx=t.tolist(), scores=scores)[0]
    ours = cm.compute_cams(model, x, resnet.layer4, targets=t, method=method)
    torch.testing.assert_close(minmax(ours), theirs.detach(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("arch, layer", [("mobilenet_v3_small", "features"), ("densenet121", "features.denseblock4")])
def test_xgradcam_on_signed_activations_matches_pytorch_grad_cam(arch: str, layer: str) -> None:
    """Hardswish (MobileNetV3) and pre-norm (DenseNet) outputs can be negative: channel sums near 0."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1, 2])
    module = dict(model.named_modules())[layer]
    with pgc.XGradCAM(model=model, target_layers=[module]) as peer:
        theirs = torch.from_numpy(peer(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t]))
    ours = cm.compute_cams(model, x, layer, targets=t, method="xgradcam")
    torch.testing.assert_close(pgc_display(ours, x.shape[-2:]), theirs, atol=1e-4, rtol=0)
