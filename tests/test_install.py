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


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("installed")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the installed copy may be found
    source = root / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    source.mkdir()
    for name in PROJECT_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(root / "wheel"), str(source)], check=True, capture_output=True, timeout=300, env=env)
    (wheel,) = (root / "wheel").glob("*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120, env=env)
    python = venv / "bin" / "python"
    venv_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    # The test interpreter's packages (it may itself be a virtualenv, which --system-site-packages skips).
    Path(venv_site, "outer_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--quiet", str(wheel)], check=True,
                   capture_output=True, timeout=300, env=env)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return {"wheel": wheel, "python": python, "bin": venv / "bin", "cwd": elsewhere, "env": env}


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


@pytest.mark.slow
def test_installed_demo_runs_from_any_folder(installed, tmp_path):
    env = {**installed["env"], "LMIM_CACHE_DIR": str(tmp_path / "cache"), "LMIM_DATA_DIR": str(tmp_path / "phantoms")}
    done = subprocess.run([str(installed["python"]), "-m", "lightning_mim", "demo", "--fast", "true", "--output",
                           str(tmp_path / "demo")], cwd=installed["cwd"], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "demo" / "comparison").is_dir()
