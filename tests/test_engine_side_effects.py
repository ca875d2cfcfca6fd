"""The CAM pass leaves the model and the process exactly as it found them, also when it raises."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cam_monitor as cm
from conftest import SmallCNN, make_trained_bn


def snapshot(model: nn.Module) -> dict:
    """Everything the pass must not change."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks),
                      tuple(getattr(m, "_backward_pre_hooks", {})))
                  for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
        "grad_mode": torch.is_grad_enabled(),
    }


def assert_same(before: dict, after: dict) -> None:
    for key in ("params", "buffers"):
        for name, value in before[key].items():
            assert torch.equal(value, after[key][name]), f"{key} {name} changed"
    for name, g in before["grads"].items():
        other = after["grads"][name]
        assert (g is None and other is None) or torch.equal(g, other), f".grad of {name} changed"
    for key in ("requires_grad", "training", "hooks", "grad_mode"):
        assert before[key] == after[key], f"{key} changed"
    assert torch.equal(before["rng"], after["rng"]), "global RNG state changed"


@pytest.fixture
def busy_model() -> nn.Module:
    """A model mid-training: train mode with one submodule frozen in eval, .grad pre-filled."""
    torch.manual_seed(0)
    model = make_trained_bn(SmallCNN())
    model.train()
    model.features[1].eval()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.features[0].weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("method", [("gradcam",), tuple(cm.METHODS)])
def test_pass_has_no_side_effects(busy_model: nn.Module, images: torch.Tensor, method: tuple) -> None:
    targets = torch.randint(0, 5, (6, 3))
    before = snapshot(busy_model)
    cm.compute_cams(busy_model, images, "features.4", targets=targets, method=method)
    assert_same(before, snapshot(busy_model))


def test_pass_runs_in_eval_mode_even_when_model_is_training(busy_model: nn.Module, images: torch.Tensor) -> None:
    seen = []
    h = busy_model.drop.register_forward_pre_hook(lambda m, _i: seen.append(m.training))
    try:
        a = cm.compute_cams(busy_model, images, "features.4", targets=torch.zeros(6, dtype=torch.long))
        b = cm.compute_cams(busy_model, images, "features.4", targets=torch.zeros(6, dtype=torch.long))
    finally:
        h.remove()
    assert seen == [False, False]
    torch.testing.assert_close(a, b)  # dropout off, BN on running stats: deterministic


class FailsAfterLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_trained_bn(SmallCNN())

    def forward(self, x):
        self.net.features(x)
        raise RuntimeError("boom in the model")


def test_state_restored_when_model_forward_raises(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = FailsAfterLayer().train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        cm.compute_cams(model, images, "net.features.4")
    assert_same(before, snapshot(model))


def test_state_restored_when_targets_are_invalid(busy_model: nn.Module, images: torch.Tensor) -> None:
    before = snapshot(busy_model)
    with pytest.raises(cm.TargetError):
        cm.compute_cams(busy_model, images, "features.4", targets=torch.full((6,), 99))
    assert_same(before, snapshot(busy_model))


def test_state_restored_under_inference_mode(busy_model: nn.Module, images: torch.Tensor) -> None:
    before = snapshot(busy_model)
    with torch.inference_mode():
        cm.compute_cams(busy_model, images.clone(), "features.4")
    assert_same(before, snapshot(busy_model))


def test_deepcopy_of_model_unaffected_by_pass(busy_model: nn.Module, images: torch.Tensor) -> None:
    twin = copy.deepcopy(busy_model)
    cm.compute_cams(busy_model, images, "features.7")
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(5)
    out_a = busy_model(x)
    torch.manual_seed(5)
    out_b = twin(x)
    torch.testing.assert_close(out_a, out_b)


def test_a_model_already_in_eval_mode_is_not_switched(images: torch.Tensor) -> None:
    """During validation Lightning has the model in eval mode: the pass leaves it alone (``eval()``
    walks every module through Python) and still gives every flag back when some are training."""
    class CountingCNN(SmallCNN):
        calls = 0

        def train(self, mode: bool = True):
            CountingCNN.calls += 1
            return super().train(mode)

    model = CountingCNN().eval()
    CountingCNN.calls = 0
    cm.compute_cams(model, images, "features.4")
    assert CountingCNN.calls == 0 and not model.training
    model.train()
    model.features[1].eval()
    before = {n: m.training for n, m in model.named_modules()}
    CountingCNN.calls = 0
    cm.compute_cams(model, images, "features.4")
    assert CountingCNN.calls == 1 and {n: m.training for n, m in model.named_modules()} == before


def test_class_scores_are_the_eval_mode_logits_and_leave_the_model_as_it_was(busy_model: nn.Module,
                                                                             images: torch.Tensor) -> None:
    """What discovery's pasted images are scored by: one inference forward in eval mode, float32
    logits, the predicted classes their largest; the training model untouched."""
    from cam_monitor.engine import class_scores, predict_classes

    reference = copy.deepcopy(busy_model).eval()
    with torch.no_grad():
        expected = reference(images)
    before = snapshot(busy_model)
    scores = class_scores(busy_model, images)
    assert_same(before, snapshot(busy_model))
    assert scores.dtype == torch.float32 and scores.shape == expected.shape and torch.allclose(scores, expected)
    assert torch.equal(predict_classes(busy_model, images), expected.argmax(1))
