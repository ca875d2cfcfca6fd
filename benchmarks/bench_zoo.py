"""The shortcut zoo with NO masks: does the default monitor find each shortcut, and stay quiet on controls?

For every task of ``cam_monitor.demo.data.CUES`` and every seed: one fit where the cue codes the
label (shortcut) and one where it is random (control), the default ``CAMMonitor`` on every epoch
with mask-free probes (``cam_monitor.demo.zoo``). Ground truth: accuracy with matched cues minus
accuracy with random cues. Reports per task: detection rate on shortcut runs (a
``shortcut_confirmed`` alert: the drift rules fire on maps that move, which is no detection),
detections by the epoch after the gap passes 0.2, alerts still active at the last epoch while the
gap is still >= 0.2, false alarms on controls (runs with any alert, and fired alerts per control
evaluation beside the stated alpha), the first ``shortcut_confirmed`` epoch next to the epoch the
gap passes 0.2 (every rule that fired is in the JSON), and what the discovery
costs per evaluation (pasted images, seconds, ratio to one inference forward of the probe set;
medians of interleaved repeats on the last model).

    python benchmarks/bench_zoo.py [--seeds 5] [--epochs 6] [--base shapes] [--global-test]
    python benchmarks/bench_zoo.py --degradation jpeg90   # every image JPEG-compressed after its cue is drawn
    python benchmarks/bench_zoo.py --degradation noise0.02 --exact-keys   # the recurring test without tolerant keys
    python benchmarks/bench_zoo.py --cues ruler --unturned   # the recurring test without turned partners
    python benchmarks/bench_zoo.py --merge a.json b.json --out all.json   # runs split over processes
    python benchmarks/bench_zoo.py --merge all.json --replay arm_mean --out old.json  # same runs, older statistic

Prints a Markdown table and writes ``benchmarks/results/zoo_cpu.json``, rewritten after every fit so
a campaign stopped part-way keeps its fits (without the cost, measured after the last).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import default_result_path, machine, time_interleaved, write_json  # noqa: E402

from cam_monitor.demo.data import BASES, CUES, check_degradation  # noqa: E402
from cam_monitor.demo.zoo import ZooRecord, ZooRun, replayed, run_task  # noqa: E402
from cam_monitor.discovery import DiscoverySettings, discover  # noqa: E402
from cam_monitor.engine import class_scores  # noqa: E402


def discovery_cost(run: ZooRun, repeats: int) -> dict:
    """Seconds of the confirmation (given the maps) vs an inference forward of the probe set, on the
    run's model, the pasted images classified in chunks of the monitor's ``batch_size`` as the monitor does."""
    monitor = run.monitor
    ev, probes = monitor.last_evaluation, monitor.probes
    model = run.model
    settings, chunk = monitor.settings.discovery, monitor.settings.batch_size

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([class_scores(model, x[i:i + chunk]) for i in range(0, len(x), chunk)])

    def forward() -> None:
        predict(probes.images)

    def confirm() -> None:
        discover(ev.maps, probes, probes.labels, ev.preds, predict, settings, step=1)

    times = time_interleaved({"forward": forward, "discovery": confirm}, repeats, torch.device("cpu"))
    found = discover(ev.maps, probes, probes.labels, ev.preds, predict, settings, step=1)
    fwd, disc = statistics.median(times["forward"]), statistics.median(times["discovery"])
    return {"pasted_images": found.pasted, "probes": len(probes), "forward_s": fwd,
            "discovery_s": disc, "ratio": disc / fwd}


@dataclass
class SavedRun(ZooRecord):
    """A run read back from a result file: its record and whether its alert was active at the end."""

    active_at_end: bool = False


#: What every file ``--merge`` joins must share, with the value of a file that predates the key.
SETTINGS = (("arch", "cnn"), ("base", "digits"), ("epochs", None), ("global_test", False), ("record_pairs", None),
            ("masks", False), ("object_masks", False), ("degradation", "clean"), ("recurring_tolerant", True),
            ("recurring_turned", False))


def load_alike(paths: list[str], settings: tuple[tuple[str, object], ...]) -> list[dict]:
    """The result files at ``paths``, refused (SystemExit) unless they agree on every key of
    ``settings`` (key, value of a file without it): one table holds runs of one setting, and a
    merged file would otherwise carry the first file's label for all."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    for key, default in settings:
        values = {str(r.get(key, default)) for r in results}
        if len(values) > 1:
            raise SystemExit(f"--merge: the files differ in {key} ({', '.join(sorted(values))}); one table holds runs "
                             f"of one setting: merge each {key} separately")
    return results


def merge(paths: list[str]) -> tuple[list[SavedRun], list[dict]]:
    """The runs of several result files (seeds or tasks split over processes), and the files."""
    results = load_alike(paths, SETTINGS)
    runs = [SavedRun(r["task"], r["variant"], r["seed"], r["epochs"], r["alerts"], r["active_at_end"])
            for result in results for r in result["runs"]]
    return runs, results


def arm_mean(row: dict) -> float:
    """The statistic before the ``all`` stream: the mean of the e-detectors of the arms that ran."""
    arms = list(row["evidence_pairs"])
    return sum(math.exp(row["evidence_streams"].get(a, 0.0)) for a in arms) / max(1, len(arms))


#: Statistics a recorded run can be replayed under (``--replay``): name -> value of one row.
REPLAYS = {"arm_mean": arm_mean}


def replay(run: SavedRun, statistic: str) -> SavedRun:
    """``run`` with its ``shortcut_confirmed`` alert replayed under :data:`REPLAYS` ``[statistic]``
    from its recorded evidence (the other rules' alerts kept as they were)."""
    first, active = replayed(run.rows, REPLAYS[statistic])
    kept = [a for a in run.alerts if a["rule"] != "shortcut_confirmed"]
    fired = [] if first is None else [{"epoch": first, "rule": "shortcut_confirmed", "replayed": statistic}]
    return SavedRun(run.cue, run.variant, run.seed, run.rows, kept + fired, active)


def summarise(runs: list[ZooRun] | list[SavedRun]) -> list[dict]:
    rows = []
    for cue in dict.fromkeys(r.cue for r in runs):
        shortcut = [r for r in runs if r.cue == cue and r.variant == "shortcut"]
        control = [r for r in runs if r.cue == cue and r.variant == "control"]
        detected = [r for r in shortcut if r.confirmed_epoch is not None]  # other rules fire on moving maps too
        in_time = [r for r in detected if r.gap_epoch is None or r.confirmed_epoch <= r.gap_epoch + 1]
        still_cheating = [r for r in shortcut if r.rows[-1]["accuracy_gap"] >= 0.2]
        control_evals = sum(len(r.rows) for r in control)
        control_alerts = sum(len(r.alerts) for r in control)
        rows.append({
            "task": cue, "seeds": len(shortcut), "controls": len(control),
            "detected": len(detected), "detected_by_next_epoch": len(in_time),
            "still_cheating_at_end": len(still_cheating),
            "active_at_end": sum(1 for r in still_cheating if r.active_at_end),
            "false_alarms": sum(1 for r in control if r.alerts),
            "control_evaluations": control_evals,
            "control_alerts": control_alerts,
            "false_alarm_rate_per_evaluation": control_alerts / max(1, control_evals),
            "first_alert_epochs": [r.confirmed_epoch for r in shortcut],
            "gap_passes_0.2_epochs": [r.gap_epoch for r in shortcut],
            "final_gap": [round(r.rows[-1]["accuracy_gap"], 3) for r in shortcut],
            "rules_fired": sorted({a["rule"] for r in shortcut + control for a in r.alerts}),
            "control_rules_fired": sorted({a["rule"] for r in control for a in r.alerts}),
        })
    return rows


def pooled_false_alarms(rows: list[dict]) -> tuple[int, int]:
    """Alerts fired on control runs and control evaluations, summed over the tasks: the rate is their
    ratio, not the mean of the tasks' rates (tasks with fewer control runs would weigh as much)."""
    return sum(r["control_alerts"] for r in rows), sum(r["control_evaluations"] for r in rows)


def print_table(rows: list[dict], cost: dict | None) -> None:
    print("\n| task | detected (shortcut runs) | by the epoch after gap > 0.2 | active at the end (gap still >= 0.2) | "
          "false alarms (controls) | first shortcut_confirmed epoch | gap > 0.2 epoch |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda xs: ", ".join("-" if x is None else str(x) for x in xs)  # noqa: E731
        print(f"| {r['task']} | {r['detected']}/{r['seeds']} | {r['detected_by_next_epoch']}/{r['seeds']} | "
              f"{r['active_at_end']}/{r['still_cheating_at_end']} | {r['false_alarms']}/{r['controls']} | "
              f"{fmt(r['first_alert_epochs'])} | {fmt(r['gap_passes_0.2_epochs'])} |")
    alerts, evaluations = pooled_false_alarms(rows)
    print(f"\nfalse alarms per control evaluation: {alerts}/{evaluations} = {alerts / max(1, evaluations):.4f} "
          f"(stated alpha {DiscoverySettings().alpha:g})")
    if cost is None:
        print("\ndiscovery cost per evaluation: not measured (a campaign stopped before its last fit)")
        return
    print(f"\ndiscovery cost per evaluation: {cost['pasted_images']} pasted images for {cost['probes']} probes, "
          f"{cost['discovery_s'] * 1e3:.1f} ms vs {cost['forward_s'] * 1e3:.1f} ms for one inference forward of the "
          f"probe set (ratio {cost['ratio']:.2f}; the pasted images alone are {cost['pasted_images'] / cost['probes']:.3g} "
          "probe sets)")


def checked_degradation(how: str) -> str:
    """``--degradation`` as given, refused with the forms it takes unless
    :func:`~cam_monitor.demo.data.check_degradation` reads it."""
    try:
        check_degradation(how)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return how


def add_fit_arguments(p: argparse.ArgumentParser, seeds: int) -> None:
    """The zoo fits a benchmark runs (``--seeds`` from ``--first-seed``, ``--epochs``, ``--arch``,
    ``--base``, ``--cues``, ``--degradation``) and ``--merge``, which joins result files split over
    processes instead."""
    p.add_argument("--seeds", type=int, default=seeds)
    p.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--arch", default="cnn", choices=("cnn", "resnet18"), help="the model trained on each task")
    p.add_argument("--base", default="digits", choices=BASES, help="the images the cues go over (digits: 32 px grey; "
                   "shapes: drawn shapes on varied backgrounds, 64 px colour)")
    p.add_argument("--cues", default=",".join(CUES), help="comma-separated zoo tasks (default: all)")
    p.add_argument("--degradation", default="clean", type=checked_degradation,
                   help="every image (train, validation, probes, test) after its cue is drawn: clean, noiseS "
                        "(Gaussian noise of S times the value range) or jpegQ (JPEG at quality Q)")
    p.add_argument("--merge", nargs="+", default=None, help="result files to combine into one table (no runs)")
    p.add_argument("--masks", action="store_true",
                   help="give the monitor the true cue masks as spurious masks (the marked arm and the mask rules run)")
    p.add_argument("--object-masks", action="store_true",
                   help="give the monitor the true object masks (the object rules run: object_enrichment_floor, "
                        "drift_off_object's object branch)")
    p.add_argument("--record-pairs", type=int, default=None, metavar="N",
                   help="every arm draws N pairs an evaluation, in one stage (DiscoverySettings(first_stage=1.0)): "
                        "a recording that bench_allocation.py replays under any sharing of the pairs (its alerts "
                        "are not the default monitor's)")


def recording(pairs: int | None, num_probes: int = 64, **settings: bool) -> DiscoverySettings | None:
    """The discovery settings of a ``--record-pairs`` run: one stage, a budget that gives each arm
    ``pairs`` pairs (:func:`~cam_monitor.discovery.arm_shares` shares them equally) on ``num_probes``
    probes (the arms :attr:`~cam_monitor.discovery.DiscoverySettings.arms` names; where the
    recurring or the marked arm runs too, it takes an equal share and each arm gets fewer); None
    without a recording, and only the other ``settings`` when there are some."""
    if pairs is None:
        return DiscoverySettings(**settings) if settings else None
    if pairs < 1:
        raise SystemExit(f"--record-pairs must be >= 1, got {pairs}")
    arms = len(DiscoverySettings(**settings).arms)
    return DiscoverySettings(first_stage=1.0, budget=2 * pairs * arms / num_probes, **settings)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fit_arguments(p, seeds=5)
    p.add_argument("--global-test", action="store_true",
                   help="also run the opt-in background-spectrum arm (DiscoverySettings(global_test=True))")
    p.add_argument("--exact-keys", action="store_true",
                   help="the recurring test finds copies of the same pixels only "
                        "(DiscoverySettings(recurring_tolerant=False)): the tolerant keys' share of a detection")
    p.add_argument("--unturned", action="store_true",
                   help="the recurring test finds copies at the same orientation only "
                        "(DiscoverySettings(recurring_turned=False)): the turned partners' share of a detection")
    p.add_argument("--repeats", type=int, default=20, help="interleaved repeats of the cost measurement")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/zoo_cpu.json)")
    p.add_argument("--replay", choices=sorted(REPLAYS), default=None,
                   help="with --merge: replay every run's shortcut_confirmed under another statistic of its "
                        "recorded evidence (arm_mean: the arms' mean alone, the statistic before the all stream)")
    args = p.parse_args()
    if args.replay and not args.merge:
        p.error("--replay needs --merge (it restates recorded runs)")
    if args.merge:
        saved, results = merge(args.merge)
        if args.replay:
            saved = [replay(r, args.replay) for r in saved]
        first, rows = results[0], summarise(saved)
        cost = next((r["cost"] for r in results if r.get("cost")), None)  # a file stopped part-way has none
        print_table(rows, cost)
        write_json({"machine": first["machine"], **{key: first.get(key, default) for key, default in SETTINGS},
                    "seeds": sorted({r.seed for r in saved}), "tasks": rows,
                    "cost": cost, "merged_from": [Path(p).name for p in args.merge],
                    "replayed_under": args.replay,
                    "runs": [r for result in results for r in result["runs"]] if not args.replay else
                    [{"task": r.cue, "variant": r.variant, "seed": r.seed, "alerts": r.alerts,
                      "active_at_end": r.active_at_end} for r in saved]},
                   args.out or default_result_path("zoo", torch.device("cpu")))
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runs: list[ZooRun] = []
    start = time.perf_counter()
    out = args.out or default_result_path("zoo", torch.device("cpu"))

    def result(cost: dict | None) -> dict:
        return {"machine": machine(), "arch": args.arch, "base": args.base, "epochs": args.epochs,
                "global_test": args.global_test, "record_pairs": args.record_pairs, "masks": args.masks,
                "object_masks": args.object_masks, "degradation": args.degradation,
                "recurring_tolerant": not args.exact_keys, "recurring_turned": not args.unturned,
                "seeds": sorted({r.seed for r in runs}), "tasks": summarise(runs), "cost": cost,
                "runs": [{"task": r.cue, "variant": r.variant, "seed": r.seed, "alerts": r.alerts, "epochs": r.rows,
                          "active_at_end": r.active_at_end} for r in runs],
                "wall_s": time.perf_counter() - start}

    with tempfile.TemporaryDirectory(prefix="cam_zoo_") as root:
        chosen = {**({"global_test": True} if args.global_test else {}),
                  **({"recurring_tolerant": False} if args.exact_keys else {}),
                  **({"recurring_turned": False} if args.unturned else {})}
        discovery = recording(args.record_pairs, **chosen)
        extra = {"discovery": discovery} if discovery is not None else {}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for cue in args.cues.split(","):
                for variant in ("shortcut", "control"):
                    run = run_task(cue, variant, seed, args.epochs, f"{root}/{cue}_{variant}_{seed}", arch=args.arch,
                                   base=args.base, spurious_masks=args.masks, object_masks=args.object_masks,
                                   degradation=args.degradation, **extra)
                    runs.append(run)
                    print(f"{cue:>18} {variant:>8} seed {seed}: gap > 0.2 at epoch {run.gap_epoch}, alerts "
                          f"{[(a['epoch'], a['rule']) for a in run.alerts]}", flush=True)
                    write_json(result(None), out, say=False)  # a campaign stopped part-way keeps its fits
        cost = discovery_cost(next(r for r in reversed(runs) if r.variant == "shortcut"),
                              args.repeats)
    print_table(summarise(runs), cost)
    write_json(result(cost), out)


if __name__ == "__main__":
    main()
