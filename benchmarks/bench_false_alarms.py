"""The stated false-alarm rate, measured: control fits only, many seeds, every zoo cue.

A control of the zoo (``cam_monitor.demo.zoo``) draws its cue at random, independent of the label,
so any alert the default mask-free ``CAMMonitor`` raises on it is a false alarm. The shortcut
statistic (``cam/shortcut_evidence``) is a fixed mixture of e-detectors, so under the null it
crosses ``1 / alpha`` within ``T`` evaluations with probability at most ``T * alpha`` (Ville's
inequality for the product started at each evaluation, a union over the ``T`` starts): the
stated rate ``alpha`` per evaluation is at most ``T * alpha`` per run of ``T`` evaluations. Runs
of different seeds are independent, so the measured per-run rate gets an exact one-sided
Clopper-Pearson bound; with no alarm in ``R`` runs that bound is ``1 - 0.05 ** (1 / R)``, at or
below ``T * alpha`` from about ``3 / (T * alpha)`` runs (500 for six evaluations at 1e-3).

    python benchmarks/bench_false_alarms.py --seeds 40 [--first-seed 0] [--base shapes] [--arch resnet18]
    python benchmarks/bench_false_alarms.py --seeds 40 --degradation noise0.02   # noisy images
    python benchmarks/bench_false_alarms.py --merge a.json b.json --out all.json   # runs split over processes

Prints per cue and base the control runs, their evaluations, the runs with any alert (the drift
rules included, which state no rate) and with ``shortcut_confirmed``, the highest evidence any of
them reached, then the totals: ``shortcut_confirmed``'s per-run rate beside the stated one; writes ``benchmarks/results/false_alarms_cpu.json`` (``--out`` for another file),
again after every run, so a long campaign stopped part-way keeps what it ran.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import default_result_path, machine, write_json  # noqa: E402
from bench_zoo import add_fit_arguments, load_alike, recording  # noqa: E402

from cam_monitor.demo.zoo import run_task  # noqa: E402
from cam_monitor.discovery import DiscoverySettings  # noqa: E402

#: What every file ``--merge`` joins must share (:func:`bench_zoo.load_alike`), with the value of a
#: file that predates the key (runs before the recurring test's turned partners); architectures and
#: bases may mix (the table groups by them).
SETTINGS = (("record_pairs", None), ("masks", False), ("object_masks", False), ("degradation", "clean"),
            ("recurring_turned", False))
#: The confidence of the stated bounds.
CONFIDENCE = 0.95


def upper_bound(events: int, trials: int, confidence: float = CONFIDENCE) -> float:
    """The exact one-sided Clopper-Pearson upper bound on a rate seen ``events`` times in
    ``trials`` independent trials: the ``p`` whose binomial tail P(X <= events) is ``1 - confidence``
    (bisection on the tail; 1.0 with no trials)."""
    if trials == 0 or events >= trials:
        return 1.0

    def tail(p: float) -> float:
        return sum(math.exp(math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1)
                            + k * math.log(p) + (trials - k) * math.log1p(-p)) for k in range(events + 1))

    low, high = events / trials, 1.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if tail(mid) > 1 - confidence else (low, mid)
    return high


def pair_string(diffs: list[float]) -> str | list[float]:
    """An evaluation's paired outcomes of one stream, in the order they were bet on, one character
    each (``+`` the candidate flipped and its control did not, ``-`` the reverse, ``0`` tied): what
    a replay of the evidence under another margin needs, in a compact form. A graded stream (the
    recurring arm's gains, :func:`~cam_monitor.discovery.settings.graded`) with any value in
    between stays a list of its values, to 4 places."""
    if all(d in (-1, 0, 1) for d in diffs):
        return "".join("0+-"[int(d)] for d in diffs)
    return [round(float(d), 4) for d in diffs]


def pair_diffs(encoded: str) -> list[int]:
    """The paired differences a :func:`pair_string` spells, in their order."""
    return [{"+": 1, "0": 0, "-": -1}[c] for c in encoded]


def record(run, base: str, arch: str) -> dict:
    """One control run as the JSON keeps it: its alerts (with each arm's evidence, which test fired),
    its evaluations, the evidence of each, each arm's excess (what broke a null, where one did) and
    each stream's paired differences (:func:`pair_string`)."""
    return {"task": run.cue, "base": base, "arch": arch, "seed": run.seed, "evaluations": len(run.rows),
            "alerts": [{"epoch": a["epoch"], "rule": a["rule"], "evidence_by_test": a.get("evidence_by_test", {})}
                       for a in run.alerts],
            "evidence": [r["cam/shortcut_evidence"] for r in run.rows],
            "excess": [{k.split("/")[1]: r[k] for k in r if k.endswith("flip_excess")} for r in run.rows],
            "pairs": [{arm: pair_string(d) for arm, d in r.get("evidence_pairs", {}).items()} for r in run.rows],
            "accuracy_gap": [round(r["accuracy_gap"], 3) for r in run.rows]}


def summarise(runs: list[dict], alpha: float) -> dict:
    """Per (base, arch, cue) and in total: runs, evaluations, runs with any alert and with
    ``shortcut_confirmed``, the highest evidence; the totals beside the stated rate."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["base"], r["arch"], r["task"]), []).append(r)

    def counts(rs: list[dict]) -> dict:
        return {"runs": len(rs), "evaluations": sum(r["evaluations"] for r in rs),
                "runs_with_any_alert": sum(1 for r in rs if r["alerts"]),
                "runs_with_shortcut_confirmed": sum(1 for r in rs if any(a["rule"] == "shortcut_confirmed"
                                                                         for a in r["alerts"])),
                "highest_evidence": max((max(r["evidence"], default=0.0) for r in rs), default=0.0)}

    total = counts(runs)
    per_run = max((r["evaluations"] for r in runs), default=0)
    confirmed = total["runs_with_shortcut_confirmed"]
    total.update({
        "alpha_per_evaluation": alpha,
        "stated_per_run": per_run * alpha,
        "measured_per_run": confirmed / max(1, total["runs"]),
        "upper_bound_per_run": upper_bound(confirmed, total["runs"]),
        "upper_bound_any_alert_per_run": upper_bound(total["runs_with_any_alert"], total["runs"]),
        "confidence": CONFIDENCE,
    })
    total["bound_at_or_below_stated"] = total["upper_bound_per_run"] <= total["stated_per_run"]
    return {"groups": [{"base": b, "arch": a, "task": t, **counts(rs)} for (b, a, t), rs in groups.items()],
            "total": total}


def print_table(summary: dict) -> None:
    print("\n| base | arch | task | control runs | evaluations | runs with an alert | shortcut_confirmed | "
          "highest evidence |")
    print("|---|---|---|---|---|---|---|---|")
    for g in summary["groups"]:
        print(f"| {g['base']} | {g['arch']} | {g['task']} | {g['runs']} | {g['evaluations']} | "
              f"{g['runs_with_any_alert']} | {g['runs_with_shortcut_confirmed']} | {g['highest_evidence']:.3g} |")
    t = summary["total"]
    print(f"\n{t['runs_with_shortcut_confirmed']} of {t['runs']} control runs ({t['evaluations']} evaluations) raised "
          f"shortcut_confirmed, {t['runs_with_any_alert']} any alert (exact {t['confidence']:.0%} upper bound "
          f"{t['upper_bound_any_alert_per_run']:.3g} per run); highest evidence {t['highest_evidence']:.3g} against "
          f"{1 / t['alpha_per_evaluation']:g}. shortcut_confirmed per run: measured {t['measured_per_run']:.3g}, "
          f"exact {t['confidence']:.0%} upper bound {t['upper_bound_per_run']:.3g}, stated at most "
          f"{t['stated_per_run']:.3g} (alpha {t['alpha_per_evaluation']:g} per evaluation): the bound is "
          f"{'at or below' if t['bound_at_or_below_stated'] else 'above'} the stated rate.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fit_arguments(p, seeds=40)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/false_alarms_cpu.json)")
    args = p.parse_args()
    alpha = DiscoverySettings().alpha
    out = args.out or default_result_path("false_alarms", torch.device("cpu"))
    if args.merge:
        results = load_alike(args.merge, SETTINGS)
        runs = [r for result in results for r in result["runs"]]
        summary = summarise(runs, alpha)
        print_table(summary)
        epochs = sorted({r["epochs"] for r in results})  # groups of several architectures may train for different epochs
        write_json({"machine": results[0]["machine"], "epochs": epochs[0] if len(epochs) == 1 else epochs,
                    **{key: results[0].get(key, default) for key, default in SETTINGS}, **summary,
                    "merged_from": [Path(f).name for f in args.merge], "runs": runs}, out)
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    runs: list[dict] = []
    start = time.perf_counter()
    discovery = recording(args.record_pairs)
    extra = {"discovery": discovery} if discovery is not None else {}
    with tempfile.TemporaryDirectory(prefix="cam_false_alarms_") as root:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for cue in args.cues.split(","):
                run = run_task(cue, "control", seed, args.epochs, f"{root}/{cue}_{seed}", arch=args.arch, base=args.base,
                               spurious_masks=args.masks, object_masks=args.object_masks,
                               degradation=args.degradation, **extra)
                runs.append(record(run, args.base, args.arch))
                print(f"{args.base:>6} {args.arch:>8} {cue:>18} seed {seed}: evidence max "
                      f"{max(runs[-1]['evidence']):.3g}, alerts {runs[-1]['alerts']}", flush=True)
                result = {"machine": machine(), "epochs": args.epochs, "record_pairs": args.record_pairs, "masks": args.masks,
                          "object_masks": args.object_masks, "degradation": args.degradation,
                          "recurring_turned": discovery.recurring_turned if discovery else DiscoverySettings().recurring_turned,
                          **summarise(runs, alpha), "runs": runs, "wall_s": time.perf_counter() - start}
                write_json(result, out, say=False)
    print_table(summarise(runs, alpha))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
