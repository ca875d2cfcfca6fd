"""ProbeSet: builders, persistence and clear errors naming the offending probe."""
from __future__ import annotations


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
from torchvision.io import write_png

import cam_monitor as cm
from cam_monitor.probes import boxes_to_masks


def make(n=4, h=8, w=8, **kw) -> cm.ProbeSet:
    g = torch.Generator().manual_seed(0)
    return cm.ProbeSet(torch.rand(n, 3, h, w, generator=g), torch.arange(n) % 3, **kw)


def test_defaults_ids_and_display_unnormalises() -> None:
    imgs = torch.full((2, 3, 4, 4), 0.0)
    p = cm.ProbeSet(imgs, torch.tensor([0, 1]), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert p.ids == ["probe_000", "probe_001"] and len(p) == 2 and p.image_size == (4, 4)
    assert torch.allclose(p.display_images(), torch.full((2, 3, 4, 4), 0.5))


def test_masks_of_another_size_are_resized_nearest_and_binary_ints_accepted() -> None:
    m = torch.zeros(4, 4, 4, dtype=torch.uint8)
    m[:, :2, :2] = 1
    p = make(spurious_masks=m)
    assert p.spurious_masks.dtype == torch.bool and p.spurious_masks.shape == (4, 8, 8)
    assert p.spurious_masks[:, :4, :4].all() and not p.spurious_masks[:, 4:, :].any()


def test_marked_names_the_probes_with_a_spurious_mask_of_their_own() -> None:
    assert make().marked is None
    m = torch.zeros(4, 8, 8, dtype=torch.bool)
    m[1, 0, 0] = m[3, 4:, 4:] = True
    assert make(spurious_masks=m).marked.tolist() == [False, True, False, True]


def test_boxes_become_masks() -> None:
    p = make(n=2, object_masks=[[(1, 2, 4, 5)], None])
    expected = boxes_to_masks([[(1, 2, 4, 5)], []], 8, 8)
    assert torch.equal(p.object_masks, expected)
    assert p.object_masks[0, 2:5, 1:4].all() and int(p.object_masks[0].sum()) == 9 and not p.object_masks[1].any()


def test_save_load_roundtrip_with_weights_only(tmp_path) -> None:
    p = make(spurious_masks=torch.rand(4, 8, 8) > 0.5, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0), num_classes=3,
             class_names=["a", "b", "c"])
    path = tmp_path / "sub" / "probes.pt"
    p.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"].startswith("cam_monitor.ProbeSet")
    q = cm.ProbeSet.load(path)
    assert torch.equal(q.images, p.images) and torch.equal(q.labels, p.labels)
    assert torch.equal(q.spurious_masks, p.spurious_masks) and q.object_masks is None
    assert q.ids == p.ids and q.mean == p.mean and q.std == p.std and q.class_names == ["a", "b", "c"]
    assert not list(tmp_path.glob("sub/*.tmp"))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_load_refuses_pickled_objects_and_foreign_files(tmp_path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"format": "cam_monitor.ProbeSet/1", "images": Evil()}, evil)
    with pytest.raises(cm.InputError, match="weights_only"):
        cm.ProbeSet.load(evil)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(cm.InputError, match="not a cam_monitor probe file"):
        cm.ProbeSet.load(foreign)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file at all")
    with pytest.raises(cm.InputError, match="corrupt"):
        cm.ProbeSet.load(corrupt)


class ListDataset:
    def __init__(self, n=30, classes=3, with_masks=False):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, 6, 6, generator=g)
        self.y = torch.arange(n) % classes
        self.with_masks = with_masks
        self.calls = 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.calls += 1
        if self.with_masks:
            return {"image": self.x[i], "label": int(self.y[i]), "spurious_mask": self.x[i, 0] > 0.5,
                    "object_mask": self.x[i, 0] <= 0.5}
        return self.x[i], int(self.y[i])


def test_from_dataset_is_stratified_deterministic_and_leaves_global_rng_alone() -> None:
    ds = ListDataset()
    state = torch.get_rng_state()
    a = cm.ProbeSet.from_dataset(ds, per_class=2, seed=7)
    b = cm.ProbeSet.from_dataset(ds, per_class=2, seed=7)
    c = cm.ProbeSet.from_dataset(ds, per_class=2, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.ids == b.ids and a.ids != c.ids
    assert sorted(a.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    for pid, label, img in zip(a.ids, a.labels, a.images):
        i = int(pid[3:])
        assert int(ds.y[i]) == label and torch.equal(ds.x[i], img)


def test_from_dataset_reads_dict_items_with_masks_and_uses_targets_attribute() -> None:
    ds = ListDataset(with_masks=True)
    ds.targets = ds.y.tolist()
    p = cm.ProbeSet.from_dataset(ds, per_class=1, seed=0)
    assert ds.calls == 3  # labels came from .targets: only the picked items were read
    assert p.spurious_masks.shape == (3, 6, 6) and torch.equal(p.object_masks, ~p.spurious_masks)


def write_img(path, value, size=(6, 6), channels=3):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(torch.full((channels, *size), value, dtype=torch.uint8), str(path))


def test_from_folder_with_class_subfolders_and_masks(tmp_path) -> None:
    write_img(tmp_path / "cat" / "a.png", 255)
    write_img(tmp_path / "dog" / "b.png", 0)
    mask = torch.zeros(1, 3, 3, dtype=torch.uint8)
    mask[0, 0, 0] = 255
    write_png(mask, str(tmp_path / "dog" / "b.spurious.png"))
    p = cm.ProbeSet.from_folder(tmp_path, transform=lambda x: x * 2 - 1)
    assert p.ids == ["cat/a", "dog/b"] and p.labels.tolist() == [0, 1] and p.class_names == ["cat", "dog"]
    assert torch.allclose(p.images[0], torch.ones(3, 6, 6)) and torch.allclose(p.images[1], -torch.ones(3, 6, 6))
    assert p.object_masks is None
    assert p.spurious_masks[1, :2, :2].all() and int(p.spurious_masks[1].sum()) == 4 and not p.spurious_masks[0].any()


def test_from_folder_with_labels_csv(tmp_path) -> None:
    write_img(tmp_path / "x.png", 10, channels=1)
    write_img(tmp_path / "y.png", 20, channels=1)
    write_img(tmp_path / "x.object.png", 255, channels=1)
    (tmp_path / "labels.csv").write_text("file,label\nx.png,4\ny.png,2\n")
    p = cm.ProbeSet.from_folder(tmp_path)
    assert p.labels.tolist() == [4, 2] and p.images.shape == (2, 1, 6, 6)
    assert p.object_masks[0].all() and not p.object_masks[1].any()


@pytest.mark.parametrize("build, pattern", [
    (lambda: cm.ProbeSet(torch.rand(0, 3, 4, 4), torch.zeros(0, dtype=torch.long)), "empty"),
    (lambda: cm.ProbeSet(torch.rand(3, 4, 4), torch.zeros(3)), "4-D"),
    (lambda: cm.ProbeSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long)), "floating"),
    (lambda: make(n=2).__class__(torch.rand(2, 3, 4, 4), torch.zeros(3, dtype=torch.long)), r"labels must be \(N,\)"),
    (lambda: cm.ProbeSet(torch.rand(2, 3, 4, 4), torch.tensor([0, 5]), num_classes=3), r"'probe_001' \(index 1\) has label 5"),
    (lambda: cm.ProbeSet(torch.rand(2, 3, 4, 4), torch.tensor([0, -1])), "label -1"),
    (lambda: cm.ProbeSet(torch.rand(2, 3, 4, 4), torch.tensor([0.0, 1.0])), "integer class indices"),
    (lambda: cm.ProbeSet(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), ids=["a", "a"]), "duplicate probe id 'a'"),
    (lambda: cm.ProbeSet(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), ids=["a"]), "1 ids for 2"),
    (lambda: cm.ProbeSet(torch.tensor([[[[0.0, float("nan")]]]]), torch.tensor([0])), r"NaN or inf pixels at indices \[0\]"),
    (lambda: cm.ProbeSet(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), spurious_masks=torch.rand(2, 4, 4)), r"spurious mask of probe 'probe_000' .* not binary"),
    (lambda: cm.ProbeSet(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), object_masks=torch.ones(3, 4, 4)), r"object_masks must be \(N, H, W\)"),
    (lambda: cm.ProbeSet(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), object_masks=[[(0, 0, 9, 9)], None]), "outside"),
    (lambda: cm.ProbeSet(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), mean=(0.5,)), "3 channels"),
    (lambda: cm.ProbeSet(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), std=(1, 0, 1)), "std"),
    (lambda: cm.ProbeSet.from_dataset(ListDataset(), per_class=0), "per_class"),
])
def test_bad_probe_input_raises_input_error_naming_the_probe(build, pattern) -> None:
    with pytest.raises(cm.InputError, match=pattern):
        build()


def test_from_folder_errors(tmp_path) -> None:
    with pytest.raises(cm.InputError, match="does not exist"):
        cm.ProbeSet.from_folder(tmp_path / "missing")
    with pytest.raises(cm.InputError, match="neither labels.csv nor class sub-folders"):
        cm.ProbeSet.from_folder(tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(cm.InputError, match="cannot read probe image"):
        cm.ProbeSet.from_folder(tmp_path)
    (tmp_path / "c" / "broken.png").unlink()
    write_img(tmp_path / "c" / "a.png", 1, size=(4, 4))
    write_img(tmp_path / "c" / "b.png", 1, size=(5, 5))
    with pytest.raises(cm.InputError, match="differ in shape"):
        cm.ProbeSet.from_folder(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label\nc/a.png,x\n")
    with pytest.raises(cm.InputError, match="not an integer"):
        cm.ProbeSet.from_folder(tmp_path)


def test_balanced_pick_covers_every_class_round_robin() -> None:
    from cam_monitor.probes import balanced_indices

    labels = torch.arange(1000) % 10
    picked = balanced_indices(labels, 32, seed=0)
    counts = torch.bincount(labels[picked], minlength=10)
    assert counts.tolist().count(4) == 2 and counts.tolist().count(3) == 8
    assert sorted(labels[picked[:10]].tolist()) == list(range(10))  # every class before any second probe
    assert picked == balanced_indices(labels, 32, seed=0) and picked != balanced_indices(labels, 32, seed=1)


def test_more_classes_than_probes_samples_classes_with_the_seed() -> None:
    from cam_monitor.probes import balanced_indices

    labels = torch.arange(5000) % 1000
    a = labels[balanced_indices(labels, 32, seed=0)]
    b = labels[balanced_indices(labels, 32, seed=1)]
    assert len(set(a.tolist())) == 32 and set(a.tolist()) != set(b.tolist())
    assert max(a.tolist()) > 100  # not simply the first 32 classes


def test_rare_classes_give_what_they_have() -> None:
    from cam_monitor.probes import balanced_indices

    labels = torch.tensor([0] * 20 + [1] * 2)
    assert torch.bincount(labels[balanced_indices(labels, 8)]).tolist() == [6, 2]


def test_labels_of_a_random_split_come_from_the_parent_targets() -> None:
    ds = ListDataset()
    ds.targets = ds.y.tolist()
    sub = torch.utils.data.Subset(ds, [4, 1, 7, 2, 0, 5])
    ds.calls = 0
    p = cm.ProbeSet.from_dataset(sub, num_probes=3, seed=0)
    assert ds.calls == 3  # labels came from the parent's .targets: only the picked items were read
    assert sorted(p.labels.tolist()) == [0, 1, 2]


def test_check_classes_and_same_as() -> None:
    p = make(4)
    p.check_classes(3)
    with pytest.raises(cm.TargetError, match=r"\[2\] are out of range for a model with 2 classes"):
        p.check_classes(2)
    assert p.same_as(make(4)) and not p.same_as(make(4, ids=["a", "b", "c", "d"]))
    other = make(4)
    other.images[0, 0, 0, 0] += 1
    assert not p.same_as(other)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512))
def test_any_random_bytes_are_an_input_error_naming_the_file(tmp_path, data) -> None:
    path = tmp_path / "random.pt"
    path.write_bytes(data)
    with pytest.raises(cm.InputError, match="random.pt"):
        cm.ProbeSet.load(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(min_value=0.0, max_value=0.999))
def test_a_truncated_probe_file_is_an_input_error(tmp_path, cut) -> None:
    full = tmp_path / "full.pt"
    make(3).save(full)
    raw = full.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(cm.InputError, match="cut.pt"):
        cm.ProbeSet.load(path)


@pytest.mark.parametrize("state, pattern", [
    ({"format": "cam_monitor.ProbeSet/1"}, r"incomplete .* lacks \['images'"),
    ({**make(2).state(), "labels": torch.tensor([0.5, 1.5])}, "invalid probe set: labels must be integer"),
    ({**make(2).state(), "images": "not a tensor"}, "invalid probe set: probe images must be a torch.Tensor"),
    ({**make(2).state(), "ids": ["a"]}, "invalid probe set: got 1 ids for 2"),
])
def test_tagged_but_broken_states_are_input_errors(tmp_path, state, pattern) -> None:
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(cm.InputError, match=pattern):
        cm.ProbeSet.load(path)


def test_a_v2_transform_moves_the_masks_with_the_image(tmp_path) -> None:
    from torchvision.transforms import v2

    img = torch.zeros(3, 8, 12, dtype=torch.uint8)
    img[:, 2:4, 8:10] = 255  # a bright square at rows 2-3, columns 8-9
    write_png(img, str(tmp_path / "a" / "x.png")) if (tmp_path / "a").mkdir() is None else None
    mask = torch.zeros(1, 8, 12, dtype=torch.uint8)
    mask[:, 2:4, 8:10] = 255
    write_png(mask, str(tmp_path / "a" / "x.spurious.png"))
    flip_crop = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.CenterCrop((8, 8)), v2.Resize((16, 16)),
                            v2.Normalize([0.5] * 3, [0.5] * 3)])
    p = cm.ProbeSet.from_folder(tmp_path, transform=flip_crop)
    bright = p.images[0, 0] > 0  # normalised: the square is +1, the rest -1
    assert p.images.shape == (1, 3, 16, 16) and bright.any()
    assert torch.equal(p.spurious_masks[0], bright)  # flipped, cropped and resized exactly like the image


def test_a_plain_callable_transform_applies_to_the_image_and_masks_follow_its_size(tmp_path) -> None:
    write_img(tmp_path / "a" / "x.png", 200, size=(6, 6))
    write_png(torch.full((1, 6, 6), 255, dtype=torch.uint8), str(tmp_path / "a" / "x.object.png"))
    p = cm.ProbeSet.from_folder(tmp_path, transform=lambda im: torch.nn.functional.interpolate(im[None], size=(12, 12))[0])
    assert p.images.shape[-2:] == (12, 12) and p.object_masks.shape == (1, 12, 12) and bool(p.object_masks.all())


def test_images_the_labels_do_not_cover_are_counted_in_a_warning(tmp_path) -> None:
    write_img(tmp_path / "cat" / "a.png", 255)
    write_img(tmp_path / "stray.png", 0)
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) outside the class sub-folders: stray.png"):
        cm.ProbeSet.from_folder(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label\ncat/a.png,0\n")
    write_img(tmp_path / "b.png", 9)
    with pytest.warns(UserWarning, match=r"skipped 2 image\(s\) not listed in labels.csv: b.png, stray.png"):
        p = cm.ProbeSet.from_folder(tmp_path)
    assert p.ids == ["cat/a"]
