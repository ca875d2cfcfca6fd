"""The one shape rule probe masks from any source share."""
from __future__ import annotations

from ..errors import InputError


def check_mask_shape(mask: tuple[int, int], image: tuple[int, int], what: str) -> None:
    """Refuse a mask whose shape is not its image's, unless only a resize of the same aspect ratio
    tells them apart (a mask drawn at another resolution, resized with nearest); a stretched mask
    would mark another region than the one drawn."""
    if tuple(mask) != tuple(image) and mask[0] * image[1] != mask[1] * image[0]:
        raise InputError(f"{what}: mask shape {tuple(mask)} (H, W) does not match image shape {tuple(image)} and "
                         "differs in aspect ratio, so resizing would stretch it onto another region; give masks of the "
                         "image's shape (or a resize of it)")
