"""TensorBoard: images at ``global_step`` (the slider shows the maps moving), alerts as text."""
from __future__ import annotations

import json
from typing import Any

import torch
from torchvision.io import encode_png

from ..compat import tensorboard_file_writer
from ..evaluation import Evaluation
from ..render import to_uint8
from ..report import Panel


def image_summary(tag: str, image: torch.Tensor) -> Any:
    """A TensorBoard image summary of a (3, H, W) float [0, 1] image, PNG-encoded by torchvision.

    ``SummaryWriter.add_image`` encodes through Pillow at its default compression, several
    times slower on a large probe grid; fast zlib level 1 keeps the image lossless.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    u8 = to_uint8(image)
    png = encode_png(u8, compression_level=1).numpy().tobytes()
    img = Summary.Image(height=int(u8.shape[1]), width=int(u8.shape[2]), colorspace=int(u8.shape[0]),
                        encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=img)])


class TensorBoardSink:
    """Writes to a ``SummaryWriter``; tags start with ``prefix`` (``cam/probe_grid``)."""

    name = "tensorboard"

    def __init__(self, writer: Any, prefix: str = "cam") -> None:
        self.writer, self.prefix = writer, prefix

    def _add_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        tensorboard_file_writer(self.writer).add_summary(image_summary(f"{self.prefix}/{tag}", image), step)

    def log_evaluation(self, ev: Evaluation, panel: Panel) -> None:
        self._add_image("probe_grid", panel.grid, ev.global_step)
        for tag, image in panel.extra_images().items():
            self._add_image(tag, image, ev.global_step)
        self.writer.flush()

    def log_alert(self, event: dict[str, Any]) -> None:
        self.writer.add_text(f"{self.prefix}/alerts", json.dumps(event), event["global_step"])
        self.writer.flush()
