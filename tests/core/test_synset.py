"""Synthetic-set parameterisations, growth schedule and the saved format."""

from __future__ import annotations

import pytest
import torch

from lgm_ray.core.seeds import generator
from lgm_ray.core.synset import (
    COLOR_MATRIX,
    REAL_INIT_EPS,
    SyntheticSet,
    decorrelate_color,
    pyramid_resolutions,
    synset_payload,
    validate_synset,
)


def test_pyramid_resolutions_powers_of_two_and_odd_sizes():
    assert pyramid_resolutions(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert pyramid_resolutions(224) == [1, 2, 4, 8, 16, 32, 64, 128, 224]
    assert pyramid_resolutions(1) == [1]


def test_color_matrix_is_normalised_by_largest_column_norm():
    raw = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    assert torch.allclose(COLOR_MATRIX.norm(dim=0).max(), torch.tensor(1.0))
    assert torch.allclose(COLOR_MATRIX * raw.norm(dim=0).max(), raw, atol=1e-6)
    x = torch.randn(2, 3, 4, 4)
    y = decorrelate_color(x)
    assert torch.allclose(y[0, :, 1, 2], COLOR_MATRIX @ x[0, :, 1, 2], atol=1e-6)


@pytest.mark.parametrize("param", ["pyramid", "pixel"])
@pytest.mark.parametrize("color", [True, False])
def test_render_shape_range_labels_and_gradients(param, color):
    s = SyntheticSet(4, ipc=3, res=16, param=param, decorrelate=color, seed=0)
    img = s.render()
    assert img.shape == (12, 3, 16, 16)
    assert float(img.detach().min()) > 0 and float(img.detach().max()) < 1
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    img.sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in s.parameters())


def test_render_is_sigmoid_2x_of_the_level_sum():
    s = SyntheticSet(1, res=4, param="pixel", decorrelate=False, seed=0)
    assert torch.allclose(s.render(), torch.sigmoid(2 * s.levels[0]))


def test_pyramid_growth_rescales_levels_and_reaches_full_resolution():
    s = SyntheticSet(2, ipc=1, res=8, seed=0)
    assert [p.shape[-1] for p in s.levels] == [1]
    first = s.levels[0].detach().clone()
    assert s.grow()
    assert [p.shape[-1] for p in s.levels] == [1, 2]
    assert torch.allclose(s.levels[0], first * 1 / 2)
    while s.grow():
        pass
    assert [p.shape[-1] for p in s.levels] == [1, 2, 4, 8]
    assert not s.can_grow and not s.grow()
    pixel = SyntheticSet(2, res=8, param="pixel")
    assert not pixel.grow()
    with pytest.raises(ValueError, match="at most 4"):
        SyntheticSet(2, res=8).grow_to(5)


def test_class_subset_owns_only_its_classes():
    s = SyntheticSet(10, ipc=2, res=4, classes=[7, 3])
    assert s.classes == [3, 7]
    assert s.labels.tolist() == [3, 3, 7, 7]
    with pytest.raises(ValueError, match="outside"):
        SyntheticSet(10, classes=[10])
    with pytest.raises(ValueError, match="repeat"):
        SyntheticSet(10, classes=[3, 3])


def test_state_round_trip_after_growth_keeps_the_seed():
    s = SyntheticSet(3, ipc=2, res=8, seed=1)
    s.grow()
    s.grow()
    with torch.no_grad():
        s.levels[1].add_(1.0)  # as if trained: the restored set must not be a fresh draw
    t = SyntheticSet.from_state(s.config(), s.state_dict())
    assert torch.equal(t.render(), s.render())
    # the restored set grows the level the original would have grown (the seed travels in config)
    s.grow()
    t.grow()
    assert torch.equal(t.levels[-1], s.levels[-1])


SHARDS = ([0, 1, 2, 3, 4], [5, 6], [7, 8, 9])


def _rows(full: SyntheticSet, classes: list[int]) -> torch.Tensor:
    return torch.isin(full.labels, torch.tensor(classes))


def _assert_split_equals_full(full: SyntheticSet, parts: list[SyntheticSet]) -> None:
    assert [len(p.levels) for p in parts] == [len(full.levels)] * len(parts)
    for level, p_full in enumerate(full.levels):
        for part in parts:
            assert torch.equal(part.levels[level], p_full[_rows(full, part.classes)])
    assert torch.equal(torch.cat([p.render() for p in parts]), full.render())


@pytest.mark.parametrize("param", ["pyramid", "pixel"])
@pytest.mark.parametrize("channels", [3, 1])
def test_rows_do_not_depend_on_the_class_split(param, channels):
    kw = dict(ipc=2, res=8, param=param, channels=channels, seed=11)
    full = SyntheticSet(10, **kw)
    parts = [SyntheticSet(10, classes=c, **kw) for c in SHARDS]
    _assert_split_equals_full(full, parts)
    for _ in range(4):  # up to full resolution (1, 2, 4, 8), and one more call that cannot grow
        grown = full.grow()
        assert [p.grow() for p in parts] == [grown] * len(parts)
        _assert_split_equals_full(full, parts)
    assert len(full.levels) == (4 if param == "pyramid" else 1)
    # the rows are not all alike (each class has its own draw) and the seed matters
    first = full.levels[-1].detach()
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    other = SyntheticSet(10, **{**kw, "seed": 12})
    assert not torch.equal(other.levels[0], SyntheticSet(10, **kw).levels[0])


def test_class_noise_comes_from_the_documented_generator():
    s = SyntheticSet(5, ipc=3, res=8, classes=[1, 4], seed=7)
    expected = torch.cat([torch.randn(3, 3, 1, 1, generator=generator(7, "syn", c, 0)) for c in (1, 4)])
    assert torch.equal(s.levels[0], expected)
    s.grow()
    expected = torch.cat([torch.randn(3, 3, 2, 2, generator=generator(7, "syn", c, 1)) for c in (1, 4)]) / 2
    assert torch.equal(s.levels[1], expected)


def test_starting_with_n_levels_equals_growing_to_n():
    grown = SyntheticSet(4, ipc=1, res=16, seed=3)
    grown.grow_to(4)
    started = SyntheticSet(4, ipc=1, res=16, seed=3, start_levels=4)
    assert [p.shape for p in started.levels] == [p.shape for p in grown.levels]
    for a, b in zip(started.levels, grown.levels, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_class_state_round_trips_across_splits():
    kw = dict(ipc=2, res=8, seed=4)
    parts = [SyntheticSet(10, classes=c, **kw) for c in SHARDS]
    for i, part in enumerate(parts):  # as if trained on three workers, differently
        part.grow_to(3)
        with torch.no_grad():
            for p in part.levels:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    states = {c: st for part in parts for c, st in part.class_state().items()}
    assert sorted(states) == list(range(10))
    assert set(states[6]) == {"levels.0", "levels.1", "levels.2"} and states[6]["levels.2"].shape == (2, 3, 4, 4)
    images = {c: img for part in parts for c, img in zip(part.classes, part.render().split(2), strict=True)}

    # a different split, starting fresh at one level: grows to the states' level count and loads
    for classes in ([0, 1], [2, 3, 4, 5, 6, 7, 8, 9]):
        other = SyntheticSet(10, classes=classes, **kw)
        other.load_class_state(states)
        assert len(other.levels) == 3
        for c, img in zip(classes, other.render().split(2), strict=True):
            assert torch.equal(img, images[c])
    # the same level count: overwritten in place (an optimiser over the parameters stays valid)
    full = SyntheticSet(10, **kw)
    full.grow_to(3)
    before = list(full.parameters())
    full.load_class_state(states)
    assert all(a is b for a, b in zip(full.parameters(), before, strict=True))
    assert torch.equal(full.render(), torch.cat([images[c] for c in range(10)]))
    # the exported state is a copy, not a view of the parameters
    with torch.no_grad():
        full.levels[0].zero_()
    assert not torch.equal(full.class_state()[0]["levels.0"], states[0]["levels.0"])


def test_class_state_errors_are_named():
    kw = dict(ipc=2, res=8, seed=4)
    states = SyntheticSet(10, classes=[0, 1], **kw).class_state()
    with pytest.raises(ValueError, match=r"missing classes \[2\]"):
        SyntheticSet(10, classes=[1, 2], **kw).load_class_state(states)
    grown = SyntheticSet(10, classes=[0, 1], **kw)
    grown.grow()
    with pytest.raises(ValueError, match="already has 2"):
        grown.load_class_state(states)
    with pytest.raises(ValueError, match=r"must have shape \(1, 3, 1, 1\)"):
        SyntheticSet(10, classes=[0, 1], ipc=1, res=8).load_class_state(states)
    mixed = {0: states[0], 1: {**states[1], "levels.1": torch.zeros(2, 3, 2, 2)}}
    with pytest.raises(ValueError, match="different numbers of levels"):
        SyntheticSet(10, classes=[0, 1], **kw).load_class_state(mixed)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="parameterisation"):
        SyntheticSet(2, param="wavelet")
    with pytest.raises(ValueError, match="ipc"):
        SyntheticSet(2, ipc=0)


def test_payload_is_the_reference_format(tmp_path):
    s = SyntheticSet(3, ipc=2, res=8)
    payload = synset_payload(s.render(), s.labels, class_names=["a", "b", "c"])
    torch.save(payload, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt")
    assert loaded["images"].dtype == torch.float32 and loaded["images"].shape == (6, 3, 8, 8)
    assert loaded["labels"].dtype == torch.long and loaded["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert validate_synset(loaded) is loaded
    with pytest.raises(ValueError, match="not a synthetic set"):
        validate_synset({"images": loaded["images"]})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        validate_synset({"images": loaded["images"] * 3, "labels": loaded["labels"]})


@pytest.mark.parametrize("param", ["pyramid", "pixel"])
@pytest.mark.parametrize("channels,color", [(3, True), (3, False), (1, False)])
def test_set_images_renders_the_given_images(param, channels, color):
    s = SyntheticSet(4, ipc=2, res=16, param=param, decorrelate=color, channels=channels, seed=3)
    images = torch.rand(8, 3, 16, 16, generator=generator(0, "test"))
    s.set_images(images)
    want = images.clamp(REAL_INIT_EPS, 1 - REAL_INIT_EPS)
    if channels == 1:
        want = want.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    assert torch.allclose(s.render(), want, atol=1e-5)
    if param == "pyramid":  # complete from the start, the image in the finest level only
        assert len(s.levels) == s.max_levels and not s.can_grow
        assert all(float(p.abs().max()) == 0 for p in s.levels[:-1])
    with pytest.raises(ValueError, match="set_images needs 8×3×16×16"):
        s.set_images(images[:, :, :8, :8])
