"""The local paste test's design choices, scored on zoo models: window size and alignment, control,
placement and what the recipient is.

The monitor's local arm pastes a candidate's best-credited window into a probe of another class
and compares it with a control pasted at the same place. Its null hypothesis ("the candidate is
no more potent than its control") must hold on models that read the object, or its stated
false-alarm rate means nothing. This script measures that, design by design, on the same models:

- for every spec ``base:cue:variant:seed`` it trains the demo CNN on that zoo task for
  ``--epochs`` and keeps each epoch's weights (cached under ``--cache``, so designs can be
  re-scored without training again);
- at every epoch it draws up to ``--pairs`` (candidate, recipient) pairs as the monitor does and,
  per design, counts the pairs where the test flipped the recipient to the candidate's class and
  the control did not (wins) and the reverse (losses).

On a control model (cue independent of the label) a design whose wins clearly exceed its losses
breaks its null; on a shortcut model the wins measure its power. The zoo's true cue masks (never
shown to the tests) say how many candidates and controls touch the cue: a control that is itself
part of the cue (a cue wider than the window) ties with the candidate, whatever the model reads.
Designs: ``box`` (the window's side in grid cells), ``control`` (``next``: the source's next
most-credited window, the monitor's; ``random``: a window drawn in proportion to the map's credit
outside the candidate; ``guard``: the best window at least one window away; ``blurred``: the
candidate's own window blurred at half a cell, its detail gone, its content in place; ``swap``: the
source with the recipient's window over the candidate's, counted when the source keeps its class,
so a win is a class that follows the window) and ``place``
(``credited``: over the recipient's most-credited window, the monitor's; ``quiet``: its
least-credited window; ``own``: where the candidate sits in its source). Two more for cues wider
than a cell: ``window`` (``cell``: the grid's cells, the monitor's; ``pixel``: windows of ``box``
cells' size, fractions allowed, at any pixel offset of the upsampled map, so a cue that straddles
cells can sit inside one) and ``recipient`` (what both are pasted into: ``probe`` as it is, the
monitor's; ``erased``: its most-credited 3-cell window filled first, taking its own cue away;
``flat``: its mean colour alone; ``blurred``: blurred at one cell).

    python benchmarks/bench_local_test.py --specs shapes:background_cast:control:0,shapes:corner_patch:shortcut:3
    python benchmarks/bench_local_test.py --specs digits:text_tag:shortcut:0,digits:text_tag:control:0 \
        --boxes 1,1.5 --controls next --places credited --windows pixel --recipients probe,erased,flat

Prints one row per model, epoch and design, then per design the worst control evaluation, the
shortcut models' median wins and how often their control lay on the cue; writes
``benchmarks/results/local_test_cpu.json`` (``--out`` for another file).
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import default_result_path, machine, write_json  # noqa: E402

from cam_monitor import discovery as D  # noqa: E402
from cam_monitor.demo.model import ARCHS, DecoyDigitsDataModule, DigitClassifier  # noqa: E402
from cam_monitor.demo.zoo import mask_free_probes, truth_probes  # noqa: E402
from cam_monitor.engine import compute_cams, predict_classes  # noqa: E402
from cam_monitor.evidence import sign_test_p  # noqa: E402
from cam_monitor.interventions import Box, Paste, blurred_cells, cell_size, filled, pasted_images  # noqa: E402
from cam_monitor.maps import upsample  # noqa: E402
from cam_monitor.probes import ProbeSet  # noqa: E402

ControlFn = Callable[[D.Windows, int, Box, tuple[int, int], tuple[int, int], torch.Generator], Box]
PlaceFn = Callable[[D.Windows, int, Box, tuple[int, int], tuple[int, int]], Box]


@dataclass(frozen=True)
class Spec:
    """One zoo model: the base task, the cue, ``shortcut`` or ``control``, the seed, the
    architecture (:data:`~cam_monitor.demo.model.ARCHS`; the demo CNN unless a fifth field names one)."""

    base: str
    cue: str
    variant: str
    seed: int
    arch: str = "cnn"

    @classmethod
    def parse(cls, text: str) -> "Spec":
        base, cue, variant, seed, *arch = text.split(":")
        return cls(base, cue, variant, int(seed), *arch)

    @property
    def text(self) -> str:
        """The ``base:cue:variant:seed[:arch]`` form :meth:`parse` reads (what result files record)."""
        suffix = "" if self.arch == "cnn" else f":{self.arch}"
        return f"{self.base}:{self.cue}:{self.variant}:{self.seed}{suffix}"

    @property
    def name(self) -> str:
        """:attr:`text` with underscores: the model's name in tables and its cache file's."""
        return self.text.replace(":", "_")

    def model(self, probes: ProbeSet) -> DigitClassifier:
        """A fresh model of this spec's architecture for ``probes``' channels and size."""
        return DigitClassifier(arch=self.arch, in_channels=probes.images.shape[1], image_size=probes.image_size[0])


def control_next(windows: D.Windows, source: int, avoid: Box, size: tuple[int, int], image_size: tuple[int, int],
                 gen: torch.Generator) -> Box:
    """The monitor's control: the source's next most-credited window."""
    return D.control_box(windows, source, avoid, size, image_size)


def control_random(windows: D.Windows, source: int, avoid: Box, size: tuple[int, int], image_size: tuple[int, int],
                   gen: torch.Generator) -> Box:
    """The earlier design: a free window drawn in proportion to the source map's energy."""
    free = windows.clear_of(avoid)
    weights = windows.energy[source].double() * free
    weights = weights if weights.sum() > 0 else free.double()
    return D.fit_box(windows.boxes[int(torch.multinomial(weights, 1, generator=gen))], size, image_size)


def control_guard(windows: D.Windows, source: int, avoid: Box, size: tuple[int, int], image_size: tuple[int, int],
                  gen: torch.Generator) -> Box:
    """The source's best window at least one window's width away from the candidate."""
    h, w = avoid[2] - avoid[0], avoid[3] - avoid[1]
    free = windows.clear_of((avoid[0] - h, avoid[1] - w, avoid[2] + h, avoid[3] + w))
    free = free if free.any() else torch.ones_like(free)
    energy = torch.where(free, windows.energy[source].double(), -float("inf"))
    return D.fit_box(windows.boxes[int(energy.argmax())], size, image_size)


def control_blurred(windows: D.Windows, source: int, avoid: Box, size: tuple[int, int], image_size: tuple[int, int],
                    gen: torch.Generator) -> Box:
    """The candidate's own window with its detail blurred away (half a cell, the detail arm's
    blur): :func:`score` reads this control's pixels from the blurred source. The same content
    and arrangement as the test, so a window of any size holds as much of an object in both; a
    cue told by its fine pattern (a stamp, a glyph, ticks) is in the test only."""
    return avoid


def control_swap(windows: D.Windows, source: int, avoid: Box, size: tuple[int, int], image_size: tuple[int, int],
                 gen: torch.Generator) -> Box:
    """The swap: the control is the *source* with the recipient's window (from the test's place)
    pasted over the candidate's, and it counts when the source keeps its class (:func:`score`).
    A win is a pair whose class follows the window (the recipient takes the candidate's class and
    the source loses it), a loss one whose class stays with the rest of the image: an object
    spanning several windows keeps its class around a swapped window, a cue inside the window
    takes it along."""
    return avoid


CONTROLS: dict[str, ControlFn] = {"next": control_next, "random": control_random, "guard": control_guard,
                                  "blurred": control_blurred, "swap": control_swap}
PLACES: dict[str, PlaceFn] = {
    "credited": lambda windows, r, box, size, image_size: D.credited_place(windows, r, size, image_size),
    "quiet": lambda windows, r, box, size, image_size: D.fit_box(windows.boxes[int(windows.energy[r].argmin())],
                                                                 size, image_size),
    "own": lambda windows, r, box, size, image_size: box,
}


WINDOWS = ("cell", "pixel")
RECIPIENTS = ("probe", "erased", "flat", "blurred")
Design = tuple[float, str, str, str, str]  # box (cells), control, place, window, recipient


#: Where the benchmarks on cached zoo models keep each model's weights after every epoch.
CACHE = os.path.join(tempfile.gettempdir(), "cam_monitor_zoo_states")


def specs_of(text: str) -> list[Spec]:
    """``--specs``: comma-separated :meth:`Spec.parse` texts."""
    return [Spec.parse(s) for s in text.split(",")]


def cached_models_parser(doc: str, result: str) -> argparse.ArgumentParser:
    """The arguments every benchmark on cached zoo models (:func:`trained_models`) takes:
    ``--specs`` (parsed into :class:`Spec`), ``--epochs``, ``--cache`` and ``--out`` (the
    ``result`` file under ``benchmarks/results/``); the benchmark adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--specs", required=True, type=specs_of, help="comma-separated base:cue:variant:seed[:arch], e.g. "
                   "shapes:corner_patch:control:0 or digits:background_texture:control:0:resnet18")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--cache", default=CACHE, help="where each model's per-epoch weights are kept (shared by the "
                   "benchmarks on cached zoo models)")
    p.add_argument("--out", default=default_result_path(result, torch.device("cpu")))
    return p


def trained_states(spec: Spec, epochs: int, cache: str) -> list[dict[str, torch.Tensor]]:
    """The model's weights after each epoch of ``spec``'s zoo task (trained once, then cached)."""
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"{spec.name}_{epochs}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    import lightning as L

    class Keep(L.Callback):
        def __init__(self) -> None:
            self.states: list[dict[str, torch.Tensor]] = []

        def on_validation_epoch_end(self, trainer, module) -> None:
            self.states.append({k: v.detach().clone() for k, v in module.state_dict().items()})

    L.seed_everything(spec.seed, verbose=False)
    data = DecoyDigitsDataModule(spec.variant, seed=spec.seed, cue=spec.cue, base=spec.base)
    probes = mask_free_probes(spec.cue, spec.seed, 64, spec.base)
    keep = Keep()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, deterministic=True, logger=False,
                        callbacks=[keep], enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=cache)
    trainer.fit(spec.model(probes), data)
    torch.save(keep.states, path + ".tmp")
    os.replace(path + ".tmp", path)
    return keep.states


def trained_models(specs: Iterable[Spec], epochs: int, cache: str) -> Iterator[tuple[Spec, ProbeSet, int, DigitClassifier]]:
    """Every spec's model after each of its ``epochs`` (:func:`trained_states`), beside its zoo
    probes (mask-free, 64) and the epoch: one model per spec, its weights loaded in turn, in eval mode."""
    for spec in specs:
        probes = mask_free_probes(spec.cue, spec.seed, 64, spec.base)
        model = spec.model(probes).eval()
        for epoch, state in enumerate(trained_states(spec, epochs, cache)):
            model.load_state_dict(state)
            yield spec, probes, epoch, model


def on_cue(masks: torch.Tensor, probe: int, box: Box) -> bool:
    """Whether ``box`` (image pixels) touches probe ``probe``'s true cue."""
    return bool(masks[probe, box[0]:box[2], box[1]:box[3]].any())


def pixel_windows(maps: torch.Tensor, side_cells: float, image_size: tuple[int, int]) -> D.Windows:
    """Windows of ``side_cells`` cells' size at every pixel offset, their energy read from the map
    upsampled bilinearly to the image (not only the grid's cells: a cue that straddles cells can
    sit inside one window)."""
    ch, cw = cell_size(image_size, tuple(maps.shape[-2:]))
    side = max(1, round(side_cells * ch)), max(1, round(side_cells * cw))
    energy = F.avg_pool2d(upsample(maps.float().clamp_min(0), image_size)[:, None], side, stride=1)[:, 0]
    boxes = [(y, x, y + side[0], x + side[1]) for y in range(energy.shape[-2]) for x in range(energy.shape[-1])]
    return D.Windows(energy.flatten(1), boxes, torch.tensor(boxes, dtype=torch.long).reshape(-1, 4))


def design_windows(maps: torch.Tensor, box: float, window: str, image_size: tuple[int, int]) -> D.Windows:
    """The candidate windows of a design: the monitor's grid-aligned windows of ``box`` cells
    (``cell``) or windows of that size at any pixel offset (``pixel``)."""
    if window == "cell":
        if box != int(box):
            raise ValueError(f"cell windows need a whole number of cells, got {box}")
        return D.Windows.of(maps, D.window_side(tuple(maps.shape[-2:]), int(box)), image_size)
    return pixel_windows(maps, box, image_size)


def recipient_images(images: torch.Tensor, maps: torch.Tensor, recipient: str) -> torch.Tensor:
    """What the candidate and its control are pasted into: the probes as they are (``probe``, the
    monitor's), with their most-credited 3-cell window filled with their mean (``erased``: the
    recipient's own cue, if it reads one, taken away first), their per-channel mean alone
    (``flat``) or blurred at one cell (``blurred``: detail gone, layout kept)."""
    grid = tuple(maps.shape[-2:])
    if recipient == "probe":
        return images
    if recipient == "flat":
        return images.mean((2, 3), keepdim=True).expand_as(images).clone()
    if recipient == "blurred":
        return blurred_cells(images, grid, 1.0)
    windows = pixel_windows(maps, 3.0, tuple(images.shape[-2:]))
    region = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
    for i, k in enumerate(windows.energy.argmax(1).tolist()):
        y0, x0, y1, x1 = windows.boxes[k]
        region[i, y0:y1, x0:x1] = True
    return filled(images, region)


def score(model: torch.nn.Module, probes: ProbeSet, pairs: int, designs: list[Design],
          seed: int, cue_masks: torch.Tensor, layer: str = ARCHS["cnn"]) -> list[dict]:
    """Per design, the wins and losses of up to ``pairs`` paste tests on ``probes`` against their
    controls, and (from the true ``cue_masks``, which the tests never see) how many candidates and
    how many controls touch the cue."""
    images, labels = probes.images, probes.labels
    preds = predict_classes(model, images)
    maps = compute_cams(model, images, layer, labels)
    accuracy = float((preds == labels).float().mean())
    candidates: dict[tuple[float, str], tuple[D.Windows, list[D.Suspect]]] = {}  # the same for every design
    rows = []
    for box, control, place, window, recipient in designs:
        if (box, window) not in candidates:
            windows = design_windows(maps, box, window, probes.image_size)
            candidates[box, window] = windows, D.find_suspects(maps, labels, preds, probes.image_size,
                                                               D.DiscoverySettings(), windows)
        windows, suspects = candidates[box, window]
        gen = torch.Generator().manual_seed(seed)
        tests = []
        for s, r in D.recipients_of(suspects, labels, preds, pairs, gen):
            at = suspects[s].box
            size = (at[2] - at[0], at[3] - at[1])
            tests.append(D.PasteTest(s, r, CONTROLS[control](windows, suspects[s].probe, at, size, probes.image_size, gen),
                                     PLACES[place](windows, r, at, size, probes.image_size)))
        wins = losses = 0
        on = sum(on_cue(cue_masks, suspects[t.suspect].probe, suspects[t.suspect].box) for t in tests)
        control_on = sum(on_cue(cue_masks, suspects[t.suspect].probe, t.control_box) for t in tests)
        if tests:
            n = len(images)  # recipients are read from the second half: the probes as this design prepares them
            blocks = [images, recipient_images(images, maps, recipient)]
            if control == "blurred":
                blocks.append(blurred_cells(images, tuple(maps.shape[-2:])))
            both = torch.cat(blocks)
            shifted = [p._replace(recipient=p.recipient + n) for p in D.pastes(suspects, tests)]
            if control == "blurred":  # the controls' pixels from the blurred sources (the third block)
                shifted = shifted[:len(tests)] + [p._replace(source=p.source + 2 * n) for p in shifted[len(tests):]]
            if control == "swap":  # the source, as it is, with the recipient's window over the candidate's
                shifted = shifted[:len(tests)] + [Paste(t.recipient + n, t.place, suspects[t.suspect].probe,
                                                          suspects[t.suspect].box) for t in tests]
            out = predict_classes(model, pasted_images(both, shifted))
            cls = torch.tensor([suspects[t.suspect].cls for t in tests])
            flips, controls = out[:len(tests)] == cls, out[len(tests):] == cls
            wins, losses = int((flips & ~controls).sum()), int((~flips & controls).sum())
        rows.append({"box": box, "control": control, "place": place, "window": window, "recipient": recipient,
                     "pairs": len(tests), "wins": wins, "losses": losses, "p": sign_test_p(wins, losses),
                     "accuracy": accuracy, "candidate_on_cue": on, "control_on_cue": control_on})
    return rows


def design_summary(records: list[dict], fields: tuple[str, ...]) -> list[tuple[dict, list[dict]]]:
    """Per design (the values of ``fields``): over its control evaluations the worst p-value's
    wins:losses and how many had p < 0.01 (a null the design breaks), over its shortcut
    evaluations the median wins; with each design's shortcut records for further columns."""
    out = []
    key = lambda r: tuple(r[f] for f in fields)  # noqa: E731
    for values, group in itertools.groupby(sorted(records, key=key), key=key):
        group = list(group)
        controls = [r for r in group if r["variant"] == "control"]
        shortcuts = [r for r in group if r["variant"] == "shortcut"]
        worst = min(controls, key=lambda r: r["p"], default=None)
        out.append(({**dict(zip(fields, values)), "control_evaluations": len(controls),
                     "control_p_below_0.01": sum(r["p"] < 0.01 for r in controls),
                     "worst_control": f"{worst['wins']}:{worst['losses']}" if worst else "-",
                     "shortcut_median_wins": statistics.median([r["wins"] for r in shortcuts]) if shortcuts else None},
                    shortcuts))
    return out


#: The design fields of a record; records written before ``window`` and ``recipient`` existed used
#: the monitor's (grid cells, the probe as it is).
DESIGN_FIELDS = ("box", "control", "place", "window", "recipient")
DESIGN_DEFAULTS = {"window": "cell", "recipient": "probe"}


def summarise(records: list[dict]) -> list[dict]:
    """:func:`design_summary` per design (:data:`DESIGN_FIELDS`), with the share of the shortcut
    models' tests whose control touched the cue (a control that is part of the cue ties with it)."""
    out = []
    for row, shortcuts in design_summary([{**DESIGN_DEFAULTS, **r} for r in records], DESIGN_FIELDS):
        tested = sum(r["pairs"] for r in shortcuts)
        out.append({**row, "shortcut_control_on_cue":
                    sum(r["control_on_cue"] for r in shortcuts) / tested if tested else None})
    return out


def main() -> None:
    p = cached_models_parser(__doc__, "local_test")
    p.add_argument("--pairs", type=int, default=200, help="paste tests per model, epoch and design")
    p.add_argument("--boxes", default="1,2", help="window sides in grid cells (fractions need --windows pixel)")
    p.add_argument("--controls", default=",".join(CONTROLS), help=f"from {tuple(CONTROLS)}")
    p.add_argument("--places", default=",".join(PLACES), help=f"from {tuple(PLACES)}")
    p.add_argument("--windows", default="cell", help=f"from {WINDOWS} (the monitor: cell)")
    p.add_argument("--recipients", default="probe", help=f"from {RECIPIENTS} (the monitor: probe)")
    args = p.parse_args()
    specs = args.specs
    boxes = [float(b) if "." in b else int(b) for b in args.boxes.split(",")]
    designs = list(itertools.product(boxes, args.controls.split(","), args.places.split(","),
                                     args.windows.split(","), args.recipients.split(",")))
    for name in ({d[1] for d in designs} - set(CONTROLS) | {d[2] for d in designs} - set(PLACES)
                 | {d[3] for d in designs} - set(WINDOWS) | {d[4] for d in designs} - set(RECIPIENTS)):
        p.error(f"unknown control, place, window or recipient {name!r}")
    designs = [d for d in designs if d[3] == "pixel" or d[0] == int(d[0])]  # grid cells come whole
    if not designs:
        p.error("cell windows need whole numbers of cells in --boxes; use --windows pixel for fractions")
    os.makedirs(args.cache, exist_ok=True)
    records = []
    print("| model | epoch | accuracy | box | control | place | window | recipient | wins:losses | p | tests | "
          "candidate on cue | control on cue |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec, probes, epoch, model in trained_models(specs, args.epochs, args.cache):
        cue_masks = truth_probes(spec.cue, spec.seed, 64, spec.base).spurious_masks
        for row in score(model, probes, args.pairs, designs, epoch, cue_masks, ARCHS[spec.arch]):
            records.append({"model": spec.name, "variant": spec.variant, "epoch": epoch, **row})
            print(f"| {spec.name} | {epoch} | {row['accuracy']:.2f} | {row['box']} | {row['control']} | "
                  f"{row['place']} | {row['window']} | {row['recipient']} | {row['wins']}:{row['losses']} | "
                  f"{row['p']:.2g} | {row['pairs']} | "
                  f"{row['candidate_on_cue']} | {row['control_on_cue']} |", flush=True)
    summary = summarise(records)
    print("\n| box | control | place | window | recipient | control evaluations | with p < 0.01 | worst control "
          "wins:losses | shortcut median wins | shortcut controls on the cue |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        print(f"| {r['box']} | {r['control']} | {r['place']} | {r['window']} | {r['recipient']} | "
              f"{r['control_evaluations']} | "
              f"{r['control_p_below_0.01']} | {r['worst_control']} | {r['shortcut_median_wins']} | "
              + ("-" if r["shortcut_control_on_cue"] is None else f"{r['shortcut_control_on_cue']:.0%}") + " |")
    write_json({"machine": machine(), "epochs": args.epochs, "pairs": args.pairs, "specs": [s.text for s in args.specs],
                "summary": summary, "records": records}, args.out)


if __name__ == "__main__":
    main()
