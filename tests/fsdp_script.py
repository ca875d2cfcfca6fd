"""Run by tests/test_fsdp.py under torchrun (2 CPU processes, gloo): evaluate a sharded model.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_script.py OUT_DIR fsdp1|fsdp2
Each rank writes rank<r>.json: whether its gathered maps equal a single-process evaluation of the
same weights, whether any parameter gradient appeared, and whether a training step and a second
evaluation then still work.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import SmallCNN  # noqa: E402

import cam_monitor as cm  # noqa: E402
from cam_monitor.evaluation import EvalSettings, Placement, evaluate  # noqa: E402


def shard(model: nn.Module, kind: str) -> nn.Module:
    """Wrap every conv as its own unit under a root, as auto-wrap policies do."""
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({nn.Conv2d}), device_id=torch.device("cpu"))
    from torch.distributed.fsdp import fully_shard

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fully_shard(m)
    return fully_shard(model)


def main() -> None:
    out, kind = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    plain = SmallCNN()
    model = SmallCNN()
    model.load_state_dict(plain.state_dict())
    layer = model.features  # the module object: its dotted name changes under the FSDP1 wrapper
    model = shard(model, kind)
    probes = cm.ProbeSet(torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.arange(5))

    def gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    place = Placement(rank=rank, world=world, gather=gather)
    sharded = evaluate(model, probes, EvalSettings(layer, batch_size=2), place)  # 3 probes a rank: 2 chunks each
    single = evaluate(plain, probes, EvalSettings("features", batch_size=2))
    no_grads = all(p.grad is None for p in model.parameters())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    opt.step()
    after = evaluate(model, probes, EvalSettings(layer, batch_size=2), place)
    record = {"rank": rank, "maps_equal": bool(torch.allclose(sharded.maps, single.maps, atol=1e-5)),
              "aggregates_equal": all(abs(sharded.aggregates[k] - v) < 1e-5 for k, v in single.aggregates.items()
                                      if v == v),
              "no_param_grads": no_grads, "trained_then_evaluated": bool(torch.isfinite(after.maps).all())}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()  # neither rank tears its gloo pairs down while the other is still using them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip the interpreter's teardown: a gloo thread that drops its last reference to a tensor
    # while CPython finalizes takes the GIL, is unwound by the interpreter and aborts the process
    # ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489), now and
    # then on a busy machine. The record above is written and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
