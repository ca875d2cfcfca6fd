"""TensorBoard: images at ``global_step`` (the slider shows the maps moving), alerts as text.

The sink writes its own event file into the logger's run folder, beside the logger's file:
TensorBoard reads every event file of a folder as one run. It writes through tensorboardX,
whose record checksum (CRC-32C) is native code from the ``crc32c`` package, where tensorboard's
own writer computes it in pure Python (about 0.3 s per MB of image, holding the GIL: a cost the
training thread would feel while the background worker writes a probe grid).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision.io import encode_png

from .base import Sink
from ..alerts import describe_alert_markdown
from ..render import to_uint8
from ..records import AlertEvent, Evaluation, Panel

#: Start of the suffix of the sink's event file name
#: (``events.out.tfevents.<time>.<host>.cam_monitor.<prefix with dots>``: one file per monitor).
EVENT_FILE_SUFFIX = ".cam_monitor"


def image_summary(tag: str, image: torch.Tensor) -> Any:
    """A TensorBoard image summary of a (3, H, W) float [0, 1] image, PNG-encoded by torchvision.

    ``add_image`` would encode through Pillow at its default compression, several times slower on
    a large probe grid; fast zlib level 1 keeps the image lossless.
    """
    from tensorboardX.proto.summary_pb2 import Summary

    u8 = to_uint8(image)
    png = encode_png(u8, compression_level=1).numpy().tobytes()
    img = Summary.Image(height=int(u8.shape[1]), width=int(u8.shape[2]), colorspace=int(u8.shape[0]),
                        encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=img)])


def text_summary(tag: str, markdown: str) -> Any:
    """A summary for TensorBoard's text plugin under exactly ``tag`` (tensorboardX's ``text`` would
    append ``/text_summary`` to it)."""
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboardX.proto.plugin_text_pb2 import TextPluginData
    from tensorboardX.proto.tensor_pb2 import TensorProto
    from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto

    plugin = SummaryMetadata.PluginData(plugin_name="text", content=TextPluginData(version=0).SerializeToString())
    tensor = TensorProto(dtype="DT_STRING", string_val=[markdown.encode("utf-8")],
                         tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin), tensor=tensor)])


def curve_section(prefix: str) -> str:
    """The dashboard section of a monitor's per-probe curves: ``cam_probes`` (``cam_late_probes``
    for a monitor named ``late``), beside the aggregate ``cam/`` charts."""
    return f"{prefix.replace('/', '_')}_probes"


def curve_tag(prefix: str, metric: str, probe_id: str) -> str:
    """Scalar tag of one probe's curve: ``<section>/<metric>/<probe id>``."""
    return f"{curve_section(prefix)}/{metric}/{probe_id}"


class TensorBoardSink(Sink):
    """Writes into the TensorBoard run folder ``log_dir``; tags start with ``prefix`` (``cam/probe_grid``).

    Per-probe curves go as scalars (TensorBoard plots them; the Custom Scalars tab shows one chart
    per metric with a line per probe) instead of a rendered figure. The event file is opened on the
    first write (a run that never sends anything leaves no file) and closed by :meth:`close`.
    """

    name = "tensorboard"
    draws_curves = True

    def __init__(self, log_dir: str | Path, prefix: str = "cam") -> None:
        self.log_dir, self.prefix = str(log_dir), prefix
        self._writer: Any = None
        self._layout_written = False

    def where(self) -> str:
        """Where the pictures go, for the fit-start line (with TensorBoard's image sampling, which
        otherwise hides evaluations on a long run)."""
        return (f"TensorBoard in {self.log_dir} (it keeps 10 images per tag by default: start it with "
                "--samples_per_plugin images=0 to see every evaluation)")

    def _file_writer(self) -> Any:
        if self._writer is None:
            from tensorboardX import FileWriter

            suffix = f"{EVENT_FILE_SUFFIX}.{self.prefix.replace('/', '.')}"
            self._writer = FileWriter(self.log_dir, filename_suffix=suffix)
        return self._writer

    def _add_curves(self, curves: dict[str, dict[str, float]], step: int) -> None:
        """One scalar per probe and metric, all in one event; the first time, the Custom Scalars
        layout that draws each metric as one chart with a line per probe."""
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import custom_scalars

        writer = self._file_writer()
        if curves and not self._layout_written:
            section = curve_section(self.prefix)
            charts = {metric: ["Multiline", [f"^{section}/{metric}/"]] for metric in curves}
            writer.add_summary(custom_scalars({section: charts}))
            self._layout_written = True
        points = [Summary.Value(tag=curve_tag(self.prefix, metric, probe_id), simple_value=float(value))
                  for metric, values in curves.items() for probe_id, value in values.items()]
        if points:  # one event record for all of them: one write, one checksum
            writer.add_summary(Summary(value=points), step)

    def _add_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self._file_writer().add_summary(image_summary(f"{self.prefix}/{tag}", image), step)

    def log_evaluation(self, ev: Evaluation, panel: Panel) -> None:
        self._add_image("probe_grid", panel.grid, ev.global_step)
        for tag, image in panel.extra_images().items():
            self._add_image(tag, image, ev.global_step)
        self._add_curves(panel.curves, ev.global_step)
        self._file_writer().flush()

    def log_alert(self, event: AlertEvent) -> None:
        """The event in words (Markdown, which TensorBoard's Text tab renders) under ``<prefix>/alerts``."""
        self._file_writer().add_summary(text_summary(f"{self.prefix}/alerts", describe_alert_markdown(event)),
                                        event["global_step"])
        self._file_writer().flush()

    def close(self) -> None:
        """Flush and close the event file (the callback calls it at teardown)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
