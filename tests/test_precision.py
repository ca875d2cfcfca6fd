"""Maps and metrics of the same trained weights in float32, under low-precision autocast and with
low-precision weights: the difference is bounded (bf16 on CPU; fp16 on a GPU where there is one).

Issue 10 saw many all-zero maps under 16-mixed/bf16-mixed on a GPU run; this shows that the
arithmetic alone does not make maps vanish (on CPU with bf16 the degenerate count is the same and
every map keeps its ranking), so such runs point at the model trained in that precision."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import cam_monitor as cm
from cam_monitor import metrics as M
from cam_monitor.evaluation import EvalSettings, Placement, evaluate
from lightning_helpers import fit

BOUNDS = {"spurious_energy": 0.01, "object_energy": 0.01, "average_drop": 0.01, "pointing_spurious": 0.07,
          "quality": 0.01}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, model = fit(tmp_path_factory.mktemp("precision"), None, epochs=2)
    probes = cm.ProbeSet.from_dataset(trainer.datamodule.data.val, num_probes=32, seed=0)
    return model.eval(), probes


def assert_close_to_float32(ev, ref) -> None:
    assert ev.aggregates["degenerate"] == ref.aggregates["degenerate"]
    alive = ref.maps.flatten(1).amax(1) > 0
    assert float(M.spearman(ev.maps[alive], ref.maps[alive]).min()) > 0.95
    for key, bound in BOUNDS.items():
        assert abs(ev.aggregates[key] - ref.aggregates[key]) <= bound, key
    assert ev.aggregates["spurious_enrichment"] == pytest.approx(ref.aggregates["spurious_enrichment"], rel=0.02)


def run(model, probes, device: str, dtype: torch.dtype, mode: str):
    settings = EvalSettings("net.features")
    model = copy.deepcopy(model).to(device)
    if mode == "weights":
        return evaluate(model.to(dtype), probes, settings, Placement(device, prepare=lambda x: x.to(device, dtype)))
    return evaluate(model, probes, settings, Placement(device, forward_context=lambda: torch.autocast(device, dtype=dtype)))


@pytest.mark.parametrize("mode", ["autocast", "weights"])
def test_bf16_on_cpu_stays_within_bounds_of_float32(trained, mode) -> None:
    model, probes = trained
    ref = evaluate(model, probes, EvalSettings("net.features"))
    assert_close_to_float32(run(model, probes, "cpu", torch.bfloat16, mode), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs a GPU")
@pytest.mark.parametrize("mode", ["autocast", "weights"])
def test_fp16_on_a_gpu_stays_within_bounds_of_float32(trained, mode) -> None:
    model, probes = trained
    ref = evaluate(copy.deepcopy(model).cuda(), probes, EvalSettings("net.features"), Placement("cuda"))
    assert_close_to_float32(run(model, probes, "cuda", torch.float16, mode), ref)
