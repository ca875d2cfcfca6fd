"""Where a monitor's probe set comes from: the set it was given, a saved probe file, a probe
folder, a pick from the data the training uses, or (when a run resumes) the checkpoint's set."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch

from ..errors import InputError
from .pick import isolated_rng
from .probe_set import ProbeSet

#: What ``probes=`` accepts: a probe set, a saved probe file or a probe folder, or None (pick from data).
ProbeArg = Union[ProbeSet, str, os.PathLike, None]


def load_probe_source(src: ProbeSet | str | os.PathLike, transform: Callable[..., Any] | None = None) -> ProbeSet:
    """A probe set from a ProbeSet, a saved probe file, or a probe folder (read through
    ``transform``; a transform for a saved file is refused: its images are stored as the model
    consumes them)."""
    if isinstance(src, ProbeSet):
        return src
    path = Path(src)
    if path.is_dir():
        return ProbeSet.from_folder(path, transform=transform)
    if transform is not None:
        raise InputError(f"ProbeSettings(transform=...) applies to probe folders, but {str(path)!r} is a saved probe "
                         "file (its images are stored as the model consumes them): drop the transform")
    return ProbeSet.load(path)


def from_loader(loader: Any, which: str, num_probes: int, seed: int, mean: Sequence[float] | None,
                std: Sequence[float] | None) -> ProbeSet:
    """``num_probes`` class-balanced probes from a loader's map-style dataset, without touching the RNG;
    ``which`` names the loader in errors."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise InputError(f"CAMMonitor(probes=None) picks probes from the {which}'s dataset, but it is not a map-style "
                         f"dataset ({type(dataset).__name__}); pass probes=ProbeSet(...), a probe file or a folder")
    with isolated_rng():
        return ProbeSet.from_dataset(dataset, num_probes=num_probes, seed=seed, mean=mean, std=std)


class ProbeSource:
    """The probes a monitor was asked for, and how to get them.

    Args:
        given: a ProbeSet, a saved probe file, a probe folder, or None to pick from data.
        num_probes: how many to pick from data.
        seed: the pick's seed.
        mean, std: display normalisation of picked probes.
        transform: maps a folder's images to the model's input.
    """

    def __init__(self, given: ProbeArg, num_probes: int = 64, seed: int = 0, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, transform: Callable[..., Any] | None = None) -> None:
        if given is not None and not isinstance(given, (ProbeSet, str, os.PathLike)):
            raise TypeError(f"probes must be a ProbeSet, a path or None, got {type(given).__name__}")
        if transform is not None and not isinstance(given, (str, os.PathLike)):
            raise ValueError("ProbeSettings(transform=...) applies to probes loaded from a folder (probes='folder/'); "
                             "a ProbeSet or probes picked from data are already as the model consumes them")
        self.given, self.num_probes, self.seed = given, num_probes, seed
        self.mean, self.std, self.transform = mean, std, transform

    @property
    def from_data(self) -> bool:
        """Whether the probes are picked from the training's data (no set, file or folder given)."""
        return self.given is None

    def ready(self) -> ProbeSet | None:
        """The given probe set, or None when it must still be loaded or picked."""
        return self.given if isinstance(self.given, ProbeSet) else None

    def load(self) -> ProbeSet:
        """The given set, file or folder as a probe set (not for a pick from data)."""
        if self.given is None:
            raise InputError("no probe set, file or folder was given: the probes are picked from a loader")
        return load_probe_source(self.given, self.transform)

    def pick(self, loader: Any, which: str) -> ProbeSet:
        """``num_probes`` class-balanced probes from ``loader``'s dataset (``which`` names it in errors)."""
        return from_loader(loader, which, self.num_probes, self.seed, self.mean, self.std)

    def resumed_differs(self, resumed: ProbeSet) -> tuple[bool, str]:
        """Whether a resumed run's probes differ from what this source asks for, and the request in words."""
        if self.given is None:
            return len(resumed) != self.num_probes, f"num_probes={self.num_probes}"
        return not self.load().same_as(resumed), f"probes={self.given!r}"[:80]
