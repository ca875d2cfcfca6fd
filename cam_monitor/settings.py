"""The monitor's settings, grouped: which probes, what an evaluation computes, when an alert
fires, what the pictures show (and :class:`~cam_monitor.discovery.DiscoverySettings`, the fifth
group, lives with discovery).

Each group is a frozen, keyword-only dataclass that checks itself when built, so a wrong value
fails where it is written, naming the group and the fix. LightningCLI reads them from YAML as
nested mappings (``alerting: {spurious_enrichment: 3.0}``). :func:`from_flat` maps the flat
keyword arguments of earlier releases onto the groups. Lightning-free.
"""
from __future__ import annotations

import typing
import warnings
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Callable, Literal, Sequence, Union

import torch
from jsonargparse.typing import restricted_string_type

from .alerts import ACTIONS, RULES
from .discovery import DiscoverySettings
from .probes import ProbeSet

#: A CAM method's name (``cam_monitor.methods.METHODS``), spelled out so a CLI or YAML typo fails at parsing.
Method = Literal["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"]
#: An import path ``package.module:function`` (an alert action or a transform named in YAML).
ImportPath = restricted_string_type("ImportPath", r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
#: Which probes get per-probe curves on the dashboards: the few the filmstrip follows, every tiled one, or none.
ProbeCurves = Literal["filmstrip", "all", "none"]
PROBE_CURVES = typing.get_args(ProbeCurves)


def _check_int(group: str, name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{group}: {name} must be an int >= {minimum}, got {value!r}")


def _check_choice(group: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        words = ", ".join(map(repr, choices[:-1])) + f" or {choices[-1]!r}"
        raise ValueError(f"{group}: {name} must be {words}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ProbeSettings:
    """How the probe set is chosen when ``probes`` is not given, and how folder images are read.

    Args:
        num_probes: class-balanced probes picked from the loaders the trainer uses (validation,
            else training) when no probe set is given.
        seed: seed of the pick (and, unless the DiscoverySettings name one, of discovery's controls).
        mean: display normalisation (per-channel mean) of probes picked from data.
        std: display normalisation (per-channel std) of probes picked from data.
        transform: with a probe folder, a callable or import path mapping each image (float
            (C, H, W) in [0, 1]) to the model's input.
    """

    num_probes: int = 64
    seed: int = 0
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    transform: Union[Callable[..., torch.Tensor], ImportPath, None] = None

    def __post_init__(self) -> None:
        _check_int("ProbeSettings", "num_probes", self.num_probes, 1)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))


@dataclass(frozen=True, kw_only=True)
class CAMSettings:
    """What each evaluation computes.

    Args:
        methods: CAM methods computed in the one pass; the metrics use the first.
        targets: explain the true class ("label") or the predicted class ("pred").
        batch_size: probes per CAM chunk (bounds device memory).
        faithfulness: compute ``average_drop`` (one extra forward on image x map).
        border_fraction: width of the border band that stands in for a spurious mask (share of
            each side).
        reference: what drift and the reference rules compare with: the first evaluation
            ("first") or the model before its first training step ("fit_start").
        output_transform: callable or import path picking the (B, classes) logits from the
            model's output; None finds a tensor, ``["logits"]``, ``.logits`` or ``[0]``.
        reshape: (h, w) of a token layer whose grid is not square.
        layout: of a 4-D layer output: "nchw", "nhwc" (channels-last), or "auto" (by evidence:
            the shape, then what produced the output).
    """

    methods: Sequence[Method] = ("gradcam",)
    targets: Literal["label", "pred"] = "label"
    batch_size: int = 64
    faithfulness: bool = True
    border_fraction: float = 0.1
    reference: Literal["first", "fit_start"] = "first"
    output_transform: Union[Callable[[Any], torch.Tensor], ImportPath, None] = None
    reshape: Sequence[int] | None = None
    layout: Literal["auto", "nchw", "nhwc"] = "auto"

    def __post_init__(self) -> None:
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        object.__setattr__(self, "methods", methods)
        if self.reference not in ("first", "fit_start"):
            raise ValueError(f"CAMSettings: reference must be 'first' or 'fit_start', got {self.reference!r}")


@dataclass(frozen=True, kw_only=True)
class AlertSettings:
    """When an alert fires, and what it does. Each threshold is one rule's (``alerts.RULES``).

    Args:
        spurious_enrichment: energy share on the user's spurious masks over their area share
            (needs spurious masks).
        spurious_energy_rise: rise of the spurious energy since the reference.
        object_enrichment_floor: alert when the object masks' enrichment falls below this (1.0 =
            chance; needs object masks).
        drift_threshold: drift from the reference (1 - Spearman rho) while the maps move off the object.
        object_energy_floor: opt-in absolute floor on ``object_energy`` (needs object masks).
        patience: consecutive failing evaluations before a rule fires.
        hysteresis: a fired rule clears only this share of its threshold past it.
        action: "log", "warn", "stop" (every rank stops at the same step), "raise"
            (CAMAlertError), or an import path "package.module:function" called with the alert.

    No rule fires or clears while the model is at chance on the probes (``cam/skill_p`` above
    ``DiscoverySettings.skill_level``, :func:`alerts.at_chance`): its maps explain no decision yet.
    """

    spurious_enrichment: float = 4.0
    spurious_energy_rise: float = 0.15
    object_enrichment_floor: float = 0.5
    drift_threshold: float = 0.5
    object_energy_floor: float | None = None
    patience: int = 1
    hysteresis: float = 0.1
    action: Union[Literal["log", "warn", "stop", "raise"], ImportPath] = "warn"

    def __post_init__(self) -> None:
        for rule in RULES:
            if rule.group == "AlertSettings":
                rule.check(getattr(self, rule.setting))
        _check_int("AlertSettings", "patience", self.patience, 1)
        if not isinstance(self.hysteresis, (int, float)) or not 0 <= self.hysteresis < 1:
            raise ValueError(f"AlertSettings: hysteresis must be in [0, 1), got {self.hysteresis!r}")
        if not callable(self.action) and self.action not in ACTIONS and not isinstance(self.action, str):
            raise ValueError(f"AlertSettings: action must be one of {ACTIONS} or an import path, got {self.action!r}")

    def thresholds(self) -> dict[str, float | None]:
        """The rules' thresholds by rule setting name (what :func:`alerts.default_rules` takes)."""
        return {rule.setting: getattr(self, rule.setting) for rule in RULES if rule.group == "AlertSettings"}


@dataclass(frozen=True, kw_only=True)
class PictureSettings:
    """What the pictures show, how often, and on which thread they are drawn.

    Args:
        every_n_evals: send pictures every N-th evaluation (0 = never).
        max_grid_probes: probes shown in the probe grid.
        filmstrip_probes: the first N probes also get a filmstrip (their overlay over the last
            evaluations) and, by default, per-probe curves.
        tile_size: picture tile size in px (longer side); None keeps the image size.
        probe_curves: which probes get per-probe curves on the dashboards: the filmstrip's
            ("filmstrip"), every probe in the grid ("all"), or none ("none").
        background: draw and write the pictures on a worker thread (True), on the training
            thread (False), or "auto": on the worker where training runs on an accelerator.
    """

    every_n_evals: int = 1
    max_grid_probes: int = 32
    filmstrip_probes: int = 4
    tile_size: int | None = 128
    probe_curves: ProbeCurves = "filmstrip"
    background: Union[bool, Literal["auto"]] = "auto"

    def __post_init__(self) -> None:
        _check_int("PictureSettings", "every_n_evals", self.every_n_evals, 0)
        _check_int("PictureSettings", "filmstrip_probes", self.filmstrip_probes, 0)
        _check_choice("PictureSettings", "probe_curves", self.probe_curves, PROBE_CURVES)
        _check_choice("PictureSettings", "background", self.background, (True, False, "auto"))

    @property
    def curve_probes(self) -> int | None:
        """How many of the first probes get per-probe curves (None: every tiled one)."""
        return {"filmstrip": self.filmstrip_probes, "all": None, "none": 0}[self.probe_curves]


#: The flat keyword arguments of releases before 0.2 -> (the group argument, its field).
FLAT_ARGUMENTS: dict[str, tuple[str, str]] = {
    "num_probes": ("probe_settings", "num_probes"), "probe_seed": ("probe_settings", "seed"),
    "mean": ("probe_settings", "mean"), "std": ("probe_settings", "std"),
    "probe_transform": ("probe_settings", "transform"),
    **{name: ("cams", name) for name in ("methods", "targets", "batch_size", "faithfulness", "border_fraction",
                                          "reference", "output_transform", "reshape", "layout")},
    **{name: ("alerting", name) for name in ("spurious_enrichment", "spurious_energy_rise", "object_enrichment_floor",
                                              "drift_threshold", "object_energy_floor", "patience", "hysteresis")},
    "alert_action": ("alerting", "action"),
    "images_every_n_evals": ("pictures", "every_n_evals"),
    **{name: ("pictures", name) for name in ("max_grid_probes", "filmstrip_probes", "tile_size", "probe_curves",
                                              "background")},
    "shortcut_flip_excess": ("discovery", "min_effect"),
}
GROUPS = {"probe_settings": ProbeSettings, "cams": CAMSettings, "alerting": AlertSettings,
          "pictures": PictureSettings, "discovery": DiscoverySettings}


def from_flat(groups: dict[str, Any], flat: dict[str, Any], owner: str = "CAMMonitor") -> dict[str, Any]:
    """``groups`` (argument -> settings object) with the deprecated flat keyword arguments ``flat``
    applied on top, one ``DeprecationWarning`` each naming the new spelling; an unknown name is a
    ``TypeError`` as Python gives for any unknown keyword."""
    out = dict(groups)
    for name in flat:
        if name not in FLAT_ARGUMENTS:
            raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")
    for name, value in sorted(flat.items(), key=lambda item: FLAT_ARGUMENTS[item[0]][0] == "discovery"):
        group, field = FLAT_ARGUMENTS[name]
        cls = GROUPS[group]
        warnings.warn(f"{owner}({name}=...) is deprecated and will be removed in the next release; write "
                      f"{owner}({group}={cls.__name__}({field}=...))", DeprecationWarning, stacklevel=3)
        if isinstance(out[group], bool):  # discovery=True/False: the settings it stands for
            out[group] = DiscoverySettings(enabled=out[group], seed=out["probe_settings"].seed)
        out[group] = replace(out[group], **{field: value})
    return out


def given(settings: Any) -> dict[str, Any]:
    """The fields of a settings object that differ from the class's defaults (what the user set)."""
    default = type(settings)()
    return {f.name: getattr(settings, f.name) for f in fields(settings)
            if getattr(settings, f.name) != getattr(default, f.name)}


def plain(value: Any) -> Any:
    """A setting as a logger can store it: numbers, strings, booleans and None as they are; a
    sequence of those as a list; a settings group as a dict of its fields; anything else (a
    ProbeSet, a callable) as its short text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    if is_dataclass(value) and not isinstance(value, ProbeSet):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, ProbeSet):
        return f"ProbeSet({len(value)} probes)"
    return getattr(value, "__qualname__", None) or repr(value)[:200]


def flatten(head: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``{head.argument: value}``, a settings group's fields as ``head.group.field``: the monitor's
    settings as a logger's flat hyperparameters."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        value = plain(value)
        if isinstance(value, dict):
            out.update(flatten(f"{head}.{key}", value))
        else:
            out[f"{head}.{key}"] = value
    return out
