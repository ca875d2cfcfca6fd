"""The engine's maps equal the published definitions, computed plainly one image and class at a time."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import cam_monitor as cm
from conftest import GapLinear

ALL = tuple(cm.METHODS)


def naive_activation_and_grad(model: nn.Module, layer: nn.Module, image: torch.Tensor, cls: int):
    """Activation and d logit[cls] / d activation for ONE image with a plain full backward."""
    store = {}

    def hook(_m, _i, out):
        out.retain_grad()
        store["a"] = out

    h = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = image[None].clone().requires_grad_(True)
            logit = model(x)[0, cls]
            (g,) = torch.autograd.grad(logit, store["a"])
    finally:
        h.remove()
    return store["a"].detach()[0], g[0]


def naive_map(method: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each method's formula for one image and class, written out channel by channel."""
    c = a.shape[0]
    out = torch.zeros(a.shape[1:])
    for k in range(c):
        if method == "gradcam":
            w = g[k].mean()
            out += w * a[k]
        elif method == "gradcam++":
            s = a[k].sum()
            weight = 0.0
            for i in range(a.shape[1]):
                for j in range(a.shape[2]):
                    gij = g[k, i, j]
                    den = 2 * gij ** 2 + s * gij ** 3
                    alpha = gij ** 2 / den if den != 0 else 0.0
                    weight += alpha * max(float(gij), 0.0)
            out += weight * a[k]
        elif method == "xgradcam":
            s = a[k].sum()
            w = (g[k] * a[k]).sum() / s if s != 0 else 0.0
            out += w * a[k]
        elif method == "hirescam":
            out += g[k] * a[k]
        elif method == "layercam":
            out += g[k].clamp(min=0) * a[k]
    return out.clamp(min=0)


def test_gradcam_equals_cam_oracle_for_gap_linear_model() -> None:
    torch.manual_seed(0)
    model = GapLinear().eval()
    x = torch.randn(3, 3, 10, 12)
    targets = torch.tensor([0, 3, 1])
    maps = cm.compute_cams(model, x, "features", targets=targets)
    feats = model.features(x)
    cam = torch.einsum("bc,bchw->bhw", model.fc.weight[targets], feats).clamp(min=0)
    torch.testing.assert_close(maps, cam / (10 * 12), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ALL)
def test_each_method_matches_naive_per_image_per_class_loop(small_cnn: nn.Module, images: torch.Tensor, method: str) -> None:
    targets = torch.tensor([[0, 4], [1, 2], [3, 3], [2, 0], [4, 1], [0, 0]])
    maps = cm.compute_cams(small_cnn, images, "features.7", targets=targets, method=method)
    assert maps.shape == (6, 2, 8, 8) and maps.dtype == torch.float32
    layer = small_cnn.features[7]
    for b in range(images.shape[0]):
        for k in range(targets.shape[1]):
            a, g = naive_activation_and_grad(small_cnn, layer, images[b], int(targets[b, k]))
            torch.testing.assert_close(maps[b, k], naive_map(method, a, g), rtol=1e-4, atol=1e-6)


def test_tuple_of_methods_equals_separate_calls(small_cnn: nn.Module, images: torch.Tensor) -> None:
    together = cm.compute_cams(small_cnn, images, "features.4", method=ALL)
    assert set(together) == set(ALL)
    for m in ALL:
        torch.testing.assert_close(together[m], cm.compute_cams(small_cnn, images, "features.4", method=m))


def test_k_targets_equal_k_single_target_calls(small_cnn: nn.Module, images: torch.Tensor) -> None:
    targets = torch.randint(0, 5, (6, 3), generator=torch.Generator().manual_seed(0))
    multi = cm.compute_cams(small_cnn, images, "features.7", targets=targets, method=ALL)
    for k in range(3):
        single = cm.compute_cams(small_cnn, images, "features.7", targets=targets[:, k], method=ALL)
        for m in ALL:
            torch.testing.assert_close(multi[m][:, k], single[m], rtol=1e-5, atol=1e-7)


def test_default_target_is_predicted_class(small_cnn: nn.Module, images: torch.Tensor) -> None:
    pred = small_cnn(images).argmax(1)
    torch.testing.assert_close(cm.compute_cams(small_cnn, images, "features.7"),
                               cm.compute_cams(small_cnn, images, "features.7", targets=pred))


def test_counterfactual_uses_negated_gradients(small_cnn: nn.Module, images: torch.Tensor) -> None:
    t = torch.zeros(6, dtype=torch.long)
    res = cm.cam_pass(small_cnn, images, "features.7", t, "hirescam", counterfactual=True)
    a, g = naive_activation_and_grad(small_cnn, small_cnn.features[7], images[0], 0)
    torch.testing.assert_close(res.maps["hirescam"][0, 0], (-(g * a).sum(0)).clamp(min=0), rtol=1e-4, atol=1e-6)


def test_batch_invariance_map_alone_equals_map_in_batch(small_cnn: nn.Module, images: torch.Tensor) -> None:
    batch = cm.compute_cams(small_cnn, images, "features.4", targets=torch.arange(6) % 5, method=ALL)
    for i in range(images.shape[0]):
        alone = cm.compute_cams(small_cnn, images[i:i + 1], "features.4", targets=torch.tensor([i % 5]), method=ALL)
        for m in ALL:
            torch.testing.assert_close(alone[m][0], batch[m][i], rtol=1e-4, atol=1e-6)


def test_layer_none_picks_last_spatial_layer(small_cnn: nn.Module, images: torch.Tensor) -> None:
    res = cm.cam_pass(small_cnn, images, None)
    assert res.layer_name == "features"  # the Sequential's output is the last 4-D map before pooling
    torch.testing.assert_close(res.maps["gradcam"][:, 0], cm.compute_cams(small_cnn, images, "features"))


def test_layer_given_as_module(small_cnn: nn.Module, images: torch.Tensor) -> None:
    torch.testing.assert_close(cm.compute_cams(small_cnn, images, small_cnn.features[4]),
                               cm.compute_cams(small_cnn, images, "features.4"))


def test_output_transform_picks_logits_from_dict_output(small_cnn: nn.Module, images: torch.Tensor) -> None:
    class DictOut(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return {"aux": x.mean(), "scores": self.net(x)}

    wrapped = DictOut(small_cnn)
    maps = cm.compute_cams(wrapped, images, "net.features.7", output_transform=lambda o: o["scores"])
    torch.testing.assert_close(maps, cm.compute_cams(small_cnn, images, "features.7"))
    with pytest.raises(TypeError, match="output_transform"):
        cm.compute_cams(wrapped, images, "net.features.7")


def test_inplace_op_after_layer_does_not_alter_captured_activation() -> None:
    class InplaceAfter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            y = self.conv(x)
            y.mul_(2.0).relu_()
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    model = InplaceAfter().eval()
    x = torch.randn(2, 3, 8, 8)
    res = cm.cam_pass(model, x, "conv", torch.tensor([0, 1]), "hirescam")
    a = model.conv(x[:1])[0].detach()
    # d logit_0 / d a = 2 * [2a > 0] * W[0, c] / (h * w), written out by hand
    g = 2.0 * (a > 0).float() * model.fc.weight[0].detach()[:, None, None] / 64.0
    torch.testing.assert_close(res.maps["hirescam"][0, 0], (g * a).sum(0).clamp(min=0), rtol=1e-4, atol=1e-6)


def test_token_layer_vit_auto_reshape_matches_naive() -> None:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=5).eval()
    x = torch.randn(3, 3, 32, 32)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    maps = cm.compute_cams(vit, x, layer, targets=torch.tensor([0, 1, 2]))
    assert maps.shape == (3, 4, 4)
    explicit = cm.compute_cams(vit, x, layer, targets=torch.tensor([0, 1, 2]), reshape=(4, 4))
    torch.testing.assert_close(maps, explicit)
    module = dict(vit.named_modules())[layer]
    a, g = naive_activation_and_grad(vit, module, x[1], 1)
    a_grid = a[1:].t().reshape(16, 4, 4)
    g_grid = g[1:].t().reshape(16, 4, 4)
    torch.testing.assert_close(maps[1], naive_map("gradcam", a_grid, g_grid), rtol=1e-4, atol=1e-6)


def test_k_targets_on_a_token_layer_take_one_backward_each_and_equal_single_calls(monkeypatch) -> None:
    """A transformer block's tail saves tens of activations: K targets go one backward at a time
    (not K times the memory in one batched backward) and give what K single-target calls give."""
    from cam_monitor import engine

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=64, num_classes=5).eval()
    torch.nn.init.normal_(vit.heads.head.weight, std=0.1)
    x = torch.randn(3, 3, 32, 32)
    targets = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4], [4, 0, 1, 2]])
    chunks, batched = [], []
    pick, vmapped = engine.targets_per_backward, engine._batched_grad
    monkeypatch.setattr(engine, "targets_per_backward", lambda *a: chunks.append(pick(*a)) or chunks[-1])
    monkeypatch.setattr(engine, "_batched_grad", lambda *a: batched.append(a[2].shape[0]) or vmapped(*a))
    layer = "encoder.layers.encoder_layer_1.ln_1"
    multi = cm.compute_cams(vit, x, layer, targets=targets, method=ALL)
    assert chunks == [1] and batched == []
    for k in range(4):
        single = cm.compute_cams(vit, x, layer, targets=targets[:, k], method=ALL)
        for m in ALL:
            torch.testing.assert_close(multi[m][:, k], single[m], rtol=1e-5, atol=1e-7)
    chunks.clear()
    cnn = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    cm.compute_cams(cnn, torch.randn(3, 3, 64, 64), "layer4", targets=targets)
    assert chunks == [4] and batched == [4]  # pooling + linear head: one batched backward


def test_targets_per_backward_keeps_the_batched_backward_within_twice_the_gradients() -> None:
    from cam_monitor.engine import targets_per_backward

    assert targets_per_backward(5, act_bytes=100, tail_bytes=0) == 5
    assert targets_per_backward(5, act_bytes=100, tail_bytes=101) == 5  # CNN head: about one activation
    assert targets_per_backward(5, act_bytes=100, tail_bytes=400) == 2  # 2 x 400 <= 2 x 5 x 100
    assert targets_per_backward(5, act_bytes=100, tail_bytes=2500) == 1  # a transformer block


def test_the_tail_is_measured_only_when_several_targets_are_asked_for() -> None:
    import numpy as np

    from cam_monitor.engine import _several_targets

    for one in (None, 3, [1, 2], torch.tensor([1, 2]), torch.tensor([[1], [2]]), [[0], [1]]):
        assert not _several_targets(one)
    for many in (torch.tensor([[1, 2], [3, 4]]), [[0, 1], [1, 2]], np.array([[0, 1, 2]])):
        assert _several_targets(many)
    assert not _several_targets([[0, 1], [2]])  # ragged: resolve_targets gives the error


def test_tail_memory_counts_saved_activations_once_and_no_parameters() -> None:
    from cam_monitor.engine import TailMemory

    lin = nn.Linear(8, 8)
    tail = TailMemory(lin)
    x = torch.randn(4, 8, requires_grad=True)
    with tail.hooks():
        y = lin(x)
        z = y * y  # saves y twice: one storage
    assert tail.nbytes == x.numel() * 4 + y.numel() * 4
    assert z.requires_grad


def test_a_layer_whose_output_aliases_its_input_is_captured_before_the_model_changes_it() -> None:
    """An Identity (or in-place) target layer returns memory the model still holds; changing that
    memory in place afterwards must not change the captured activation."""
    class Aliasing(nn.Module):
        def __init__(self, zero_after: bool) -> None:
            super().__init__()
            self.conv, self.ident, self.fc, self.zero_after = nn.Conv2d(3, 4, 3, padding=1), nn.Identity(), nn.Linear(4, 3), zero_after

        def forward(self, x):
            y = self.conv(x)
            a = self.ident(y)
            out = self.fc(a.mean((2, 3)))
            if self.zero_after:
                y.zero_()
            return out

    torch.manual_seed(0)
    plain = Aliasing(False).eval()
    zeroing = Aliasing(True).eval()
    zeroing.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 8, 8)
    expected = cm.compute_cams(plain, x, "ident", torch.tensor([0, 2]), "hirescam")
    assert float(expected.amax()) > 0
    torch.testing.assert_close(cm.compute_cams(zeroing, x, "ident", torch.tensor([0, 2]), "hirescam"), expected)


def test_token_layer_without_class_token() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 9, 8)
            return self.head(self.mix(t).mean(1))

    torch.manual_seed(0)
    maps = cm.compute_cams(Tokens().eval(), torch.randn(2, 3, 12, 12), "mix")
    assert maps.shape == (2, 3, 3)


def test_bf16_autocast_returns_float32_maps_close_to_fp32(small_cnn: nn.Module, images: torch.Tensor) -> None:
    ref = cm.compute_cams(small_cnn, images, "features.7", targets=torch.zeros(6, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = cm.compute_cams(small_cnn, images, "features.7", targets=torch.zeros(6, dtype=torch.long))
    assert low.dtype == torch.float32
    rel = (low - ref).abs().max() / ref.abs().max()
    assert rel < 0.05


def test_compiled_model_gives_same_maps(small_cnn: nn.Module, images: torch.Tensor) -> None:
    compiled = torch.compile(small_cnn, backend="eager")
    compiled(images)  # compile once, as training would
    ref = cm.compute_cams(small_cnn, images, "features.7")
    torch.testing.assert_close(cm.compute_cams(compiled, images, "features.7"), ref)
    torch.testing.assert_close(cm.compute_cams(compiled, images, "_orig_mod.features.7"), ref)


@pytest.mark.parametrize("mode", ["normal", "no_grad", "inference_mode"])
def test_works_under_every_grad_mode(small_cnn: nn.Module, images: torch.Tensor, mode: str) -> None:
    ref = cm.compute_cams(small_cnn, images, "features.4", method=ALL)
    ctx = {"normal": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with ctx():
        imgs = images.clone()
        got = cm.compute_cams(small_cnn, imgs, "features.4", method=ALL)
        assert torch.is_grad_enabled() == (mode == "normal")
        assert torch.is_inference_mode_enabled() == (mode == "inference_mode")
    for m in ALL:
        torch.testing.assert_close(got[m], ref[m])


def test_no_graph_is_recorded_before_the_target_layer(small_cnn: nn.Module, images: torch.Tensor) -> None:
    seen = []
    h = small_cnn.features[3].register_forward_hook(
        lambda _m, _i, out: seen.append((torch.is_grad_enabled(), out.requires_grad)))
    try:
        cm.compute_cams(small_cnn, images, "features.4")
    finally:
        h.remove()
    assert seen == [(False, False)]


def test_resnet18_layer4_runs_and_has_layer_resolution() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    res = cm.cam_pass(model, torch.randn(2, 3, 64, 64), "layer4", method=ALL)
    assert res.grid_size == (2, 2) and res.layer_name == "layer4"
    assert res.logits.shape == (2, 7) and res.scores.shape == (2, 1)
    for m in ALL:
        assert torch.isfinite(res.maps[m]).all() and (res.maps[m] >= 0).all()


def test_a_module_called_twice_gives_the_last_calls_map_and_says_how_often() -> None:
    from torch import nn

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    head = nn.Linear(3, 4)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = conv, head

        def forward(self, x):
            return self.head(self.conv(torch.relu(self.conv(x))).mean((2, 3)))

    class Once(nn.Module):  # the second call as its own module
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second, self.head = conv, nn.Conv2d(3, 3, 3, padding=1), head
            self.second.load_state_dict(conv.state_dict())

        def forward(self, x):
            return self.head(self.second(torch.relu(self.first(x))).mean((2, 3)))

    x = torch.randn(2, 3, 8, 8)
    twice = cm.cam_pass(Twice(), x, "conv", torch.tensor([0, 1]))
    once = cm.cam_pass(Once(), x, "second", torch.tensor([0, 1]))
    assert twice.layer_calls == 2 and once.layer_calls == 1
    torch.testing.assert_close(twice.maps["gradcam"], once.maps["gradcam"])


@pytest.fixture(scope="module")
def swin():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None, num_classes=10).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # a non-zero head, so the maps are not all zero
    return model


def test_channels_last_swin_stages_are_read_as_such(swin) -> None:
    x, t = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    permuted = cm.compute_cams(swin, x, "permute", t)  # torchvision's own (B, C, h, w) view of `norm`
    norm = cm.cam_pass(swin, x, "norm", t)
    assert norm.layout == "nhwc" and norm.maps["gradcam"].shape == (2, 1, 2, 2)
    torch.testing.assert_close(norm.maps["gradcam"][:, 0], permuted)
    assert float(permuted.abs().max()) > 0
    features = cm.cam_pass(swin, x, "features", t)
    explicit = cm.compute_cams(swin, x, "features", t, reshape=lambda a: a.permute(0, 3, 1, 2))
    assert features.layout == "nhwc"
    torch.testing.assert_close(features.maps["gradcam"][:, 0], explicit)
    forced = cm.compute_cams(swin, x, "features", t, layout="nhwc")
    torch.testing.assert_close(forced, explicit)


def small_vit(zero_head: bool):
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                               mlp_dim=64, num_classes=5).eval()
    if not zero_head:  # torchvision zero-initialises the head
        torch.nn.init.normal_(vit.heads.head.weight, std=0.1)
    return vit


def test_automatic_pick_on_a_vit_is_the_last_attention_input_and_explains_the_class() -> None:
    vit = small_vit(zero_head=False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = cm.cam_pass(vit, x, None, torch.tensor([0, 1]))
    assert result.layer_name == "encoder.layers.encoder_layer_1.ln_1" and result.grid_size == (4, 4)
    assert float(result.maps["gradcam"].amax()) > 0 and not result.zero_gradient
    # the last block's output reaches the head only through the class token: zero maps, zero gradient
    last = cm.cam_pass(vit, x, "encoder.ln", torch.tensor([0, 1]))
    assert float(last.maps["gradcam"].amax()) == 0 and last.zero_gradient
    # a zero-initialised head (torchvision's default) gives no class gradient: the pick is made by structure,
    # the same layer, and the first gradient reaches it
    dead = small_vit(zero_head=True)
    blind = cm.cam_pass(dead, x, None, torch.tensor([0, 1]))
    assert blind.layer_name == "encoder.layers.encoder_layer_1.ln_1" and blind.zero_gradient
    from cam_monitor.layers import pick_layer
    assert pick_layer(small_vit(zero_head=True), x)[2] is False  # no logits to judge by: not settled
    # a convolutional net keeps its last spatial layer
    cnn = torchvision_resnet()
    assert cm.cam_pass(cnn, torch.randn(1, 3, 64, 64), None).layer_name == "layer4"


def torchvision_resnet():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()
