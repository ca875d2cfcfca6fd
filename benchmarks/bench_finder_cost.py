"""What finding recurring content costs at fit start, by probe size and content.

The recurring test's finder (:mod:`cam_monitor.probes.recurrence`) reads the probes once per run.
Its cost grows with the pixels it keys and with the pairs of equal keys they make, so it is
measured on three kinds of content, each with the same white glyph-like mark (an eighth of the
side by a quarter) at its own place in every other probe:

- ``smooth``: dark, smooth, varied backgrounds (few structured pixels: flat scenes, scans);
- ``textured``: noise at five scales (many structured pixels: natural texture);
- ``noise``: uniform noise in every pixel (every pixel keyed: the worst case).

Beside each, the finder without turned partners (``recurring_masks(..., turned=False)``: the
finder before them, which key each image's seven turns and match against them), the exact keys
alone (``tolerant=False, turned=False``: the finder before its tolerant keys, which cost two more
tables) and one inference forward of a torchvision
ResNet-18 (``weights=None``) over the same probes, the cost a user knows. Seconds: medians of
interleaved repeats in this process. Peak memory: how much the process's peak resident memory
grows while the finder runs, the median of ``--repeats`` fresh processes per case (Linux; the
forward's is not measured). It varies from process to process by up to half (what the allocator
keeps of the memory it frees), hence the median.

    python benchmarks/bench_finder_cost.py                         # 64 probes at 64, 128 and 224 px
    python benchmarks/bench_finder_cost.py --sizes 224,320 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import (default_result_path, machine, number_from_subprocess, peak_rss_growth,  # noqa: E402
                          time_interleaved, write_json)

from cam_monitor.probes.recurrence import recurring_masks  # noqa: E402

KINDS = ("smooth", "textured", "noise")


def probes(kind: str, size: int, n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) probes of ``kind`` (:data:`KINDS`) in [0, 1], every other one with the
    mark at a random place; deterministic for ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "smooth":
        coarse = torch.rand(n, 3, 8, 8, generator=gen)
        images = 0.05 + 0.2 * torch.rand(n, 3, 1, 1, generator=gen) + 0.3 * F.interpolate(
            coarse, size=(size, size), mode="bicubic", align_corners=False)
    elif kind == "textured":
        scales = [max(1, size // k) for k in (1, 2, 4, 8, 16)]
        images = 0.14 * sum(F.interpolate(torch.rand(n, 3, s, s, generator=gen), size=(size, size), mode="bilinear",
                                          align_corners=False) for s in scales)
    elif kind == "noise":
        images = 0.6 * torch.rand(n, 3, size, size, generator=gen)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    images = images.clamp(0, 1)
    lit = torch.rand(max(2, size // 8), max(2, size // 4), generator=gen) < 0.5
    h, w = lit.shape
    for i in range(0, n, 2):
        y = int(torch.randint(0, size - h + 1, (1,), generator=gen))
        x = int(torch.randint(0, size - w + 1, (1,), generator=gen))
        images[i, :, y:y + h, x:x + w] = torch.where(lit, 1.0, images[i, :, y:y + h, x:x + w])
    return images


def memory_here(kind: str, size: int, n: int) -> float:
    """In this process: bytes of peak memory growth while the finder reads ``n`` probes of ``kind``."""
    images = probes(kind, size, n)
    return peak_rss_growth(lambda: recurring_masks(images))


def memory(kind: str, size: int, args: argparse.Namespace) -> float | None:
    """The median of :func:`memory_here` in ``args.repeats`` fresh processes; None where one failed
    (not Linux, out of memory)."""
    cmd = [sys.executable, __file__, "--_memory-of", kind, str(size), "--probes", str(args.probes),
           "--threads", str(args.threads)]
    grown = []
    for _ in range(args.repeats):
        value = number_from_subprocess(cmd, f"memory of {kind} at {size} px")
        if value is None:
            return None
        grown.append(value)
    return statistics.median(grown)


def run_size(size: int, args: argparse.Namespace) -> list[dict]:
    """Every kind at ``size``: the finder's and the forward's medians, in how many marked probes it
    found something and in how many unmarked ones, and its peak memory growth."""
    model = torchvision.models.resnet18(weights=None).eval()
    sets = {kind: probes(kind, size, args.probes) for kind in args.kinds}
    fns = {f"find {kind}": (lambda images=images: recurring_masks(images)) for kind, images in sets.items()}
    fns |= {f"unturned {kind}": (lambda images=images: recurring_masks(images, turned=False))
            for kind, images in sets.items()}
    fns |= {f"exact {kind}": (lambda images=images: recurring_masks(images, tolerant=False, turned=False))
            for kind, images in sets.items()}

    def forward() -> None:
        with torch.inference_mode():
            model(sets[args.kinds[0]])

    times = time_interleaved({**fns, "forward": forward}, args.repeats, torch.device("cpu"))
    rows = []
    for kind, images in sets.items():
        found = recurring_masks(images).flatten(1).any(1)
        grown = memory(kind, size, args) if args.memory else None
        rows.append({"size": size, "kind": kind, "probes": args.probes, "marked": (args.probes + 1) // 2,
                     "found": int(found[0::2].sum()), "found_unmarked": int(found[1::2].sum()),
                     "find_s": statistics.median(times[f"find {kind}"]),
                     "unturned_s": statistics.median(times[f"unturned {kind}"]),
                     "exact_s": statistics.median(times[f"exact {kind}"]),
                     "forward_s": statistics.median(times["forward"]),
                     "peak_memory_mb": None if grown is None else grown / 2 ** 20})
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| size | content | marked probes with a find | unmarked probes with a find | find (s) | "
          "without turns (s) | exact keys alone (s) | ResNet-18 forward (s) | x forward | peak memory growth (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mem = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        print(f"| {r['size']} | {r['kind']} | {r['found']} of {r['marked']} | {r['found_unmarked']} | "
              f"{r['find_s']:.2f} | {r.get('unturned_s', float('nan')):.2f} | {r['exact_s']:.2f} | "
              f"{r['forward_s']:.3f} | "
              f"{r['find_s'] / r['forward_s']:.0f} | {mem} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64,128,224", help="probe sides, pixels, comma-separated")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"contents, comma-separated, of {KINDS}")
    p.add_argument("--probes", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory column")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/finder_cost_cpu.json)")
    p.add_argument("--_memory-of", nargs=2, metavar=("KIND", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._memory_of:
        print(memory_here(args._memory_of[0], int(args._memory_of[1]), args.probes))
        return
    args.kinds = args.kinds.split(",")
    for kind in args.kinds:
        if kind not in KINDS:
            p.error(f"--kinds: {kind!r} is not one of {KINDS}")
    result = {"machine": machine(), "repeats": args.repeats, "rows": []}
    print(f"machine: {result['machine']}; {args.repeats} interleaved repeats")
    for size in (int(s) for s in args.sizes.split(",")):
        rows = run_size(size, args)
        result["rows"].extend(rows)
        print_table(rows)
    write_json(result, args.out or default_result_path("finder_cost", torch.device("cpu")))


if __name__ == "__main__":
    main()
