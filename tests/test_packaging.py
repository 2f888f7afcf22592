"""Packaging: a regular (non-editable) install of the built wheel, used from a folder outside the checkout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD_INPUTS = ("pyproject.toml", "README.md", "lit_dreamer", "callbacks", "configs")


def listed_packages() -> set[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["tool"]["setuptools"]["packages"])


def test_every_subpackage_is_listed_in_pyproject():
    # The package-dir mapping rules out setuptools' automatic discovery: a new subpackage must be listed.
    found = set()
    for package, folder in (("lit_dreamer", REPO / "lit_dreamer"), ("lit_dreamer.callbacks", REPO / "callbacks")):
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            found.add(".".join((package, *parts)))
    assert found <= listed_packages(), sorted(found - listed_packages())


def test_nothing_imports_a_top_level_callbacks_package():
    # From a checkout `import callbacks` still resolves (the repository root is on sys.path) and would load
    # a second copy of every callback class; an installed package has no such module at all.
    pattern = re.compile(r"^\s*\"?(from|import)\s+callbacks\b", re.MULTILINE)  # .ipynb: a JSON string
    files = [p for folder in ("lit_dreamer", "callbacks", "tests", "scripts", "examples", "notebooks")
             for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".ipynb")]
    offenders = [str(p.relative_to(REPO)) for p in files if pattern.search(p.read_text())]
    assert offenders == [], f"import from lit_dreamer.callbacks instead: {offenders}"


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{command}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the checkout (building in place would leave build/ and egg-info behind)."""
    source, dist = tmp_path / "source", tmp_path / "dist"
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(dist), str(source)])
    wheels = list(dist.glob("lit_dreamer-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def install_in_venv(tmp_path: Path, wheel: Path) -> Path:
    """A fresh venv with the wheel installed (no download: the test's own packages are visible to it)."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)])
    python = venv / "bin" / "python"
    # --system-site-packages reaches the base interpreter's packages only; when the tests run in a venv
    # themselves, torch and lightning live in that venv's site-packages. A plain path in a .pth file adds
    # the folder without running its own .pth files (so an editable install of the checkout stays off).
    inner = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(inner, "outer_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)])
    return python


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_installs_and_trains_from_another_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    for name in ("lit_dreamer/configs/debug.yaml", "lit_dreamer/configs/cartpole.yaml",
                 "lit_dreamer/configs/size/size12m.yaml", "lit_dreamer/callbacks/env_collector.py",
                 "lit_dreamer/envs/make.py"):
        assert name in names, name
    assert not [n for n in names if n.split("/")[0] in ("callbacks", "configs")]  # no generic top-level names

    python = install_in_venv(tmp_path, wheel)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LIT_DREAMER_RUN_NAME")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    probe = ("import importlib.util, lit_dreamer, lit_dreamer.callbacks, lit_dreamer.config as c; print("
             "lit_dreamer.__file__, lit_dreamer.callbacks.__file__, c.CONFIG_DIR, importlib.util.find_spec('callbacks'))")
    where = run([str(python), "-c", probe], cwd=work, env=env).stdout.split()
    assert all(path.startswith(str(tmp_path / "venv")) for path in where[:3]), where
    assert where[3] == "None", "a top-level `callbacks` package is importable"

    config = run([str(python), "-m", "lit_dreamer", "config", "-c", "cartpole"], cwd=work, env=env).stdout
    assert "  steps: 20000" in config and "  critic_lr: 0.00064" in config  # from configs/cartpole.yaml
    proc = run([str(python), "-m", "lit_dreamer", "fit", "-c", "debug", "run.steps=70", "run.dir=run",
                f"logger.tracking_uri=sqlite:///{work}/mlflow.db"], cwd=work, env=env, timeout=400)
    assert "env steps 70" in proc.stdout, proc.stdout
    assert list((work / "run" / "checkpoints").glob("step-*/model.ckpt"))
