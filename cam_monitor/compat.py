"""Every private API of another library that cam_monitor uses, in one place, each pinned and tested.

``tests/test_compat.py`` checks each entry against the installed versions; CI also runs the
Lightning-facing tests against the oldest Lightning the package allows (README, "Development").
Lightning's own extension points that are protected by name but documented for subclasses
(``ModelCheckpoint._save_topk_checkpoint``, ``Callback._generate_state_key``) are used where they
are documented: in :mod:`cam_monitor.checkpoint` and :mod:`cam_monitor.callback`.
"""
from __future__ import annotations

from typing import Any


def tensorboard_file_writer(writer: Any) -> Any:
    """The ``FileWriter`` behind a ``torch.utils.tensorboard.SummaryWriter``.

    Why private: ``SummaryWriter.add_image`` only takes raw pixels and PNG-encodes them through
    Pillow at its default (slow) compression; writing an already-encoded image summary needs the
    file writer's public ``add_summary``. Present in torch 2.2 .. 2.14 (``torch>=2.2,<=2.14.1``).
    """
    return writer._get_file_writer()
