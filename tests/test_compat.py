"""The private APIs cam_monitor relies on (cam_monitor/compat.py and the ModelCheckpoint extension
points) exist in the installed versions; CI runs this against the oldest Lightning allowed too."""
from __future__ import annotations

import inspect

from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.tensorboard import SummaryWriter

from cam_monitor.compat import tensorboard_file_writer
from cam_monitor.sinks.tensorboard import image_summary


def test_tensorboard_file_writer_takes_an_encoded_summary(tmp_path) -> None:
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = SummaryWriter(str(tmp_path))
    tensorboard_file_writer(writer).add_summary(image_summary("cam/x", torch.rand(3, 8, 8)), 5)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("cam/x")] == [5]


def test_model_checkpoint_extension_points_keep_their_signatures() -> None:
    for name in ("_save_topk_checkpoint", "_save_last_checkpoint"):
        params = list(inspect.signature(getattr(ModelCheckpoint, name)).parameters)
        assert params == ["self", "trainer", "monitor_candidates"], (name, params)
