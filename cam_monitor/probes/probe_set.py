"""The probe set as a value: the images the monitor explains at every evaluation, with optional
masks, checked once when built.

Why fixed: drift and alert rules compare maps of the *same* images over training, so the set is
picked once (deterministically) and saved as plain tensors that load with ``weights_only=True``.
Reading folders (:mod:`.folder`), picking from datasets (:mod:`.pick`) and choosing among the
sources a monitor is given (:mod:`.source`) live beside it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import torch

from ..atomic import atomic_path
from ..engine import check_images
from ..errors import InputError, TargetError
from ..maps import resize_masks
from .shapes import check_mask_shape

Box = Sequence[float]
MaskSpec = Union[None, torch.Tensor, Sequence[Union[Sequence[Box], None]]]
_FORMAT = "cam_monitor.ProbeSet/1"
_STATE_KEYS = ("images", "labels", "spurious_masks", "object_masks", "ids", "mean", "std", "num_classes", "class_names")


def boxes_to_masks(boxes: Sequence[Sequence[Box] | None], height: int, width: int) -> torch.Tensor:
    """(N, H, W) bool masks from per-probe lists of (x0, y0, x1, y1) pixel boxes (x1, y1 exclusive)."""
    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for i, probe_boxes in enumerate(boxes):
        for box in probe_boxes or ():
            if len(box) != 4:
                raise InputError(f"probe {i}: a box must be (x0, y0, x1, y1), got {tuple(box)}")
            x0, y0, x1, y1 = (int(round(float(v))) for v in box)
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise InputError(f"probe {i}: box {tuple(box)} is empty or outside the {width}x{height} image")
            masks[i, y0:y1, x0:x1] = True
    return masks


@dataclass
class ProbeSet:
    """Probe images (N, C, H, W) as the model consumes them, labels (N,), optional masks and ids.

    Args:
        images: float tensor, already transformed/normalised for the model.
        labels: (N,) integer class labels.
        spurious_masks / object_masks: (N, H, W) binary tensors (any size: resized with nearest),
            or a per-probe sequence of (x0, y0, x1, y1) box lists; ``None`` when unknown.
        ids: unique string per probe (default ``probe_000`` ...).
        mean / std: per-channel normalisation the images carry, used only to un-normalise for display.
        num_classes: when given, labels are checked to lie in ``[0, num_classes)``.
        class_names: optional display names of the classes.
    """

    images: torch.Tensor
    labels: torch.Tensor
    spurious_masks: MaskSpec = None
    object_masks: MaskSpec = None
    ids: list[str] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_classes: int | None = None
    class_names: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        self.images = _check_images(self.images)
        n, _, h, w = self.images.shape
        self.ids = _check_ids(self.ids, n)
        self.labels = _check_labels(self.labels, self.ids, self.num_classes)
        self.spurious_masks = _check_masks(self.spurious_masks, "spurious", self.ids, h, w)
        self.object_masks = _check_masks(self.object_masks, "object", self.ids, h, w)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != self.images.shape[1]:
                    raise InputError(f"{name} has {len(value)} values but the images have {self.images.shape[1]} channels")
                setattr(self, name, value)
        if self.std is not None and any(s <= 0 for s in self.std):
            raise InputError(f"std values must be > 0, got {self.std}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the probe images."""
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    @property
    def marked(self) -> torch.Tensor | None:
        """(N,) bool: which probes carry a spurious mask of their own (a non-empty one); None
        without spurious masks. The others are measured against the border band."""
        return None if self.spurious_masks is None else self.spurious_masks.flatten(1).any(1)

    def display_images(self) -> torch.Tensor:
        """Images un-normalised with ``mean``/``std`` and clamped to [0, 1], for overlays."""
        x = self.images.float()
        if self.std is not None:
            x = x * torch.tensor(self.std, device=x.device)[:, None, None]
        if self.mean is not None:
            x = x + torch.tensor(self.mean, device=x.device)[:, None, None]
        return x.clamp(0, 1)

    def subset(self, index: Sequence[int] | torch.Tensor | slice) -> "ProbeSet":
        """A new ProbeSet with the probes at ``index`` (same metadata)."""
        idx = torch.arange(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long)
        pick = idx.tolist()
        return ProbeSet(
            self.images[idx], self.labels[idx],
            None if self.spurious_masks is None else self.spurious_masks[idx],
            None if self.object_masks is None else self.object_masks[idx],
            [self.ids[i] for i in pick], self.mean, self.std, self.num_classes, self.class_names)

    def check_classes(self, num_classes: int) -> None:
        """Raise :class:`TargetError` unless every label is a class of a model with ``num_classes``."""
        bad = (self.labels < 0) | (self.labels >= num_classes)
        if bad.any():
            ids = [self.ids[i] for i in bad.nonzero()[:, 0].tolist()][:10]
            raise TargetError(f"probe labels {self.labels[bad].unique().tolist()} are out of range for a model with "
                              f"{num_classes} classes (0..{num_classes - 1}): probes {ids}")

    def same_as(self, other: "ProbeSet") -> bool:
        """Whether ``other`` holds the same probes (ids, labels, images and masks)."""
        def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
            return (a is None) == (b is None) and (a is None or (a.shape == b.shape and bool(torch.equal(a, b))))
        return (self.ids == other.ids and same(self.labels, other.labels) and same(self.images, other.images)
                and same(self.spurious_masks, other.spurious_masks) and same(self.object_masks, other.object_masks))

    # ---- persistence ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Plain tensors and primitives only (what :meth:`save` writes)."""
        return {
            "format": _FORMAT, "images": self.images.cpu(), "labels": self.labels.cpu(),
            "spurious_masks": None if self.spurious_masks is None else self.spurious_masks.cpu(),
            "object_masks": None if self.object_masks is None else self.object_masks.cpu(),
            "ids": list(self.ids), "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std), "num_classes": self.num_classes,
            "class_names": None if self.class_names is None else list(self.class_names),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], source: str = "state") -> "ProbeSet":
        """Rebuild from :meth:`state`; anything that is not a complete probe-set state is an
        :class:`InputError` naming ``source``."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise InputError(f"{source} is not a cam_monitor probe file (missing format tag {_FORMAT!r})")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise InputError(f"{source} is an incomplete cam_monitor probe file: it lacks {missing}; save it again "
                             "with ProbeSet.save")
        try:
            return cls(*(state[k] for k in _STATE_KEYS))
        except InputError as err:
            raise InputError(f"{source} holds an invalid probe set: {err}") from err
        except (TypeError, ValueError, IndexError, RuntimeError) as err:
            raise InputError(f"{source} holds an invalid probe set ({type(err).__name__}: {err})") from err

    def save(self, path: str | os.PathLike) -> None:
        """Write the probe set atomically (a temporary file renamed into place)."""
        with atomic_path(path) as tmp:
            torch.save(self.state(), tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ProbeSet":
        """Load a file written by :meth:`save` with ``torch.load(weights_only=True)``."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (FileNotFoundError, IsADirectoryError, PermissionError):  # the OS's own error says which
            raise
        except Exception as err:  # noqa: BLE001 - torch.load raises many types on foreign bytes (EOFError, KeyError, ...)
            first = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(
                f"cannot load probe file {str(path)!r}: it is corrupt, not a torch file, or holds objects other than "
                f"tensors and primitives (refused by torch.load(weights_only=True)): {first}") from err
        return cls.from_state(state, source=repr(str(path)))

    # ---- builders (each lives in its own module) -------------------------------------------------

    @classmethod
    def from_dataset(cls, dataset: Any, per_class: int = 4, seed: int = 0, *, num_probes: int | None = None,
                     num_classes: int | None = None, labels: Sequence[int] | torch.Tensor | None = None,
                     **meta: Any) -> "ProbeSet":
        """Pick probes from a map-style dataset, class-balanced and deterministic
        (:func:`cam_monitor.probes.pick.dataset_fields`)."""
        from .pick import dataset_fields

        fields = dataset_fields(dataset, per_class, seed, num_probes=num_probes, labels=labels)
        return cls(**{**fields, "num_classes": num_classes, **meta})

    @classmethod
    def from_folder(cls, root: str | os.PathLike, transform: Callable[..., Any] | None = None,
                    labels_csv: str | None = None, **meta: Any) -> "ProbeSet":
        """Load probes from a folder (:func:`cam_monitor.probes.folder.folder_fields`; layout in the
        docs/reference.md, "Probe folders")."""
        from .folder import folder_fields

        return cls(**{**folder_fields(root, transform, labels_csv), **meta})


# ---- validation helpers ------------------------------------------------------------------------

def _check_images(images: Any) -> torch.Tensor:
    check_images(images, what="probe images")
    finite = torch.isfinite(images.flatten(1)).all(1)
    if not finite.all():
        raise InputError(f"probe images hold NaN or inf pixels at indices {(~finite).nonzero()[:, 0].tolist()}")
    return images


def _check_ids(ids: Sequence[str] | None, n: int) -> list[str]:
    if ids is None:
        return [f"probe_{i:03d}" for i in range(n)]
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise InputError(f"got {len(ids)} ids for {n} probe images")
    seen: dict[str, int] = {}
    for i, pid in enumerate(ids):
        if pid in seen:
            raise InputError(f"duplicate probe id {pid!r} at indices {seen[pid]} and {i}")
        seen[pid] = i
    return ids


def _check_labels(labels: Any, ids: list[str], num_classes: int | None) -> torch.Tensor:
    t = torch.as_tensor(labels)
    if t.dim() != 1 or t.shape[0] != len(ids):
        raise InputError(f"labels must be (N,) = ({len(ids)},), got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise InputError(f"labels must be integer class indices, got {t.dtype}")
    t = t.long()
    bad = (t < 0) | (t >= num_classes) if num_classes is not None else t < 0
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise InputError(f"probe {ids[i]!r} (index {i}) has label {int(t[i])}, outside {bound}")
    return t


def _check_masks(masks: MaskSpec, kind: str, ids: list[str], h: int, w: int) -> torch.Tensor | None:
    if masks is None:
        return None
    if not isinstance(masks, torch.Tensor):
        if len(masks) != len(ids):
            raise InputError(f"{kind} boxes: got {len(masks)} entries for {len(ids)} probes")
        return boxes_to_masks(masks, h, w)
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3 or masks.shape[0] != len(ids):
        raise InputError(f"{kind}_masks must be (N, H, W) with N = {len(ids)}, got shape {tuple(masks.shape)}")
    check_mask_shape(tuple(masks.shape[-2:]), (h, w), f"{kind}_masks of the {len(ids)} probes")
    if masks.dtype != torch.bool:
        binary = ((masks == 0) | (masks == 1)).flatten(1).all(1)
        if not binary.all():
            i = int((~binary).nonzero()[0, 0])
            raise InputError(f"{kind} mask of probe {ids[i]!r} (index {i}) is not binary: use 0/1 or bool values")
        masks = masks.bool()
    return resize_masks(masks, (h, w))
