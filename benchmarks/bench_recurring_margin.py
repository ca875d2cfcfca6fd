"""The recurring arm's graded pairs under other margins and dead zones, replayed from recorded runs.

The zoo (``bench_zoo.py``) and the false-alarm campaign (``bench_false_alarms.py``) keep every
evaluation's recurring pairs as the arm bet on them (graded: the gain in the source class's
probability of the test over its control, over ``recurring_gain_scale``, clipped to [-1, 1]).
Replaying them asks, with the pairs held as drawn, how the arm's own e-detector would have grown
under another margin (what each pair must beat) or a dead zone (a gain smaller than it counts as a
tie): on control runs, how high it got; on shortcut runs, the evaluation it passed ``1 / alpha``.
The pairs were drawn by the version that recorded them, whose sharing of the pairs followed its own
evidence, so a replay is a guide to a rule, not the rule's campaign. A pair recorded at the clip
is taken at the scale's gain, the least it could have been.

    python benchmarks/bench_recurring_margin.py benchmarks/results/false_alarms_graded_no_margin_cpu.json \
        benchmarks/results/zoo_graded_no_margin_cpu.json benchmarks/results/zoo_shapes_graded_no_margin_cpu.json

Prints a table per rule and writes ``benchmarks/results/recurring_margin_cpu.json`` (``--out`` for another file).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import default_result_path, write_json  # noqa: E402
from bench_allocation import parse_pairs  # noqa: E402

from cam_monitor.discovery import RECURRING, DiscoverySettings, graded  # noqa: E402
from cam_monitor.evidence import EvidenceState  # noqa: E402

#: (margin, dead zone in gain units) of the rules replayed by default: none, the common margin,
#: twice it, and dead zones of one and two points of probability.
RULES = ((0.0, 0.0), (0.05, 0.0), (0.1, 0.0), (0.0, 0.01), (0.0, 0.02))


@dataclass
class Stream:
    """One run's recorded recurring pairs, an evaluation at a time (graded outcomes in [-1, 1])."""

    name: str
    variant: str
    evaluations: list[list[float]]


def read_streams(paths: Iterable[str]) -> list[Stream]:
    """The runs of zoo and false-alarm result files whose recurring arm drew any pair."""
    out = []
    for path in paths:
        result = json.loads(Path(path).read_text())
        for r in result["runs"]:
            base = r.get("base", result.get("base", "digits"))
            if "pairs" in r:  # bench_false_alarms: control runs only
                evaluations = [parse_pairs(e.get(RECURRING, [])) for e in r["pairs"]]
                variant = "control"
            else:
                evaluations = [parse_pairs(e["evidence_pairs"].get(RECURRING, [])) for e in r["epochs"]]
                variant = r["variant"]
            if any(evaluations):
                out.append(Stream(f"{base} {r['task']} {r['seed']}", variant, evaluations))
    return out


def rescored(outcomes: list[float], scale: float, dead_zone: float) -> torch.Tensor:
    """Recorded graded outcomes with a gain below ``dead_zone`` counted as a tie and the rest moved
    down by it (then graded at ``scale`` again)."""
    gains = torch.tensor(outcomes, dtype=torch.float64) * scale
    return graded(gains.sign() * (gains.abs() - dead_zone).clamp_min(0.0), scale)


def replay(stream: Stream, margin: float, dead_zone: float, settings: DiscoverySettings) -> list[float]:
    """The arm's own log e-detector after each evaluation under ``margin`` and ``dead_zone``."""
    state, out = EvidenceState.capped(settings.alpha), []
    for outcomes in stream.evaluations:
        if outcomes:
            d = rescored(outcomes, settings.recurring_gain_scale, dead_zone)
            state = state.update({RECURRING: d}, settings.bet, margin)
        out.append(state.log_detector.get(RECURRING, 0.0))
    return out


def summarise(streams: list[Stream], margin: float, dead_zone: float, settings: DiscoverySettings) -> dict:
    """One rule over every stream: the controls' highest log detectors (the three highest, named),
    and per shortcut run the first evaluation its detector passed ``1 / alpha`` (None: never)."""
    level = math.log(1 / settings.alpha)
    controls, passed = [], {}
    for s in streams:
        logs = replay(s, margin, dead_zone, settings)
        if s.variant == "control":
            controls.append((max(logs), s.name))
        else:
            passed[s.name] = next((e for e, v in enumerate(logs) if v >= level), None)
    controls.sort(reverse=True)
    return {"margin": margin, "dead_zone": dead_zone, "controls": len(controls),
            "highest_controls": [{"run": n, "log_detector": round(v, 3)} for v, n in controls[:3]],
            "shortcut_passed": passed, "shortcuts_passed": sum(v is not None for v in passed.values())}


def print_table(rows: list[dict]) -> None:
    print("| margin | dead zone (gain) | controls | highest control log detector | shortcut runs past 1/alpha | "
          "their first evaluations |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        top = r["highest_controls"][0] if r["highest_controls"] else {"run": "-", "log_detector": 0.0}
        firsts = "".join("-" if v is None else str(v) for v in r["shortcut_passed"].values())
        print(f"| {r['margin']} | {r['dead_zone']} | {r['controls']} | {top['log_detector']:.2f} ({top['run']}) | "
              f"{r['shortcuts_passed']}/{len(r['shortcut_passed'])} | {firsts} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="zoo and false-alarm result files with graded recurring pairs")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/recurring_margin_cpu.json)")
    args = p.parse_args()
    settings = DiscoverySettings()
    streams = read_streams(args.files)
    rows = [summarise(streams, m, dz, settings) for m, dz in RULES]
    print_table(rows)
    write_json({"files": [Path(f).name for f in args.files], "alpha": settings.alpha, "bet": settings.bet,
                "scale": settings.recurring_gain_scale, "rules": rows},
               args.out or default_result_path("recurring_margin", torch.device("cpu")))


if __name__ == "__main__":
    main()
