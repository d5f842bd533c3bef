"""The house's floors (docs/architecture.md): imports only run downwards, no method imports another, no circle,
and ``import dyntok`` stays a thin face."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO_ROOT


def test_the_import_contracts_hold():
    """pyproject.toml's ``[tool.importlinter]`` contracts; a broken one prints the offending import chain.

    In a subprocess: import-linter configures logging for the whole process, which would silence dyntok's own
    loggers in the tests that follow.
    """
    lint = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    result = subprocess.run([sys.executable, "-c", lint], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_importing_dyntok_loads_neither_matplotlib_nor_the_data_layer():
    loaded = subprocess.run(
        [sys.executable, "-c", "import json, sys, dyntok; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT).stdout
    modules = json.loads(loaded.splitlines()[-1])
    heavy = [name for name in modules if name.split(".")[0] == "matplotlib" or name.startswith("dyntok.data")
             or name.startswith(("dyntok.report", "dyntok.training", "dyntok.bench", "dyntok.cli"))]
    assert heavy == []


def test_show_is_still_reachable_from_the_package():
    import dyntok
    from dyntok.report.gallery import show

    assert dyntok.show is show and "show" in dyntok.__all__
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        dyntok.nothing_here  # noqa: B018


def test_every_registered_method_is_in_the_independence_contract():
    try:
        import tomllib
    except ImportError:  # Python 3.10: import-linter brings tomli
        import tomli as tomllib

    import dyntok

    contracts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    independent = next(contract for contract in contracts if contract["type"] == "independence")["modules"]
    modules = {type(dyntok.create_model(f"{method}_vit_cifar_nano")).__module__ for method in dyntok.list_methods()}
    assert modules == set(independent)
