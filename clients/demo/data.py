"""Data sets for the demo, and the non-IID split across sites.

- ``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 images; nothing downloaded);
- ``fashion-mnist``: read from the Debian package ``dataset-fashion-mnist``'s IDX files
  (``/usr/share/datasets/fashion-mnist``, or ``$SECAGG_FASHION_MNIST_DIR``);
- ``folder:PATH``: one sub-folder of images per class, as a hospital's own data would come;
  images are read with Pillow, made grayscale and resized to 28x28. A class's images may sit
  in sub-folders of its folder (one per patient, say); hidden files and folders (a name
  starting with "."), ``__MACOSX`` and ``__pycache__`` are not data. Images of more than 8
  bits a value (16-bit PNG or TIFF, as X-ray and CT exports are) are scaled together, from 0
  to the brightest value any of them holds (a 12-bit image in a 16-bit file was white when
  cut to 8 bits).

Images are float32 in [0, 1], shaped (N, 1, H, W); labels int64. The held-out test set is a
stratified 20% (for the folder and digits) or the data set's own test split (Fashion-MNIST).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from secagg.errors import ConfigurationError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FOLDER_SIZE = 28
IDX_MAX_BYTES = 128 << 20  # Fashion-MNIST's largest file is 47 MB unpacked
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".pgm", ".ppm"}


class DataError(ConfigurationError):
    """A data set is missing or unreadable (one clear line)."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    skipped: int = 0  # (folder) files that are not images of a known kind, not read

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])


def load(spec: str, *, seed: int = 0) -> Dataset:
    if spec == "digits":
        return _digits(seed)
    if spec == "fashion-mnist":
        return _fashion()
    if spec.startswith("folder:"):
        # (an empty path read the working directory, named "." in the error)
        # defence: demo.folder-path-given
        if not spec[len("folder:"):].strip():
            raise DataError("folder: needs the path of a folder of class sub-folders, e.g. "
                            "folder:/data/xrays")
        return _folder(Path(os.path.expanduser(spec[len("folder:"):])), seed)
    raise DataError(f"unknown dataset {spec!r}: use digits, fashion-mnist or folder:PATH")


def _split(x: np.ndarray, y: np.ndarray, seed: int, name: str,
           classes: tuple[str, ...], skipped: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test[idx[: max(1, len(idx) // 5)]] = True
    return Dataset(name, x[~test], y[~test], x[test], y[test], classes, skipped)


def _digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    return _split(x, y, seed, "digits", tuple(str(i) for i in range(10)))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file's array, or DataError naming the file: not gzip, truncated, of another
    kind, or holding another number of values than its header says."""
    # (a file that is no gzip was "BadGzipFile: Not a gzipped file", naming no file)
    # defence: demo.idx-unreadable-named
    try:
        with gzip.open(path, "rb") as f:
            data = f.read(IDX_MAX_BYTES + 1)
    except (OSError, EOFError, zlib.error):
        raise DataError(f"cannot read {path}: not a complete gzip file") from None
    header = 16 if magic == 2051 else 8
    if len(data) < header or len(data) > IDX_MAX_BYTES:
        raise DataError(f"{path} is not an IDX file of the expected kind")
    got, count = struct.unpack(">II", data[:8])
    if got != magic:
        raise DataError(f"{path} is not an IDX file of the expected kind")
    rows, cols = struct.unpack(">II", data[8:16]) if magic == 2051 else (1, 1)
    # (a truncated file raised numpy's "cannot reshape array of size ..."; one with more
    # values than its header counts was read in part, silently)
    # defence: demo.idx-size-matches-its-header
    if len(data) - header != count * rows * cols:
        raise DataError(f"{path} holds {len(data) - header} values, its header says "
                        f"{count * rows * cols}: the file is damaged")
    values = np.frombuffer(data, dtype=np.uint8, offset=header)
    return values.reshape(count, rows, cols) if magic == 2051 else values


def _pair(images: np.ndarray, labels: np.ndarray, what: str) -> None:
    """DataError unless every image has one label (and no label is past the classes)."""
    # (30 images with 25 labels loaded, and training paired them wrongly)
    # defence: demo.images-and-labels-pair
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST's {what} files hold {len(images)} images and "
                        f"{len(labels)} labels")
    if labels.size and int(labels.max()) >= 10:
        raise DataError(f"Fashion-MNIST's {what} labels go past its 10 classes")


def _fashion() -> Dataset:
    d = Path(os.environ.get("SECAGG_FASHION_MNIST_DIR", FASHION_DIR))
    files = {k: d / f"{k}-idx{'3' if 'images' in k else '1'}-ubyte.gz"
             for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    if not all(p.exists() for p in files.values()):
        raise DataError("Fashion-MNIST is not installed: run `apt-get install -y "
                        "dataset-fashion-mnist` (or set SECAGG_FASHION_MNIST_DIR)")
    xtr = _read_idx(files["train-images"], 2051).astype(np.float32)[:, None] / 255.0
    ytr = _read_idx(files["train-labels"], 2049).astype(np.int64)
    xte = _read_idx(files["t10k-images"], 2051).astype(np.float32)[:, None] / 255.0
    yte = _read_idx(files["t10k-labels"], 2049).astype(np.int64)
    _pair(xtr, ytr, "training")
    _pair(xte, yte, "test")
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
    return Dataset("fashion-mnist", xtr, ytr, xte, yte, classes)


NOT_DATA = {"__MACOSX", "__pycache__"}  # (and any name starting with ".")


def _not_data(name: str) -> bool:
    """A hidden or system file or folder: .ipynb_checkpoints, .git, .DS_Store, macOS's ._x.png
    and __MACOSX (they became classes, or aborted the run as unreadable images)."""
    return name.startswith(".") or name in NOT_DATA


def _class_files(folder: Path) -> tuple[list[Path], int]:
    """A class folder's image files, in its sub-folders too (links to folders are not
    followed: a loop), and how many other files it holds."""
    found, other = [], 0
    for top, dirs, files in os.walk(folder):
        # defence: demo.folder-hidden-entries-skipped
        dirs[:] = sorted(d for d in dirs if not _not_data(d))
        for name in sorted(files):
            if _not_data(name):
                continue
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(top) / name)
            else:
                other += 1
    return found, other


def _read_image(path: Path) -> tuple[np.ndarray, bool]:
    """One image, grayscale, FOLDER_SIZE square, as float32: in [0, 1], or, for an image of
    more than 8 bits a value (True), in its own units (the data set scales those together);
    DataError naming the file and why it cannot be read."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # (Pillow's size guard warned on stderr without naming the file, or raised a
            # traceback past twice its limit; the image is made 28x28 anyway)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                # defence: demo.folder-deep-images-scaled
                if img.mode in ("I", "F") or img.mode.startswith("I;16"):
                    # (a NaN in a float TIFF made the data set's brightest value NaN)
                    values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0,
                                           posinf=0.0, neginf=0.0)
                    small = Image.fromarray(values, mode="F").resize((FOLDER_SIZE, FOLDER_SIZE))
                    return np.array(small, dtype=np.float32), True
                gray = img.convert("L").resize((FOLDER_SIZE, FOLDER_SIZE))
                return np.asarray(gray, dtype=np.float32) / 255.0, False
    # defence: demo.folder-big-image-named
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"cannot read image {path}: it has more pixels than Pillow reads "
                        f"safely ({Image.MAX_IMAGE_PIXELS:,}): downscale it") from None
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not an image Pillow can read (another "
                        "format, or damaged)") from None
    except (OSError, SyntaxError, ValueError) as e:  # (truncated, a link loop, no access)
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise DataError(f"cannot read image {path}: {why}") from None


def _folder(root: Path, seed: int) -> Dataset:
    if not root.exists():
        raise DataError(f"folder data set {root} does not exist")
    if not root.is_dir():
        raise DataError(f"folder data set {root} is a file: give the folder that holds one "
                        "sub-folder per class")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not _not_data(p.name)))
    if len(classes) < 2:
        raise DataError(f"folder data set {root} needs one sub-folder per class (at least 2)")
    images, labels, skipped = [], [], 0
    deep_images: list[np.ndarray] = []
    for label, name in enumerate(classes):
        files, other = _class_files(root / name)
        skipped += other
        # (an empty class folder was a class of its own, one no image could teach)
        # defence: demo.folder-empty-class-refused
        if not files:
            raise DataError(f"class folder {root / name} holds no images ("
                            f"{', '.join(sorted(IMAGE_SUFFIXES))}): add some or remove it")
        # (the total was checked: a class of one image left none to train on)
        # defence: demo.folder-images-per-class
        if len(files) < 5:
            raise DataError(f"class folder {root / name} holds {len(files)} image(s): each "
                            "class needs at least 5 (a fifth is held out for testing)")
        for path in files:
            pixels, deep = _read_image(path)
            images.append(pixels)
            if deep:
                deep_images.append(pixels)
            labels.append(label)
    # Images of more than 8 bits a value, scaled together from 0 to the brightest value any
    # of them holds: cut to 8 bits, a 12-bit X-ray in a 16-bit file was white; each scaled
    # from its own range, the brightness that told classes apart was gone.
    # defence: demo.folder-deep-images-scaled-together
    brightest = max((float(a.max()) for a in deep_images), default=0.0)
    for a in deep_images:
        a *= 1.0 / brightest if brightest > 0 else 0.0
        np.clip(a, 0.0, 1.0, out=a)
    if len(images) < 5 * len(classes):
        raise DataError(f"folder data set {root} has too few images ({len(images)}; at least "
                        f"5 a class, {5 * len(classes)} for {len(classes)} classes)")
    return _split(np.stack(images)[:, None], np.array(labels, dtype=np.int64), seed,
                  f"folder:{root.name}", classes, skipped)


def dirichlet_split(labels: np.ndarray, sites: int, alpha: float, seed: int,
                    min_size: int = 10) -> list[np.ndarray]:
    """Indices of each site's samples: per class, proportions drawn from Dirichlet(alpha)
    (smaller alpha: more skewed). Redrawn until every site has ``min_size`` samples."""
    if sites < 1 or alpha <= 0:
        raise DataError("the split needs sites >= 1 and alpha > 0")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(sites)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            shares = rng.dirichlet([alpha] * sites)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for s, part in enumerate(np.split(idx, cuts)):
                parts[s].extend(part.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.array(sorted(p), dtype=np.int64) for p in parts]
    raise DataError(f"cannot split {len(labels)} training images so that each of {sites} "
                    f"sites gets at least {min_size} (the split is non-IID, Dirichlet "
                    f"alpha={alpha}): use fewer sites or more images")
