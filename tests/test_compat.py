"""The protected extension points cam_monitor relies on (cam_monitor/compat.py lists them) exist in the
installed versions; CI runs this against the oldest Lightning allowed too."""
from __future__ import annotations

import inspect

from lightning.pytorch.callbacks import ModelCheckpoint


def test_model_checkpoint_extension_points_keep_their_signatures() -> None:
    for name in ("_save_topk_checkpoint", "_save_last_checkpoint"):
        params = list(inspect.signature(getattr(ModelCheckpoint, name)).parameters)
        assert params == ["self", "trainer", "monitor_candidates"], (name, params)


def test_model_checkpoint_keeps_the_file_a_link_points_to() -> None:
    ckpt = ModelCheckpoint()
    assert ckpt._last_checkpoint_saved == ""
