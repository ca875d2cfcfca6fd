"""What the monitor costs: one full evaluation vs an inference forward, and training overhead.

1. ResNet-18 (random weights), 64 probes at 224 px (smooth random images): an inference-mode forward of the batch vs
   one full monitor evaluation (CAM pass + metrics + rendering + TensorBoard write), with and
   without the faithfulness forward; tiles at the monitor's default 128 px; interleaved rounds,
   median/min/max.
2. The demo's shortcut fit (Decoy Digits, 6 epochs) with the monitor on every epoch vs off,
   alternating runs; wall time of ``trainer.fit``.

    python benchmarks/bench_monitor.py [--repeats 5] [--fit-repeats 3]

Prints Markdown tables and writes ``benchmarks/results/monitor_<device>.json``.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torchvision
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import default_result_path, machine, time_interleaved, write_json  # noqa: E402

import cam_monitor as cm  # noqa: E402
from cam_monitor.render import probe_tiles, tile_grid  # noqa: E402
from cam_monitor.evaluation import EvalSettings, Placement, evaluate  # noqa: E402
from cam_monitor.publisher import Publisher  # noqa: E402
from cam_monitor.report import Panel  # noqa: E402
from cam_monitor.sinks import TensorBoardSink  # noqa: E402


def monitor_evaluation(repeats: int, device: torch.device, n: int = 64, size: int = 224) -> dict:
    """Table 1: forward vs full evaluation on ``n`` probes."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().to(device)
    g = torch.Generator().manual_seed(0)
    # Smooth random fields (14x14 noise, bilinear to 224 px): compressible like photographs. White
    # noise would not compress, and TensorBoard's pure-Python CRC of the event record would then
    # add about 0.6 s for the 64-tile grid.
    coarse = torch.randn(n, 3, 14, 14, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    spur = torch.zeros(n, size, size, dtype=torch.bool)
    spur[:, :32, :32] = True
    obj = torch.zeros(n, size, size, dtype=torch.bool)
    obj[:, 56:168, 56:168] = True
    probes = cm.ProbeSet(images, torch.randint(0, 1000, (n,), generator=g), spur, obj,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    batch = images.to(device)
    writer = SummaryWriter(tempfile.mkdtemp(prefix="cam_bench_tb_"))
    sink = TensorBoardSink(writer)
    state: dict = {"step": 0, "prev": None, "ref": None}

    def forward():
        with torch.inference_mode():
            model(batch)

    def measure(faithfulness: bool):
        ev = evaluate(model, probes, EvalSettings("layer4", batch_size=n, faithfulness=faithfulness),
                      Placement(device=device), epoch=0, global_step=state["step"], previous=state["prev"],
                      reference=state["ref"])
        state["step"] += 1
        state["prev"] = ev.maps
        state["ref"] = state["ref"] if state["ref"] is not None else ev.as_reference()
        return ev

    def draw_and_write(ev) -> None:
        tiles = probe_tiles(probes.display_images(), ev.maps, ids=probes.ids, labels=probes.labels.tolist(),
                            preds=ev.preds.tolist(), scores=ev.probs.tolist(),
                            spurious_energy=ev.per_probe["spurious_energy"].tolist(),
                            spurious_masks=spur, object_masks=obj, tile_size=128)
        sink.log_evaluation(ev, Panel(tile_grid(tiles), tiles, None, probes.ids, probes.labels.tolist()))

    def full(faithfulness: bool):
        def run():
            draw_and_write(measure(faithfulness))
        return run

    worker = Publisher(background=True)
    blocking: list[float] = []

    def queued():
        """The default monitor: the caller waits for the pass and the metrics, the worker draws."""
        def run():
            start = time.perf_counter()
            ev = measure(True)
            worker.submit("render", lambda: draw_and_write(ev))
            blocking.append(time.perf_counter() - start)
            worker.drain()  # timed as part of the round: blocking + background = the whole evaluation
        return run

    names = {"forward": "inference forward (64 x 224)", "nofaith": "monitor evaluation, no faithfulness",
             "default": "monitor evaluation (default, + faithfulness forward)",
             "queued": "same, pictures on the background worker: whole evaluation"}
    times = time_interleaved({names["forward"]: forward, names["nofaith"]: full(False), names["default"]: full(True),
                              names["queued"]: queued()}, repeats, device)
    worker.close()
    writer.close()
    times["same: blocking part (what the training loop waits for)"] = blocking[1:]  # [0] was the warm-up
    times["same: background part (on the worker)"] = [t - b for t, b in zip(times[names["queued"]], blocking[1:])]
    base = statistics.median(times[names["forward"]])
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                   "x_forward": statistics.median(t) / base} for name, t in times.items()}


def demo_fit_seconds(monitor: str, epochs: int, root: str) -> float:
    """Wall time of the demo's shortcut fit: ``monitor`` is "off", "sync" (pictures on the training
    thread) or "background" (pictures on the monitor's worker thread, the default)."""
    from cam_monitor.demo.model import DecoyDigitsDataModule, DigitClassifier

    L.seed_everything(0, verbose=False)
    data = DecoyDigitsDataModule("shortcut")
    data.setup()
    callbacks = [cm.CAMMonitor(target_layer="net.features", num_probes=20, tile_size=96, alert_action="log",
                               background=monitor == "background")] if monitor != "off" else []
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, logger=L.pytorch.loggers.TensorBoardLogger(root),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root)
    start = time.perf_counter()
    trainer.fit(DigitClassifier(), data)
    return time.perf_counter() - start


def training_overhead(repeats: int, epochs: int) -> dict:
    """Table 2: interleaved fits without the monitor, with it drawing on the training thread, and
    with its pictures on the background worker (the default); medians and the overhead."""
    names = {"off": "monitor off", "sync": "monitor every epoch, pictures on the training thread",
             "background": "monitor every epoch, pictures in the background (default)"}
    runs: dict[str, list[float]] = {name: [] for name in names.values()}
    demo_fit_seconds("off", 1, tempfile.mkdtemp())  # warm-up: imports, data build
    for r in range(repeats):
        order = list(names) if r % 2 == 0 else list(reversed(names))
        for variant in order:
            runs[names[variant]].append(demo_fit_seconds(variant, epochs, tempfile.mkdtemp(prefix="cam_bench_fit_")))
    off = statistics.median(runs[names["off"]])
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                   "x_forward": statistics.median(t) / off} for name, t in runs.items()}


def print_table(title: str, rows: dict, ratio_name: str) -> None:
    print(f"\n### {title}\n")
    print(f"| variant | median s | min s | max s | {ratio_name} |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | {r['x_forward']:.2f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fit-repeats", type=int, default=3, help="0 skips the training-overhead table")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = torch.device(args.device)
    result = {"machine": machine(), "device": str(device)}
    print(f"machine: {result['machine']}; device {device}")
    result["evaluation"] = monitor_evaluation(args.repeats, device)
    print_table("One monitor evaluation, ResNet-18 layer4, 64 probes at 224 px", result["evaluation"], "x forward")
    if args.fit_repeats > 0:
        result["training"] = training_overhead(args.fit_repeats, args.epochs)
        print_table(f"Demo shortcut fit, {args.epochs} epochs, TensorBoard logger", result["training"], "x off")
    write_json(result, args.out or default_result_path("monitor", device))


if __name__ == "__main__":
    main()
