"""The package's layers: each folder imports only from the folders below it, and no module imports
itself back through others (checked with import-linter's contract from pyproject.toml, and with a
cycle search over grimp's import graph). Each check is also shown to fail on a broken copy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grimp")
tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter not installed")

_CYCLES = (
    "import grimp, json, sys; g = grimp.build_graph('runlora', cache_dir=None); "
    "print(json.dumps(sorted([m, i] for m in g.modules for i in "
    "g.find_modules_directly_imported_by(m) if g.chain_exists(importer=i, imported=m))))"
)


def _run(args: list[str], src: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        cwd=cwd,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _lint_imports(src: Path, config: Path) -> subprocess.CompletedProcess:
    return _run([str(LINT_IMPORTS), "--config", str(config), "--no-cache"], src, config.parent)


def _cycles(src: Path) -> list[tuple[str, str]]:
    """Pairs (a, b): a imports b directly and b reaches a back through imports."""
    result = _run([sys.executable, "-c", _CYCLES], src, src)
    assert result.returncode == 0, result.stderr
    return [tuple(pair) for pair in json.loads(result.stdout)]


def _broken_copy(tmp_path: Path, module: str, line: str) -> tuple[Path, Path]:
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "src" / "runlora", src / "runlora", ignore=ignore)
    config = tmp_path / "pyproject.toml"
    shutil.copy(ROOT / "pyproject.toml", config)
    path = src / "runlora" / module
    path.write_text(path.read_text() + "\n" + line + "  # noqa\n")
    return src, config


def test_pyproject_declares_the_layers_in_order():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in contracts["contracts"] if c["type"] == "layers")["layers"]
    assert layers == ["cli", "recipes | bench", "integrations", "layers", "planning", "ops"]


def test_the_package_keeps_its_import_contracts():
    result = _lint_imports(ROOT / "src", ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_package_has_no_import_cycle():
    assert _cycles(ROOT / "src") == []


@pytest.mark.parametrize(
    "module, line",
    [
        ("ops/products.py", "from ..planning import planner"),
        ("planning/scoring.py", "from ..layers import layer"),
        ("layers/routing.py", "from ..integrations import peft"),
        ("integrations/peft.py", "from ..bench import model_bench"),
        ("bench/layer_bench.py", "from ..recipes import data"),
        ("ops/variants.py", "from .. import configs"),
    ],
)
def test_an_upward_or_sideways_import_breaks_the_contract(tmp_path, module, line):
    src, config = _broken_copy(tmp_path, module, line)
    result = _lint_imports(src, config)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout


def test_a_cycle_inside_a_layer_is_found(tmp_path):
    # planning.measured imports planning.clock; clock importing measured back closes a cycle that
    # the layers contract cannot see (both are in planning/).
    src, _ = _broken_copy(tmp_path, "planning/clock.py", "from . import measured")
    assert ["runlora.planning.clock", "runlora.planning.measured"] in [
        list(pair) for pair in _cycles(src)
    ]


@pytest.mark.parametrize(
    "old, new",
    [
        ("distributed", "integrations.distributed"),
        ("quant", "layers.quant"),
        ("planner", "planning.planner"),
    ],
)
def test_a_module_of_the_flat_layout_names_its_new_path(old, new):
    import importlib

    with pytest.raises(ModuleNotFoundError, match=rf"runlora\.{old} moved to runlora\.{new}"):
        importlib.import_module(f"runlora.{old}")
    importlib.import_module(f"runlora.{new}")
    with pytest.raises(ModuleNotFoundError, match="No module named 'runlora.nothing_here'"):
        importlib.import_module("runlora.nothing_here")
