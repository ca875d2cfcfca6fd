"""What the monitor's check before training finds in one CAM pass over the first probes.

Each finding is a sentence with its fix. Warnings are about numbers that would not mean what their
names say (every map zero, a grid too coarse for the spurious region, a layer that runs twice);
notes say what was read automatically (a channels-last layout). Also the pass itself
(:func:`dry_run`), which turns a model/probe mismatch into an error that names the fix.
Lightning-free: the monitor only prints the findings.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .alerts import MOVED_ONTO_MARKS_LEVEL
from .discovery import MIN_DETAIL_GRID, RECURRING, DiscoverySettings, arms_run, recurring_in, window_side
from .engine import CAMResult
from .errors import CAMError, InputError
from .evaluation import EvalSettings, Placement, spurious_regions
from .evidence import sign_test_p
from .interventions import cell_size
from .metrics import energy_fraction_bounds, enrichment_ceiling, pointing_always_hits
from .probes import ProbeSet
from .probes.recurrence import MAX_SHARE, background_of

#: Distinct spurious regions the resolution check looks at (it is exact per region, so bounded).
RESOLUTION_REGIONS = 16
#: The largest share of the image a candidate region of discovery's local test may cover.
MAX_REGION_SHARE = 0.25


@dataclass
class Findings:
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def dry_run_findings(result: CAMResult, probes: ProbeSet, settings: EvalSettings, enrichment_threshold: float,
                     prefix: str) -> Findings:
    """Everything worth saying about ``result``, a CAM pass over the first probes."""
    found = Findings()
    if settings.layout == "auto" and result.layout == "nhwc":
        found.notes.append(f"layer {result.layer_name!r} outputs channels-last (B, h, w, C); reading it so (pass "
                           "layout='nchw' to override)")
    if all(float(m.amax()) <= 0 for m in result.maps.values()):
        found.warnings.append(f"{zero_map_cause(result)}; metrics stay NaN (counted in {prefix}/degenerate) until the "
                              "maps are non-zero")
    found.warnings.extend(immobile_metric_findings(result.grid_size, result.layer_name, probes, settings.border_fraction,
                                                   prefix))
    found.warnings.extend(resolution_findings(result.grid_size, result.layer_name, probes, settings.border_fraction,
                                              enrichment_threshold, prefix))
    found.warnings.extend(discovery_findings(result.grid_size, result.layer_name, probes, settings, prefix))
    found.notes.extend(local_reach_notes(result.grid_size, result.layer_name, probes, settings))
    found.warnings.extend(drift_sign_findings(probes, prefix))
    if result.layer_calls > 1:
        found.warnings.append(
            f"layer {result.layer_name!r} runs {result.layer_calls} times in one forward (a shared module); its maps "
            "are of the last call only, as captum's. Target a module that runs once (for instance the block after "
            "the last call), or wrap each use in its own module")
    return found


def zero_map_cause(result: CAMResult) -> str:
    """Why every map of the pass is all zero, and what to do about it."""
    where = f"every map of the first probes at layer {result.layer_name!r} is all zero"
    if result.zero_gradient:
        return (f"{where}: the class scores' gradient there is zero. Either the head has no gradient yet (torchvision "
                "zero-initialises ViT heads; the maps become non-zero once the first steps move it, and "
                "target_layer=None already picked the layer by structure), or the layer reaches the logits only "
                "through a class token (a ViT's last block or final norm): target the last block's attention input, "
                "e.g. 'encoder.layers.encoder_layer_11.ln_1'")
    return (f"{where}: all of its evidence is negative and the ReLU removes it; target an earlier layer, or check "
            "that the probes are normalised as the model expects")


#: The alert settings that act only on masks the user gives, and the masks they need.
MASK_RULE_SETTINGS = {"spurious_enrichment": "spurious", "object_enrichment_floor": "object",
                      "object_energy_floor": "object"}


def inert_setting_findings(alerting: dict[str, object], min_effect: float | None, probes: ProbeSet,
                           discovery_enabled: bool) -> list[str]:
    """One line per setting the user gave that cannot have any effect with these probes: a mask
    rule's threshold (``alerting``: the AlertSettings fields the user set) without those masks, the
    drift threshold without any mask, the discovery margin (``min_effect``, None unless the user set
    it) with discovery off."""
    out = []
    for arg, kind in MASK_RULE_SETTINGS.items():
        if arg in alerting and getattr(probes, f"{kind}_masks") is None:
            out.append(f"AlertSettings: {arg}={alerting[arg]!r} can never alert: its rule judges {kind} masks the user "
                       f"gives, and the probes have none; give {kind}_masks (ProbeSet(..., {kind}_masks=...) or "
                       f"<name>.{kind}.png files in the probe folder)" + ("" if kind == "object" else
                                                     ", or rely on mask-free discovery (shortcut_confirmed)"))
    if "drift_threshold" in alerting and probes.object_masks is None and probes.spurious_masks is None:
        out.append(f"AlertSettings: drift_threshold={alerting['drift_threshold']!r} can never alert: drift_off_object "
                   "judges whether the maps left the object, which takes object masks (or spurious masks the user "
                   "gives), and the probes have none; cam/drift_ref is still logged, and mask-free discovery "
                   "(shortcut_confirmed) judges runs without masks")
    if min_effect is not None and not discovery_enabled:
        out.append(f"DiscoverySettings: min_effect={min_effect!r} can never alert: it is the margin of mask-free "
                   "discovery's test, and discovery is off (enabled=False); turn discovery on")
    return out


def marked_probes_needed(level: float = MOVED_ONTO_MARKS_LEVEL) -> int:
    """The fewest probes whose rises can make the sign test of ``spurious_rise_p`` reach ``level``
    (every one of them up)."""
    n = 1
    while sign_test_p(n, 0) > level:
        n += 1
    return n


def drift_sign_findings(probes: ProbeSet, prefix: str) -> list[str]:
    """Without object masks, ``drift_off_object`` asks whether the energy on the user's marks rose
    on more of the marked probes than chance allows; with too few marked probes no rise can pass."""
    if probes.object_masks is not None or probes.spurious_masks is None:
        return []
    marked = int(probes.marked.sum())
    need = marked_probes_needed()
    if marked == 0 or marked >= need:
        return []
    return [f"only {marked} probe(s) carry a spurious mask of their own and none an object mask, so drift_off_object "
            f"can never fire: whether the maps moved onto your marks is a sign test over those probes "
            f"({prefix}/spurious_rise_p), which needs at least {need} of them to reach {MOVED_ONTO_MARKS_LEVEL:g}; "
            "mark the cue on more probes, or give object masks"]


def immobile_metric_findings(grid: tuple[int, int], layer: str, probes: ProbeSet, border_fraction: float,
                             prefix: str) -> list[str]:
    """The region metrics that are the same number for every map on this grid (every single-cell
    map puts the same share of its energy on each probe's region), so they cannot move whatever the
    model does, and the alerts and gates on them can never change."""
    families = [("spurious", spurious_regions(probes, border_fraction),
                 ("spurious_energy", "spurious_enrichment", "spurious_energy_rise"))]
    if probes.object_masks is not None:
        families.append(("object", probes.object_masks, ("object_energy", "object_enrichment")))
    out = []
    for kind, regions, names in families:
        distinct = torch.unique(regions, dim=0)[:RESOLUTION_REGIONS]
        low, high = energy_fraction_bounds(grid, distinct)
        if bool(((high - low).nan_to_num(1.0) <= 1e-6).all()):
            metrics = ", ".join(f"{prefix}/{n}" for n in names)
            out.append(f"on the {grid[0]}x{grid[1]} grid of layer {layer!r}, every map puts the same share of its "
                       f"energy on the {kind} regions: {metrics} are the same number whatever the model does, and "
                       "their alerts and any gate on them can never change; target an earlier layer (a finer grid) "
                       "or use larger probes")
    return out


def resolution_findings(grid: tuple[int, int], layer: str, probes: ProbeSet, border_fraction: float,
                        enrichment_threshold: float, prefix: str) -> list[str]:
    """Whether the layer's grid can resolve the probes' spurious regions: no map reaching the
    enrichment threshold means the rule can never fire (and a gate on it always passes); every
    map pointing at the region means ``pointing_spurious`` is 1 whatever the model does."""
    regions = spurious_regions(probes, border_fraction)
    where = f"on the {grid[0]}x{grid[1]} grid of layer {layer!r}"
    region = "spurious masks" if probes.spurious_masks is not None else (
        f"default border band ({border_fraction:g} of each side)")
    finer = "target an earlier layer (a finer grid) or use larger probes"
    out = []
    ceiling = float(enrichment_ceiling(grid, regions).nan_to_num(0).max())
    if ceiling <= enrichment_threshold and probes.spurious_masks is not None:
        fix = finer if ceiling <= 1.0 + 1e-3 else f"{finer}, give tighter spurious masks, or lower spurious_enrichment"
        out.append(f"{where}, no map can put more than {ceiling:.2f}x its share of energy on the {region} (1.00 = "
                   f"chance), below spurious_enrichment={enrichment_threshold:g}: that alert can never fire and a gate "
                   f"on {prefix}/spurious_enrichment always passes; {fix}")
    if bool(pointing_always_hits(grid, torch.unique(regions, dim=0)[:RESOLUTION_REGIONS]).all()):
        out.append(f"{where}, every map's peak lies within half a stride of the {region}: {prefix}/pointing_spurious "
                   f"is 1.0 whatever the model does; {finer}")
    return out


def discovery_findings(grid: tuple[int, int], layer: str, probes: ProbeSet, settings: EvalSettings,
                       prefix: str) -> list[str]:
    """Whether mask-free discovery can work here: it is the only shortcut check without spurious
    masks, and its local test needs a candidate region that is a small part of the image."""
    found = settings.discovery
    if probes.spurious_masks is None and not found.enabled:
        return [f"no spurious masks and discovery=False: nothing watches for shortcuts ({prefix}/spurious_enrichment "
                "of the default border band is logged but does not alert); turn discovery on or give spurious masks"]
    out = []
    side = window_side(grid, found.box_cells)
    share = side[0] * side[1] / (grid[0] * grid[1])
    if found.enabled and share > MAX_REGION_SHARE:
        out.append(f"discovery's candidate region ({side[0]}x{side[1]} cells of the {grid[0]}x{grid[1]} grid of layer "
                   f"{layer!r}) covers {share:.0%} of the image: the local paste test cannot tell a small cue from "
                   "the object here (the global and border tests still run); target an earlier layer (a finer grid) "
                   "or lower DiscoverySettings(box_cells=...)")
    idle = set(found.arms) - set(arms_run(found, grid, probes)) if found.enabled else set()
    if "border" in idle:
        out.append(f"discovery's border test needs an inner band as large as its border band, and "
                   f"{probes.image_size[0]}x{probes.image_size[1]} images have none: it does not run; "
                   "use DiscoverySettings(border_test=False)")
    coarse = [arm for arm in ("detail", "texture") if arm in idle]
    if coarse:
        names = " and ".join(coarse)
        off = ", ".join(f"{arm}_test=False" for arm in coarse)
        out.append(f"discovery's {names} test{'s need' if len(coarse) > 1 else ' needs'} a grid of at least "
                   f"{MIN_DETAIL_GRID}x{MIN_DETAIL_GRID} cells (on fewer a cell holds a whole object), and layer "
                   f"{layer!r} gives {grid[0]}x{grid[1]}: {'they do' if len(coarse) > 1 else 'it does'} not run; "
                   f"target an earlier layer (a finer grid) or use DiscoverySettings({off})")
    return out


def local_reach_notes(grid: tuple[int, int], layer: str, probes: ProbeSet, settings: EvalSettings) -> list[str]:
    """The size of cue the mask-free local test can see on this layer, where it is the only watch
    on local cues (no spurious masks): a cue larger than its window is missed whatever the model
    does (a floating stamp, a text tag, a ruler over several cells), so the user learns it at fit
    start rather than from a silent dashboard."""
    found = settings.discovery
    if probes.spurious_masks is not None or not found.enabled:
        return []
    cells = window_side(grid, found.box_cells)
    ch, cw = cell_size(probes.image_size, grid)
    runs = arms_run(found, grid, probes)
    others = [arm for arm in runs if arm not in ("local", RECURRING)]
    named = " and ".join([", ".join(others[:-1]), others[-1]] if len(others) > 1 else others)
    still = f" (the {named} test{'s' if len(others) > 1 else ''} still run{'' if len(others) > 1 else 's'})"
    window = "one cell" if cells == (1, 1) else f"{cells[0]}x{cells[1]} cells"
    recurring = recurring_note(probes, runs, found) if found.recurring_test else ""
    return [f"without masks, discovery's local test sees a cue that fits in {window} of layer {layer!r} "
            f"({cells[0] * ch}x{cells[1] * cw} px of the "
            f"{probes.image_size[0]}x{probes.image_size[1]} probes); a stamp, tag or ruler larger than that is "
            f"missed by it{still if others else ''}{recurring}: "
            "give spurious masks for a cue you know, or target a layer whose cells are at least as large as the cue "
            "and smaller than your objects"]


def recurring_note(probes: ProbeSet, runs: tuple[str, ...], found: DiscoverySettings) -> str:
    """What the recurrence finder (with the keys and turns ``found`` chooses) found in the probes,
    for the local-reach note: the recurring arm tests a cue of any size whole, but only one drawn
    the same in several probes (to within noise and compression with its tolerant keys, turned
    with its turns: :mod:`~cam_monitor.probes.recurrence`)."""
    if RECURRING in runs:
        holding = int(recurring_in(probes, found).flatten(1).any(1).sum())
        return (f"; the recurring test found content drawn the same in {holding} of {len(probes)} "
                "probes and tests it whole")
    background = background_of(probes.images, found.recurring_tolerant, found.recurring_turned)
    if background:
        return (f"; what recurs across the probes is background (it covers more than "
                f"{MAX_SHARE:.1%} of {background} of {len(probes)} probes: a texture, a pattern, a frame), which the "
                "texture, detail and border tests are for, so the recurring test, which tests a mark against a box "
                "elsewhere in its probe, does not run")
    if not found.recurring_tolerant:
        return ("; nothing recurs pixel for pixel across the probes, so the recurring test, which would test such a "
                "cue whole, does not run (recurring_tolerant=False: a cue under sensor noise or JPEG compression is "
                "found only with DiscoverySettings(recurring_tolerant=True), the default)")
    turns = ", turned by quarter turns or mirrored" if found.recurring_turned else ""
    return ("; nothing recurs across the probes, so the recurring test, which would test such a cue whole, does "
            f"not run (it finds a cue under sensor noise or JPEG compression{turns}, not one resized, "
            "turned by other angles or redrawn from probe to probe)")


#: Probes the check before training runs through the model.
DRY_RUN_PROBES = 8


def first_pass(runner: torch.nn.Module, probes: ProbeSet, settings: EvalSettings, placement: Placement,
               n: int = 1) -> CAMResult:
    """One CAM pass over the first ``n`` probes, as the evaluations run it."""
    first = slice(0, min(len(probes), n))
    images = placement.to_model(probes.images[first])
    targets = probes.labels[first] if settings.targets == "label" else None
    with placement.forward_context():
        return settings.cam_pass(runner, images, targets)


def dry_run(runner: torch.nn.Module, probes: ProbeSet, settings: EvalSettings, placement: Placement, when: str,
            model_name: str) -> CAMResult:
    """The first :data:`DRY_RUN_PROBES` probes through the CAM pass: a wrong layer, probe shape or
    label fails here, ``when`` (``"before training"``), with the fix, instead of at the first
    validation; ``model_name`` names the model in the message."""
    try:
        result = first_pass(runner, probes, settings, placement, DRY_RUN_PROBES)
        if settings.targets == "label":
            probes.check_classes(result.logits.shape[1])
    except CAMError as err:
        raise type(err)(f"CAMMonitor check {when} failed: {err}") from err
    except Exception as err:  # noqa: BLE001 - e.g. a conv rejecting the probes' channel count
        raise InputError(
            f"CAMMonitor could not run a probe of shape {tuple(probes.images.shape[1:])} through {model_name} {when} "
            f"({type(err).__name__}: {err}); make the probes match the model's input (channels, size, "
            "normalisation)") from err
    return result
