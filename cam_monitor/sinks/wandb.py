"""Weights & Biases: images, a per-probe ``wandb.Table`` and ``run.alert`` for fired alerts."""
from __future__ import annotations

from typing import Any

import torch

from .base import Sink
from ..alerts import describe_alert
from ..render import to_uint8
from ..records import AlertEvent, Evaluation, Panel
from .tensorboard import curve_tag

ALERT_COLUMNS = ["event", "epoch", "global_step", "rule", "metric", "value", "threshold", "probe_ids"]


def _hwc(image: torch.Tensor) -> Any:
    """(3, H, W) float [0, 1] -> (H, W, 3) uint8 numpy, what ``wandb.Image`` expects."""
    return to_uint8(image).permute(1, 2, 0).numpy()


#: Captions of the pictures besides the probe grid.
CAPTIONS = {"filmstrip": "the first probes (rows) at the last evaluations (left to right)",
            "trends": "per-probe metric curves (thin) and their mean (thick)"}
#: The masks W&B draws as overlays the user can toggle, with their legend.
MASK_LABELS = {"spurious": "spurious mask", "object": "object mask", "inferred": "inferred shortcut"}


def overlay_image(panel: Panel, i: int) -> Any:
    """Probe ``i``'s heatmap overlay as a ``wandb.Image`` with its masks as native, toggleable
    overlays and the inferred shortcut region also as a box."""
    import wandb
    from torchvision.ops import masks_to_boxes

    image = panel.overlays[i] if panel.overlays is not None else panel.tiles[i]
    masks = {kind: {"mask_data": m[i].to(torch.uint8).numpy(), "class_labels": {0: "background", 1: MASK_LABELS[kind]}}
             for kind, m in panel.masks.items() if bool(m[i].any())}
    boxes = None
    inferred = panel.masks.get("inferred")
    if inferred is not None and bool(inferred[i].any()):
        x0, y0, x1, y1 = (int(v) for v in masks_to_boxes(inferred[i][None])[0].tolist())
        boxes = {"inferred": {"box_data": [{"position": {"minX": x0, "minY": y0, "maxX": x1 + 1, "maxY": y1 + 1},
                                            "domain": "pixel", "class_id": 1, "box_caption": MASK_LABELS["inferred"]}],
                              "class_labels": {1: MASK_LABELS["inferred"]}}}
    return wandb.Image(_hwc(image), masks=masks or None, boxes=boxes)


class WandbSink(Sink):
    """Logs to a ``wandb`` run; keys start with ``prefix`` (``cam/probe_grid``, ``cam/probes``).

    Per-probe curves go as scalars (``cam_probes/<metric>/<probe id>``, W&B plots them) instead of
    a rendered figure.
    """

    name = "wandb"
    draws_curves = True

    def __init__(self, run: Any, prefix: str = "cam") -> None:
        self.run, self.prefix = run, prefix
        self._events: Any = None
        self._rows: list[list[Any]] = []

    def where(self) -> str:
        """Where the pictures go, for the fit-start line."""
        return f"W&B run {getattr(self.run, 'name', None) or getattr(self.run, 'id', '?')}"

    def log_evaluation(self, ev: Evaluation, panel: Panel) -> None:
        import wandb

        metric_names = list(ev.per_probe)
        table = wandb.Table(columns=["probe_id", "label", "prediction", "probability", "overlay", *metric_names])
        for i, pid in enumerate(panel.ids):
            row = [pid, int(panel.labels[i]), int(ev.preds[i]), float(ev.probs[i]), overlay_image(panel, i)]
            table.add_data(*row, *[float(ev.per_probe[m][i]) for m in metric_names])
        p = self.prefix
        payload = {f"{p}/probe_grid": wandb.Image(_hwc(panel.grid), caption=f"epoch {ev.epoch} step {ev.global_step}"),
                   f"{p}/probes": table, "trainer/global_step": ev.global_step}
        for tag, image in panel.extra_images().items():
            payload[f"{p}/{tag}"] = wandb.Image(_hwc(image), caption=CAPTIONS.get(tag))
        for metric, values in panel.curves.items():
            payload.update({curve_tag(p, metric, probe_id): value for probe_id, value in values.items()})
        self.run.log(payload)

    def log_alert(self, event: AlertEvent) -> None:
        """One row more in the run's one table of alert events (the panel shows them all), the event
        in words, and a W&B alert when a rule fires."""
        import wandb

        columns = [*ALERT_COLUMNS, "summary"]
        row = [event[c] if c != "probe_ids" else ",".join(event[c]) for c in ALERT_COLUMNS] + [describe_alert(event)]
        self._rows.append(row)
        if self._events is None:
            try:
                self._events = wandb.Table(columns=columns, log_mode="INCREMENTAL")
            except TypeError:  # wandb < 0.19: no incremental tables; a new table of every row each time
                self._events = False
        if self._events is False:
            table = wandb.Table(columns=columns, data=[list(r) for r in self._rows])
        else:
            table = self._events
            table.add_data(*row)
        self.run.log({f"{self.prefix}/alert_events": table, "trainer/global_step": event["global_step"]})
        if event["event"] == "fired":
            self.run.alert(title=f"cam_monitor: {event['rule']}", text=describe_alert(event), level=wandb.AlertLevel.WARN)
