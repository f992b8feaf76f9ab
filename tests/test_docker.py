"""The Dockerfile cannot be built here (no image registry): check what it relies on instead.

Everything it COPYs exists and survives ``.dockerignore``; ``pip install .`` run on exactly the
copied files builds a wheel holding every package of the project; the image starts
``python -m lightning_mim``; the base image is a CUDA PyTorch image whose torch satisfies
pyproject.toml. hadolint lints the file in CI (``make lint-docker``).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of the Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            name, _, args = current.strip().partition(" ")
            lines.append((name.upper(), args.strip()))
        current = ""
    return lines


def ignore_patterns() -> list[str]:
    path = REPO / ".dockerignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether ``.dockerignore`` drops the path (or one of its parent folders); no ``!`` rules are used."""
    assert not any(p.startswith("!") for p in patterns), "exceptions need a fuller matcher than this test's"
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], pattern[3:]):
                return True
    return False


def copied_sources() -> list[tuple[str, str]]:
    """``(source, destination)`` of every COPY/ADD from the build context."""
    pairs = []
    for name, args in instructions():
        if name not in {"COPY", "ADD"}:
            continue
        words = [w for w in args.split() if not w.startswith("--")]
        assert "--from" not in args, "multi-stage copies are not expected"
        *sources, destination = words
        pairs += [(source, destination) for source in sources]
    return pairs


def build_context(target: Path) -> None:
    """Lay out the files the image build sees (the COPY sources, minus .dockerignore) in ``target``."""
    patterns = ignore_patterns()
    for source, _ in copied_sources():
        path = REPO / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            if not ignored(relative, patterns):
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target / relative)


def test_every_copied_path_exists_and_reaches_the_build():
    patterns = ignore_patterns()
    sources = copied_sources()
    assert sources, "the Dockerfile copies nothing"
    for source, _ in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert not ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    for heavy in (".venv", ".git", "runs", "wandb"):
        assert ignored(heavy, patterns), f".dockerignore should keep {heavy} out of the build context"


def test_pip_install_of_the_copied_files_ships_every_package(tmp_path):
    """``pip install .`` inside the image sees only the copied files: build the wheel from exactly those."""
    context = tmp_path / "context"
    build_context(context)
    pyproject = tomllib.loads((context / "pyproject.toml").read_text())
    copied_packages = {p.parent.relative_to(context).as_posix() for p in context.rglob("__init__.py")}
    assert {"lightning_mim", "data_modules"} <= copied_packages
    readme = pyproject["project"].get("readme")
    assert readme is None or (context / readme).is_file(), f"pyproject's readme {readme} is not copied"

    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "-w", str(tmp_path / "wheel"), str(context)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    shipped = {Path(name).parent.as_posix() for name in zipfile.ZipFile(wheel).namelist() if name.endswith("/__init__.py")}
    assert copied_packages <= shipped, f"copied packages that pip does not install: {sorted(copied_packages - shipped)}"
    assert "lightning_mim/__main__.py" in zipfile.ZipFile(wheel).namelist()


def test_image_runs_the_cli_from_a_cuda_pytorch_base():
    steps = instructions()
    base = next(args for name, args in steps if name == "FROM")
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-(runtime|devel)", base)
    assert match, f"base image {base} is not a CUDA PyTorch image"
    torch_requirement = next(Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                             if Requirement(r).name == "torch")
    assert Version(match.group(1)) in torch_requirement.specifier, \
        f"pip would replace the base image's torch {match.group(1)} ({torch_requirement})"

    entrypoint = json.loads(next(args for name, args in steps if name == "ENTRYPOINT"))
    assert entrypoint == ["python", "-m", "lightning_mim"]
    workdir = next(args for name, args in steps if name == "WORKDIR")
    destinations = {source: destination for source, destination in copied_sources()}
    assert destinations.get("experiments", "").rstrip("/") in {"./experiments", f"{workdir}/experiments"}, \
        "the recipes must sit in the working directory so --config experiments/... works"
    assert not any(name == "ENV" and "WANDB_MODE" in args for name, args in steps), \
        "WANDB_MODE in the image would override the logger's offline flag (sweeps need online runs)"


@pytest.mark.skipif(shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(),
                    reason="hadolint is not installed: `make lint-docker` installs it (CI runs it)")
def test_hadolint_passes():
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([binary, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
