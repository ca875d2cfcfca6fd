"""The evaluation under torch's own FSDP (FSDP1 auto-wrapped, FSDP2 fully_shard), 2 CPU processes
with gloo: every rank runs every collective, the maps equal a single-process evaluation, no
parameter gradient is created, and training goes on afterwards. (Lightning's FSDPStrategy needs a
GPU; the monitor routes its passes through the strategy's FSDP root, see trainer_access.cam_model.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

SCRIPT = Path(__file__).with_name("fsdp_script.py")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_sharded_model_gives_single_process_maps_without_gradients(tmp_path, kind) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(SCRIPT), str(tmp_path), kind], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record == {"rank": rank, "maps_equal": True, "aggregates_equal": True, "no_param_grads": True,
                          "trained_then_evaluated": True}
