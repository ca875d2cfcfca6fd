"""Probes in one place: the probe set (:mod:`.probe_set`), reading probe folders (:mod:`.folder`),
picking from datasets (:mod:`.pick`) and choosing a monitor's source (:mod:`.source`)."""
from .folder import IMAGE_SUFFIXES, MASK_KINDS, folder_fields
from .pick import balanced_indices, dataset_fields, isolated_rng
from .probe_set import Box, MaskSpec, ProbeSet, boxes_to_masks
from .shapes import check_mask_shape
from .source import ProbeArg, ProbeSource, from_loader, load_probe_source

__all__ = ["Box", "IMAGE_SUFFIXES", "MASK_KINDS", "MaskSpec", "ProbeArg", "ProbeSet", "ProbeSource", "balanced_indices",
           "boxes_to_masks", "check_mask_shape", "dataset_fields", "folder_fields", "from_loader", "isolated_rng",
           "load_probe_source"]
