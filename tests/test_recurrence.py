"""The recurrence finder: content drawn the same in several probes, at any place, is found, also
under sensor noise and JPEG compression; objects that vary from image to image, and a piece two
images share by chance, are not."""
from __future__ import annotations

import pytest
import torch

from cam_monitor.probes.recurrence import TURNS, pixel_keys, recurring_masks, recurring_of, turn

SIZE = 32


def blotchy(n: int, gen: torch.Generator, channels: int = 3, size: int = SIZE) -> torch.Tensor:
    """Dark, smooth, varied backgrounds (a base colour and upsampled noise): no two alike."""
    base = 0.05 + 0.2 * torch.rand(n, channels, 1, 1, generator=gen)
    noise = torch.nn.functional.interpolate(torch.rand(n, channels, 4, 4, generator=gen), size=(size, size),
                                            mode="bicubic", align_corners=False)
    return (base + 0.12 * noise).clamp(0, 0.45)


def tag() -> torch.Tensor:
    """A 5 x 9 glyph-like pattern of lit pixels (True: lit)."""
    g = torch.Generator().manual_seed(7)
    lit = torch.rand(5, 9, generator=g) < 0.5
    lit[:, 0] = lit[:, -1] = True
    return lit


def with_tags(n: int, tagged: list[int], seed: int = 0, size: int = SIZE, scale: int = 1,
              turned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` blotchy images of ``size`` px, each of ``tagged`` with the white tag (its pixels
    ``scale`` x ``scale`` blocks; the k-th of them turned by the k-th symmetry of a square where
    ``turned``) at its own random place (only the lit pixels drawn, the background showing
    through), and where each tag is."""
    gen = torch.Generator().manual_seed(seed)
    images = blotchy(n, gen, size=size)
    where = torch.zeros(n, size, size, dtype=torch.bool)
    upright = tag().repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    for k, i in enumerate(tagged):
        lit = turn(upright, k % TURNS) if turned else upright
        h, w = lit.shape
        y, x = (int(v) for v in torch.randint(1, size - max(h, w) - 1, (2,), generator=gen))
        images[i, :, y:y + h, x:x + w] = torch.where(lit, torch.ones(()), images[i, :, y:y + h, x:x + w])
        where[i, y:y + h, x:x + w] = True
    return images, where


def objects(n: int, seed: int = 0) -> torch.Tensor:
    """Blotchy images each with a filled square of its own bright colour and size at its own place."""
    gen = torch.Generator().manual_seed(seed)
    images = blotchy(n, gen)
    for i in range(n):
        side = int(torch.randint(8, 14, (1,), generator=gen))
        y, x = (int(v) for v in torch.randint(1, SIZE - side - 1, (2,), generator=gen))
        images[i, :, y:y + side, x:x + side] = (0.55 + 0.45 * torch.rand(3, 1, 1, generator=gen))
    return images


def test_a_tag_drawn_at_random_places_over_varied_backgrounds_is_found_where_it_is() -> None:
    images, where = with_tags(12, tagged=[0, 2, 4, 6, 8, 10])
    found = recurring_masks(images)
    for i in range(12):
        if i % 2 == 0:
            assert found[i].any() and (found[i] & where[i]).sum() >= 0.5 * tag().sum()
        else:
            assert not found[i].any()  # untagged images hold nothing that recurs


def test_a_tag_drawn_turned_or_mirrored_is_found_against_the_other_probes_turned() -> None:
    """Eight probes carry the tag in each of the square's eight symmetries, once: no two copies at
    the same orientation, so only the other probes turned are partners; found where it is, and
    nothing in the untagged probes; without turns, nothing."""
    images, where = with_tags(16, tagged=list(range(0, 16, 2)), turned=True)
    found = recurring_masks(images)
    held = (found & where).flatten(1).sum(1) >= 0.5 * tag().sum()
    assert held[0::2].all() and not found[1::2].any()
    assert not recurring_masks(images, turned=False).any()
    again = recurring_of(images, turned=False)
    assert not again.any() and recurring_of(images) is not again and torch.equal(recurring_of(images), found)


@pytest.mark.parametrize("width", [32, 27], ids=["square", "oblong"])
@pytest.mark.parametrize("offset", [None, 0.5], ids=["exact", "tolerant"])
def test_the_turned_keys_are_the_keys_of_the_turned_images(width: int, offset: float | None) -> None:
    """Each image is unfolded once for all eight ways of seeing it: the keys and structure of each
    way are those of the image turned that way (an oblong one turned a quarter is W x H)."""
    images = with_tags(4, tagged=[0, 1, 2, 3])[0][..., :width]
    ways = pixel_keys(images, offset, turned=True)
    assert len(ways) == TURNS and len(pixel_keys(images, offset)) == 1
    for way, (keys, structured) in enumerate(ways):
        (expected_keys, expected_structured), = pixel_keys(turn(images, way), offset)
        assert torch.equal(keys, expected_keys) and torch.equal(structured, expected_structured)
    assert not torch.equal(ways[0][0], ways[4][0].view(4, SIZE, width).flip(-1).flatten(1))  # a key reads its layout


def test_a_ruler_found_in_pieces_is_boxed_whole() -> None:
    """A ruler's plain bar between its ticks looks the same all along it and is not keyed, so the
    ruler is found in pieces; pieces a few pixels apart are one mark, and its box is the ruler's."""
    from cam_monitor.demo.data import class_rulers

    lit = class_rulers(2)[7].T  # upright, ticks every 8 px: gaps of plain bar between them
    gen = torch.Generator().manual_seed(0)
    images = blotchy(8, gen, size=64)
    where = torch.zeros(8, 64, 64, dtype=torch.bool)
    (h, w), lit_rows, lit_cols = lit.shape, lit.any(1).nonzero()[:, 0], lit.any(0).nonzero()[:, 0]
    for i in range(8):
        y, x = int(torch.randint(1, 64 - h, (1,), generator=gen)), int(torch.randint(1, 64 - w, (1,), generator=gen))
        images[i, :, y:y + h, x:x + w] = torch.where(lit, torch.ones(()), images[i, :, y:y + h, x:x + w])
        where[i, y + lit_rows.min():y + lit_rows.max() + 1, x + lit_cols.min():x + lit_cols.max() + 1] = True
    assert torch.equal(recurring_masks(images), where)


def noisy(images: torch.Tensor, sd: float = 0.02) -> torch.Tensor:
    """``images`` under Gaussian sensor noise of ``sd`` (the value range is 0 to 1), seeded."""
    gen = torch.Generator().manual_seed(1)
    return (images + sd * torch.randn(images.shape, generator=gen)).clamp(0, 1)


def jpeg(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """``images`` (values 0 to 1) through a JPEG encoding at ``quality`` and back."""
    from torchvision.io import decode_jpeg, encode_jpeg

    eight_bit = (images * 255).round().to(torch.uint8)
    return torch.stack([decode_jpeg(encode_jpeg(one, quality=quality)) for one in eight_bit]).float() / 255


@pytest.mark.parametrize(("degrade", "least"), [(lambda x: noisy(x, 0.03), 6), (lambda x: jpeg(x, 90), 4)],
                         ids=["noise", "jpeg"])
def test_a_tag_under_sensor_noise_or_jpeg_compression_is_still_found(degrade, least: int, monkeypatch) -> None:
    """No two copies of the tag (strokes 2 px wide: JPEG smears single pixels) are the same pixels
    any more: the exact keys miss them, the tolerant keys still find most (JPEG's 8 x 8 blocks cut
    each copy differently) and nothing in the untagged images."""
    from cam_monitor.probes import recurrence

    images, where = with_tags(12, tagged=[0, 2, 4, 6, 8, 10], size=64, scale=2)
    degraded = degrade(images)
    assert (degraded - images).abs().amax() > 0.03
    found = recurring_masks(degraded)
    held = (found & where).flatten(1).sum(1) >= 0.5 * where.flatten(1).sum(1)
    assert int(held[0::2].sum()) >= least and not found[1::2].any()
    monkeypatch.setattr(recurrence, "TOLERANT_TABLES", 0)
    assert not recurring_masks(degraded).any()


def test_the_probe_sets_finds_are_kept_apart_with_tolerant_keys_and_without() -> None:
    """``recurring_of`` keeps one find per images tensor and per choice of keys: a noisy probe set's
    tags are found with the tolerant keys and not without, whichever is asked first; on clean
    images both find the same."""
    from cam_monitor.probes.recurrence import recurring_of

    images, where = with_tags(12, tagged=[0, 2, 4, 6, 8, 10], size=64, scale=2)
    noisy_images = noisy(images, 0.03)
    assert not recurring_of(noisy_images, tolerant=False).any()
    found = recurring_of(noisy_images)
    assert (found & where).flatten(1).any(1)[0::2].sum() >= 4 and not found[1::2].any()
    assert recurring_of(noisy_images) is found and not recurring_of(noisy_images, tolerant=False).any()
    assert torch.equal(recurring_of(images), recurring_of(images, tolerant=False))


def test_copies_on_either_side_of_a_colour_level_agree_in_the_shifted_table(monkeypatch) -> None:
    """Four grey tags, two a shade above a tolerant colour level's edge and two a shade below (as
    noise puts them): in the exact keys and in the first tolerant table each has one partner, in
    the second table three."""
    from cam_monitor.probes import recurrence

    gen = torch.Generator().manual_seed(3)
    images = blotchy(8, gen, size=64)
    images[:, :, 0, 0], images[:, :, 0, 1] = 0.0, 1.0  # the value range, pinned
    edge = 12 / recurrence.TOLERANT_LEVELS
    lit = tag().repeat_interleave(2, 0).repeat_interleave(2, 1)
    for i, shade in zip((0, 2, 4, 6), (0.01, -0.01, 0.01, -0.01)):
        y, x = (int(v) for v in torch.randint(2, 64 - 20, (2,), generator=gen))
        window = images[i, :, y:y + 10, x:x + 18]
        images[i, :, y:y + 10, x:x + 18] = torch.where(lit, torch.tensor(edge + shade), window)
    assert recurring_masks(images)[[0, 2, 4, 6]].flatten(1).any(1).all()
    monkeypatch.setattr(recurrence, "TOLERANT_TABLES", 1)
    assert not recurring_masks(images).any()


def test_where_the_exact_keys_find_something_in_a_probe_its_finds_are_theirs() -> None:
    """On the zoo's digits with a floating stamp, the tolerant keys also agree on the strokes beside
    some stamps; those probes keep the exact keys' boxes."""
    from cam_monitor.demo.zoo import mask_free_probes

    images = mask_free_probes("interior_patch", 0).images
    assert recurring_masks(images).flatten(1).any(1).sum() > 50
    assert torch.equal(recurring_masks(images), recurring_masks(images, tolerant=False))


def test_strokes_that_recur_in_most_digits_are_not_found_by_the_tolerant_keys(monkeypatch) -> None:
    """Three '1's of a zoo digits probe set (no stamp, tag or ruler) share pieces of strokes that
    tolerant keys match: the tolerant tables' larger agreement, their cap on common keys and
    their extra partner each keep them out."""
    from cam_monitor.demo.zoo import mask_free_probes
    from cam_monitor.probes import recurrence

    images = mask_free_probes("background_cast", 1).images
    assert not recurring_masks(images).any()
    monkeypatch.setattr(recurrence, "TOLERANT_PARTNERS", 0)
    assert not recurring_masks(images, turned=False).any()
    with monkeypatch.context() as patched:
        patched.setattr(recurrence, "TOLERANT_COMMON", recurrence.COMMON)
        assert recurring_masks(images, turned=False).flatten(1).any(1).sum() == 3
    monkeypatch.setattr(recurrence, "TOLERANT_AGREEMENT", 1.0)
    assert recurring_masks(images, turned=False).flatten(1).any(1).sum() == 2


def test_edges_of_drawn_shapes_of_one_class_need_the_tolerant_keys_extra_partner(monkeypatch) -> None:
    """Three drawn shapes of one class in a zoo Drawn Shapes probe set (no stamp, tag or ruler)
    agree on their edges in the tolerant keys with two partners each, not with three."""
    from cam_monitor.demo.zoo import mask_free_probes
    from cam_monitor.probes import recurrence

    images = mask_free_probes("background_cast", 713, base="shapes").images
    assert not recurring_masks(images).any()
    monkeypatch.setattr(recurrence, "TOLERANT_PARTNERS", 0)
    assert recurring_masks(images).flatten(1).any(1).nonzero()[:, 0].tolist() == [8, 28, 58]


def test_objects_that_vary_from_image_to_image_are_not_found() -> None:
    assert not recurring_masks(objects(12)).any()


def test_a_piece_two_images_share_by_chance_needs_more_partners() -> None:
    """Two images that share the tag: found with one partner, not with the default two."""
    images, _ = with_tags(8, tagged=[1, 5])
    assert not recurring_masks(images).any()
    assert recurring_masks(images, partners=1)[[1, 5]].flatten(1).any(1).all()


def test_a_piece_smaller_than_the_least_share_is_not_found() -> None:
    images, _ = with_tags(8, tagged=[0, 1, 2, 3])
    assert recurring_masks(images).any()
    assert not recurring_masks(images, min_pixels=100).any()  # more than the tag's 45 pixels and their edges


def test_the_finder_reads_values_relative_to_the_probes_range() -> None:
    """Normalised probes (any offset and scale) give the same pixels."""
    images, _ = with_tags(10, tagged=[0, 3, 6, 9])
    assert torch.equal(recurring_masks(images), recurring_masks((images - 0.45) / 0.22))


def test_bad_settings_are_refused_with_the_range() -> None:
    images, _ = with_tags(4, tagged=[0, 1])
    with pytest.raises(ValueError, match="min_pixels"):
        recurring_masks(images, min_pixels=0)
    with pytest.raises(ValueError, match="partners"):
        recurring_masks(images, partners=0)


def test_the_masks_of_a_probe_set_are_computed_once_per_images_tensor() -> None:
    images, _ = with_tags(10, tagged=[0, 3, 6, 9])
    first = recurring_of(images)
    assert recurring_of(images) is first and torch.equal(first, recurring_masks(images))
    assert recurring_of(images.clone()) is not first  # another tensor: its own masks


def test_each_found_mark_becomes_its_bounding_box() -> None:
    """A ring (a solid logo's keyed edge) is filled; ticks a few pixels apart (a ruler's, found in
    pieces) are one mark; pieces a neighbourhood apart stay two boxes, and with ``join=0`` so do
    the ticks."""
    from cam_monitor.probes.recurrence import NEIGHBOURHOOD, boxed

    found = torch.zeros(3, 16, 16, dtype=torch.bool)
    found[0, 2:6, 2] = found[0, 2:6, 5] = found[0, 2, 2:6] = found[0, 5, 2:6] = True
    far = 5 + NEIGHBOURHOOD + 1
    found[0, far, 9:11] = True
    found[1, 3:5, 1:15:NEIGHBOURHOOD - 1] = True  # ticks with gaps of NEIGHBOURHOOD - 2 pixels
    found[2, 3:5, 1:15:NEIGHBOURHOOD + 1] = True  # with gaps of NEIGHBOURHOOD pixels
    expected = torch.zeros_like(found)
    expected[0, 2:6, 2:6] = expected[0, far, 9:11] = True
    expected[1, 3:5, 1:14] = True
    expected[2] = found[2]
    assert torch.equal(boxed(found), expected)
    assert torch.equal(boxed(found, join=0)[1], found[1])


def test_content_at_the_same_place_in_every_probe_is_not_found_and_moved_it_is() -> None:
    """Aligned images share pieces at their place (centred digits, registered scans): only
    agreement at a shift of at least MIN_SHIFT pixels counts, so a stamp at one place in every probe
    is left to the local and border tests, and the same stamp at places far apart is found."""
    from cam_monitor.probes.recurrence import MIN_SHIFT

    gen = torch.Generator().manual_seed(3)
    images = blotchy(6, gen)
    stamp = (torch.rand(8, 8, generator=gen) < 0.5).float()
    aligned = images.clone()
    aligned[:, :, 12:20, 12:20] = stamp
    assert not recurring_masks(aligned).any()
    nudged = images.clone()
    for i in range(6):
        nudged[i, :, 12 + i % 2:20 + i % 2, 12:20] = stamp  # shifts of one pixel: still one place
    assert MIN_SHIFT > 1 and not recurring_masks(nudged).any()
    moved = images.clone()
    for i, (y, x) in enumerate([(1, 1), (1, 22), (22, 1), (22, 22), (12, 12), (2, 12)]):
        moved[i, :, y:y + 8, x:x + 8] = stamp
    assert recurring_masks(moved).flatten(1).any(1).all()


def test_a_probe_whose_recurring_content_covers_much_of_it_keeps_none() -> None:
    """A pattern drawn the same over most of several probes is background (a texture), not a mark
    a box elsewhere could control for: those probes keep no mask, a probe with a small tag keeps it."""
    from cam_monitor.probes.recurrence import MAX_SHARE

    images, _ = with_tags(8, tagged=[0, 2, 4, 6])
    gen = torch.Generator().manual_seed(5)
    pattern = (torch.rand(16, 16, generator=gen) < 0.5).float()
    for i, (y, x) in enumerate([(0, 0), (16, 8), (8, 16), (10, 2)]):
        images[1 + 2 * i, :, y:y + 16, x:x + 16] = pattern  # a quarter of the image each
    found = recurring_masks(images)
    covered = found.flatten(1).float().mean(1)
    assert all(covered[i] == 0 for i in (1, 3, 5, 7)) and all(0 < covered[i] <= MAX_SHARE for i in (0, 2, 4, 6))


def test_where_most_probes_with_a_find_are_background_none_keeps_a_box() -> None:
    """Small boxes in a probe set whose finds are mostly background-sized are the same pattern
    seen through gaps (a grating behind objects): none is kept. Where background probes are not
    most, the small boxes stay."""
    from cam_monitor.probes.recurrence import without_background

    boxes = torch.zeros(6, SIZE, SIZE, dtype=torch.bool)
    boxes[:3, :, :20] = True  # background-sized: most of three probes
    boxes[3:5, 2:8, 2:8] = True  # small pieces in two
    assert not without_background(boxes).any()
    boxes[2] = False
    boxes[2, 10:16, 10:16] = True  # now two background probes beside three small
    kept = without_background(boxes).flatten(1).any(1)
    assert kept.tolist() == [False, False, True, True, True, False]


def test_a_pattern_behind_most_probes_is_dropped_where_it_shows_in_small_pieces() -> None:
    """A pattern drawn large in five probes and in small pieces in three, each at its own place:
    the pieces recur and are dropped, because most probes with a find carry the pattern as
    background. With the large ones gone the same pieces are kept."""
    images = blotchy(8, torch.Generator().manual_seed(3))
    pattern = (torch.rand(16, 16, generator=torch.Generator().manual_seed(5)) < 0.5).float()
    for i, (y, x) in enumerate([(0, 0), (16, 8), (8, 16), (10, 2), (4, 12)]):
        images[i, :, y:y + 16, x:x + 16] = pattern  # a quarter of the image
    for i, (y, x) in enumerate([(2, 2), (20, 18), (12, 4)]):
        images[5 + i, :, y:y + 10, x:x + 12] = pattern[3:13, 2:14]  # under an eighth
    assert not recurring_masks(images).any()
    images[:5] = blotchy(5, torch.Generator().manual_seed(4))
    assert recurring_masks(images)[5:].flatten(1).any(1).all()
