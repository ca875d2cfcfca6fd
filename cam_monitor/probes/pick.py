"""Picking probes from a dataset: class-balanced, deterministic, and without touching the
training's random state. Returns the fields of a probe set; :class:`ProbeSet` builds itself from them."""
from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator, Sequence

import torch

from ..errors import InputError


def dataset_fields(dataset: Any, per_class: int = 4, seed: int = 0, *, num_probes: int | None = None,
                   labels: Sequence[int] | torch.Tensor | None = None) -> dict[str, Any]:
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
    return _from_items(dataset, chosen)



def _from_items(dataset: Any, indices: Sequence[int]) -> dict[str, Any]:
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
    return {"images": torch.stack(images), "labels": torch.tensor(labels), "spurious_masks": stack(spur),
            "object_masks": stack(obj), "ids": [f"idx{i:06d}" for i in indices]}



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


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run the body with the global RNGs (torch's CPU and CUDA, Python's, NumPy's where installed)
    restored afterwards, so a dataset's random transforms cannot move the training's random stream."""
    py_state = random.getstate()
    try:
        import numpy as np
        np_state = np.random.get_state()
    except ImportError:
        np, np_state = None, None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            if np is not None:
                np.random.set_state(np_state)
