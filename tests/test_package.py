"""pyproject.toml and embed_ft/: the house's modules under one name, and no other on your path."""
import importlib.metadata
import subprocess
import sys

import pytest
from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11 on


def test_the_install_puts_one_name_on_the_path_whose_modules_are_the_root_files():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {"embed_ft": "."}
    assert set(tool["packages"]) == {"embed_ft"} | {f"embed_ft.{p.parent.name}" for p in ROOT.glob("*/__init__.py")
                                                    if p.parent.name != "embed_ft"}


def test_a_module_of_yours_named_like_one_of_ours_is_yours_and_no_other_of_ours_is_on_your_path(tmp_path):
    try:
        importlib.metadata.distribution("embed-ft")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("embed-ft is not installed (pip install -e .)")
    (tmp_path / "data.py").write_text("MINE = True\n")
    script = ("import data; from embed_ft import data as ours, options; print(data.MINE, ours.__file__, options.data is ours)\n"
              "import errors")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    mine, ours, same = result.stdout.split()
    assert mine == "True" and ours == str(ROOT / "data.py") and same == "True"
    assert "No module named 'errors'" in result.stderr
