"""``GatedModelCheckpoint``: a ``ModelCheckpoint`` whose "best" saves wait for explanation gates.

Gates are ``{metric: "<op> <number>"}`` with op one of ``<``, ``<=``, ``>``, ``>=``, parsed
without ``eval``. A top-k save is refused (and the reason logged) when any gated metric is
missing, NaN, or fails its condition; the top-k bookkeeping is untouched, so no phantom
checkpoint is recorded. ``last.ckpt`` (``save_last``) is the run's resume point: it is written
wherever Lightning's own ``ModelCheckpoint`` with the same arguments would write it, whatever the
gate says (a refused top-k save still brings it), unless ``gate_last=True``.

The overridden ``_save_topk_checkpoint`` / ``_save_last_checkpoint`` are ModelCheckpoint's
extension points for subclasses (protected by name, no public equivalent), and ``_last_checkpoint_saved``
the file a ``save_last="link"`` links to; they exist with these signatures in every Lightning the
package allows, which CI checks against the oldest (2.4) and the newest.
"""
from __future__ import annotations

import math
import operator
import re
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_GATE = re.compile(r"^\s*(<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def parse_gate(metric: str, condition: str) -> tuple[str, float]:
    """``"<= 1.5"`` -> ``("<=", 1.5)``; a clear error for anything else."""
    match = _GATE.match(condition) if isinstance(condition, str) else None
    if match is None:
        raise ValueError(f"gate for {metric!r} must look like '<= 1.5' (ops <, <=, >, >=), got {condition!r}")
    return match.group(1), float(match.group(2))


def failing_gates(gates: dict[str, tuple[str, float]], metrics: dict[str, Any]) -> list[str]:
    """Human-readable reasons, one per gate that does not pass on ``metrics`` (empty = all pass)."""
    reasons = []
    for name, (op, bound) in gates.items():
        if name not in metrics:
            reasons.append(f"{name} was not logged")
            continue
        value = float(metrics[name].item() if isinstance(metrics[name], torch.Tensor) else metrics[name])
        if math.isnan(value) or not _OPS[op](value, bound):
            reasons.append(f"{name} = {value:.4g} fails '{op} {bound:g}'")
    return reasons


class GatedModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint(..., gate={"cam/spurious_enrichment": "<= 1.5"})``: save only when every gate passes.

    All other arguments are ``ModelCheckpoint``'s. ``refused`` lists ``(global_step, reasons)``
    for each refused save.

    Args:
        gate: metric name -> condition ("<= 1.5"; ops <, <=, >, >=): a top-k ("best") save is
            refused while any gated metric is missing, NaN or fails its condition.
        gate_last: gate last.ckpt too; by default it is written wherever ModelCheckpoint writes
            it, so a run whose gate never passes can still be resumed.
    """

    def __init__(self, *args: Any, gate: dict[str, str] | None = None, gate_last: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not gate:
            raise ValueError("GatedModelCheckpoint needs gate={'metric': '<op> value'}; use ModelCheckpoint for no gate")
        self.gate = {str(k): parse_gate(k, v) for k, v in gate.items()}
        self.gate_last = bool(gate_last)
        self.refused: list[tuple[int, list[str]]] = []
        self._resume_step: int | None = None

    def _gate_passes(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> bool:
        reasons = failing_gates(self.gate, monitor_candidates)
        if reasons and (not self.refused or self.refused[-1][0] != trainer.global_step):
            self.refused.append((trainer.global_step, reasons))
            rank_zero_info(f"GatedModelCheckpoint: not saving at step {trainer.global_step}: {'; '.join(reasons)}")
        return not reasons

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self._gate_passes(trainer, monitor_candidates):
            super()._save_topk_checkpoint(trainer, monitor_candidates)
        elif self.save_last and not self.gate_last and self._would_save_topk(trainer, monitor_candidates):
            self._save_resume_point(trainer, monitor_candidates)

    def _would_save_topk(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> bool:
        """Whether ``ModelCheckpoint`` without the gate would save a top-k file here (Lightning then
        writes ``last.ckpt`` beside it; since 2.5 only then)."""
        if self.save_top_k == 0:
            return False
        if self.monitor is None:
            return True
        current = monitor_candidates.get(self.monitor)
        return current is not None and self.check_monitor_top_k(trainer, current)

    def _save_resume_point(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        """Write ``last.ckpt`` where the refused top-k save would have brought it: a real file, never a
        link (``save_last="link"`` would point at an older, gated-in checkpoint)."""
        linked_to, self._last_checkpoint_saved = self._last_checkpoint_saved, ""
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        except BaseException:
            self._last_checkpoint_saved = linked_to
            raise
        self._resume_step = trainer.global_step

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self._resume_step == trainer.global_step:
            return  # written at this step already, by _save_resume_point
        if not self.gate_last or self._gate_passes(trainer, monitor_candidates):
            super()._save_last_checkpoint(trainer, monitor_candidates)
