"""Mask-free shortcut discovery and its causal confirmation, from maps already computed: paired
tests against controls, forward passes only (what each arm tests: :mod:`.arms`).

``settings`` (what runs) -> ``skill`` (whether the model is ready) -> ``candidates`` (who is
tested against what) -> ``allocation`` (how many pairs each arm gets) -> ``arms`` (the images,
classified: :func:`discover`) -> ``outcome`` (what was found)."""
from .allocation import arm_shares, open_shares, second_stage_weights, share_out
from .arms import Predict, discover
from .candidates import (Pair, PasteTest, Suspect, Windows, cells_to_pixels, control_box, credited_place, find_suspects,
                         fit_box, pastes, plan_tests, recipients_of, window_side)
from .outcome import Discovery, PairedArm
from .settings import (ARMS, FIRST_STAGE, LOCAL, MARKED, MIN_DETAIL_GRID, RECURRING, TEST_NAMES, DiscoverySettings,
                       arms_run, detail_runs, graded, marks_testable, recurring_in)
from .skill import beats_chance, skill_p, skilled

__all__ = ["ARMS", "FIRST_STAGE", "LOCAL", "MARKED", "MIN_DETAIL_GRID", "RECURRING", "TEST_NAMES", "Discovery",
           "DiscoverySettings", "Pair", "PairedArm", "PasteTest", "Predict", "Suspect", "Windows", "arm_shares",
           "arms_run", "beats_chance", "cells_to_pixels", "control_box", "credited_place", "detail_runs", "discover",
           "find_suspects", "fit_box", "graded", "marks_testable", "open_shares", "pastes", "plan_tests",
           "recipients_of", "recurring_in", "second_stage_weights", "share_out", "skill_p", "skilled", "window_side"]
