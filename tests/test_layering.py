"""Which modules may import which: evaluation and the callbacks sit below train, never import it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_dreamer.config import EnvConfig

REPO = Path(__file__).resolve().parent.parent
# train builds the callbacks and the callbacks run evaluation: an import of train from either is a cycle.
BELOW_TRAIN = [REPO / "lit_dreamer" / "evaluation.py", *sorted((REPO / "callbacks").glob("*.py"))]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", BELOW_TRAIN, ids=lambda p: str(p.relative_to(REPO)))
def test_evaluation_and_callbacks_do_not_import_train(path):
    assert "lit_dreamer.train" not in imported_modules(path)


@pytest.mark.parametrize("module", ["lit_dreamer.evaluation", "lit_dreamer.callbacks"])
def test_importing_evaluation_or_callbacks_leaves_train_unloaded(module):
    check = f"import sys, {module}; assert 'lit_dreamer.train' not in sys.modules, sorted(sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_env_config_gives_make_env_its_settings():
    env = EnvConfig(obs="pixels", action_repeat=2, image_size=32, time_limit=50, text_length=12, held_out=["red ball"])
    assert env.make_kwargs() == dict(obs="pixels", action_repeat=2, image_size=32, time_limit=50, text_length=12,
                                     held_out=("red ball",))
