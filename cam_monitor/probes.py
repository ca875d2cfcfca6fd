"""A fixed probe set: the images the monitor explains at every evaluation, with optional masks.

Why fixed: drift and alert rules compare maps of the *same* images over training, so the set is
picked once (deterministically) and saved as plain tensors that load with ``weights_only=True``.
"""
from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch
from torchvision.io import ImageReadMode, decode_image

from .atomic import atomic_path
from .engine import check_images
from .errors import InputError, TargetError
from .maps import resize_masks

Box = Sequence[float]
MaskSpec = Union[None, torch.Tensor, Sequence[Union[Sequence[Box], None]]]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MASK_KINDS = ("spurious", "object")
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

    # ---- builders ------------------------------------------------------------------------------

    @classmethod
    def from_dataset(cls, dataset: Any, per_class: int = 4, seed: int = 0, *, num_probes: int | None = None,
                     num_classes: int | None = None, labels: Sequence[int] | torch.Tensor | None = None,
                     **meta: Any) -> "ProbeSet":
        """Pick probes from a map-style dataset, class-balanced and deterministic.

        ``per_class`` probes of every class, or, with ``num_probes``, that many in total taken
        round-robin over the classes (see :func:`balanced_indices`). Items may be ``(image, label)``
        tuples or dicts with ``image``, ``label`` and optional ``spurious_mask`` / ``object_mask``.
        Labels come from ``labels``, else ``dataset.targets`` (also through ``Subset``), else from
        indexing each item. The choice uses a private ``torch.Generator(seed)``: the global RNG
        is never touched and the same dataset and seed always give the same probes.
        """
        all_labels = _dataset_labels(dataset, labels)
        if num_probes is None:
            if not isinstance(per_class, int) or per_class < 1:
                raise InputError(f"per_class must be an int >= 1, got {per_class!r}")
            num_probes = per_class * len(set(all_labels.tolist()))
        chosen = balanced_indices(all_labels, num_probes, seed)
        if not chosen:
            raise InputError("the dataset is empty: no probes to pick")
        return cls._from_items(dataset, chosen, num_classes=num_classes, **meta)

    @classmethod
    def _from_items(cls, dataset: Any, indices: Sequence[int], **meta: Any) -> "ProbeSet":
        images, labels, spur, obj = [], [], [], []
        for i in indices:
            item = dataset[i]
            if isinstance(item, dict):
                images.append(torch.as_tensor(item["image"]))
                labels.append(int(item["label"]))
                spur.append(item.get("spurious_mask"))
                obj.append(item.get("object_mask"))
            else:
                images.append(torch.as_tensor(item[0]))
                labels.append(int(item[1]))
        stack = lambda ms: None if not ms or any(m is None for m in ms) else torch.stack([torch.as_tensor(m) for m in ms])  # noqa: E731
        meta.setdefault("ids", [f"idx{i:06d}" for i in indices])
        return cls(torch.stack(images), torch.tensor(labels), stack(spur), stack(obj), **meta)

    @classmethod
    def from_folder(cls, root: str | os.PathLike, transform: Callable[..., Any] | None = None,
                    labels_csv: str | None = None, **meta: Any) -> "ProbeSet":
        """Load probes from a folder (layout in the README, "Probe folders").

        Images are files with an image suffix; ``<stem>.spurious.png`` / ``<stem>.object.png``
        beside an image are its masks (non-zero = inside). Labels come from ``labels.csv``
        (columns ``file,label``; ``labels_csv`` names another file) or else from class
        sub-folders (sorted names -> 0, 1, ...); images the labels do not cover are skipped
        with a warning that counts them. ``transform`` maps the float (C, H, W) image in [0, 1]
        to the model's input: a ``torchvision.transforms.v2`` transform is applied to the image
        and its masks together (crops, flips and resizes move the masks too; masks are resized
        with nearest; normalisation touches the image only); any other callable is applied to
        the image, and masks are resized (nearest) to its output size.
        """
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"probe folder {str(root)!r} does not exist or is not a folder")
        csv_path = root / (labels_csv or "labels.csv")
        if csv_path.exists():
            files, labels, class_names = _labels_from_csv(root, csv_path)
        else:
            files, labels, class_names = _labels_from_subfolders(root)
        if not files:
            raise InputError(f"probe folder {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        _warn_skipped(root, files, "not listed in " + csv_path.name if csv_path.exists() else "outside the class sub-folders")
        _refuse_orphan_masks(root)
        images, spurious, objects = [], [], []
        for f in files:
            raw = _read_image(f)
            masks = {kind: _read_mask(_mask_path(f, kind)) for kind in MASK_KINDS}
            for kind, mask in masks.items():
                if mask is not None:
                    check_mask_shape(tuple(mask.shape), tuple(raw.shape[-2:]), f"mask {str(_mask_path(f, kind))!r}")
            image, spur, obj = _transformed(transform, raw, masks["spurious"], masks["object"], f)
            images.append(image)
            spurious.append(spur)
            objects.append(obj)
        shapes = {tuple(t.shape) for t in images}
        if len(shapes) > 1:
            raise InputError(f"probe images differ in shape {sorted(shapes)}; pass a transform that resizes them to one "
                             "size (CAMMonitor(probe_transform=...) or ProbeSet.from_folder(transform=...))")
        stack = lambda ms: None if all(m is None for m in ms) else torch.stack(  # noqa: E731
            [m if m is not None else torch.zeros(images[0].shape[-2:], dtype=torch.bool) for m in ms])
        meta.setdefault("ids", [str(f.relative_to(root).with_suffix("")) for f in files])
        meta.setdefault("class_names", class_names)
        return cls(torch.stack(images), torch.tensor(labels), stack(spurious), stack(objects), **meta)


def load_probe_source(src: "ProbeSet | str | os.PathLike", transform: Callable[..., Any] | None = None) -> ProbeSet:
    """A probe set from what ``CAMMonitor(probes=...)`` accepts: a ProbeSet, a saved probe file, or
    a probe folder (read through ``transform``; a transform for a saved file is refused, its images
    are stored as the model consumes them)."""
    if isinstance(src, ProbeSet):
        return src
    path = Path(src)
    if path.is_dir():
        return ProbeSet.from_folder(path, transform=transform)
    if transform is not None:
        raise InputError(f"probe_transform applies to probe folders, but {str(path)!r} is a saved probe file (its "
                         "images are stored as the model consumes them): drop probe_transform")
    return ProbeSet.load(path)


def _transformed(transform: Callable[..., Any] | None, image: torch.Tensor, spurious: torch.Tensor | None,
                 objects: torch.Tensor | None, path: Path) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Apply ``transform`` (see :meth:`ProbeSet.from_folder`); masks end at the image's size."""
    if transform is None:
        out = image
    elif isinstance(transform, torch.nn.Module) and type(transform).__module__.startswith("torchvision.transforms.v2"):
        from torchvision import tv_tensors

        masks = [m for m in (spurious, objects) if m is not None]
        result = transform(tv_tensors.Image(image), *[tv_tensors.Mask(m.to(torch.uint8)) for m in masks])
        out, moved = (result[0], list(result[1:])) if masks else (result, [])
        spurious = moved.pop(0).bool() if spurious is not None else None
        objects = moved.pop(0).bool() if objects is not None else None
        out = out.as_subclass(torch.Tensor)
        spurious = None if spurious is None else spurious.as_subclass(torch.Tensor)
        objects = None if objects is None else objects.as_subclass(torch.Tensor)
    else:
        out = transform(image)
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise InputError(f"the probe transform must return a (C, H, W) tensor; for {str(path)!r} it returned "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    size = tuple(out.shape[-2:])
    return out, *(None if m is None else resize_masks(m, size) for m in (spurious, objects))


def _warn_skipped(root: Path, used: list[Path], why: str) -> None:
    """Warn (with a count and examples) about images in ``root`` that the labels did not cover."""
    taken = set(used)
    skipped = sorted(p for p in root.rglob("*") if p.is_file() and _is_probe_image(p) and p not in taken)
    if skipped:
        names = ", ".join(str(p.relative_to(root)) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(f"probe folder {str(root)!r}: skipped {len(skipped)} image(s) {why}: {names}", stacklevel=3)


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


def check_mask_shape(mask: tuple[int, int], image: tuple[int, int], what: str) -> None:
    """Refuse a mask whose shape is not its image's, unless only a resize of the same aspect ratio
    tells them apart (a mask drawn at another resolution, resized with nearest); a stretched mask
    would mark another region than the one drawn."""
    if tuple(mask) != tuple(image) and mask[0] * image[1] != mask[1] * image[0]:
        raise InputError(f"{what}: mask shape {tuple(mask)} (H, W) does not match image shape {tuple(image)} and "
                         "differs in aspect ratio, so resizing would stretch it onto another region; give masks of the "
                         "image's shape (or a resize of it)")


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


def balanced_indices(labels: torch.Tensor, num: int, seed: int = 0) -> list[int]:
    """``num`` dataset indices covering the classes as evenly as the data allows.

    Classes are taken round-robin (one probe of each class in turn, members in a seeded random
    order), so every class is probed before any class gets a second probe; with more classes
    than ``num``, a seeded random sample of ``num`` classes gets one probe each. The result is
    in round-robin order, so any prefix (the probes shown first) is balanced too.
    """
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise InputError(f"the number of probes must be an int >= 1, got {num!r}")
    gen = torch.Generator().manual_seed(seed)
    classes = sorted(set(labels.tolist()))
    if len(classes) > num:
        keep = torch.randperm(len(classes), generator=gen)[:num]
        classes = sorted(classes[i] for i in keep.tolist())
    queues = []
    for cls_id in classes:
        members = (labels == cls_id).nonzero()[:, 0]
        queues.append(members[torch.randperm(len(members), generator=gen)].tolist())
    chosen: list[int] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        for queue in queues:
            if depth < len(queue) and len(chosen) < num:
                chosen.append(queue[depth])
    return chosen


def _targets_of(dataset: Any) -> Any:
    """``dataset.targets``, looked up through ``torch.utils.data.Subset`` (``random_split``) too."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return targets
    parent, indices = getattr(dataset, "dataset", None), getattr(dataset, "indices", None)
    if parent is not None and indices is not None:
        parent_targets = _targets_of(parent)
        if parent_targets is not None:
            return torch.as_tensor(parent_targets)[torch.as_tensor(list(indices), dtype=torch.long)]
    return None


def _dataset_labels(dataset: Any, labels: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        labels = _targets_of(dataset)
    if labels is None:
        def label_of(item: Any) -> int:
            return int(item["label"]) if isinstance(item, dict) else int(item[1])
        labels = [label_of(dataset[i]) for i in range(len(dataset))]
    t = torch.as_tensor(labels).long()
    if t.dim() != 1 or len(t) != len(dataset):
        raise InputError(f"got {len(t)} labels for a dataset of {len(dataset)} items")
    return t


def _labels_from_csv(root: Path, csv_path: Path) -> tuple[list[Path], list[int], list[str] | None]:
    files, labels = [], []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"file", "label"} <= set(reader.fieldnames):
            raise InputError(f"{csv_path} must have a header with columns 'file' and 'label'")
        for line, row in enumerate(reader, start=2):
            path = root / row["file"]
            if not path.exists():
                raise InputError(f"{csv_path}:{line}: image {row['file']!r} does not exist")
            try:
                labels.append(int(row["label"]))
            except ValueError:
                raise InputError(f"{csv_path}:{line}: label {row['label']!r} is not an integer") from None
            files.append(path)
    return files, labels, None


def _refuse_orphan_masks(root: Path) -> None:
    """A mask file with no image of its name (a typo, a renamed image) would leave the image it was
    drawn for measured against the border band: refuse it, naming the files."""
    stems = {p.with_suffix("") for p in root.rglob("*") if p.is_file() and _is_probe_image(p)}
    orphans = sorted(str(p.relative_to(root)) for p in root.rglob("*.png") if p.is_file()
                     and any(p.stem.endswith("." + k) for k in MASK_KINDS) and p.with_name(p.stem).with_suffix("") not in stems)
    if orphans:
        names = ", ".join(orphans[:5]) + (", ..." if len(orphans) > 5 else "")
        raise InputError(f"probe folder {str(root)!r}: {len(orphans)} mask file(s) have no image of the same name "
                         f"(<name>.spurious.png / <name>.object.png belong to <name>.<image suffix>): {names}; rename "
                         "them to their image's name or remove them")


def _is_probe_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not any(path.stem.endswith("." + k) for k in MASK_KINDS)


def _labels_from_subfolders(root: Path) -> tuple[list[Path], list[int], list[str] | None]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise InputError(f"probe folder {str(root)!r} has neither labels.csv nor class sub-folders")
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.is_file() and _is_probe_image(path):
                files.append(path)
                labels.append(label)
    return files, labels, classes


def _mask_path(image: Path, kind: str) -> Path:
    return image.with_name(f"{image.stem}.{kind}.png")


def _read_image(path: Path) -> torch.Tensor:
    """(C, H, W) float in [0, 1]; RGB for colour files, 1 channel for greyscale."""
    try:
        raw = decode_image(str(path), mode=ImageReadMode.UNCHANGED)
    except (RuntimeError, ValueError, OSError) as err:
        raise InputError(f"cannot read probe image {str(path)!r}: {err}") from err
    if raw.shape[0] in (2, 4):  # drop alpha
        raw = raw[:-1]
    return raw.float() / (65535.0 if raw.dtype == torch.uint16 else 255.0)


def _read_mask(path: Path) -> torch.Tensor | None:
    """(H, W) bool mask at the file's size, or None when the file does not exist."""
    if not path.exists():
        return None
    try:
        raw = decode_image(str(path), mode=ImageReadMode.GRAY)
    except (RuntimeError, ValueError, OSError) as err:
        raise InputError(f"cannot read mask {str(path)!r}: {err}") from err
    return raw[0] > 0
