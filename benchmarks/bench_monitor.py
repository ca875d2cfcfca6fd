"""What the monitor costs: one full evaluation vs an inference forward, and training overhead.

1. ResNet-18 (random weights), 64 probes at 224 px (smooth random images): an inference-mode forward of the batch vs
   one full evaluation of ``cam_monitor.Monitor`` (CAM pass + metrics + discovery + rules + rendering + TensorBoard
   write), with and without the faithfulness forward; the pictures the default monitor draws (the first 32 probes'
   grid at 128 px, the filmstrip of 4 probes, per-probe scalars); interleaved rounds, median/min/max.
   The same table times mask-free discovery at its default budget (budget x 64 pasted or swapped images), given the maps.
2. Throughput: probes per second of the default evaluation's blocking part on 1,024 probes.
3. The background worker's effect on the training thread: training steps of the demo CNN with the
   worker idle vs drawing pictures all the time (interleaved rounds), with torch on every core and
   again with one core left free (what remains then is the GIL, not the cores).
4. The demo's shortcut fit (Decoy Digits, 6 epochs) with the monitor on every epoch vs off,
   alternating runs; wall time of ``trainer.fit``.

    python benchmarks/bench_monitor.py [--repeats 5] [--fit-repeats 3] [--throughput-probes 1024]

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import default_result_path, machine, sync, time_interleaved, write_json  # noqa: E402

import cam_monitor as cm  # noqa: E402
from cam_monitor.history import History  # noqa: E402
from cam_monitor.discovery import DiscoverySettings, discover  # noqa: E402
from cam_monitor.engine import class_scores  # noqa: E402
from cam_monitor.evaluation import EvalSettings, Placement, evaluate  # noqa: E402
from cam_monitor.publisher import Publisher  # noqa: E402
from cam_monitor.report import ReportSettings, build_panel  # noqa: E402
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
    placement = Placement(device=device)
    monitors: list[cm.Monitor] = []

    def default_monitor(faithfulness: bool, background: bool) -> cm.Monitor:
        """The default monitor (discovery on, the grid of the first 32 probes at 128 px, the
        filmstrip of 4 probes, per-probe scalars) writing one TensorBoard event file."""
        mon = cm.Monitor("layer4", probes, cams=cm.CAMSettings(batch_size=n, faithfulness=faithfulness),
                         alerting=cm.AlertSettings(action="log"))
        folder = tempfile.mkdtemp(prefix="cam_bench_tb_")
        mon.open(folder, [TensorBoardSink(folder)], background=background)
        mon.prepare(model, placement)
        monitors.append(mon)
        return mon

    def forward():
        with torch.inference_mode():
            model(batch)

    def full(faithfulness: bool):
        mon, step = default_monitor(faithfulness, background=False), iter(range(10**6))

        def run():
            mon.evaluate(model, placement, epoch=0, step=next(step))
        return run

    blocking: dict[bool, list[float]] = {True: [], False: []}

    def queued(faithfulness: bool = True):
        """The default monitor on an accelerator: the caller waits for the pass and the metrics, the worker draws."""
        mon, step = default_monitor(faithfulness, background=True), iter(range(10**6))

        def run():
            start = time.perf_counter()
            mon.evaluate(model, placement, epoch=0, step=next(step))
            blocking[faithfulness].append(time.perf_counter() - start)
            mon.outputs.publisher.drain()  # timed as part of the round: blocking + background = the whole evaluation
        return run

    state: dict = {}

    def discovery_full_budget():
        """Mask-free discovery at its default budget, every arm: budget x 64 pasted or swapped images
        for 64 probes (every probe a candidate, as if the model got 10 classes right)."""
        ev = state["last"] = state.get("last") or evaluate(model, probes, EvalSettings("layer4", batch_size=n),
                                                              placement)
        classes = torch.arange(n) % 10
        found = discover(ev.maps, probes, classes, classes, lambda x: class_scores(model, x.to(device)),
                         DiscoverySettings())
        budget = DiscoverySettings().budget * n
        assert budget - 2 * len(DiscoverySettings().arms) < found.pasted <= budget

    names = {"forward": "inference forward (64 x 224)", "nofaith": "monitor evaluation, no faithfulness",
             "default": "monitor evaluation (default, + faithfulness forward)",
             "queued": "same, pictures on the background worker: whole evaluation",
             "queued_nofaith": "no faithfulness, pictures on the background worker: whole evaluation",
             "discovery": f"mask-free discovery at its default budget ({int(DiscoverySettings().budget * n)} pasted or "
                          "swapped images), given the maps"}
    times = time_interleaved({names["forward"]: forward, names["nofaith"]: full(False), names["default"]: full(True),
                              names["queued"]: queued(), names["queued_nofaith"]: queued(False),
                              names["discovery"]: discovery_full_budget}, repeats, device)
    for mon in monitors:
        mon.close()
    times["same: blocking part (what the training loop waits for)"] = blocking[True][1:]  # [0] was the warm-up
    times["same: background part (on the worker)"] = [t - b for t, b in zip(times[names["queued"]], blocking[True][1:])]
    times["no faithfulness: blocking part"] = blocking[False][1:]
    base = statistics.median(times[names["forward"]])
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                   "x_forward": statistics.median(t) / base} for name, t in times.items()}


def demo_fit_seconds(monitor: str, epochs: int, root: str) -> float:
    """Wall time of the demo's shortcut fit: ``monitor`` is "off", "sync" (pictures on the training
    thread) or "background" (pictures on the monitor's worker thread)."""
    from cam_monitor.demo.model import DecoyDigitsDataModule, DigitClassifier

    L.seed_everything(0, verbose=False)
    data = DecoyDigitsDataModule("shortcut")
    data.setup()
    callbacks = [cm.CAMMonitor("net.features", probe_settings=cm.ProbeSettings(num_probes=20),
                               alerting=cm.AlertSettings(action="log"),
                               pictures=cm.PictureSettings(tile_size=96, background=monitor == "background"))
                 ] if monitor != "off" else []
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, logger=L.pytorch.loggers.TensorBoardLogger(root),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root)
    start = time.perf_counter()
    trainer.fit(DigitClassifier(), data)
    return time.perf_counter() - start


def training_overhead(repeats: int, epochs: int) -> dict:
    """Table 2: interleaved fits without the monitor, with it drawing on the training thread, and
    with its pictures on the background worker (the default); medians and the overhead."""
    names = {"off": "monitor off",
             "sync": "monitor every epoch, pictures on the training thread (background=False; the default 'auto' on a CPU)",
             "background": "monitor every epoch, pictures on the worker (background=True; 'auto' on a GPU)"}
    runs: dict[str, list[float]] = {name: [] for name in names.values()}
    demo_fit_seconds("off", 1, tempfile.mkdtemp())  # warm-up: imports, data build
    for r in range(repeats):
        order = list(names) if r % 2 == 0 else list(reversed(names))
        for variant in order:
            runs[names[variant]].append(demo_fit_seconds(variant, epochs, tempfile.mkdtemp(prefix="cam_bench_fit_")))
    off = statistics.median(runs[names["off"]])
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                   "x_forward": statistics.median(t) / off} for name, t in runs.items()}


def worker_effect(repeats: int, steps: int = 20, threads: int | None = None) -> dict:
    """Table 3: what the background worker costs the training thread (the GIL, the cores).

    Time ``steps`` training steps of the demo CNN (batch 64) with the worker idle, and with it busy
    drawing and writing the demo monitor's pictures (64 probes, 96-px tiles, TensorBoard) the whole
    time; interleaved rounds. The ratio is what a step costs while pictures are being made.
    ``threads`` sets torch's intra-op threads for the run (fewer than the cores leaves one free for
    the worker: what remains of the slowdown is the GIL, not the cores).
    """
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads or saved_threads)
    try:
        return _worker_effect(repeats, steps)
    finally:
        torch.set_num_threads(saved_threads)


def _worker_effect(repeats: int, steps: int) -> dict:
    from cam_monitor.demo.data import make_decoy_digits
    from cam_monitor.demo.model import DigitClassifier

    torch.manual_seed(0)
    data = make_decoy_digits(0)
    model = DigitClassifier()
    opt = model.configure_optimizers()
    x, y = data.train_shortcut.images[:64], data.train_shortcut.labels[:64]
    probes = cm.ProbeSet.from_dataset(data.val, num_probes=64, seed=0)
    history = History()
    ev = evaluate(model.net, probes, EvalSettings("features"))
    history.record(ev, "fit", {})
    sink = TensorBoardSink(tempfile.mkdtemp(prefix="cam_bench_gil_"))
    settings = ReportSettings(tile_size=96)
    worker = Publisher(background=True)

    def train_steps() -> None:
        model.train()
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    busy = {"on": False}

    def keep_drawing() -> None:
        sink.log_evaluation(ev, build_panel(probes, ev, history, settings, trends=False))
        if busy["on"]:
            worker.submit("render", keep_drawing)

    def idle() -> None:
        train_steps()

    def drawing() -> None:
        busy["on"] = True
        worker.submit("render", keep_drawing)
        train_steps()
        busy["on"] = False
        worker.drain()

    draws: list[float] = []
    start = time.perf_counter()
    keep_drawing()
    draws.append(time.perf_counter() - start)
    times = time_interleaved({"idle": idle, "drawing": drawing}, repeats, torch.device("cpu"))
    worker.close()
    sink.close()
    base = statistics.median(times["idle"])
    names = {"idle": f"{steps} training steps, worker idle",
             "drawing": f"{steps} training steps, worker drawing the pictures all the time"}
    out = {names[k]: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                      "x_forward": statistics.median(t) / base} for k, t in times.items()}
    out["one picture set (64 tiles + filmstrip, TensorBoard), drawn alone"] = {
        "median_s": draws[0], "min_s": draws[0], "max_s": draws[0], "x_forward": float("nan")}
    return out


def throughput(n: int, device: torch.device, size: int = 224, batch: int = 64) -> dict:
    """Table 4: probes per second of one default evaluation (the part the training loop waits for:
    CAM pass, faithfulness forward, discovery, metrics) on ``n`` probes, ResNet-18 at ``size`` px,
    in chunks of ``batch``; and of the inference forward alone over the same probes."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().to(device)
    g = torch.Generator().manual_seed(1)
    coarse = torch.randn(n, 3, 14, 14, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    probes = cm.ProbeSet(images, torch.randint(0, 1000, (n,), generator=g))

    def forward() -> None:
        with torch.inference_mode():
            for start in range(0, n, batch):
                model(images[start:start + batch].to(device))

    def evaluation() -> None:
        evaluate(model, probes, EvalSettings("layer4", batch_size=batch), Placement(device=device))

    out = {}
    for name, fn in (("inference forward", forward), ("default evaluation (blocking part)", evaluation)):
        if device.type == "cuda":  # warm-up on a GPU; on a CPU one pass is long enough
            fn()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        seconds = time.perf_counter() - start
        out[f"{name}, {n} probes"] = {"seconds": seconds, "probes_per_s": n / seconds}
    return out


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
    p.add_argument("--throughput-probes", type=int, default=1024, help="0 skips the throughput table")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = torch.device(args.device)
    result = {"machine": machine(), "device": str(device)}
    print(f"machine: {result['machine']}; device {device}")
    result["evaluation"] = monitor_evaluation(args.repeats, device)
    print_table("One monitor evaluation, ResNet-18 layer4, 64 probes at 224 px", result["evaluation"], "x forward")
    if args.throughput_probes > 0:
        result["throughput"] = throughput(args.throughput_probes, device)
        print("\n### Throughput, ResNet-18 layer4 at 224 px, chunks of 64\n")
        print("| what | seconds | probes/s |\n|---|---:|---:|")
        for name, r in result["throughput"].items():
            print(f"| {name} | {r['seconds']:.2f} | {r['probes_per_s']:.1f} |")
    result["worker"] = worker_effect(args.repeats)
    print_table(f"The background worker's effect on training steps (demo CNN, batch 64, {torch.get_num_threads()} "
                "threads)", result["worker"], "x idle")
    if torch.get_num_threads() > 1:
        result["worker_free_core"] = worker_effect(args.repeats, threads=torch.get_num_threads() - 1)
        print_table(f"Same, training on {torch.get_num_threads() - 1} thread(s): a core left free for the worker",
                    result["worker_free_core"], "x idle")
    if args.fit_repeats > 0:
        result["training"] = training_overhead(args.fit_repeats, args.epochs)
        print_table(f"Demo shortcut fit, {args.epochs} epochs, TensorBoard logger", result["training"], "x off")
    write_json(result, args.out or default_result_path("monitor", device))


if __name__ == "__main__":
    main()
