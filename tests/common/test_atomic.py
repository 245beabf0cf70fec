"""Files written whole or not at all (lgm_ray.common.atomic)."""

from __future__ import annotations

import pytest

from lgm_ray.common.atomic import replace_with, save_figure, write_text


def test_write_text_creates_folders_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "result.json"
    write_text(path, "one")
    write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    write_text(path, "old")

    def half_then_crash(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_with(path, half_then_crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_the_temporary_keeps_the_suffix_writers_choose_the_format_from(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    path = save_figure(fig, tmp_path / "fig.png")
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    seen = []
    replace_with(tmp_path / "x.pt", lambda tmp: (seen.append(tmp.suffix), tmp.write_bytes(b"1")))
    assert seen == [".pt"]
