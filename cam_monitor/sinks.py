"""Where an evaluation goes: TensorBoard, Weights & Biases, PNG files, and the alert log.

Each sink takes the already-rendered pictures (rendered once, shared by every sink) and the
experiment object of its backend (a ``SummaryWriter``, a ``wandb`` run) or a folder, so this
module knows nothing of Lightning. :class:`AlertLog` is the durable record: one JSON object a
line, flushed and fsync'd, de-duplicated on resume, a torn last line from a killed process
detected and dropped.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torchvision.io import encode_png

from .atomic import atomic_path
from .evaluation import Evaluation
from .render import save_png


@dataclass
class Panel:
    """The pictures of one evaluation: the probe grid, per-probe tiles, the trends figure and the
    filmstrip (first probes over the last evaluations)."""

    grid: torch.Tensor
    tiles: torch.Tensor
    trends: torch.Tensor | None
    ids: Sequence[str]
    labels: Sequence[int]
    filmstrip: torch.Tensor | None = None

    def extra_images(self) -> dict[str, torch.Tensor]:
        """The optional pictures that exist for this evaluation, by tag."""
        return {tag: img for tag, img in (("trends", self.trends), ("filmstrip", self.filmstrip)) if img is not None}


def image_summary(tag: str, image: torch.Tensor) -> Any:
    """A TensorBoard image summary of a (3, H, W) float [0, 1] image, PNG-encoded by torchvision.

    ``SummaryWriter.add_image`` encodes through Pillow at its default compression, several
    times slower on a large probe grid; fast zlib level 1 keeps the image lossless.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    u8 = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    png = encode_png(u8, compression_level=1).numpy().tobytes()
    img = Summary.Image(height=int(u8.shape[1]), width=int(u8.shape[2]), colorspace=int(u8.shape[0]),
                        encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=img)])


class TensorBoardSink:
    """Images at ``global_step`` (so the slider shows the maps moving) and alerts as text."""

    name = "tensorboard"

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def _add_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.writer._get_file_writer().add_summary(image_summary(tag, image), step)

    def log_evaluation(self, ev: Evaluation, panel: Panel) -> None:
        self._add_image("cam/probe_grid", panel.grid, ev.global_step)
        for tag, image in panel.extra_images().items():
            self._add_image(f"cam/{tag}", image, ev.global_step)
        self.writer.flush()

    def log_alert(self, event: dict[str, Any]) -> None:
        self.writer.add_text("cam/alerts", json.dumps(event), event["global_step"])
        self.writer.flush()


class WandbSink:
    """Images, a per-probe ``wandb.Table`` (id, label, prediction, overlay, metrics) and ``run.alert``."""

    name = "wandb"

    def __init__(self, run: Any) -> None:
        self.run = run

    def log_evaluation(self, ev: Evaluation, panel: Panel) -> None:
        import wandb

        metric_names = list(ev.per_probe)
        table = wandb.Table(columns=["probe_id", "label", "prediction", "probability", "overlay", *metric_names])
        for i, pid in enumerate(panel.ids):
            row = [pid, int(panel.labels[i]), int(ev.preds[i]), float(ev.probs[i]),
                   wandb.Image(_hwc(panel.tiles[i]))]
            table.add_data(*row, *[float(ev.per_probe[m][i]) for m in metric_names])
        payload = {"cam/probe_grid": wandb.Image(_hwc(panel.grid), caption=f"epoch {ev.epoch} step {ev.global_step}"),
                   "cam/probes": table, "trainer/global_step": ev.global_step}
        for tag, image in panel.extra_images().items():
            payload[f"cam/{tag}"] = wandb.Image(_hwc(image))
        self.run.log(payload)

    def log_alert(self, event: dict[str, Any]) -> None:
        import wandb

        text = (f"{event['rule']}: {event['metric']} = {event['value']:.4g} (threshold {event['threshold']:.4g}) "
                f"at epoch {event['epoch']}, step {event['global_step']}; probes: {', '.join(event['probe_ids']) or '-'}")
        table = wandb.Table(columns=["event", "epoch", "global_step", "rule", "metric", "value", "threshold", "probe_ids"],
                            data=[[event["event"], event["epoch"], event["global_step"], event["rule"], event["metric"],
                                   event["value"], event["threshold"], ",".join(event["probe_ids"])]])
        self.run.log({"cam/alert_events": table, "trainer/global_step": event["global_step"]})
        if event["event"] == "fired":
            self.run.alert(title=f"cam_monitor: {event['rule']}", text=text, level=wandb.AlertLevel.WARN)


class FileSink:
    """PNG files under a folder: ``probe_grid_e<epoch>_s<step>.png`` per evaluation, and the latest
    ``trends.png`` and ``filmstrip.png``."""

    name = "files"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def log_evaluation(self, ev: Evaluation, panel: Panel) -> None:
        save_png(panel.grid, self.folder / f"probe_grid_e{ev.epoch:03d}_s{ev.global_step:07d}.png")
        for tag, image in panel.extra_images().items():
            save_png(image, self.folder / f"{tag}.png")

    def log_alert(self, event: dict[str, Any]) -> None:
        """Alerts always go to :class:`AlertLog`; nothing more to write here."""


def _hwc(image: torch.Tensor) -> Any:
    """(3, H, W) float [0, 1] -> (H, W, 3) uint8 numpy, what wandb.Image expects."""
    return (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def alert_key(event: dict[str, Any]) -> tuple:
    """Identity of an alert line: the same event re-emitted after a resume has the same key."""
    return (event.get("event"), event.get("rule"), int(event.get("global_step", -1)), int(event.get("epoch", -1)))


class AlertLog:
    """Append-only ``alerts.jsonl``: one flushed JSON object a line, never a duplicate.

    On first use the existing file is read; a torn last line (from a process killed mid-write)
    is detected, reported through :attr:`repaired` and dropped by rewriting the file atomically.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._keys: set[tuple] | None = None
        self.repaired = False

    def _load(self) -> set[tuple]:
        if self._keys is not None:
            return self._keys
        keys: set[tuple] = set()
        if self.path.exists():
            raw = self.path.read_bytes()
            lines = raw.split(b"\n")
            good: list[bytes] = []
            for line in lines:
                if not line.strip():
                    continue
                try:
                    keys.add(alert_key(json.loads(line)))
                    good.append(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    self.repaired = True
            if self.repaired or (raw and not raw.endswith(b"\n")):
                with atomic_path(self.path) as tmp:
                    tmp.write_bytes(b"".join(g + b"\n" for g in good))
        self._keys = keys
        return keys

    def read(self) -> list[dict[str, Any]]:
        """Every intact line of the file, in order."""
        self._load()
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, event: dict[str, Any]) -> bool:
        """Write ``event`` unless an identical one is already there; return whether it was written."""
        keys = self._load()
        key = alert_key(event)
        if key in keys:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())
        keys.add(key)
        return True
