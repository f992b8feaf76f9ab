"""What pyproject.toml cannot say: the recipes folder ships inside the package, as one copy.

``experiments/`` (method recipes, demo configs, trainer presets, SLURM templates, sweeps) is
installed as the package ``lightning_mim.experiments``, so an installed ``--config mae.yaml`` works
from any folder (:mod:`lightning_mim.recipes` finds it). Everything else is in pyproject.toml.
"""

from setuptools import find_namespace_packages, find_packages, setup

RECIPES = "lightning_mim.experiments"
RECIPE_PACKAGES = [RECIPES] + [f"{RECIPES}.{sub}" for sub in find_namespace_packages(where="experiments")]

setup(
    packages=find_packages(include=["lightning_mim*", "data_modules*"]) + RECIPE_PACKAGES,
    package_dir={RECIPES: "experiments"},
    package_data={package: ["*.yaml", "*.sbatch"] for package in RECIPE_PACKAGES},
)
