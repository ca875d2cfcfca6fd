"""Rendering: colormap lookup, display-only scaling, contours, grids, figures and PNG export."""
from __future__ import annotations

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torchvision.io import decode_png, read_file

import cam_monitor.render as R
from cam_monitor.errors import InputError


def test_lut_comes_from_matplotlib_registry() -> None:
    lut = R.colormap_lut("viridis")
    want = torch.tensor(matplotlib.colormaps["viridis"](1.0)[:3]).float()
    assert lut.shape == (256, 3)
    torch.testing.assert_close(lut[-1], want)
    with pytest.raises(InputError, match="unknown colormap 'nope'"):
        R.colormap_lut("nope")


def test_overlay_is_alpha_blend_of_minmax_bilinear_upsampled_map() -> None:
    g = torch.Generator().manual_seed(0)
    imgs, maps = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 4, 4, generator=g) * 7
    raw = maps.clone()
    torch.testing.assert_close(R.overlay(imgs, maps, alpha=0.0), imgs)
    up = F.interpolate(maps[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    up = (up - up.amin((1, 2), keepdim=True)) / (up.amax((1, 2), keepdim=True) - up.amin((1, 2), keepdim=True))
    torch.testing.assert_close(R.overlay(imgs, maps, alpha=1.0), R.apply_colormap(up, "jet"))
    mixed = R.overlay(imgs, maps, alpha=0.4)
    torch.testing.assert_close(mixed, 0.6 * imgs + 0.4 * R.apply_colormap(up, "jet"))
    assert torch.equal(maps, raw)  # display scaling never touches the raw maps


def test_overlay_accepts_greyscale_and_rejects_bad_input() -> None:
    assert R.overlay(torch.rand(2, 1, 8, 8), torch.rand(2, 2, 2)).shape == (2, 3, 8, 8)
    with pytest.raises(InputError, match="alpha"):
        R.overlay(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 2), alpha=1.5)
    with pytest.raises(InputError, match="maps must be"):
        R.overlay(torch.rand(2, 3, 8, 8), torch.rand(3, 2, 2))
    with pytest.raises(InputError, match="display images"):
        R.overlay(torch.rand(2, 2, 8, 8), torch.rand(2, 2, 2))


def test_contour_is_one_pixel_ring_in_the_given_colour() -> None:
    m = torch.zeros(1, 10, 10, dtype=torch.bool)
    m[0, 2:7, 3:8] = True
    ring = R.mask_boundary(m)[0]
    assert int(ring.sum()) == 5 * 5 - 3 * 3 and not ring[3:6, 4:7].any()
    out = R.draw_contours(torch.zeros(1, 3, 10, 10), m, R.RED)
    assert torch.allclose(out[0, :, 2, 3], torch.tensor(R.RED)) and out[0, :, 4, 5].abs().sum() == 0


def test_contour_equals_the_eight_neighbour_erosion_on_random_masks() -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 13, 17, generator=g) > 0.35
    masks[:, :4, :5] = True  # touches the image's edge, which is no boundary
    m = masks[:, None].float()
    eroded = -torch.nn.functional.max_pool2d(-m, kernel_size=3, stride=1, padding=1)
    assert torch.equal(R.mask_boundary(masks), (m.bool() & ~eroded.bool())[:, 0])


def test_captions_outside_latin1_are_drawn_not_refused() -> None:
    tile = R.caption(torch.zeros(3, 20, 60), ["猫 Ω", "café"])
    assert tile.shape == (3, 20 + 2 * R.CAPTION_LINE_PX + 2, 60)
    assert float(tile[:, 20:].min()) < 0.5  # something was drawn


def test_probe_grid_layout_captions_and_contours() -> None:
    n, h = 5, 32
    spur = torch.zeros(n, h, h, dtype=torch.bool)
    spur[:, :4, :4] = True
    obj = torch.zeros(n, h, h, dtype=torch.bool)
    obj[:, 10:20, 10:20] = True
    grid = R.probe_grid(torch.rand(n, 3, h, h), torch.rand(n, 4, 4), ids=[f"p{i}" for i in range(n)],
                        labels=[0, 1, 0, 1, 0], preds=[0, 0, 0, 1, 1], scores=[0.1] * n,
                        spurious_energy=[0.2, float("nan"), 0.1, 0.3, 0.4], spurious_masks=spur,
                        object_masks=obj, nrow=3, tile_size=64, class_names=["cat", "dog"])
    tile_h = 64 + 3 * R.CAPTION_LINE_PX + 2
    assert grid.shape == (3, 2 * (tile_h + 2) + 2, 3 * (64 + 2) + 2)
    red = (grid[0] > 0.95) & (grid[1] < 0.15) & (grid[2] < 0.15)
    green = (grid[1] > 0.85) & (grid[0] < 0.15)
    assert red.any() and green.any()
    assert ((grid >= 0) & (grid <= 1)).all()


def test_filmstrip_and_metric_curves_figure() -> None:
    strip = R.filmstrip([torch.rand(3, 20, 20)] * 4, ["e1", "e2", "e3", "e4"])
    assert strip.shape[-1] == 4 * 22 + 2
    with pytest.raises(InputError, match="one title per frame"):
        R.filmstrip([torch.rand(3, 8, 8)], [])
    values = torch.rand(3, 4)
    values[0] = float("nan")
    fig = R.metric_curves([10, 20, 30], {"cam/spurious_energy": values, "cam/drift": torch.rand(3, 4)})
    assert [ax.get_title() for ax in fig.axes] == ["cam/spurious_energy", "cam/drift"]
    img = R.figure_to_tensor(fig)
    assert img.shape[0] == 3 and img.shape[1] > 100 and 0 <= float(img.min()) and float(img.max()) <= 1


def test_save_png_roundtrip_and_atomic(tmp_path) -> None:
    img = torch.rand(3, 9, 11)
    path = R.save_png(img, tmp_path / "a" / "grid.png")
    back = decode_png(read_file(str(path))).float() / 255
    torch.testing.assert_close(back, img, atol=1 / 255, rtol=0)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["grid.png"]


def test_captions_fall_back_to_the_index_for_classes_without_a_name() -> None:
    tiles = R.probe_tiles(torch.rand(2, 3, 16, 16), torch.rand(2, 4, 4), ids=["a", "b"], labels=[0, 1], preds=[7, 1],
                          class_names=["cat", "dog"], tile_size=64)
    assert tiles.shape[0] == 2


def test_captions_shorten_class_names_never_the_probability_and_mark_mispredictions_red() -> None:
    from cam_monitor.render import fit_text, probe_tiles, text_width

    names = ["a_very_long_class_name_circle", "an_even_longer_class_name_triangle"]
    parts = fit_text(["y=" + names[0], " p=" + names[1]], " (0.87)", 120)
    assert text_width("".join(parts) + " (0.87)") <= 120 and all(p.endswith("..") for p in parts)
    images, maps = torch.rand(2, 3, 32, 32), torch.rand(2, 4, 4)
    tiles = probe_tiles(images, maps, ids=["a", "b"], labels=[0, 1], preds=[0, 0], scores=[0.9, 0.4],
                        class_names=names, tile_size=128)
    caption = tiles[:, :, 128:]  # the text strip under each 128 px tile
    red = (caption[:, 0] > 0.6) & (caption[:, 1] < 0.3) & (caption[:, 2] < 0.3)
    assert not bool(red[0].any()) and bool(red[1].any())  # only the misprediction is drawn in red


def test_the_grid_carries_a_colour_legend() -> None:
    from cam_monitor.render import tile_grid, with_legend

    grid = tile_grid(torch.zeros(4, 3, 32, 32), nrow=4)
    out = with_legend(grid)
    assert out.shape[-1] == grid.shape[-1] and out.shape[-2] > grid.shape[-2]
    legend = out[:, grid.shape[-2]:]
    magenta = (legend[0] > 0.7) & (legend[1] < 0.4) & (legend[2] > 0.7)
    assert bool(magenta.any())
