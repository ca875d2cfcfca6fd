"""How discovery shares an evaluation's pairs between its arms, replayed exactly from recorded runs.

Every arm takes its pairs in the order it planned them, each stage the next ones, and the monitor
changes nothing in training, so a run recorded with ``N`` pairs an arm at every evaluation in one
stage (``--record-pairs N`` of ``bench_zoo.py`` or ``bench_false_alarms.py``) holds every pair that
any sharing of at most ``N`` pairs an arm would have drawn on the same models. Replaying a rule
here recomputes, evaluation by evaluation, the shares it would have chosen (from the evidence it
would have had), the pairs it would have drawn and the statistic the monitor would have shown:
seconds instead of a campaign of fits for every rule tried. Exact up to argmax ties that float
rounding could break differently between batch sizes; a rule that wants more than ``N`` pairs of an
arm whose plan had more is counted (its shortfall) and given the ``N`` there are.

    python benchmarks/bench_zoo.py --record-pairs 48 --out zoo_rec.json            # 5 arms: 7.5x the probes
    python benchmarks/bench_false_alarms.py --record-pairs 48 --out fa_rec.json
    python benchmarks/bench_allocation.py zoo_rec.json fa_rec.json [--rules shipped,one_stage] [--out F]

Prints per rule: on the shortcut runs, per task, how many ``shortcut_confirmed`` confirmed, how many
by the epoch after their accuracy gap passed 0.2 and the first alert epochs; on every control run
(the zoo's and the false-alarm campaign's), how many alerted and the highest statistic; writes
``benchmarks/results/allocation_cpu.json`` (``--out`` for another file).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import default_result_path, write_json  # noqa: E402
from bench_false_alarms import pair_diffs  # noqa: E402

from cam_monitor.demo.run import GAP_LINE  # noqa: E402
from cam_monitor.demo.zoo import replayed  # noqa: E402
from cam_monitor.discovery import ARMS, FIRST_STAGE, DiscoverySettings, arm_shares  # noqa: E402
from cam_monitor.evidence import EvidenceState, log_growth, stream  # noqa: E402

#: An evaluation's recorded pairs: arm -> paired differences in {-1, 0, 1}, in plan order.
Pairs = dict[str, list[int]]


@dataclass(frozen=True)
class Rule:
    """A way to share an evaluation's pairs: ``first_stage`` of them equally, then the rest, ``led``
    of them by weight and the others equally. An arm's weight is its expected log growth per pair
    (:func:`~cam_monitor.evidence.log_growth` with ``prior`` pseudo-counts, 0 where negative) times
    its e-detector with the first stage counted, at least 1 and at most ``level_cap``; where no arm
    grows, ``fallback``: ``"level"`` (the e-detectors), ``"equal"`` or ``"log_level"`` (one plus the
    log of each e-detector above 1: the leader gets more, not all). ``detail_bet``, where set,
    replaces the detail arm's stake (``DiscoverySettings.detail_bet``) in the statistic (the
    weights compare the arms at the common stake ``bet``, as the monitor's do). The defaults are
    the monitor's (:func:`~cam_monitor.discovery.second_stage_weights`)."""

    first_stage: float = FIRST_STAGE
    led: float = 1.0
    prior: float = 0.5
    level_cap: float = math.inf
    fallback: str = "level"
    detail_bet: float | None = None

    def settings(self) -> DiscoverySettings:
        """The monitor's discovery settings with this rule's stakes."""
        return DiscoverySettings() if self.detail_bet is None else DiscoverySettings(detail_bet=self.detail_bet)


#: The rules ``--rules`` can name: the monitor's, and the variants measured against it.
RULES = {
    "shipped": Rule(),
    "equal_fallback": Rule(fallback="equal"),
    "log_level_fallback": Rule(fallback="log_level"),
    "one_stage": Rule(first_stage=1.0),
    "first_half": Rule(first_stage=0.5),
    "first_half_equal_fallback": Rule(first_stage=0.5, fallback="equal"),
    "led_half": Rule(led=0.5),
    "growth_only": Rule(level_cap=1.0, fallback="equal"),
    "level_cap_10": Rule(level_cap=10.0),
    "prior_quarter": Rule(prior=0.25),
    "detail_bet_0.7": Rule(detail_bet=0.7),
    "detail_bet_0.5": Rule(detail_bet=0.5),
    "detail_bet_0.4": Rule(detail_bet=0.4),
    "detail_bet_0.2": Rule(detail_bet=0.2),
}


def rule_weights(rule: Rule, diffs: dict[str, torch.Tensor], evidence: EvidenceState,
                 settings: DiscoverySettings) -> dict[str, float]:
    """Each arm's weight in the second stage under ``rule``, from its first-stage ``diffs`` and the
    ``evidence`` before them ({} for an equal share)."""
    interim = evidence.update({a: d for a, d in diffs.items() if d.numel()}, settings.bets, settings.margins)
    level = {a: interim.detector(stream(a)) for a in diffs}
    growth = {a: max(0.0, log_growth(d, settings.bet, settings.margins[a], rule.prior))
              * min(rule.level_cap, max(1.0, level[a])) for a, d in diffs.items()}
    if any(growth.values()):
        return growth
    if rule.fallback == "log_level":
        return {a: 1.0 + math.log(max(1.0, v)) for a, v in level.items()}
    return level if rule.fallback == "level" else {}


def second_shares(rule: Rule, num: int, arms: tuple[str, ...], weights: dict[str, float]) -> dict[str, int]:
    """The second stage's ``num`` pairs: ``led`` of them by ``weights``, the rest equally."""
    following = int(num * rule.led) if weights else 0
    equal = arm_shares(num - following, arms)
    by_weight = arm_shares(following, arms, weights)
    return {a: equal[a] + by_weight[a] for a in arms}


def replay_run(evaluations: list[Pairs], rule: Rule, record_pairs: int, num_probes: int = 64,
               settings: DiscoverySettings | None = None) -> tuple[list[float], int]:
    """The statistic after every evaluation of one recorded run had discovery shared its pairs by
    ``rule`` (the arms that ran: those with pairs at any evaluation, in :data:`ARMS` order), and the
    pairs it wanted beyond the recording (arms recorded in full, ``record_pairs`` of them)."""
    settings = settings or rule.settings()
    arms = tuple(a for a in ARMS if any(e.get(a) for e in evaluations)) or ("local",)
    total = int(settings.budget * num_probes) // 2
    state, values, short = EvidenceState.capped(settings.alpha), [], 0
    for pairs in evaluations:
        recorded = {a: torch.tensor(pairs.get(a, []), dtype=torch.long) for a in arms}
        first = int(total * rule.first_stage)
        taken = {a: min(n, len(recorded[a])) for a, n in arm_shares(first, arms).items()}
        weights = rule_weights(rule, {a: recorded[a][:taken[a]] for a in arms}, state, settings)
        # the monitor shares the second stage among arms with planned pairs left (past a full recording: unknown, assumed so)
        open_arms = tuple(a for a in arms if taken[a] < len(recorded[a]) or len(recorded[a]) >= record_pairs)
        for a, n in (second_shares(rule, total - first, open_arms, weights) if open_arms else {}).items():
            wanted = taken[a] + n
            short += max(0, wanted - len(recorded[a])) if len(recorded[a]) >= record_pairs else 0
            taken[a] = min(wanted, len(recorded[a]))
        state = state.update({a: recorded[a][:taken[a]] for a in arms}, settings.bets, settings.margins, pool=arms)
        values.append(state.value(arms))
    return values, short


def alert_epochs(values: list[float], alpha: float) -> tuple[int | None, bool]:
    """The first evaluation whose statistic crosses ``1 / alpha`` and whether the alert it raises is
    still active after the last: the monitor's rule, as :func:`~cam_monitor.demo.zoo.replayed` applies it."""
    return replayed([{"epoch": e, "value": v} for e, v in enumerate(values)], lambda row: row["value"], alpha)


def parse_pairs(encoded: str | list[float]) -> list[float]:
    """A recorded stream: the false-alarm campaign's ``+0-`` string (:func:`bench_false_alarms.pair_diffs`)
    or a list (the zoo's, and a graded stream's values: :func:`bench_false_alarms.pair_string`)."""
    return pair_diffs(encoded) if isinstance(encoded, str) else list(encoded)


@dataclass
class Recorded:
    """One recorded run: which task, control or shortcut, its pairs and accuracy gap per evaluation."""

    task: str
    variant: str
    seed: int
    evaluations: list[Pairs]
    gaps: list[float]

    @property
    def gap_epoch(self) -> int | None:
        return next((e for e, g in enumerate(self.gaps) if g > GAP_LINE), None)


def label(task: str, base: str, arch: str) -> str:
    """A task's name in the tables: with its base and architecture where they are not the digits CNN's."""
    return task if (base, arch) == ("digits", "cnn") else f"{task} ({base}, {arch})"


def read_recordings(paths: Iterable[str]) -> tuple[list[Recorded], int]:
    """The runs of zoo and false-alarm result files recorded with ``--record-pairs``, and that count."""
    runs, counts = [], set()
    for path in paths:
        result = json.loads(Path(path).read_text())
        counts.add(result.get("record_pairs"))
        for r in result["runs"]:
            task = label(r["task"], r.get("base", result.get("base", "digits")), r.get("arch", result.get("arch", "cnn")))
            if "pairs" in r:  # bench_false_alarms: control runs only
                runs.append(Recorded(task, "control", r["seed"],
                                     [{a: parse_pairs(p) for a, p in e.items()} for e in r["pairs"]], r["accuracy_gap"]))
            else:
                runs.append(Recorded(task, r["variant"], r["seed"],
                                     [{a: parse_pairs(p) for a, p in e["evidence_pairs"].items()} for e in r["epochs"]],
                                     [e["accuracy_gap"] for e in r["epochs"]]))
    if None in counts or len(counts) != 1:
        raise SystemExit(f"every file must be one recording (--record-pairs, the same N); got {sorted(map(str, counts))}")
    return runs, counts.pop()


def summarise(runs: list[Recorded], rule: Rule, record_pairs: int, alpha: float) -> dict:
    """One rule's replay of every run: per shortcut task its detections, on time and first epochs;
    over the controls, alerts and the highest statistic; the pairs it wanted beyond the recording."""
    tasks: dict[str, dict] = {}
    controls, short = [], 0
    for run in runs:
        values, missing = replay_run(run.evaluations, rule, record_pairs)
        short += missing
        first, active = alert_epochs(values, alpha)
        if run.variant == "control":
            controls.append({"task": run.task, "seed": run.seed, "highest": max(values, default=0.0), "alerted": first is not None})
            continue
        row = tasks.setdefault(run.task, {"task": run.task, "runs": 0, "detected": 0, "on_time": 0, "first_alert_epochs": [],
                                          "gap_passes_0.2_epochs": [], "active_at_end_while_cheating": 0, "cheating_at_end": 0})
        row["runs"] += 1
        row["detected"] += first is not None
        row["on_time"] += first is not None and (run.gap_epoch is None or first <= run.gap_epoch + 1)
        row["first_alert_epochs"].append(first)
        row["gap_passes_0.2_epochs"].append(run.gap_epoch)
        cheating = run.gaps[-1] >= GAP_LINE
        row["cheating_at_end"] += cheating
        row["active_at_end_while_cheating"] += cheating and active
    highest = sorted(c["highest"] for c in controls)
    return {"rule": asdict(rule), "shortcut_tasks": list(tasks.values()),
            "controls": {"runs": len(controls), "alerted": sum(c["alerted"] for c in controls),
                         "highest": highest[-1] if highest else None,
                         "median_highest": highest[len(highest) // 2] if highest else None,
                         "above_10": sum(h > 10 for h in highest),
                         "worst": sorted(controls, key=lambda c: -c["highest"])[:3]},
            "pairs_beyond_recording": short}


def table(results: dict[str, dict]) -> list[str]:
    """The rules' Markdown table: a column per shortcut task the recordings hold (none for controls alone)."""
    tasks = list(dict.fromkeys(t["task"] for r in results.values() for t in r["shortcut_tasks"]))
    head = ["rule", *tasks, "on time", "control alerts", "highest control", "median", "> 10", "pairs short"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in results.items():
        by_task = {t["task"]: t for t in r["shortcut_tasks"]}
        cells = [f"{by_task[t]['on_time']}/{by_task[t]['runs']} {by_task[t]['first_alert_epochs']}" if t in by_task
                 else "" for t in tasks]
        c = r["controls"]
        row = [name, *cells, str(sum(t["on_time"] for t in r["shortcut_tasks"])), f"{c['alerted']}/{c['runs']}",
               f"{c['highest'] or 0:.3g}", f"{c['median_highest'] or 0:.3g}", str(c["above_10"]),
               str(r["pairs_beyond_recording"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="result files of bench_zoo.py / bench_false_alarms.py --record-pairs N")
    p.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, of {', '.join(RULES)}")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/allocation_cpu.json)")
    args = p.parse_args()
    unknown = [r for r in args.rules.split(",") if r not in RULES]
    if unknown:
        p.error(f"unknown rules {unknown}; known: {', '.join(RULES)}")
    runs, record_pairs = read_recordings(args.files)
    alpha = DiscoverySettings().alpha
    results = {name: summarise(runs, RULES[name], record_pairs, alpha) for name in args.rules.split(",")}
    print("\n" + "\n".join(table(results)))
    write_json({"record_pairs": record_pairs, "files": [Path(f).name for f in args.files], "alpha": alpha,
                "rules": results}, args.out or default_result_path("allocation", torch.device("cpu")))


if __name__ == "__main__":
    main()
