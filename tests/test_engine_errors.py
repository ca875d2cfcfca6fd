"""Bad input to the engine raises an error whose type and message name the problem and the fix."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cam_monitor as cm
from conftest import SmallCNN


class WithUnused(SmallCNN):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Conv2d(3, 3, 1)


class TupleLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(3, 1, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        out, _ = self.attn(t, t, t)
        return self.head(out.mean(1))


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(layer="features.77"), cm.LayerNotFoundError, r"Did you mean: 'features.7'"),
        (dict(layer="featurs"), cm.LayerNotFoundError, r"'features'"),
        (dict(layer="nothing_like_it_at_all"), cm.LayerNotFoundError, r"named_modules"),
        (dict(layer=nn.Conv2d(1, 1, 1)), cm.LayerNotFoundError, r"not a submodule"),
        (dict(layer=3), TypeError, r"dotted module name"),
        (dict(layer="head"), cm.LayerNotSpatialError, r"2-D tensor"),
        (dict(layer="pool"), cm.LayerNotSpatialError, r"1x1 grid"),
        (dict(layer="features.4", targets=torch.tensor([0, 1, 2, 3, 4, 5])), cm.TargetError, r"\[5\] are out of range"),
        (dict(layer="features.4", targets=torch.tensor([-1] * 6)), cm.TargetError, r"out of range"),
        (dict(layer="features.4", targets=torch.tensor([0, 1])), cm.TargetError, r"match the 6 images"),
        (dict(layer="features.4", targets=torch.zeros(6, 2, 2, dtype=torch.long)), cm.TargetError, r"\(6, K\)"),
        (dict(layer="features.4", targets=torch.zeros(6)), cm.TargetError, r"integer class indices"),
        (dict(layer="features.4", method="scorecam"), ValueError, r"unknown CAM method 'scorecam'"),
        (dict(layer="features.4", method=()), ValueError, r"at least one"),
    ],
)
def test_bad_arguments_raise_clear_errors(small_cnn, images, kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        cm.compute_cams(small_cnn, images, **kwargs)


@pytest.mark.parametrize(
    "imgs, pattern",
    [
        (torch.randn(3, 16, 16), r"4-D .*unsqueeze\(0\)"),
        (torch.randn(2, 1, 3, 16, 16), r"4-D"),
        (torch.randn(0, 3, 16, 16), r"empty batch"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), r"floating"),
        ([[1.0]], r"torch.Tensor"),
    ],
)
def test_bad_images_raise_input_error(small_cnn, imgs, pattern) -> None:
    with pytest.raises(cm.InputError, match=pattern):
        cm.compute_cams(small_cnn, imgs, "features.4")


def test_layer_never_called_raises_hook_not_fired(images) -> None:
    with pytest.raises(cm.HookNotFiredError, match=r"'unused' was not called.*_orig_mod"):
        cm.compute_cams(WithUnused().eval(), images, "unused")


def test_layer_returning_tuple_is_rejected(images) -> None:
    with pytest.raises(cm.LayerNotSpatialError, match="returns a tuple"):
        cm.compute_cams(TupleLayer().eval(), images, "attn")


def test_token_count_not_square_asks_for_reshape() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            t = self.proj(x.flatten(2).transpose(1, 2)[:, :7])  # 7 tokens: not a grid
            return self.head(t.mean(1))

    with pytest.raises(cm.LayerNotSpatialError, match=r"reshape=\(h, w\)"):
        cm.compute_cams(Seq().eval(), torch.randn(2, 3, 4, 4), "proj")


def test_errors_share_a_base_class() -> None:
    for err in (cm.LayerNotFoundError, cm.LayerNotSpatialError, cm.HookNotFiredError, cm.TargetError, cm.InputError):
        assert issubclass(err, cm.CAMError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cam_pass_queues_without_a_host_sync_on_a_gpu() -> None:
    """The whole pass (state, hook, forward, target check, 1 and K-target backward, maps) never
    waits for the device; the out-of-range check on device targets reads its flag once, after."""
    from cam_monitor.engine import raise_if_out_of_range, resolve_targets

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).cuda().eval()
    images = torch.randn(4, 3, 16, 16, device="cuda")
    cm.cam_pass(model, images, "2", torch.tensor([0, 1, 2, 3]), tuple(cm.METHODS))  # warm-up: lazy CUDA init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        one = cm.cam_pass(model, images, "2", torch.tensor([0, 1, 2, 3]), tuple(cm.METHODS))  # CPU labels, as the monitor's
        many = cm.cam_pass(model, images, "2", torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4]]), "gradcam")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not one.zero_gradient and many.maps["gradcam"].shape == (4, 2, 16, 16)
    logits = torch.randn(4, 8, device="cuda")
    bad = torch.tensor([0, 1, 2, 9], device="cuda")
    tgt, _, pending = resolve_targets(bad, logits)
    with pytest.raises(cm.TargetError, match=r"\[9\] are out of range"):
        raise_if_out_of_range(pending, bad, 8)
