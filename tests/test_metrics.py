"""Each metric against a naive loop, small hand-computed examples, degenerate inputs and invariances."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cam_monitor import metrics as M
from cam_monitor.maps import upsample

NAN = float("nan")


def rand_maps(b=5, h=6, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, generator=g)


def rand_masks(b=5, h=6, w=7, seed=1, p=0.3):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, h, w, generator=g) < p
    m[:, 0, 0] = True  # never empty
    return m


def assert_nan_equal(got: torch.Tensor, want: list[float]) -> None:
    want_t = torch.tensor(want, dtype=got.dtype)
    assert torch.equal(torch.isnan(got), torch.isnan(want_t)), (got, want_t)
    torch.testing.assert_close(torch.nan_to_num(got), torch.nan_to_num(want_t), rtol=1e-5, atol=1e-6)


# ---- hand-computed examples -------------------------------------------------------------------

def test_energy_fraction_and_enrichment_hand_example() -> None:
    a = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
    m = torch.tensor([[[False, True], [False, False]]])
    assert_nan_equal(M.energy_fraction(a, m), [3 / 8])
    assert_nan_equal(M.enrichment(a, m), [(3 / 8) / (1 / 4)])


def test_uniform_map_has_chance_enrichment() -> None:
    m = rand_masks()
    assert_nan_equal(M.enrichment(torch.ones(5, 6, 7), m), [1.0] * 5)


def test_pointing_game_hand_example_with_tolerance() -> None:
    a = torch.zeros(2, 5, 5)
    a[:, 2, 2] = 1.0
    m = torch.zeros(2, 5, 5, dtype=torch.bool)
    m[0, 2, 3] = True  # 1 px away
    m[1, 0, 4] = True  # sqrt(8) px away
    assert_nan_equal(M.pointing_game(a, m, tolerance=0), [0.0, 0.0])
    assert_nan_equal(M.pointing_game(a, m, tolerance=1), [1.0, 0.0])
    assert_nan_equal(M.pointing_game(a, m, tolerance=2.9), [1.0, 1.0])


def test_pointing_game_default_tolerance_is_half_stride() -> None:
    assert M.default_tolerance((7, 7), (224, 224)) == 16.0


def test_rank_accuracy_hand_example() -> None:
    a = torch.tensor([[[4.0, 3.0, 2.0, 1.0]]])
    m = torch.tensor([[[True, False, True, False]]])
    assert_nan_equal(M.rank_accuracy(a, m), [0.5])  # top-2 = {0, 1}; mask {0, 2}


def test_border_mask_is_ten_percent_band() -> None:
    m = M.border_mask(20, 30)
    assert m[:2].all() and m[-2:].all() and m[:, :3].all() and m[:, -3:].all()
    assert not m[2:-2, 3:-3].any()
    assert int(m.sum()) == 20 * 30 - 16 * 24


def test_spearman_hand_example_with_ties() -> None:
    a = torch.tensor([[[1.0, 2.0, 2.0, 3.0]]])
    b = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    # ranks a: 0, 1.5, 1.5, 3 ; b: 0, 1, 2, 3 -> rho = 4.5 / sqrt(4.5 * 5)
    assert_nan_equal(M.spearman(a, b), [4.5 / math.sqrt(4.5 * 5)])
    assert_nan_equal(M.spearman(b, -b), [-1.0])


def test_topk_iou_hand_example() -> None:
    a = torch.arange(20.0).reshape(1, 4, 5)
    b = a.clone()
    b[0, 3, 4] = -1  # the top cell of a is no longer in b's top 2
    assert_nan_equal(M.topk_iou(a, b, fraction=0.1), [1 / 3])  # top2 a {19,18}, b {18,17}
    assert_nan_equal(M.topk_iou(a, a), [1.0])


def test_center_of_mass_shift_in_image_pixels() -> None:
    a = torch.zeros(1, 4, 4)
    b = torch.zeros(1, 4, 4)
    a[0, 0, 0] = 1
    b[0, 0, 3] = 1
    assert_nan_equal(M.center_of_mass_shift(a, b), [3.0])
    assert_nan_equal(M.center_of_mass_shift(a, b, image_size=(32, 32)), [24.0])
    assert_nan_equal(M.center_of_mass(a, (32, 32))[0], [4.0, 4.0])


def test_average_drop_and_increase_in_confidence_hand_example() -> None:
    y = torch.tensor([0.8, 0.5, 0.2, 0.0])
    o = torch.tensor([0.4, 0.6, 0.2, 0.1])
    assert_nan_equal(M.average_drop(y, o), [0.5, 0.0, 0.0, NAN])
    assert_nan_equal(M.increase_in_confidence(y, o), [0.0, 1.0, 0.0, 1.0])


def test_nanmean_reports_skipped() -> None:
    assert M.nanmean(torch.tensor([1.0, NAN, 3.0])) == (2.0, 1)
    mean, skipped = M.nanmean(torch.tensor([NAN, NAN]))
    assert math.isnan(mean) and skipped == 2


# ---- against naive loops ----------------------------------------------------------------------

def test_mask_metrics_match_naive_loops_on_upsampled_maps() -> None:
    maps, masks = rand_maps(h=3, w=4), rand_masks(h=12, w=16)
    up = upsample(maps, (12, 16))
    ef, en, ra = M.energy_fraction(maps, masks), M.enrichment(maps, masks), M.rank_accuracy(maps, masks)
    pg = M.pointing_game(maps, masks, tolerance=2.5)
    for b in range(5):
        a, m = up[b].flatten().tolist(), masks[b].flatten().tolist()
        total = sum(a)
        inside = sum(v for v, k in zip(a, m) if k)
        assert ef[b].item() == pytest.approx(inside / total, rel=1e-5)
        assert en[b].item() == pytest.approx(inside / total / (sum(m) / len(m)), rel=1e-5)
        k = sum(m)
        top = sorted(range(len(a)), key=lambda i: -a[i])[:k]
        assert ra[b].item() == pytest.approx(sum(m[i] for i in top) / k)
        best = max(range(len(a)), key=lambda i: a[i])
        by, bx = divmod(best, 16)
        near = any(masks[b, y, x] and (y - by) ** 2 + (x - bx) ** 2 <= 2.5 ** 2 for y in range(12) for x in range(16))
        assert pg[b].item() == float(near)


def naive_spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def test_drift_metrics_match_naive_loops() -> None:
    a = (rand_maps(seed=3) * 4).round()  # many ties
    b = (rand_maps(seed=4) * 4).round()
    rho, iou, shift = M.spearman(a, b), M.topk_iou(a, b, 0.2), M.center_of_mass_shift(a, b, (12, 14))
    for i in range(5):
        x, y = a[i].flatten().tolist(), b[i].flatten().tolist()
        assert rho[i].item() == pytest.approx(naive_spearman(x, y), abs=1e-5)
        k = math.ceil(0.2 * len(x))
        ta = set(sorted(range(len(x)), key=lambda j: -x[j])[:k])
        tb = set(sorted(range(len(y)), key=lambda j: -y[j])[:k])
        assert iou[i].item() == pytest.approx(len(ta & tb) / len(ta | tb))

        def com(v):
            s = sum(v)
            cy = sum(v[j] * ((j // 7) + 0.5) * 2 for j in range(len(v))) / s
            cx = sum(v[j] * ((j % 7) + 0.5) * 2 for j in range(len(v))) / s
            return cy, cx
        (ay, ax), (by_, bx) = com(x), com(y)
        assert shift[i].item() == pytest.approx(math.hypot(ay - by_, ax - bx), rel=1e-5)


# ---- degenerate inputs and invariances --------------------------------------------------------

def test_degenerate_inputs_give_nan_not_zero_and_never_raise() -> None:
    maps = rand_maps(b=4)
    maps[0] = 0.0      # all-zero map
    maps[1] = 0.5      # constant map
    masks = rand_masks(b=4)
    masks[2] = False   # empty mask
    ef, en = M.energy_fraction(maps, masks), M.enrichment(maps, masks)
    pg, ra = M.pointing_game(maps, masks), M.rank_accuracy(maps, masks)
    assert torch.isnan(ef[[0, 2]]).all() and not torch.isnan(ef[[1, 3]]).any()
    assert torch.isnan(en[[0, 2]]).all() and en[1].item() == pytest.approx(1.0)
    for v in (pg, ra):
        assert torch.isnan(v[:3]).all() and not torch.isnan(v[3])
    other = rand_maps(b=4, seed=9)
    for v in (M.spearman(maps, other), M.topk_iou(maps, other)):
        assert torch.isnan(v[:2]).all() and not torch.isnan(v[2:]).any()
    assert torch.isnan(M.center_of_mass_shift(maps, other)[0]) and not torch.isnan(M.center_of_mass_shift(maps, other)[1:]).any()


def test_scale_invariance_where_definitions_say_so() -> None:
    maps, masks, other = rand_maps(), rand_masks(), rand_maps(seed=5)
    for fn in (M.energy_fraction, M.enrichment, M.pointing_game, M.rank_accuracy):
        torch.testing.assert_close(fn(maps * 37.0, masks), fn(maps, masks), equal_nan=True)
    for fn in (M.spearman, M.topk_iou, M.center_of_mass_shift):
        torch.testing.assert_close(fn(maps * 0.01, other * 50.0), fn(maps, other), equal_nan=True)


def test_mismatched_shapes_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="share B"):
        M.energy_fraction(rand_maps(b=2), rand_masks(b=3))
    with pytest.raises(ValueError, match="one shape"):
        M.spearman(rand_maps(h=3), rand_maps(h=4))
    with pytest.raises(ValueError, match="border fraction"):
        M.border_mask(10, 10, 0.6)
    with pytest.raises(ValueError, match="tolerance"):
        M.pointing_game(rand_maps(), rand_masks(), tolerance=-1)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 4), h=st.integers(1, 6), w=st.integers(1, 6), scale=st.integers(1, 4),
       seed=st.integers(0, 10_000), zero_frac=st.floats(0, 1))
def test_metric_ranges_hold_for_random_shapes_and_masks(b, h, w, scale, seed, zero_frac) -> None:
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(b, h, w, generator=g)
    maps[torch.rand(b, h, w, generator=g) < zero_frac] = 0
    masks = torch.rand(b, h * scale, w * scale, generator=g) < 0.4
    for fn, lo, hi in ((M.energy_fraction, 0, 1), (M.pointing_game, 0, 1), (M.rank_accuracy, 0, 1)):
        v = fn(maps, masks)
        assert v.shape == (b,)
        ok = v[~torch.isnan(v)]
        assert ((ok >= lo - 1e-6) & (ok <= hi + 1e-6)).all()
    en = M.enrichment(maps, masks)
    area = masks.flatten(1).float().mean(1)
    ok = ~torch.isnan(en)
    assert (en[ok] <= 1 / area[ok] + 1e-4).all()
    other = torch.rand(b, h, w, generator=g)
    rho = M.spearman(maps, other)
    assert (rho[~torch.isnan(rho)].abs() <= 1 + 1e-6).all()


def test_masked_scores_reuses_logits_and_matches_plain_forward() -> None:
    import cam_monitor as cm
    from conftest import SmallCNN, make_trained_bn

    torch.manual_seed(0)
    model = make_trained_bn(SmallCNN()).eval()
    x = torch.randn(4, 3, 16, 16)
    res = cm.cam_pass(model, x, "features.7")
    maps, t = res.maps["gradcam"][:, 0], res.targets[:, 0]
    y1, o1 = cm.masked_scores(model, x, maps, t)
    y2, o2 = cm.masked_scores(model, x, maps, t, logits=res.logits)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(o1, o2)
    from cam_monitor.maps import minmax
    want = model(x * upsample(minmax(maps), (16, 16))[:, None]).softmax(1).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(o1, want.detach())


def test_enrichment_ceiling_is_the_best_any_map_can_reach() -> None:
    from cam_monitor.maps import upsample

    band = M.border_mask(64, 64, 0.1)[None]
    assert M.enrichment_ceiling((2, 2), band).item() == pytest.approx(1.0, abs=1e-5)  # a 2x2 grid cannot resolve a band
    fine = M.enrichment_ceiling((14, 14), band).item()
    share = band.float().mean().item()
    assert 1.0 < fine <= 1 / share + 1e-5
    g = torch.Generator().manual_seed(0)
    for grid in [(2, 2), (4, 4), (7, 5)]:
        maps = torch.rand(500, *grid, generator=g) ** 8  # peaky random maps
        reached = M.enrichment(upsample(maps, (64, 64)), band.expand(500, -1, -1)).max().item()
        assert reached <= M.enrichment_ceiling(grid, band).item() + 1e-5
    corner = torch.zeros(1, 64, 64, dtype=torch.bool)
    corner[0, :8, :8] = True
    assert M.enrichment_ceiling((8, 8), corner).item() > 10  # a fine grid resolves a small corner patch
    assert torch.isnan(M.enrichment_ceiling((4, 4), torch.zeros(1, 8, 8, dtype=torch.bool))).all()


def test_pointing_always_hits_on_a_grid_too_coarse_for_the_band() -> None:
    band = M.border_mask(64, 64, 0.1)[None]
    assert M.pointing_always_hits((2, 2), band).tolist() == [True]
    assert M.pointing_always_hits((8, 8), band).tolist() == [False]
    maps = torch.rand(200, 2, 2, generator=torch.Generator().manual_seed(0))
    assert (M.pointing_game(maps, band.expand(200, -1, -1)) == 1).all()  # what the check predicts
