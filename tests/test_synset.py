"""Synthetic-set parameterisations, growth schedule and the saved format."""

from __future__ import annotations

import pytest
import torch

from lgm_ray.synset import (
    COLOR_MATRIX,
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
    s = SyntheticSet(4, ipc=3, res=16, param=param, decorrelate=color, generator=torch.Generator().manual_seed(0))
    img = s.render()
    assert img.shape == (12, 3, 16, 16)
    assert float(img.detach().min()) > 0 and float(img.detach().max()) < 1
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    img.sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in s.parameters())


def test_render_is_sigmoid_2x_of_the_level_sum():
    s = SyntheticSet(1, res=4, param="pixel", decorrelate=False, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(s.render(), torch.sigmoid(2 * s.levels[0]))


def test_pyramid_growth_rescales_levels_and_reaches_full_resolution():
    g = torch.Generator().manual_seed(0)
    s = SyntheticSet(2, ipc=1, res=8, generator=g)
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


def test_class_subset_owns_only_its_classes():
    s = SyntheticSet(10, ipc=2, res=4, classes=[7, 3])
    assert s.classes == [3, 7]
    assert s.labels.tolist() == [3, 3, 7, 7]
    with pytest.raises(ValueError, match="outside"):
        SyntheticSet(10, classes=[10])


def test_state_round_trip_after_growth():
    s = SyntheticSet(3, ipc=2, res=8, generator=torch.Generator().manual_seed(1))
    s.grow()
    s.grow()
    t = SyntheticSet.from_state(s.config(), s.state_dict())
    assert torch.equal(t.render(), s.render())


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
