"""The embedded default data: a deterministic synthetic cohort of CT-like abdominal phantoms.

Each case is a body outline (skin, subcutaneous fat, muscle wall, textured visceral fat and bowel,
air outside) with organs drawn as ellipsoids / tubes deformed by low-frequency noise, each with its
own HU level and texture, partial-volume edges and Gaussian noise. Images are int16 HU NIfTI files,
labels uint8 NIfTI files (0 = background, ``i + 1`` = ``ORGAN_NAMES[i]``), RAS affines, plus an
MSD-style ``dataset.json``.

Variability between cases (generator version 2; every range is a constant of :data:`VARIABILITY`):

* body habitus: overall size, width-to-depth ratio, subcutaneous fat thickness;
* pose: rotation of the whole anatomy about the cranio-caudal axis and an in-plane shift;
* organs: position jitter, an independent scale per half-axis, shape wobble (smooth noise);
* appearance: per-organ mean HU and texture amplitude, contrast phase (kidney/aorta enhancement),
  image noise level, partial-volume blur (Gaussian, sigma in voxels);
* optional lesions (``lesions=True``): up to two hypodense spheres in the liver, labelled liver.

Every organ is sized so that at 64 × 64 in-plane voxels its smallest cross-section is still several
voxels across (aorta and pancreas at least ~4): no structure is unlearnable by construction.

Anatomy is laid out in body-relative units (x: right+, y: anterior+, z: superior+; the body
ellipse has half-axes 1), so any ``shape``/``spacing`` gives a plausible, if small, abdomen.
All randomness comes from NumPy generators spawned from ``seed`` per case, so the same arguments
give identical files (with the same NumPy build: libm/BLAS rounding may differ across platforms).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from lightning_mim.run_files import atomic_write

ORGAN_NAMES = ("liver", "spleen", "right_kidney", "left_kidney", "aorta", "stomach", "pancreas", "spine")
GENERATOR_VERSION = 2
#: Ranges of the between-case variability (body units: the body ellipse has half-axes 1).
VARIABILITY = {
    "body_scale": (0.84, 1.06),         # overall body size relative to the field of view
    "body_aspect": (0.88, 1.12),        # width / depth relative to the mean habitus
    "fat_depth": (0.06, 0.18),          # subcutaneous fat thickness
    "rotation_deg": (-15.0, 15.0),      # about the cranio-caudal axis
    "shift": 0.04,                      # SD of the in-plane shift of the anatomy
    "organ_jitter": 0.05,               # SD of organ centre jitter
    "organ_scale": (0.80, 1.20),        # per half-axis
    "noise_sd_hu": (8.0, 25.0),
    "blur_sigma_voxels": (0.3, 0.9),    # partial-volume blur
    "texture_scale": (0.5, 1.8),        # multiplies each organ's texture amplitude
}
MANIFEST = "manifest.json"


def default_phantom_root() -> Path:
    """``$LMIM_DATA_DIR`` or ``~/.cache/lightning_mim/phantoms``."""
    return Path(os.environ.get("LMIM_DATA_DIR") or "~/.cache/lightning_mim/phantoms").expanduser()


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], cells: int = 4) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise varying over ~``shape / cells`` voxels.

    A coarse random grid upsampled with smoothstep-weighted linear interpolation; each axis is an
    interpolation matrix, so the whole field is three small matrix products.
    """
    field = rng.standard_normal([cells + 1] * 3).astype(np.float32)
    for size in shape:
        position = np.linspace(0.0, cells, size, dtype=np.float32)
        lower = np.minimum(position.astype(np.int64), cells - 1)
        weight = position - lower
        weight = weight * weight * (3 - 2 * weight)
        matrix = np.zeros((cells + 1, size), dtype=np.float32)
        matrix[lower, np.arange(size)] = 1 - weight
        matrix[lower + 1, np.arange(size)] = weight
        # Contract the leading (coarse) axis and append the fine one: after three steps the axes
        # are back in order (i, j, k).
        field = np.tensordot(field, matrix, axes=([0], [0]))
    return np.ascontiguousarray(field)


class _Canvas:
    """HU volume and label map painted organ by organ; later organs cover earlier ones."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator):
        self.rng = rng
        self.shape = shape
        half_extent = [(n - 1) * s / 2 for n, s in zip(shape, spacing)]
        body_scale = rng.uniform(*VARIABILITY["body_scale"])
        aspect = np.sqrt(rng.uniform(*VARIABILITY["body_aspect"]))
        # Half-axes of the body ellipse in mm: wider (x) than deep (y), like an abdomen.
        semi_axes = (0.47 * 2 * half_extent[0] * body_scale * aspect, 0.36 * 2 * half_extent[1] * body_scale / aspect)
        axes = [np.linspace(-h, h, n, dtype=np.float32) for h, n in zip(half_extent, shape)]
        # Pose: the anatomy is rotated about z and shifted in-plane (in mm, before normalising).
        angle = np.deg2rad(rng.uniform(*VARIABILITY["rotation_deg"]))
        shift = rng.normal(0.0, VARIABILITY["shift"], 2) * np.asarray(semi_axes)
        px = axes[0].reshape(-1, 1, 1) - np.float32(shift[0])
        py = axes[1].reshape(1, -1, 1) - np.float32(shift[1])
        cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        self.x = ((cos * px + sin * py) / np.float32(semi_axes[0])).astype(np.float32)
        self.y = ((-sin * px + cos * py) / np.float32(semi_axes[1])).astype(np.float32)
        self.z = (axes[2] / max(half_extent[2], 1e-6)).reshape(1, 1, -1)
        # Edge softness of about one voxel in body units, for partial-volume blending.
        self.edge = np.float32(1.0 / (min(shape[0], shape[1]) * 0.4))
        self.hu = np.full(shape, -1000.0, dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)

    def noise(self, cells: int = 4) -> np.ndarray:
        return smooth_noise(self.rng, self.shape, cells)

    def paint(self, inside: np.ndarray, hu: np.ndarray | float, label: int | None = None) -> None:
        """Blend ``hu`` where the signed field ``inside`` (> 0 inside) is positive, with soft edges."""
        weight = np.clip(0.5 + inside / (2 * self.edge), 0.0, 1.0)
        self.hu += weight * (hu - self.hu)
        if label is not None:
            self.labels[inside > 0] = label

    def ellipsoid(self, center, semi_axes, wobble: float = 0.25, cells: int = 3) -> np.ndarray:
        """Signed field (> 0 inside) of an ellipsoid deformed by smooth noise, in body units."""
        cx, cy, cz = center
        ax, ay, az = semi_axes
        level = ((self.x - cx) / ax) ** 2 + ((self.y - cy) / ay) ** 2 + ((self.z - cz) / az) ** 2
        radius = 1 + wobble * self.noise(cells)
        # Approximate distance in body units: scale the level-set gap by the smallest half-axis.
        return (radius - np.sqrt(level)) * min(ax, ay)

    def tube(self, start, end, radius: float, wobble: float = 0.2) -> np.ndarray:
        """Signed field of a capsule between two points (pancreas-like), deformed by noise."""
        start = np.asarray(start, dtype=np.float32)
        direction = np.asarray(end, dtype=np.float32) - start
        length2 = float(direction @ direction)
        offsets = (self.x - start[0], self.y - start[1], self.z - start[2])
        t = np.clip((offsets[0] * direction[0] + offsets[1] * direction[1] + offsets[2] * direction[2]) / length2, 0, 1)
        distance2 = sum((o - t * d) ** 2 for o, d in zip(offsets, direction))
        return radius * (1 + wobble * self.noise(4)) - np.sqrt(distance2)


def _jitter(rng: np.random.Generator, point, spread: float | None = None):
    spread = VARIABILITY["organ_jitter"] if spread is None else spread
    return tuple(float(v) for v in np.asarray(point) + rng.normal(0, spread, 3))


def _scaled(rng: np.random.Generator, semi_axes):
    """Each half-axis scaled independently: organs vary in size and in shape."""
    return tuple(float(v) for v in np.asarray(semi_axes) * rng.uniform(*VARIABILITY["organ_scale"], 3))


def generate_phantom(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator, lesions: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic abdominal CT: (int16 HU volume, uint8 label map), both ``shape``."""
    from scipy.ndimage import gaussian_filter

    canvas = _Canvas(shape, spacing, rng)
    x, y = canvas.x, canvas.y
    label = {name: index + 1 for index, name in enumerate(ORGAN_NAMES)}

    def texture(amplitude: float, cells: int) -> np.ndarray:
        return amplitude * rng.uniform(*VARIABILITY["texture_scale"]) * canvas.noise(cells)

    # Body: a slightly squared ellipse with an irregular outline; skin, fat, muscle wall, viscera.
    radius = (np.abs(x) ** 2.3 + np.abs(y) ** 2.1) ** (1 / 2.2) * (1 + 0.03 * canvas.noise(3)) + 0 * canvas.z
    fat_depth = rng.uniform(*VARIABILITY["fat_depth"])
    canvas.paint(1.0 - radius, -100 + 8 * canvas.noise(6))
    canvas.paint(0.99 - radius, -105 + 10 * canvas.noise(8))
    canvas.paint((1 - fat_depth) - radius, 45 + 6 * canvas.noise(8))
    interior = (1 - fat_depth - 0.06) - radius
    bowel = canvas.noise(7)
    viscera = np.where(bowel > 0.3, 25.0 + 10 * canvas.noise(10), -90.0 + 10 * canvas.noise(10))
    viscera = np.where(canvas.noise(9) > 1.6, -750.0, viscera)  # bowel gas pockets
    canvas.paint(interior, viscera)

    def organ(field: np.ndarray) -> np.ndarray:
        return np.minimum(field, interior)  # organs stay inside the abdominal cavity

    liver = organ(canvas.ellipsoid(_jitter(rng, (0.40, 0.05, 0.35)), _scaled(rng, (0.48, 0.55, 0.6))))
    canvas.paint(liver, rng.normal(60, 8) + texture(6, 10), label["liver"])
    if lesions:
        for _ in range(int(rng.integers(0, 3))):
            centre = _jitter(rng, (0.45, 0.05, 0.35), 0.12)
            lesion = np.minimum(canvas.ellipsoid(centre, (0.07, 0.09, 0.15), wobble=0.15), liver)
            canvas.paint(lesion, rng.uniform(5, 35) + texture(4, 10))
    spleen = organ(canvas.ellipsoid(_jitter(rng, (-0.52, -0.22, 0.40)), _scaled(rng, (0.18, 0.26, 0.30))))
    canvas.paint(spleen, rng.normal(50, 7) + texture(5, 10), label["spleen"])

    stomach_center = _jitter(rng, (-0.28, 0.30, 0.45))
    stomach = organ(canvas.ellipsoid(stomach_center, _scaled(rng, (0.28, 0.24, 0.32)), wobble=0.2))
    contents = np.where(y > stomach_center[1] + 0.12, -700.0, rng.uniform(-40, 10) + 4 * canvas.noise(8))
    canvas.paint(stomach, 40.0, label["stomach"])  # wall
    canvas.paint(stomach - 0.03, contents)

    head, tail = _jitter(rng, (0.15, -0.10, 0.0)), _jitter(rng, (-0.45, -0.20, 0.15))
    pancreas = organ(canvas.tube(head, tail, radius=rng.uniform(0.10, 0.13), wobble=0.3))
    canvas.paint(pancreas, rng.normal(40, 6) + texture(12, 16), label["pancreas"])

    enhancement = rng.uniform(0.6, 1.3)  # contrast phase: how bright kidneys and aorta are
    for side, name in ((1.0, "right_kidney"), (-1.0, "left_kidney")):
        center = _jitter(rng, (0.34 * side, -0.45, -0.05 + 0.08 * (side < 0)))
        kidney = organ(canvas.ellipsoid(center, _scaled(rng, (0.13, 0.17, 0.30)), wobble=0.12))
        canvas.paint(kidney, 40 + enhancement * rng.normal(120, 10) + texture(8, 10), label[name])  # enhancing cortex
        canvas.paint(kidney - 0.035, rng.normal(35, 5) + 6 * canvas.noise(10))  # medulla

    # Great vessels: contrast-filled aorta just left of the midline, the unlabeled IVC to the right.
    bend = 0.03 * canvas.noise(2)
    aorta = rng.uniform(0.09, 0.11) - np.sqrt((x + 0.06 + bend) ** 2 + (y + 0.40) ** 2)
    canvas.paint(aorta, 40 + enhancement * rng.uniform(110, 210) + texture(5, 6), label["aorta"])
    ivc = 0.075 - np.sqrt((x - 0.13 - bend) ** 2 + (y + 0.36) ** 2)
    canvas.paint(ivc, rng.uniform(90, 140) + 0 * canvas.z)

    # Spine: vertebral bodies (cortex + cancellous bone) separated by discs, canal, posterior arch.
    period = rng.uniform(0.22, 0.30)
    phase = rng.uniform(0, 1)
    in_disc = np.abs(((canvas.z / period + phase) % 1.0) - 0.5) < 0.1
    body = 0.15 - np.sqrt((x / 1.15) ** 2 + (y + 0.66) ** 2) + 0 * canvas.z
    canvas.paint(body, np.where(in_disc, 90.0, 800.0), label["spine"])
    canvas.paint(body - 0.025, np.where(in_disc, 90.0, rng.uniform(300, 450) + 30 * canvas.noise(12)))
    canvas.labels[(body > 0) & in_disc] = 0  # discs are not bone
    arch = np.minimum(0.10 - np.sqrt(x**2 + (y + 0.88) ** 2), (y + 0.98)) + 0 * canvas.z
    canvas.paint(arch, 650.0 + 40 * canvas.noise(12), label["spine"])
    canal = 0.055 - np.sqrt(x**2 + (y + 0.86) ** 2) + 0 * canvas.z
    canvas.paint(canal, 15.0)
    canvas.labels[canal > 0] = 0

    # Partial-volume blur of the image (labels stay sharp), then acquisition noise.
    canvas.hu = gaussian_filter(canvas.hu, rng.uniform(*VARIABILITY["blur_sigma_voxels"]), mode="nearest")
    canvas.hu += rng.normal(0, rng.uniform(*VARIABILITY["noise_sd_hu"]), shape).astype(np.float32)
    return np.clip(np.rint(canvas.hu), -1024, 3071).astype(np.int16), canvas.labels


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    # gzip with mtime 0 and no file name in the header, so identical arrays give identical files.
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def _cohort_folder(root: Path, num_cases: int, shape, spacing, seed: int) -> Path:
    size = "x".join(str(n) for n in shape)
    voxel = "x".join(f"{s:g}" for s in spacing)
    return root / f"phantoms-n{num_cases}-{size}-{voxel}mm-seed{seed}"


def ensure_phantom_cohort(
    root: str | os.PathLike | None = None,
    num_cases: int = 12,
    shape: tuple[int, int, int] = (160, 160, 64),
    spacing: tuple[float, float, float] = (0.9, 0.9, 2.5),
    seed: int = 0,
    report: Callable[[str], None] | None = None,
    lesions: bool = False,
) -> Path:
    """Path of the ``dataset.json`` of the phantom cohort, generating it first if needed.

    The cohort lives in a sub-folder of ``root`` (default :func:`default_phantom_root`) named
    after its parameters, so cohorts of different sizes never overwrite each other. A manifest of
    the generation parameters is written last; when it matches and all files exist, nothing is
    done. Case ``i`` depends only on ``(seed, i)``, not on ``num_cases``. ``lesions``: add up to two
    liver lesions per case (see :func:`generate_phantom`).
    """
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if num_cases < 1 or len(shape) != 3 or min(shape) < 16 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(
            f"phantom cohort needs num_cases >= 1, a 3D shape >= 16 voxels per axis and positive spacing; "
            f"got num_cases={num_cases}, shape={shape}, spacing={spacing}"
        )
    base = Path(root).expanduser() if root else default_phantom_root()
    folder = _cohort_folder(base, num_cases, shape, spacing, seed)
    if lesions:
        folder = folder.with_name(folder.name + "-lesions")
    parameters = {
        "generator_version": GENERATOR_VERSION,
        "num_cases": num_cases,
        "shape": list(shape),
        "spacing": list(spacing),
        "seed": seed,
        **({"lesions": True} if lesions else {}),
    }
    names = [f"phantom_{index:03d}.nii.gz" for index in range(num_cases)]
    datalist = folder / "dataset.json"
    files = [datalist] + [folder / sub / name for name in names for sub in ("imagesTr", "labelsTr")]
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        manifest = None
    if manifest is not None and manifest.get("parameters") == parameters and all(f.is_file() for f in files):
        return datalist

    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    origin = -(np.asarray(shape) - 1) * np.asarray(spacing) / 2
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    digests = {}
    for index, (name, case_seed) in enumerate(zip(names, np.random.SeedSequence(seed).spawn(num_cases))):
        hu, labels = generate_phantom(shape, spacing, np.random.default_rng(case_seed), lesions)
        for sub, array in (("imagesTr", hu), ("labelsTr", labels)):
            content = _nifti_bytes(array, affine)
            atomic_write(folder / sub / name, content)
            digests[f"{sub}/{name}"] = hashlib.sha256(content).hexdigest()
        if report is not None:
            report(f"phantom cohort: wrote case {index + 1}/{num_cases} to {folder}")
    description = {
        "name": "lightning-mim phantoms",
        "description": "Synthetic CT-like abdominal phantoms (deterministic, generated by data_modules.phantoms)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(i + 1): organ for i, organ in enumerate(ORGAN_NAMES)}},
        "numTraining": num_cases,
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
        "test": [],
    }
    atomic_write(datalist, json.dumps(description, indent=1))
    atomic_write(folder / MANIFEST, json.dumps({"parameters": parameters, "sha256": digests}, indent=1))
    return datalist


#: File names of the study pools' datalists, written beside the cohort's ``dataset.json``.
POOL_DATALISTS = {"unlabelled": "unlabelled.json", "labelled": "labelled.json"}


def ensure_phantom_pools(
    root: str | os.PathLike | None = None,
    unlabelled: int = 64,
    labelled: int = 8,
    test: int = 8,
    shape: tuple[int, int, int] = (64, 64, 32),
    spacing: tuple[float, float, float] = (5.0, 5.0, 5.0),
    seed: int = 0,
    report: Callable[[str], None] | None = None,
    lesions: bool = False,
) -> dict[str, Path]:
    """Disjoint phantom pools for a label-efficiency study: ``{"unlabelled": path, "labelled": path}``.

    One cohort of ``test + labelled + unlabelled`` cases; the test split is cases ``[0, test)``, the
    labelled pool the next ``labelled``, the unlabelled pool the rest, so growing the unlabelled pool
    never changes the labelled or test cases. ``unlabelled.json`` lists images only (section
    ``training``); ``labelled.json`` lists the labelled pool as ``training`` and the held-out test
    split as ``validation`` (what :class:`~data_modules.segmentation.SegmentationDataModule` tests on).
    """
    if min(unlabelled, labelled, test) < 1:
        raise ValueError(f"phantom pools need at least 1 case each; got unlabelled={unlabelled}, labelled={labelled}, test={test}")
    datalist = ensure_phantom_cohort(root, test + labelled + unlabelled, shape, spacing, seed, report, lesions)
    cases = json.loads(datalist.read_text())["training"]
    content = json.loads(datalist.read_text())
    pools = {
        "labelled": {**content, "training": cases[test:test + labelled], "validation": cases[:test],
                     "numTraining": labelled},
        "unlabelled": {**content, "training": [{"image": c["image"]} for c in cases[test + labelled:]],
                       "numTraining": unlabelled},
    }
    paths = {}
    for name, pool in pools.items():
        path = datalist.parent / POOL_DATALISTS[name]
        text = json.dumps(pool, indent=1)
        if not path.is_file() or path.read_text() != text:
            atomic_write(path, text)
        paths[name] = path
    return paths
