"""torchvision's model zoo (random weights): for the automatic pick and for the layer docs/reference.md
recommends, the grid has the expected shape, the maps are finite and not all zero, they equal
pytorch-grad-cam's, and the monitor's metrics differ across probes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

import cam_monitor as cm
from cam_monitor.evaluation import EvalSettings, evaluate

# Inputs give grids of at least 3x3: on a 2x2 grid the border-band energy is the same for every map.
# arch: (input size, recommended layer, its grid, the automatic pick, peer reshape for the layer)
ZOO = {
    "resnet18": (96, "layer4", (3, 3), "layer4", None),
    "efficientnet_b0": (96, "features", (3, 3), "features", None),
    "convnext_tiny": (96, "features", (3, 3), "features", None),
    "densenet121": (96, "features", (3, 3), "features", None),
    "mobilenet_v3_small": (96, "features", (3, 3), "features", None),
    "regnet_y_400mf": (96, "trunk_output", (3, 3), "trunk_output", None),
    "swin_t": (96, "norm", (3, 3), "permute", "nhwc"),
    "vit_b_16": (224, "encoder.layers.encoder_layer_11.ln_1", (14, 14), "encoder.layers.encoder_layer_11.ln_1", "tokens"),
}
SLOW = {"vit_b_16", "densenet121", "swin_t", "convnext_tiny"}
#: DenseNet's forward ReLUs ``features``' output in place; pytorch-grad-cam keeps a reference to that
#: tensor, so its "features" map is of the ReLU'd output. We clone, so the peer is compared where
#: nothing in place follows.
PEER_LAYER = {"densenet121": "features.denseblock4"}


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
    if arch == "vit_b_16":  # torchvision zero-initialises the ViT head: every gradient would be 0
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def peer_reshape(kind: str | None):
    if kind == "nhwc":
        return lambda t: t.permute(0, 3, 1, 2)
    if kind == "tokens":
        return lambda t: t[:, 1:].reshape(t.shape[0], 14, 14, t.shape[2]).permute(0, 3, 1, 2)
    return None


def display(maps: torch.Tensor, size: int) -> torch.Tensor:
    """pytorch-grad-cam's display scaling (per layer, resize, and again after aggregation)."""
    def mm(m):
        m = m - m.amin(dim=(-2, -1), keepdim=True)
        return m / (m.amax(dim=(-2, -1), keepdim=True) + 1e-7)
    return mm(F.interpolate(mm(maps)[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0])


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a for a in ZOO])
def test_zoo_model_gives_right_maps_and_varying_metrics(arch: str) -> None:
    size, layer, grid, auto, reshape = ZOO[arch]
    model = build(arch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, size, size, generator=g)
    with torch.no_grad():
        t = model(x).argmax(1)  # the predicted classes: random weights give them positive evidence somewhere

    picked = cm.cam_pass(model, x, None, t)
    assert picked.layer_name == auto and picked.grid_size == grid

    result = cm.cam_pass(model, x, layer, t)
    maps = result.maps["gradcam"][:, 0]
    alive = maps.flatten(1).amax(1) > 0
    assert result.grid_size == grid and torch.isfinite(maps).all() and int(alive.sum()) >= 3

    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    peer_layer = PEER_LAYER.get(arch, layer)
    ours = maps if peer_layer == layer else cm.compute_cams(model, x, peer_layer, t)
    module = dict(model.named_modules())[peer_layer]
    with pgc.GradCAM(model=model, target_layers=[module], reshape_transform=peer_reshape(reshape)) as peer:
        theirs = torch.from_numpy(peer(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t]))
    torch.testing.assert_close(display(ours, size), theirs, atol=1e-4, rtol=0)

    probes = cm.ProbeSet(x, t)
    ev = evaluate(model, probes, EvalSettings(layer, faithfulness=False))
    assert ev.aggregates["degenerate"] == float((~alive).sum())
    energy = ev.per_probe["spurious_energy"][alive]
    assert energy.std() > 0  # the metrics tell the probes apart


@pytest.mark.slow
@pytest.mark.parametrize("arch", torchvision.models.list_models(module=torchvision.models))
def test_every_torchvision_classifier_works_with_the_default_layer_and_layout(arch: str) -> None:
    """No architecture is refused by layout="auto" and target_layer=None; the pick is a grid of the
    image. ViTs (zero-initialised heads: no class gradient yet) get their layer by structure."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    result = cm.cam_pass(model, x, None)
    h, w = result.grid_size
    maps = result.maps["gradcam"]
    assert 1 < h * w and h <= 32 and w <= 32 and torch.isfinite(maps).all()
    if arch.startswith("vit_"):
        assert result.layer_name.endswith(".ln_1") and bool(result.zero_gradient)
    else:
        assert float(maps.amax()) > 0
