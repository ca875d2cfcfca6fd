"""Reading a probe folder: images, their masks beside them, labels from ``labels.csv`` or class
sub-folders, and the optional transform applied to image and masks together. Returns the fields of
a probe set; :class:`ProbeSet` builds itself from them."""
from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torchvision.io import ImageReadMode, decode_image

from ..errors import InputError
from ..maps import resize_masks
from .shapes import check_mask_shape

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MASK_KINDS = ("spurious", "object")


def folder_fields(root: str | os.PathLike, transform: Callable[..., Any] | None = None,
                  labels_csv: str | None = None) -> dict[str, Any]:
    """Load probes from a folder (layout in docs/reference.md, "Probe folders").

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
                         "size (ProbeSettings(transform=...) or ProbeSet.from_folder(transform=...))")
    stack = lambda ms: None if all(m is None for m in ms) else torch.stack(  # noqa: E731
        [m if m is not None else torch.zeros(images[0].shape[-2:], dtype=torch.bool) for m in ms])
    return {"images": torch.stack(images), "labels": torch.tensor(labels), "spurious_masks": stack(spurious),
            "object_masks": stack(objects), "ids": [str(f.relative_to(root).with_suffix("")) for f in files],
            "class_names": class_names}


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
