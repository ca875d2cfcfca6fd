"""Does the recurrence finder still find the zoo's cues under sensor noise and JPEG compression,
and what else does it find? The exact keys alone, with the tolerant keys, and with turned
partners too, side by side.

A burnt-in cue is drawn the same in every image that carries it, but the images then go through a
sensor's noise or a JPEG encoder, and its copies are no longer the same pixels. For every zoo task
(:data:`cam_monitor.demo.data.CUES`) on the chosen bases and seeds, the shortcut task's probes
(:func:`cam_monitor.demo.zoo.truth_probes`, their true cue and object masks read by this script
only) are degraded: Gaussian noise of a share of the probes' value range (``noise0.02``), or a
JPEG encoding at a quality (``jpeg75``; 8 bits a channel). Per task and degradation, for each
finder (``exact``: :func:`~cam_monitor.probes.recurrence.recurring_masks` with
``tolerant=False, turned=False``; ``tolerant``: ``turned=False``, the finder before turned
partners; ``turned``: the default, tolerant keys and the partners turned by the square's
symmetries):

- ``found``: probes carrying the cue whose masks hold at least half of it, of ``cue probes``;
- ``off the cue``: probes with found pixels more than half a neighbourhood from the cue (an
  object, a background) and, of those, ``on an object``;
- ``clean changed``: (clean images only) probes whose masks differ between the exact and the
  tolerant finder.

    python benchmarks/bench_finder_tolerance.py [--bases digits,shapes] [--seeds 4]
    python benchmarks/bench_finder_tolerance.py --degradations clean --first-seed 1100 --seeds 89
    python benchmarks/bench_finder_tolerance.py --cues ruler --degradations clean,noise0.02 --out rulers.json

Prints a Markdown table and writes ``benchmarks/results/finder_tolerance_cpu.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import default_result_path, machine, write_json  # noqa: E402

from cam_monitor.demo.data import CUES, degraded  # noqa: E402
from cam_monitor.demo.zoo import truth_probes  # noqa: E402
from cam_monitor.probes.recurrence import NEIGHBOURHOOD, recurring_masks  # noqa: E402

DEGRADATIONS = ("clean", "noise0.01", "noise0.02", "noise0.03", "jpeg90", "jpeg75")
FINDERS = {"exact": {"tolerant": False, "turned": False}, "tolerant": {"turned": False}, "turned": {}}


def scored(found: torch.Tensor, cue: torch.Tensor, objects: torch.Tensor | None) -> dict:
    """Counts of :mod:`this script <bench_finder_tolerance>`'s columns for one probe set's masks."""
    carries = cue.flatten(1).any(1)
    held = (found & cue).flatten(1).sum(1) >= 0.5 * cue.flatten(1).sum(1)
    near = F.max_pool2d(cue[:, None].float(), NEIGHBOURHOOD + 4, 1, (NEIGHBOURHOOD + 4) // 2)[:, 0] > 0
    off = found & ~near
    on_object = (off & objects).flatten(1).any(1) if objects is not None else torch.zeros_like(carries)
    return {"cue_probes": int(carries.sum()), "found": int((held & carries).sum()),
            "off_cue": int(off.flatten(1).any(1).sum()), "off_on_object": int(on_object.sum())}


def run_task(base: str, cue: str, seed: int, degradations: tuple[str, ...] = DEGRADATIONS) -> list[dict]:
    """Every one of ``degradations`` and every finder on one task's probes."""
    probes = truth_probes(cue, seed, 64, base)
    truth = probes.spurious_masks.bool()
    objects = probes.object_masks.bool() if torch.is_tensor(probes.object_masks) else None
    rows = []
    for how in degradations:
        images = degraded(probes.images.float(), how, torch.Generator().manual_seed(seed))
        masks = {}
        for name, finder in FINDERS.items():
            start = time.perf_counter()
            masks[name] = recurring_masks(images, **finder)
            rows.append({"base": base, "cue": cue, "seed": seed, "degradation": how, "finder": name,
                         "seconds": time.perf_counter() - start, **scored(masks[name], truth, objects)})
        changed = int((masks["exact"] ^ masks["tolerant"]).flatten(1).any(1).sum())
        tolerant = next(r for r in rows[-len(FINDERS):] if r["finder"] == "tolerant")
        tolerant["clean_changed"] = changed if how == "clean" else None
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Rows summed over seeds per base, cue, degradation and finder."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["base"], r["cue"], r["degradation"], r["finder"])
        s = out.setdefault(key, {"base": key[0], "cue": key[1], "degradation": key[2], "finder": key[3], "seeds": 0,
                                 "cue_probes": 0, "found": 0, "off_cue": 0, "off_on_object": 0, "seconds": 0.0,
                                 "clean_changed": None})
        s["seeds"] += 1
        for k in ("cue_probes", "found", "off_cue", "off_on_object", "seconds"):
            s[k] += r[k]
        if r.get("clean_changed") is not None:
            s["clean_changed"] = (s["clean_changed"] or 0) + r["clean_changed"]
    return list(out.values())


def print_table(rows: list[dict]) -> None:
    print("\n| base | cue | degradation | cue probes | found: exact | tolerant | turned | off the cue (on an object): "
          "exact | tolerant | turned | clean changed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    pairs: dict[tuple, dict] = {}
    for r in rows:
        pairs.setdefault((r["base"], r["cue"], r["degradation"]), {})[r["finder"]] = r
    for (base, cue, how), p in pairs.items():
        e, t, u = p["exact"], p["tolerant"], p["turned"]
        changed = "" if t["clean_changed"] is None else str(t["clean_changed"])
        print(f"| {base} | {cue} | {how} | {e['cue_probes']} | {e['found']} | {t['found']} | {u['found']} | "
              f"{e['off_cue']} ({e['off_on_object']}) | {t['off_cue']} ({t['off_on_object']}) | "
              f"{u['off_cue']} ({u['off_on_object']}) | {changed} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", default="digits,shapes", help="comma-separated, of digits and shapes")
    p.add_argument("--cues", default=",".join(CUES), help="comma-separated zoo tasks (default: all)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--degradations", default=",".join(DEGRADATIONS),
                   help="comma-separated: clean, noiseS (S of the value range), jpegQ (quality Q)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/finder_tolerance_cpu.json)")
    args = p.parse_args(argv)
    degradations = tuple(args.degradations.split(","))
    rows = []
    for base in args.bases.split(","):
        for cue in args.cues.split(","):
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                rows += run_task(base, cue, seed, degradations)
    table = summary(rows)
    print_table(table)
    write_json({"machine": machine(), "degradations": list(degradations), "summary": table, "runs": rows},
               args.out or default_result_path("finder_tolerance", torch.device("cpu")))


if __name__ == "__main__":
    main()
