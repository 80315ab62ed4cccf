"""pyproject.toml: a non-editable install carries every module and package of the house."""
import pytest
from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11 on


def test_the_install_lists_every_module_at_the_root_and_every_package():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(tool["py-modules"]) == {p.stem for p in ROOT.glob("*.py")}
    assert set(tool["packages"]) == {p.parent.name for p in ROOT.glob("*/__init__.py")}
