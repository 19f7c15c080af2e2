"""Nothing low imports something high: every `import megatron_sc2...` in the package (at module
level or inside a function) points to its own layer or a lower one. The layer order:

  errors, config < model, ops < data < parallel < training < convert, launch, eval, governance,
  planning < cli, demo, train_command, preprocess_command

There is no list of tolerated exceptions: any upward import fails the test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_sc2"
LAYERS = [("errors", "config"), ("model", "ops"), ("data",), ("parallel",), ("training",),
          ("convert", "launch", "eval", "governance", "planning"),
          ("cli", "demo", "train_command", "preprocess_command", "__main__", "")]


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any layer of tests/test_layers.py; add it")


def _imports(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError("relative import: use the absolute megatron_sc2 name")
    return [m for m in out if m == "megatron_sc2" or m.startswith("megatron_sc2.")]


def upward_imports(package: Path) -> list[str]:
    """Every `importer -> imported` arrow of the package at `package` that points to a higher layer."""
    upward = []
    for f in sorted(package.rglob("*.py")):
        rel = f.relative_to(package.parent).with_suffix("")
        me = ".".join(p for p in rel.parts if p != "__init__")
        for target in _imports(ast.parse(f.read_text(), str(f))):
            if _layer(target) > _layer(me):
                upward.append(f"{me} -> {target}")
    return upward


def test_no_module_imports_a_layer_above_its_own():
    assert len(list(PACKAGE.rglob("*.py"))) > 40
    upward = upward_imports(PACKAGE)
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_check_reports_exactly_the_upward_arrows(tmp_path):
    # A synthetic package: arrows down, sideways within a layer and up, at module level and
    # inside functions; only the upward ones are reported.
    pkg = tmp_path / "megatron_sc2"
    files = {
        "__init__.py": "",
        "errors.py": "",
        "model/__init__.py": "from megatron_sc2.errors import UserError\n",
        "model/starcoder2.py": "def f():\n    from megatron_sc2.training.trainer import Trainer\n",
        "parallel/engine.py": "import megatron_sc2.model.starcoder2\nimport megatron_sc2.eval.run as r\n",
        "training/trainer.py": "from megatron_sc2.parallel import engine\n",
        "eval/run.py": "from megatron_sc2.convert import verify\n",
        "convert/verify.py": "",
        "planning/planner.py": "from megatron_sc2.training import flops\n",
        "train_command.py": "from megatron_sc2.eval.run import evaluate\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    assert upward_imports(pkg) == ["megatron_sc2.model.starcoder2 -> megatron_sc2.training.trainer",
                                   "megatron_sc2.parallel.engine -> megatron_sc2.eval.run"]
    (pkg / "data").mkdir()
    (pkg / "data" / "x.py").write_text("from .y import z\n")
    with pytest.raises(AssertionError, match="relative import"):
        upward_imports(pkg)
    (pkg / "data" / "x.py").write_text("import megatron_sc2.newroom\n")
    with pytest.raises(AssertionError, match="megatron_sc2.newroom: not in any layer"):
        upward_imports(pkg)
