"""``python -m lgm_ray.shards``: the exit codes its docstring states, the one ``error: …`` line for bad
input, and the package's public face."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lgm_ray.shards.__main__ as cli
from lgm_ray.shards.__main__ import main


def _one_error_line(capsys: pytest.CaptureFixture[str], *words: str) -> None:
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and all(w in last for w in words), err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(("argv", "words"), [
    (["build", "digits", "--out", "{tmp}/x", "--val-fraction", "1.5"], ["--val-fraction in [0, 1)"]),
    (["build", "imagefolder", "{tmp}/nowhere", "--out", "{tmp}/x"], ["nowhere", "does not exist"]),
    (["build", "imagefolder", "--out", "{tmp}/x"], ["imagefolder DIR"]),
    (["index", "{tmp}/none-{{0..3}}.tar", "--out", "{tmp}/x"], ["matches no shard"]),
    (["verify", "{tmp}/nothing"], ["cannot read the manifest", "python -m lgm_ray.shards build"]),
])
def test_bad_input_exits_2_with_one_line(argv: list[str], words: list[str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    _one_error_line(capsys, *words)
    assert not (tmp_path / "x").exists()


def test_bad_index_option_exits_2(square_set: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["index", str(square_set / "train-*.tar"), "--out", str(tmp_path / "x"), "--label-key", "json:"]
    assert main(argv) == 2  # an engine's ValueError for an option: bad input too
    _one_error_line(capsys, "KEY:FIELD")
    assert not (tmp_path / "x").exists()


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["build", "mnist"])
    assert exc.value.code == 2 and "invalid choice: 'mnist'" in capsys.readouterr().err


def test_verify_problems_exit_1_and_sound_set_0(square_set: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(square_set)]) == 0
    assert capsys.readouterr().out.startswith("OK ")
    damaged = Path(__import__("shutil").copytree(square_set, tmp_path / "set"))
    (damaged / "test-000000.tar").write_bytes(b"")
    assert main(["verify", str(damaged)]) == 1  # the check ran and found problems
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("FAILED ") and any("test-000000.tar has 0 bytes" in line for line in err)


def test_interrupt_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build", interrupted)
    assert main(["build", "digits", "--out", str(tmp_path / "x")]) == 130
    _one_error_line(capsys, "build interrupted")


def test_python_dash_m_runs_the_command(square_set: Path, tmp_path: Path) -> None:
    """The documented command line itself, in a fresh interpreter: OK and 0, or one error line and 2."""
    ok = subprocess.run([sys.executable, "-m", "lgm_ray.shards", "verify", str(square_set)],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and ok.stdout.startswith("OK "), ok.stderr
    bad = subprocess.run([sys.executable, "-m", "lgm_ray.shards", "verify", str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert "Exit codes:" in cli.make_parser().format_help()


def test_package_face() -> None:
    """The package re-exports its main names; ``lgm_ray.shards.build`` and the like stay the modules."""
    import types

    import lgm_ray.shards as shards
    from lgm_ray.shards import build, index, verify

    assert all(isinstance(m, types.ModuleType) for m in (build, index, verify))
    assert shards.build_shards is build.build and shards.index_shards is index.index
    assert shards.verify_shards is verify.verify
    assert shards.ShardSet.__module__ == "lgm_ray.shards.reader" and issubclass(shards.ShardError, ValueError)
    from lgm_ray.common.errors import InputError

    assert issubclass(shards.ShardError, InputError)
