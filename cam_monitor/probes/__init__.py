"""Probes in one place: the probe set (:mod:`.probe_set`), reading probe folders (:mod:`.folder`),
picking from datasets (:mod:`.pick`) and choosing a monitor's source (:mod:`.source`)."""
from .folder import IMAGE_SUFFIXES, MASK_KINDS, read_folder
from .pick import balanced_indices, from_dataset, from_loader, isolated_rng
from .probe_set import Box, MaskSpec, ProbeSet, boxes_to_masks, check_mask_shape
from .source import ProbeArg, ProbeSource, load_probe_source

__all__ = ["Box", "IMAGE_SUFFIXES", "MASK_KINDS", "MaskSpec", "ProbeArg", "ProbeSet", "ProbeSource", "balanced_indices",
           "boxes_to_masks", "check_mask_shape", "from_dataset", "from_loader", "isolated_rng", "load_probe_source",
           "read_folder"]
