"""The confirmation tests' images: each gives exactly one thing of its source and keeps the rest."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2.functional import gaussian_blur

from cam_monitor.interventions import (Paste, background_detail_images, banded_images, blurred_cells, border_bands,
                                       COLOUR_TAIL, colour_images, colour_statistics, detail_images,
                                       gaussian_kernel, matched_levels, matched_statistics,
                                       object_regions, pasted_images, reflected_blur_matrix, shuffled_cells,
                                       spectrum_images)
from cam_monitor.metrics import border_mask

SIZE = 16


def one_cell_maps(n: int, cell: tuple[int, int], grid: int = 4, rest: float = 0.01) -> torch.Tensor:
    maps = torch.full((n, grid, grid), rest)
    maps[:, cell[0], cell[1]] = 1.0
    return maps


def noise(n: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_a_paste_copies_the_sources_box_to_the_recipients_place_and_nothing_else() -> None:
    images = noise(3)
    pastes = [Paste(2, (0, 0, 4, 4), 0, (8, 4, 12, 8)), Paste(1, (12, 12, 16, 16), 0, (8, 4, 12, 8))]
    out = pasted_images(images, pastes)
    assert out.shape == (2, 1, SIZE, SIZE)
    assert torch.equal(out[0, :, 8:12, 4:8], images[2, :, :4, :4])
    assert torch.equal(out[1, :, 8:12, 4:8], images[1, :, 12:, 12:])
    outside = torch.ones(SIZE, SIZE, dtype=torch.bool)
    outside[8:12, 4:8] = False
    assert all(torch.equal(image[:, outside], images[0][:, outside]) for image in out)
    assert torch.equal(images, noise(3))  # the probes themselves are untouched
    assert pasted_images(images, []).shape == (0, 1, SIZE, SIZE)


@pytest.mark.parametrize("size", [(16, 16), (32, 48), (224, 224), (7, 7)])
def test_the_border_band_is_the_metrics_band_and_its_control_the_next_rings_inward_as_large(size) -> None:
    outer, inner = border_bands(size, 0.1)
    assert torch.equal(outer, border_mask(*size, 0.1)) and not (outer & inner).any()
    assert outer.sum() <= inner.sum() <= outer.sum() + 2 * sum(size)  # at least as large, at most one ring more
    rest = ~(outer | inner)  # what is left is a centred rectangle: the inner band is whole rings
    rows, cols = rest.any(1).nonzero()[:, 0], rest.any(0).nonzero()[:, 0]
    box = torch.zeros_like(rest)
    box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    assert torch.equal(rest, box)
    assert rows.min() + rows.max() == size[0] - 1 and cols.min() + cols.max() == size[1] - 1
    assert border_bands((6, 6), 0.1) is None  # no inner band as large: the check before training says so


def test_banded_images_give_the_recipient_the_sources_band_and_nothing_else() -> None:
    images = torch.stack([torch.full((2, SIZE, SIZE), float(v)) for v in (1, 2, 3)])
    bands = border_bands((SIZE, SIZE), 0.1)
    out = banded_images(images, [2], [0], bands)
    assert out.shape == (2, 2, SIZE, SIZE)
    for image, band in zip(out, bands):
        assert (image[:, band] == 3).all() and (image[:, ~band] == 1).all()


def test_object_regions_are_each_maps_most_credited_quarter() -> None:
    maps = one_cell_maps(2, (0, 0))
    regions = object_regions(maps, (SIZE, SIZE))
    assert regions.shape == (2, SIZE, SIZE) and int(regions[0].sum()) == SIZE * SIZE // 4
    assert bool(regions[:, :4, :4].all())  # the credited cell is inside
    assert int(object_regions(maps, (SIZE, SIZE), share=0.5)[0].sum()) == SIZE * SIZE // 2


def test_spectrum_images_carry_the_source_backgrounds_amplitude_and_the_recipients_phase() -> None:
    images = noise(4) * 0.1
    images[::2, 0, :4, :4] = 1.0
    objects = object_regions(one_cell_maps(4, (0, 0)), (SIZE, SIZE))
    out = spectrum_images(images, objects, [0], [1])
    source, region = images[0].double(), objects[0]
    assert out.shape == (2, 1, SIZE, SIZE) and out.dtype == images.dtype
    for image, part in zip(out, (region, ~region)):
        filled = source.clone()
        filled[:, part] = source[:, ~part].mean()
        want, got = torch.fft.fft2(filled), torch.fft.fft2(image.double())
        assert torch.allclose(got.abs(), want.abs(), atol=1e-4)
        dst = torch.fft.fft2(images[1].double())
        big = (want.abs() > 1e-3) & (dst.abs() > 1e-3)
        assert torch.allclose(torch.polar(torch.ones_like(got.abs()), got.angle())[big],
                              torch.polar(torch.ones_like(dst.abs()), dst.angle())[big], atol=1e-3)


def test_colour_images_swap_each_channels_median_and_spread() -> None:
    images = noise(2, 3, seed=5) * torch.tensor([1.0, 0.5, 0.2])[:, None, None]
    images[1] += torch.tensor([0.3, -0.2, 0.1])[:, None, None]
    test, control = colour_images(images, [1], [0])
    source, recipient = images[1], images[0]
    for got, want in ((test, source), (control, recipient)):
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(colour_statistics(got[None]),
                                                                     colour_statistics(want[None])))
    # the structure stays: each image is its own pixels, shifted and scaled per channel
    for got, own in ((test, recipient), (control, source)):
        assert all(torch.corrcoef(torch.stack([got[c].flatten(), own[c].flatten()]))[0, 1] > 0.9999 for c in range(3))


def test_shuffled_cells_move_whole_cells_and_keep_what_is_inside_them() -> None:
    images = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    out = shuffled_cells(images, (4, 4), torch.Generator().manual_seed(0))
    tiles = lambda x: sorted(x[0, y:y + 4, c:c + 4].flatten().tolist() for y in range(0, 16, 4)  # noqa: E731
                             for c in range(0, 16, 4))
    for before, after in zip(images, out):
        assert tiles(before) == tiles(after)  # the same cells, whole
    assert not torch.equal(out, images) and not torch.equal(out[0] - out[0].min(), out[1] - out[1].min())
    assert torch.equal(out, shuffled_cells(images, (4, 4), torch.Generator().manual_seed(0)))  # seeded
    uneven = shuffled_cells(images, (3, 3), torch.Generator().manual_seed(0))  # cells of 5 px: the last row stays
    assert torch.equal(uneven[..., 15, :], images[..., 15, :]) and torch.equal(uneven[..., :, 15], images[..., :, 15])


def test_blurred_cells_remove_detail_finer_than_a_cell_and_keep_shapes_of_several_cells() -> None:
    stripes = (torch.arange(16) % 2).float().expand(1, 1, 16, 16).clone()
    block = torch.zeros(1, 1, 16, 16)
    block[..., 4:12, 4:12] = 1.0  # 2 x 2 cells of the 4 x 4 grid
    blurred = blurred_cells(torch.cat([stripes, block]), (4, 4))
    assert blurred[0].std() < 0.05 * stripes.std()  # a one-pixel grating is gone
    assert blurred[1, 0, 6:10, 6:10].min() > 0.6 and blurred[1, 0, :2, :2].max() < 0.1  # the block is still there


@pytest.mark.parametrize("size, grid", [((16, 16), (4, 4)), ((224, 224), (7, 7)), ((32, 48), (4, 6)), ((8, 8), (1, 1))])
def test_the_blur_is_torchvisions_gaussian_blur_computed_in_two_passes(size, grid) -> None:
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2))
    ch, cw = size[0] // grid[0], size[1] // grid[1]
    sigma = [0.5 * cw, 0.5 * ch]  # torchvision's order: (x, y)
    kernel = [min(2 * math.ceil(3 * s) + 1, 2 * n - 1) for s, n in zip(sigma, (size[1], size[0]))]
    assert torch.allclose(blurred_cells(images, grid), gaussian_blur(images, kernel, sigma), atol=1e-5)
    assert blurred_cells(images.double(), grid).dtype == torch.float64


@pytest.mark.parametrize("n, size", [(16, 5), (8, 15), (1, 1), (224, 97)])
def test_the_blur_matrix_is_the_reflected_kernel_along_one_axis(n, size) -> None:
    """Each row of the matrix sums to one and applies the kernel to the reflected row, up to the
    widest kernel an axis allows (``size = 2n - 1``: every tap reflects once at most)."""
    row = torch.rand(1, 1, n, generator=torch.Generator().manual_seed(n)).double()
    matrix = reflected_blur_matrix(n, size, 0.3 * size, torch.float64, torch.device("cpu"))
    kernel = gaussian_kernel(size, 0.3 * size, torch.float64).view(1, 1, size)
    padded = torch.nn.functional.pad(row, [size // 2, size // 2], mode="reflect") if n > 1 else row
    assert torch.allclose(matrix.sum(1), torch.ones(n, dtype=torch.float64))
    assert torch.allclose(matrix @ row[0, 0], torch.nn.functional.conv1d(padded, kernel)[0, 0])


def test_colour_statistics_are_the_median_and_the_1st_to_99th_percentile_spread_in_any_number_of_chunks(
        monkeypatch) -> None:
    images = noise(7, 3, seed=8) ** 3
    monkeypatch.setattr("cam_monitor.interventions.COLOUR_CHUNK_ELEMENTS", 2 * images[0].numel())  # 4 chunks
    median, spread = colour_statistics(images)
    flat = images.flatten(2)
    assert median.shape == spread.shape == (len(images), 3, 1, 1)
    assert torch.allclose(median.flatten(1), flat.quantile(0.5, -1), atol=1e-6)
    assert torch.allclose(spread.flatten(1), flat.quantile(1 - COLOUR_TAIL, -1) - flat.quantile(COLOUR_TAIL, -1),
                          atol=1e-6)


def test_colour_statistics_take_images_larger_than_torch_quantile_takes_at_once() -> None:
    """torch.quantile refuses 2**24 elements; six 1024 px colour images are 18.9 million."""
    images = torch.zeros(6, 3, 1024, 1024)
    images[:, :, :10] = 1.0  # a bright band on 1 % of the rows
    images[3] += 0.25
    median, spread = colour_statistics(images)
    assert median.flatten().tolist() == [0.0] * 9 + [0.25] * 3 + [0.0] * 6
    assert torch.allclose(spread, torch.zeros_like(spread))  # the band is within the top 1 %


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_colour_images_keep_the_probes_dtype(dtype) -> None:
    """Half-precision probes (which torch.quantile refuses) and double ones come back in their dtype."""
    images = noise(3, 3, seed=4).to(dtype)
    out = colour_images(images, [0, 1], [2, 0])
    assert out.dtype == dtype and out.shape == (4, 3, SIZE, SIZE)
    want = colour_images(images.float(), [0, 1], [2, 0])
    assert torch.allclose(out.float(), want, atol=0.05)


def test_the_colour_statistics_move_with_a_cast_and_not_with_the_size_of_a_small_object() -> None:
    """A tint moves the median by itself; an object on a tenth or on a fifth of the image leaves
    the median and the spread within 0.03 (the pixels it covers are no longer counted; the mean
    and the standard deviation move by more than 0.1)."""
    background = noise(1, 3, seed=9) * 0.2
    small, large = background.clone(), background.clone()
    small[..., 4:9, 4:9], large[..., 2:11, 3:10] = 0.9, 0.9  # 25 and 63 of 256 pixels
    (m_small, s_small), (m_large, s_large) = colour_statistics(small), colour_statistics(large)
    assert (s_large - s_small).abs().max() < 0.01 and (m_large - m_small).abs().max() < 0.03
    assert (large.mean((2, 3)) - small.mean((2, 3))).abs().min() > 0.1
    tint = torch.tensor([0.1, -0.05, 0.0])[None, :, None, None]
    cast, spread = colour_statistics(small + tint)
    assert torch.allclose(cast - m_small, tint, atol=1e-6) and torch.allclose(spread, s_small, atol=1e-6)
    flat = torch.full((1, 3, 8, 8), 0.5)
    assert torch.equal(matched_levels(flat, colour_statistics(flat), (m_small, s_small)), flat - 0.5 + m_small)


def test_matched_statistics_give_each_channel_the_targets_mean_and_spread() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 16, 16, generator=gen) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    targets = images.mean((-2, -1), keepdim=True) + 0.1 * torch.rand(3, 2, 16, 16, generator=gen)
    for x, t in ((targets, images), (images, targets)):
        out = matched_statistics(x, t)
        assert torch.allclose(out.mean((-2, -1)), t.mean((-2, -1)), atol=1e-5)
        assert torch.allclose(out.std((-2, -1)), t.std((-2, -1)), atol=1e-4)
    flat = torch.full((1, 2, 4, 4), 0.5)
    assert torch.allclose(matched_statistics(flat, images[:1]), flat - 0.5 + images[:1].mean((-2, -1), keepdim=True))


def test_detail_images_are_the_sources_shuffled_then_blurred() -> None:
    images = noise(3)
    out = detail_images(images, [2, 0], (4, 4), torch.Generator().manual_seed(1))
    assert out.shape == (4, 1, SIZE, SIZE)
    assert torch.equal(out[:2], shuffled_cells(images[[2, 0]], (4, 4), torch.Generator().manual_seed(1)))
    assert torch.equal(out[2:], blurred_cells(images[[2, 0]], (4, 4)))
    assert detail_images(images, [], (4, 4), torch.Generator()).shape == (0, 1, SIZE, SIZE)


def test_the_texture_test_gives_the_recipient_the_candidates_fine_detail_outside_or_inside_its_object() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=gen)
    objects = torch.zeros(2, 32, 32, dtype=torch.bool)
    objects[:, :, :16] = True  # the candidate's credited quarter, here its left half
    test, control = background_detail_images(images, objects, (8, 8), [0], [1]).split(1)
    blurred = blurred_cells(images, (8, 8))
    fine = images[0] - blurred[0]
    assert torch.allclose(test[0, :, :, :16], blurred[1, :, :, :16])  # no detail of the candidate's object
    assert torch.allclose(test[0, :, :, 16:], blurred[1, :, :, 16:] + fine[:, :, 16:])  # its background's detail
    assert torch.allclose(control[0, :, :, :16], blurred[1, :, :, :16] + fine[:, :, :16])
    assert torch.allclose(control[0, :, :, 16:], blurred[1, :, :, 16:])


def test_a_masks_box_spans_its_pixels_and_a_clear_place_does_not_overlap_it() -> None:
    from cam_monitor.interventions import clear_places, mask_boxes, markable

    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[0, 2, 6] = True  # a second blob: the box spans both
    masks[2] = True  # the whole image: nowhere to move it
    assert mask_boxes(masks).tolist() == [[1, 2, 3, 7], [0, 0, 0, 0], [0, 0, 8, 8]]
    assert markable(masks).tolist() == [True, False, False]
    places = clear_places((1, 2, 3, 7), (8, 8))  # 2 x 5 boxes: top-left corners in 7 x 4
    assert places.shape == (7, 4)
    for y, x in places.nonzero().tolist():
        assert y >= 3 or y + 2 <= 1 or x >= 7 or x + 5 <= 2
    assert not places[1:3].any() and places[3:].all() and not places[0].any()
    assert not clear_places((0, 0, 8, 8), (8, 8)).any()


def test_marked_images_bring_the_marked_pixels_or_as_many_from_elsewhere_into_the_recipient_with_its_mark_filled() -> None:
    """The test puts the source's marked pixels where they are in the source; the control puts the
    source's pixels of the same shape from a box elsewhere, clear of the mark, on the same pixels.
    Both start from the recipient with its own mark filled by the mean of its other pixels."""
    from cam_monitor.interventions import marked_images

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, SIZE, SIZE, generator=gen)
    masks = torch.zeros(3, SIZE, SIZE, dtype=torch.bool)
    masks[0, 2:5, 3:7] = True
    masks[0, 4, 3] = False  # not a rectangle: only the marked pixels move
    masks[1, 10:14, 10:12] = True  # the recipient's own mark
    out = marked_images(images, masks, [0, 0], [1, 2], torch.Generator().manual_seed(1))
    assert out.shape == (4, 2, SIZE, SIZE)
    test, control = out[0], out[2]
    mark, own = masks[0], masks[1]
    rest = images[1][:, ~own].mean(1)
    base = torch.where(own[None], rest[:, None, None], images[1])
    assert torch.equal(test[:, mark], images[0][:, mark]) and torch.equal(test[:, ~mark], base[:, ~mark])
    assert torch.equal(control[:, ~mark], base[:, ~mark])
    hits = [(y, x) for y in range(SIZE - 2) for x in range(SIZE - 3)
            if torch.equal(control[:, 2:5, 3:7][:, mark[2:5, 3:7]], images[0][:, y:y + 3, x:x + 4][:, mark[2:5, 3:7]])]
    assert len(hits) == 1 and (hits[0][0] >= 5 or hits[0][0] + 3 <= 2 or hits[0][1] >= 7 or hits[0][1] + 4 <= 3)
    assert torch.equal(out[1][:, mark], images[0][:, mark]) and torch.equal(out[1][:, ~mark], images[2][:, ~mark])
    assert marked_images(images, masks, [], [], gen).shape == (0, 2, SIZE, SIZE)


def test_markable_says_exactly_where_a_clear_place_exists() -> None:
    """The closed form (the box's height fits above or below it, or its width beside it) agrees with
    searching every place (:func:`clear_places`), on boxes of every size and place and on empty masks."""
    from cam_monitor.interventions import clear_places, mask_boxes, markable

    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(600, 12, 10, dtype=torch.bool)
    for i in range(1, len(masks)):  # mask 0 stays empty
        y0, y1 = sorted(torch.randint(0, 13, (2,), generator=gen).tolist())
        x0, x1 = sorted(torch.randint(0, 11, (2,), generator=gen).tolist())
        masks[i, y0:y1, x0:x1] = True
    searched = torch.tensor([bool(b[2] > b[0]) and bool(clear_places(tuple(b), (12, 10)).any())
                             for b in mask_boxes(masks).tolist()])
    assert searched.any() and not searched.all()
    assert torch.equal(markable(masks), searched)
