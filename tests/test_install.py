"""Installed, not only cloned: a wheel installed into a fresh environment works from any folder.

The wheel is built from the checkout and installed with ``--no-deps`` into a new virtual environment
that sees the test interpreter's packages (torch, Lightning, ... are not reinstalled). Every command
then runs in a temporary folder outside the checkout, without ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("pyproject.toml", "setup.py", "README.md", "lightning_mim", "data_modules", "experiments")


ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the installed copy may be found


def project_copy(root: Path) -> Path:
    """The project's files in ``root/source``, so builds leave no build/ or egg-info in the checkout."""
    source = root / "source"
    source.mkdir()
    for name in PROJECT_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    return source


def fresh_environment(root: Path) -> Path:
    """A new virtualenv that also sees the test interpreter's packages; returns its python."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120, env=ENV)
    python = venv / "bin" / "python"
    venv_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True, env=ENV).stdout.strip()
    # The test interpreter may itself be a virtualenv, which --system-site-packages does not reach.
    Path(venv_site, "outer_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("installed")
    source = project_copy(root)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(root / "wheel"), str(source)], check=True, capture_output=True, timeout=300, env=ENV)
    (wheel,) = (root / "wheel").glob("*.whl")
    python = fresh_environment(root)
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--quiet", str(wheel)], check=True,
                   capture_output=True, timeout=300, env=ENV)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return {"wheel": wheel, "python": python, "bin": python.parent, "cwd": elsewhere, "env": ENV}


def run(installed: dict, *command: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_ships_the_recipes_once_and_a_console_script(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    recipes = sorted(n.removeprefix("lightning_mim/experiments/") for n in names if n.startswith("lightning_mim/experiments/"))
    in_checkout = sorted(p.relative_to(REPO / "experiments").as_posix() for p in (REPO / "experiments").rglob("*")
                         if p.is_file() and p.suffix in {".yaml", ".sbatch"})
    assert recipes == in_checkout
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lightning-mim = lightning_mim.cli:main" in zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()


def test_installed_package_runs_from_any_folder(installed):
    where = run(installed, str(installed["python"]), "-c", "import lightning_mim; print(lightning_mim.__file__)")
    assert where.returncode == 0 and str(REPO) not in where.stdout, where.stdout + where.stderr

    helped = run(installed, str(installed["bin"] / "lightning-mim"), "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: lightning-mim <command>") and "check-data" in helped.stdout

    printed = run(installed, str(installed["python"]), "-m", "lightning_mim", "fit", "--config", "mae",
                  "--config", "experiments/trainer/cpu.yaml", "--print_config")
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert "class_path: lightning_mim.methods.mae.MAE3D" in printed.stdout
    assert "accelerator: cpu" in printed.stdout


def test_editable_install_finds_the_checkouts_recipes_from_any_folder(tmp_path):
    """``pip install -e .`` (what ``make`` does): the recipes are the checkout's own files."""
    source = project_copy(tmp_path)
    python = fresh_environment(tmp_path)
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet", "-e",
                    str(source)], check=True, capture_output=True, timeout=300, env=ENV)
    found = subprocess.run([str(python), "-c", "from lightning_mim.recipes import find_recipe; print(find_recipe('smit'))"],
                           cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == source / "experiments" / "smit.yaml"


@pytest.mark.slow
def test_installed_demo_runs_from_any_folder(installed, tmp_path):
    env = {**installed["env"], "LMIM_CACHE_DIR": str(tmp_path / "cache"), "LMIM_DATA_DIR": str(tmp_path / "phantoms")}
    done = subprocess.run([str(installed["python"]), "-m", "lightning_mim", "demo", "--fast", "true", "--output",
                           str(tmp_path / "demo")], cwd=installed["cwd"], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "demo" / "report" / "study.md").is_file()
