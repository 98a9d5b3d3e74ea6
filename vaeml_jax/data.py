"""Datasets for VAE experiments: MNIST, Fashion-MNIST, Omniglot and statically binarized MNIST.

::

    from vaeml_jax.data import load_dataset, epoch_batches, binarized_test_set
    ds = load_dataset("mnist")                       # (60000, 784) / (10000, 784) float32 in [0, 1]
    train = jnp.asarray(ds.train)                    # once, on device
    batches = epoch_batches(key, train, 100)         # (600, 100, 784): fresh permutation and
                                                     # fresh Bernoulli pixels, on device
    x_test = binarized_test_set(ds, seed=0)          # binarized once, with a fixed seed

Where the data come from (first that has them):

1. ``data_dir`` (the CLI's ``--data-dir``), else ``$VAEML_DATA_DIR``: a folder with one sub-folder
   per dataset, laid out as

   - ``mnist/`` and ``fashion-mnist/``: the standard IDX files ``train-images-idx3-ubyte.gz`` and
     ``t10k-images-idx3-ubyte.gz`` (uint8 28x28; gzip-compressed or not; the ``*-labels-*`` files
     may sit next to them and are not read);
   - ``binarized-mnist/``: Larochelle & Murray's ``binarized_mnist_{train,valid,test}.amat`` (text,
     optionally ``.gz``; ``valid`` optional);
   - ``omniglot/``: the IWAE paper's 28x28 ``chardata.mat`` when present, else ``omniglot28.npz``.

2. For ``mnist`` only: the copy shipped inside the package (``vaeml_jax/_data/mnist``, CC BY-SA 3.0,
   see ``vaeml_jax/_data/LICENSE-MNIST.txt``), so MNIST works offline with no data directory.
3. tensorflow-datasets, when it is installed (``pip install "vaeml-jax[tfds]"``; imported lazily);
   it downloads on first use.

Otherwise :class:`DataError` says which files to put where and how to get them. Files whose content
has a known sha256 (the decompressed bytes of every IDX and ``.amat`` release, and
``omniglot28.npz``) are verified when read: a truncated, corrupt or different file is a
:class:`DataError` naming it (set ``VAEML_DATA_VERIFY=0`` or pass ``verify=False`` to read a
modified copy on purpose). Parsed files are cached per process (keyed on path, size and mtime) as
read-only uint8 arrays; every :class:`Dataset` holds fresh float32 copies.

Binarization (the convention of the VAE literature, e.g. Burda et al. 2016, "Importance Weighted
Autoencoders"): a pixel intensity p = byte / 255 is treated as the probability of a 1.

- dynamic (training): every epoch, every pixel is redrawn as x ~ Bernoulli(p) on device
  (:func:`binarize_dynamic`, inside :func:`epoch_batches`);
- the test set is binarized once with a fixed seed (:func:`binarized_test_set`), so every method is
  evaluated on the same binary images;
- static (``binarization="static"``): train and test are binarized once, with ``seed``; the
  ``binarized_mnist`` dataset (Larochelle & Murray 2011) is already binary.

Omniglot sources are not interchangeable: ``chardata.mat`` is the IWAE paper's split (24,345 train /
8,070 test) behind published Omniglot numbers; ``omniglot28.npz`` (24,345 / 8,115, area-resampled
from Lake's 105x105 images) and tensorflow-datasets' ``omniglot`` (Lake's background/evaluation
split, 19,280 / 13,180, resized here by the same exact area resampling) are different preparations
whose numbers are not comparable to published ones; a :class:`Dataset`'s ``note`` says so.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.resources
import io
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DATASETS",
    "BINARIZATIONS",
    "DataError",
    "Dataset",
    "load_dataset",
    "binarize_dynamic",
    "binarize_static",
    "binarized_test_set",
    "epoch_batches",
]

#: The dataset names :func:`load_dataset` accepts.
DATASETS = ("mnist", "fashion_mnist", "omniglot", "binarized_mnist")
BINARIZATIONS = ("dynamic", "static")

IMAGE_SHAPE = (28, 28)
NUM_PIXELS = 28 * 28

# The test (and valid) file of binarized MNIST is sorted by digit: it is permuted once with this
# fixed seed (independent of the user's seed) so that any prefix of it is a fair sample.
SHUFFLE_SEED = 0

# The IWAE paper's chardata.mat split sizes.
IWAE_OMNIGLOT_SIZES = (24_345, 8_070)

# Sub-folder names per dataset (the first is the documented one).
_FOLDERS = {
    "mnist": ("mnist",),
    "fashion_mnist": ("fashion-mnist", "fashion_mnist"),
    "omniglot": ("omniglot",),
    "binarized_mnist": ("binarized-mnist", "binarized_mnist"),
}

_IDX_TRAIN, _IDX_TEST = "train-images-idx3-ubyte", "t10k-images-idx3-ubyte"
_AMAT = {s: f"binarized_mnist_{s}.amat" for s in ("train", "valid", "test")}

# sha256 of the *decompressed* contents (independent of how a copy was gzip-compressed). The IDX
# sums are those published for the original releases (MNIST: yann.lecun.com / the cvdf mirror;
# Fashion-MNIST: zalandoresearch); the .amat sums are those of Larochelle's original text files;
# omniglot28.npz is this project's file (see the shared data README).
_SHA256_TABLE = """
ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db  mnist train
0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7  mnist test
c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888  fashion_mnist train
5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b  fashion_mnist test
ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d  binarized_mnist train
1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2  binarized_mnist valid
e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c  binarized_mnist test
3c8f9bdfa28a7ae442d14b2c6750d033c2d5ac3e6ad5802a72723b171c16cd4d  omniglot omniglot28
"""
_KNOWN_SHA256 = {
    (name, part): sha for sha, name, part in map(str.split, _SHA256_TABLE.strip().splitlines())
}

_GET = {
    "mnist": (
        "put train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz in DATA_DIR/mnist/ (from "
        "https://storage.googleapis.com/cvdf-datasets/mnist/ or http://yann.lecun.com/exdb/mnist/)"
    ),
    "fashion_mnist": (
        "put train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz in DATA_DIR/fashion-mnist/ "
        "(from https://github.com/zalandoresearch/fashion-mnist, folder data/fashion)"
    ),
    "binarized_mnist": (
        "put binarized_mnist_train.amat, binarized_mnist_valid.amat and binarized_mnist_test.amat "
        "(optionally gzip-compressed, .amat.gz) in DATA_DIR/binarized-mnist/ (from "
        "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/)"
    ),
    "omniglot": (
        "put the IWAE paper's 28x28 chardata.mat in DATA_DIR/omniglot/ (from "
        "https://github.com/yburda/iwae, datasets/OMNIGLOT/chardata.mat), or this project's "
        "omniglot28.npz (not comparable to published numbers)"
    ),
}

_TFDS_NAMES = {
    "mnist": "mnist",
    "fashion_mnist": "fashion_mnist",
    "omniglot": "omniglot",
    "binarized_mnist": "binarized_mnist",
}
_TFDS_SPLITS = {
    "mnist": ("train", "test"),
    "fashion_mnist": ("train", "test"),
    "omniglot": ("train", "test"),
    "binarized_mnist": ("train", "validation", "test"),
}

_NOTE_OMNIGLOT28 = (
    "omniglot28.npz: Lake et al.'s 105x105 Omniglot area-resampled to 28x28, split by drawer "
    "(train15: drawers 1-15, 24,345 images; test5: drawers 16-20, 8,115 images). This is NOT the "
    "IWAE paper's chardata.mat (24,345 / 8,070): log-likelihoods on it are not comparable to "
    "published Omniglot numbers; name it omniglot28 when reporting."
)
_NOTE_OMNIGLOT_TFDS = (
    "tensorflow-datasets omniglot: Lake et al.'s background (train, 19,280) / evaluation (test, "
    "13,180) split, 105x105 resized to 28x28 by exact area (box) averaging of the ink "
    "(1 - gray/255), then rounded to bytes (the preparation of omniglot28.npz). NOT the IWAE "
    "paper's chardata.mat split: log-likelihoods are not comparable to published Omniglot numbers."
)
_NOTE_BINARIZED = (
    "statically binarized MNIST (Larochelle & Murray 2011): train 50,000 (valid 10,000 in "
    f"`valid`), test 10,000 permuted with fixed seed {SHUFFLE_SEED} (the file is sorted by digit)."
)


class DataError(ValueError):
    """A dataset is unknown, missing or corrupt; the message says what, where and how to fix it."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset of flattened 28x28 images.

    Attributes:
      name: one of :data:`DATASETS`.
      train: (N, 784) float32 in [0, 1], row-major flattened 28x28 images: pixel intensities
        (byte / 255, ink = 1), or {0, 1} when ``binarized``.
      test: (M, 784) float32 in [0, 1], likewise.
      binarized: True for statically binarized data (``binarized_mnist``, or
        ``binarization="static"``); then train and test hold only 0 and 1.
      source: where it was read from: a path, ``"package"`` (the MNIST copy shipped in
        ``vaeml_jax/_data``) or ``"tensorflow-datasets"``.
      note: caveats, e.g. that an Omniglot preparation is not comparable to published numbers.
      valid: (V, 784) float32 validation split where the release has one (``binarized_mnist``),
        else None. MNIST-style training uses all of ``train``.
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    binarized: bool
    source: str
    note: str = ""
    valid: np.ndarray | None = None

    def __post_init__(self) -> None:
        for split in ("train", "test", "valid"):
            a = getattr(self, split)
            if a is None and split == "valid":
                continue
            if not isinstance(a, np.ndarray) or a.ndim != 2 or a.shape[1] != NUM_PIXELS:
                raise ValueError(
                    f"Dataset.{split} must be a numpy array of shape (N, {NUM_PIXELS}), "
                    f"got {getattr(a, 'shape', type(a).__name__)}"
                )

    def __repr__(self) -> str:
        valid = "" if self.valid is None else f", valid={self.valid.shape}"
        return (
            f"Dataset(name={self.name!r}, train={self.train.shape}, test={self.test.shape}{valid}, "
            f"binarized={self.binarized}, source={self.source!r})"
        )


# ------------------------------------------------------------------------------------------------
# Binarization and epochs
# ------------------------------------------------------------------------------------------------


def binarize_dynamic(key: jax.Array, x: jax.Array) -> jax.Array:
    """A fresh Bernoulli draw of every pixel: b_i ~ Bernoulli(x_i), independently, on device.

    b_i = 1[u_i < x_i] with u_i ~ Uniform[0, 1) drawn in (at least) float32, so E[b_i] = x_i up to
    float32 resolution. Jit-able.

    Args:
      key: a ``jax.random.key``.
      x: float array of intensities in [0, 1], any shape.

    Returns:
      An array of 0s and 1s with x's shape and dtype.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"binarize_dynamic needs float intensities in [0, 1], got dtype {x.dtype}; "
            "convert bytes with x / 255 first."
        )
    udtype = jnp.promote_types(x.dtype, jnp.float32)
    u = jax.random.uniform(key, x.shape, udtype)
    return (u < x.astype(udtype)).astype(x.dtype)


def _bernoulli_np(x: np.ndarray, entropy: int | list[int]) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"binarization needs float intensities in [0, 1], got dtype {x.dtype}; "
            "convert bytes with x / 255 first."
        )
    if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 1 or np.isnan(x).any()):
        raise ValueError("binarization needs intensities in [0, 1]; got values outside it or NaN.")
    rng = np.random.default_rng(entropy)
    u = rng.random(x.shape, dtype=np.float32)
    return (u < x).astype(np.float32)


def binarize_static(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Binarize once, on the host: b_i ~ Bernoulli(x_i) from ``np.random.default_rng(seed)``.

    Deterministic in ``seed`` (and the array's shape): the same seed gives the same binary images.

    Args:
      x: float intensities in [0, 1], any shape.
      seed: the seed of the PCG64 generator.

    Returns:
      float32 array of 0s and 1s with x's shape.
    """
    return _bernoulli_np(x, int(seed))


def binarized_test_set(dataset: Dataset, seed: int = 0) -> np.ndarray:
    """The test set as evaluated: binarized once with a fixed seed, unless it is already binary.

    For an intensity dataset this is ``binarize_static(dataset.test, seed)`` (so every method and
    every run is scored on the same binary images); for ``dataset.binarized`` it is a copy of
    ``dataset.test`` (whose binarization, for ``binarization="static"``, used ``load_dataset``'s
    seed: the same images as this function with that seed).

    Returns:
      (M, 784) float32 of 0s and 1s.
    """
    if dataset.binarized:
        return np.array(dataset.test, dtype=np.float32)
    return binarize_static(dataset.test, seed)


@functools.partial(jax.jit, static_argnames=("batch_size", "binarize"))
def epoch_batches(
    key: jax.Array, train: jax.Array, batch_size: int, *, binarize: bool = True
) -> jax.Array:
    """One epoch of minibatches, prepared on device in one jitted call.

    A fresh uniform permutation pi of the N examples; the first B * floor(N / B) of
    x_{pi(1)}, x_{pi(2)}, ... are reshaped into batches (the remainder is dropped, a different
    remainder each epoch) and, if ``binarize``, every pixel is redrawn as Bernoulli(x) with
    :func:`binarize_dynamic`. Keep ``train`` on device (``jnp.asarray`` once) so nothing moves
    between host and device per epoch.

    Args:
      key: a ``jax.random.key``; split into a permutation key and a binarization key.
      train: (N, D) float array, intensities in [0, 1].
      batch_size: B, static (1 <= B <= N).
      binarize: draw Bernoulli(x) (dynamic binarization) or return the intensities.

    Returns:
      (N // B, B, D) array of train's dtype.
    """
    train = jnp.asarray(train)
    if train.ndim != 2:
        raise ValueError(f"epoch_batches needs train of shape (N, D), got {train.shape}.")
    n, d = train.shape
    if not 1 <= batch_size <= n:
        raise ValueError(
            f"batch_size must be between 1 and the {n} training examples, got {batch_size}."
        )
    num_batches = n // batch_size
    perm_key, bern_key = jax.random.split(key)
    idx = jax.random.permutation(perm_key, n)[: num_batches * batch_size]
    x = jnp.take(train, idx, axis=0).reshape(num_batches, batch_size, d)
    if binarize:
        x = binarize_dynamic(bern_key, x)
    return x


# ------------------------------------------------------------------------------------------------
# File formats
# ------------------------------------------------------------------------------------------------


def _verify_default(verify: bool | None) -> bool:
    if verify is not None:
        return bool(verify)
    flag = os.environ.get("VAEML_DATA_VERIFY", "1").strip().lower()
    return flag not in ("0", "false", "no", "off")


def _read_content(path: Path, name: str) -> bytes:
    """The file's bytes, gunzipped if it is gzip-compressed (detected by its magic number)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; {_GET[name]}.") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{path} is not a complete gzip file ({e}): it is truncated or corrupt; replace it "
                f"with a fresh copy: {_GET[name]}."
            ) from None
    return raw


def _check_sha256(content: bytes, path: Path, name: str, part: str, verify: bool) -> None:
    expected = _KNOWN_SHA256.get((name, part))
    if not verify or expected is None:
        return
    got = hashlib.sha256(content).hexdigest()
    if got != expected:
        raise DataError(
            f"{path}: the sha256 of its (decompressed) contents is {got[:16]}..., not "
            f"{expected[:16]}... of the known {name} {part} file: it is truncated, corrupt, or a "
            f"different file; replace it with a fresh copy: {_GET[name]}. (To read a modified "
            "copy on purpose, set VAEML_DATA_VERIFY=0 or pass verify=False.)"
        )


def _parse_idx_images(content: bytes, path: Path) -> np.ndarray:
    """IDX (LeCun): 0x0000, type 0x08 (ubyte), ndim, big-endian uint32 dims, then the bytes."""
    if len(content) < 4 or content[:2] != b"\x00\x00":
        raise DataError(
            f"{path} is not an IDX file (bad magic number); expected MNIST-style images."
        )
    dtype_code, ndim = content[2], content[3]
    header = 4 + 4 * ndim
    if dtype_code != 0x08 or ndim != 3 or len(content) < header:
        raise DataError(
            f"{path} is not an IDX file of uint8 images (type 0x{dtype_code:02x}, {ndim} dims); "
            "expected the *-images-idx3-ubyte file."
        )
    dims = struct.unpack(">3I", content[4:header])
    if tuple(dims[1:]) != IMAGE_SHAPE:
        raise DataError(f"{path} holds {dims[1]}x{dims[2]} images; expected 28x28.")
    expected = header + dims[0] * NUM_PIXELS
    if len(content) != expected:
        raise DataError(
            f"{path} has {len(content)} bytes of data where its header promises {expected} "
            f"({dims[0]} images): the file is truncated or corrupt; replace it."
        )
    return np.frombuffer(content, np.uint8, offset=header).reshape(dims[0], NUM_PIXELS)


def _parse_amat(content: bytes, path: Path) -> np.ndarray:
    """Larochelle's .amat: one image per line, 784 values 0/1 separated by single spaces."""
    row = 2 * NUM_PIXELS  # "d d d ... d\n"
    if content and len(content) % row == 0:
        a = np.frombuffer(content, np.uint8).reshape(-1, row)
        digits, seps = a[:, 0::2], a[:, 1::2]
        if (
            (seps[:, :-1] == ord(" ")).all()
            and (seps[:, -1] == ord("\n")).all()
            and ((digits == ord("0")) | (digits == ord("1"))).all()
        ):
            return digits - np.uint8(ord("0"))
    # Any other whitespace layout (e.g. CRLF line ends): the general (slower) text parser.
    try:
        x = np.loadtxt(io.BytesIO(content), dtype=np.float32, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path} is not a valid .amat text file ({e}); replace it.") from None
    if x.shape[1] != NUM_PIXELS or x.shape[0] == 0 or not np.isin(x, (0.0, 1.0)).all():
        raise DataError(
            f"{path} holds an array of shape {x.shape}, not rows of {NUM_PIXELS} binary values: "
            "the file is truncated, corrupt or not binarized MNIST; replace it."
        )
    return x.astype(np.uint8)


def _parse_omniglot28(content: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Our omniglot28.npz: ``train15`` / ``test5`` uint8 (N, 28, 28), ink = 255."""
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in ("train15", "test5") if k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path} is not a readable .npz file ({e}); replace it.") from None
    out = []
    for k in ("train15", "test5"):
        a = arrays.get(k)
        if a is None:
            raise DataError(
                f"{path} has no array {k!r}; expected omniglot28.npz with train15/test5."
            )
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[1:] != IMAGE_SHAPE:
            raise DataError(
                f"{path}: {k} is {a.dtype} {a.shape}, expected uint8 (N, 28, 28); replace the file."
            )
        out.append(a.reshape(len(a), NUM_PIXELS))
    return out[0], out[1]


def _parse_chardata(content: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The IWAE paper's chardata.mat: ``data`` (784, N), ``testdata`` (784, M), floats in [0, 1].

    Each column is a 28x28 image stored column-major (MATLAB order): pixel (r, c) of image n is
    ``data[c * 28 + r, n]``. We return row-major flattened images, i.e. the IWAE code's
    ``data.T.reshape(-1, 28, 28).reshape(-1, 784, order="F")``.
    """
    import scipy.io

    try:
        mat = scipy.io.loadmat(io.BytesIO(content))
    except NotImplementedError as e:  # MATLAB v7.3 (HDF5)
        raise DataError(f"{path} is a MATLAB v7.3 file ({e}); save it as v5 (-v7) first.") from None
    except Exception as e:  # scipy raises many types on malformed files
        raise DataError(
            f"{path} is not a readable MATLAB .mat file ({type(e).__name__}: {e}); replace it."
        ) from None
    out = []
    for k in ("data", "testdata"):
        a = mat.get(k)
        if a is None:
            raise DataError(
                f"{path} has no variable {k!r}; expected the IWAE chardata.mat with data/testdata."
            )
        a = np.asarray(a)
        if a.ndim != 2 or a.shape[0] != NUM_PIXELS or not np.issubdtype(a.dtype, np.number):
            raise DataError(f"{path}: {k} has shape {a.shape}, expected ({NUM_PIXELS}, N) numbers.")
        a = a.astype(np.float32)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise DataError(f"{path}: {k} has values outside [0, 1] or non-finite ones.")
        imgs = a.T.reshape(-1, 28, 28).transpose(0, 2, 1)  # column-major -> row-major
        out.append(np.ascontiguousarray(imgs.reshape(-1, NUM_PIXELS)))
    return out[0], out[1]


@functools.lru_cache(maxsize=16)
def _parse_cached(
    kind: str, path: str, stamp: tuple[int, int], name: str, part: str, verify: bool
) -> tuple[np.ndarray, ...]:
    del stamp  # part of the cache key only: a rewritten file is read again
    p = Path(path)
    content = _read_content(p, name)
    _check_sha256(content, p, name, part, verify)
    if kind == "idx":
        arrays: tuple[np.ndarray, ...] = (_parse_idx_images(content, p),)
    elif kind == "amat":
        arrays = (_parse_amat(content, p),)
    elif kind == "omniglot28":
        arrays = _parse_omniglot28(content, p)
    elif kind == "chardata":
        arrays = _parse_chardata(content, p)
    else:  # pragma: no cover
        raise AssertionError(kind)
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _read(kind: str, path: Path, name: str, part: str, verify: bool) -> tuple[np.ndarray, ...]:
    try:
        st = path.stat()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; {_GET[name]}.") from None
    return _parse_cached(
        kind, str(path.resolve()), (st.st_size, st.st_mtime_ns), name, part, verify
    )


def _find(folder: Path, basename: str) -> Path | None:
    for candidate in (basename + ".gz", basename):
        p = folder / candidate
        if p.is_file():
            return p
    return None


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


def _intensities(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) / np.float32(255.0)


def _fixed_permutation(x: np.ndarray) -> np.ndarray:
    return x[np.random.default_rng(SHUFFLE_SEED).permutation(len(x))]


def _load_idx_folder(name: str, folder: Path, source: str, verify: bool) -> Dataset | None:
    train_p, test_p = _find(folder, _IDX_TRAIN), _find(folder, _IDX_TEST)
    if train_p is None and test_p is None:
        return None
    if train_p is None or test_p is None:
        missing = _IDX_TRAIN if train_p is None else _IDX_TEST
        raise DataError(f"{folder} has no {missing}.gz (or {missing}); {_GET[name]}.")
    (train,) = _read("idx", train_p, name, "train", verify)
    (test,) = _read("idx", test_p, name, "test", verify)
    return Dataset(name, _intensities(train), _intensities(test), False, source)


def _load_amat_folder(folder: Path, verify: bool) -> Dataset | None:
    paths = {s: _find(folder, b) for s, b in _AMAT.items()}
    if all(p is None for p in paths.values()):
        return None
    for s in ("train", "test"):
        if paths[s] is None:
            raise DataError(f"{folder} has no {_AMAT[s]} (or .amat.gz); {_GET['binarized_mnist']}.")
    arrays = {
        s: _read("amat", p, "binarized_mnist", s, verify)[0].astype(np.float32)
        for s, p in paths.items()
        if p is not None
    }
    valid = arrays.get("valid")
    return Dataset(
        "binarized_mnist",
        arrays["train"],
        _fixed_permutation(arrays["test"]),
        True,
        str(folder),
        _NOTE_BINARIZED,
        None if valid is None else _fixed_permutation(valid),
    )


def _load_omniglot_folder(folder: Path, verify: bool) -> Dataset | None:
    mat = folder / "chardata.mat"
    if mat.is_file():
        train, test = _read("chardata", mat, "omniglot", "chardata", verify)
        if (len(train), len(test)) == IWAE_OMNIGLOT_SIZES:
            note = "the IWAE paper's 28x28 Omniglot (chardata.mat, 24,345 train / 8,070 test)."
        else:
            note = (
                f"chardata.mat with {len(train):,} train / {len(test):,} test images, not the IWAE "
                "paper's 24,345 / 8,070: check the file before comparing with published numbers."
            )
        return Dataset("omniglot", train.copy(), test.copy(), False, str(mat), note)
    npz = folder / "omniglot28.npz"
    if npz.is_file():
        train, test = _read("omniglot28", npz, "omniglot", "omniglot28", verify)
        return Dataset(
            "omniglot", _intensities(train), _intensities(test), False, str(npz), _NOTE_OMNIGLOT28
        )
    return None


def _load_local(name: str, root: Path, verify: bool, looked: list[str]) -> Dataset | None:
    for sub in _FOLDERS[name]:
        folder = root / sub
        if not folder.is_dir():
            continue
        looked.append(str(folder))
        if name in ("mnist", "fashion_mnist"):
            ds = _load_idx_folder(name, folder, str(folder), verify)
        elif name == "binarized_mnist":
            ds = _load_amat_folder(folder, verify)
        else:
            ds = _load_omniglot_folder(folder, verify)
        if ds is not None:
            return ds
    if not looked:
        looked.append(str(root / _FOLDERS[name][0]) + " (no such folder)")
    return None


def _load_package_mnist(verify: bool) -> Dataset | None:
    base = importlib.resources.files("vaeml_jax").joinpath("_data").joinpath("mnist")
    arrays = []
    for part, basename in (("train", _IDX_TRAIN), ("test", _IDX_TEST)):
        resource = base.joinpath(basename + ".gz")
        if not resource.is_file():
            return None
        with importlib.resources.as_file(resource) as p:
            arrays.append(_read("idx", Path(p), "mnist", part, verify)[0])
    return Dataset("mnist", _intensities(arrays[0]), _intensities(arrays[1]), False, "package")


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """W (n_out, n_in): W[i, j] = |[i s, (i+1) s) ∩ [j, j+1)| / s with s = n_in / n_out."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    j = np.arange(n_in)
    overlap = np.minimum(edges[1:, None], j[None, :] + 1) - np.maximum(edges[:-1, None], j[None, :])
    return np.clip(overlap, 0.0, None) * (n_out / n_in)


def _omniglot_tfds_to_28(images: np.ndarray) -> np.ndarray:
    """tfds omniglot images (N, 105, 105, 3) uint8, black ink on white -> (N, 784) float32 ink.

    ink = 1 - mean_rgb / 255; exact area (box) resampling 105 -> 28, Y = W X W^T with
    :func:`_area_matrix` (each output pixel the mean ink over its 3.75 x 3.75 input square);
    rounded to bytes and divided by 255, exactly the preparation of ``omniglot28.npz``.
    """
    ink = 1.0 - images.astype(np.float64).mean(axis=-1) / 255.0
    w = _area_matrix(ink.shape[1], 28)
    w2 = _area_matrix(ink.shape[2], 28)
    small = np.matmul(np.matmul(w, ink), w2.T)
    return _intensities(np.rint(small * 255.0).astype(np.uint8).reshape(len(images), NUM_PIXELS))


def _tfds_images(name: str, split: str, examples: Any) -> np.ndarray:
    """The ``image`` array of one tensorflow-datasets split, batched: (N, H, W, C).

    ``examples`` is either what ``tfds.as_numpy(tfds.load(name, split=split, batch_size=-1))``
    gives (a mapping ``{"image": (N, H, W, C) array, "label": ...}``) or what iterating
    ``tfds.as_numpy(tfds.load(name, split=split))`` gives (a sequence of per-example mappings
    ``{"image": (H, W, C) array, ...}``), which is stacked once here.
    """
    tname = _TFDS_NAMES[name]
    if isinstance(examples, Mapping):
        if "image" not in examples:
            raise DataError(
                f"tensorflow-datasets {tname!r} {split!r} split has no 'image' feature "
                f"(features: {', '.join(map(str, examples)) or 'none'})."
            )
        a = np.asarray(examples["image"])
    elif examples is None or isinstance(examples, (str, bytes, np.ndarray)):
        raise DataError(
            f"tensorflow-datasets {tname!r} gave no {split!r} examples; expected "
            "{'image': (N, H, W, C) array} or a sequence of {'image': (H, W, C) array}."
        )
    else:
        try:
            images = [np.asarray(ex["image"]) for ex in examples]
        except (KeyError, TypeError, IndexError):
            raise DataError(
                f"tensorflow-datasets {tname!r} {split!r} examples are not all mappings with "
                "an 'image' feature."
            ) from None
        if not images:
            raise DataError(f"tensorflow-datasets {tname!r} {split!r} split is empty.")
        if len({(im.shape, im.dtype) for im in images}) != 1:
            raise DataError(
                f"tensorflow-datasets {tname!r} {split!r} images differ in shape or dtype."
            )
        a = np.stack(images)
    want = (105, 105) if name == "omniglot" else IMAGE_SHAPE
    if a.ndim != 4 or a.shape[1:3] != want:
        raise DataError(
            f"tensorflow-datasets {tname!r} {split} images have shape {a.shape}, "
            f"expected (N, {want[0]}, {want[1]}, C)."
        )
    return a


def _dataset_from_tfds(name: str, splits: Mapping[str, Any]) -> Dataset:
    """A :class:`Dataset` from tensorflow-datasets splits (the tfds-to-array conversion).

    ``splits`` maps a split name to its examples in either form :func:`_tfds_images` takes (one
    batched ``{"image": array}`` mapping, or a sequence of per-example mappings).

    ``mnist`` / ``fashion_mnist``: image (N, 28, 28, 1) uint8 -> byte / 255. ``binarized_mnist``:
    image (N, 28, 28, 1) in {0, 1}; test and validation permuted with :data:`SHUFFLE_SEED`.
    ``omniglot``: (N, 105, 105, 3) uint8 -> 28x28 ink by :func:`_omniglot_tfds_to_28`.
    """

    def image(split: str) -> np.ndarray:
        if not isinstance(splits, Mapping) or split not in splits:
            raise DataError(
                f"tensorflow-datasets {_TFDS_NAMES[name]!r} gave no {split!r} split; "
                f"expected the splits {', '.join(_TFDS_SPLITS[name])}."
            )
        return _tfds_images(name, split, splits[split])

    if name == "omniglot":
        train = _omniglot_tfds_to_28(image("train"))
        test = _omniglot_tfds_to_28(image("test"))
        return Dataset(name, train, test, False, "tensorflow-datasets", _NOTE_OMNIGLOT_TFDS)
    if name == "binarized_mnist":
        arrays = {s: image(s)[..., 0].reshape(-1, NUM_PIXELS) for s in _TFDS_SPLITS[name]}
        if any(not np.isin(a, (0, 1)).all() for a in arrays.values()):
            raise DataError("tensorflow-datasets 'binarized_mnist' images are not all 0 or 1.")
        f = {s: a.astype(np.float32) for s, a in arrays.items()}
        return Dataset(
            name,
            f["train"],
            _fixed_permutation(f["test"]),
            True,
            "tensorflow-datasets",
            _NOTE_BINARIZED,
            _fixed_permutation(f["validation"]),
        )
    train, test = (image(s)[..., 0].reshape(-1, NUM_PIXELS) for s in ("train", "test"))
    if train.dtype != np.uint8 or test.dtype != np.uint8:
        raise DataError(f"tensorflow-datasets {name!r} images are {train.dtype}, expected uint8.")
    return Dataset(name, _intensities(train), _intensities(test), False, "tensorflow-datasets")


def _load_tfds(name: str) -> Dataset | None:
    """Load through tensorflow-datasets if it is installed (None if it is not)."""
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415 (optional, heavy: imported lazily)
    except ImportError:
        return None
    except Exception as e:  # installed but broken (e.g. an incompatible tensorflow)
        raise DataError(
            f"tensorflow-datasets is installed but failed to import ({type(e).__name__}: {e}); "
            f"fix it, or {_GET[name]} and pass --data-dir DATA_DIR."
        ) from None
    splits = {}
    for split in _TFDS_SPLITS[name]:
        try:
            splits[split] = tfds.as_numpy(tfds.load(_TFDS_NAMES[name], split=split, batch_size=-1))
        except Exception as e:  # network, disk, checksum errors inside tfds
            raise DataError(
                f"tensorflow-datasets could not load {_TFDS_NAMES[name]!r} split {split!r} "
                f"({type(e).__name__}: {e}); {_GET[name]} and pass --data-dir DATA_DIR instead."
            ) from None
    return _dataset_from_tfds(name, splits)


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> tuple[Path | None, str]:
    origin = "data_dir (--data-dir)"
    if data_dir is None or str(data_dir) == "":
        env = os.environ.get("VAEML_DATA_DIR", "").strip()
        if not env:
            return None, ""
        data_dir, origin = env, "VAEML_DATA_DIR"
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data directory {root} (from {origin}) does not exist or is not a folder; point it at "
            "a folder holding one sub-folder per dataset (mnist/, fashion-mnist/, omniglot/, "
            "binarized-mnist/)."
        )
    return root, origin


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_") if isinstance(name, str) else None
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}.")
    return key


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    binarization: str = "dynamic",
    seed: int = 0,
    verify: bool | None = None,
) -> Dataset:
    """Load a dataset as flattened 28x28 float32 images in [0, 1].

    Looks in ``data_dir`` (default ``$VAEML_DATA_DIR``) for the dataset's sub-folder, then (for
    ``mnist``) the copy shipped in the package, then tensorflow-datasets if it is installed; see the
    module docstring for the layout.

    Args:
      name: one of :data:`DATASETS` (``"fashion-mnist"`` spelling accepted too).
      data_dir: the data folder, or None for ``$VAEML_DATA_DIR``; if given it must exist.
      binarization: ``"dynamic"`` (intensities returned; training redraws Bernoulli pixels each
        epoch with :func:`epoch_batches`) or ``"static"`` (train and test binarized once here with
        ``seed``; the test set then equals ``binarized_test_set`` of the dynamic dataset with the
        same seed, and train uses a different stream). ``binarized_mnist`` is binary either way.
      seed: the static-binarization seed.
      verify: check the sha256 of files with a known sum (default: on unless
        ``VAEML_DATA_VERIFY=0``).

    Returns:
      A :class:`Dataset` whose arrays are fresh float32 copies.

    Raises:
      DataError: unknown name, missing data directory, missing or corrupt files (naming the file,
        where to put which files and how to get them), or a tensorflow-datasets failure.
    """
    key = _canonical_name(name)
    if binarization not in BINARIZATIONS:
        raise ValueError(
            f"unknown binarization {binarization!r}; choose one of: {', '.join(BINARIZATIONS)}."
        )
    verify = _verify_default(verify)
    root, origin = _resolve_data_dir(data_dir)

    looked: list[str] = []
    ds = _load_local(key, root, verify, looked) if root is not None else None
    if ds is None and key == "mnist":
        ds = _load_package_mnist(verify)
        if ds is None:
            looked.append("the package's vaeml_jax/_data/mnist (missing from this install)")
    if ds is None:
        ds = _load_tfds(key)
    if ds is None:
        where = (
            f"looked in {', '.join(looked)} (from {origin})"
            if root is not None
            else "no data directory given (data_dir / --data-dir or VAEML_DATA_DIR)"
            + (f"; looked in {', '.join(looked)}" if looked else "")
        )
        raise DataError(
            f"dataset {key!r} not found: {where}, and tensorflow-datasets is not installed. "
            f"To fix: {_GET[key]}, then pass --data-dir DATA_DIR or set VAEML_DATA_DIR=DATA_DIR; "
            'or pip install "vaeml-jax[tfds]" (tensorflow-datasets downloads it on first use).'
        )

    if binarization == "static" and not ds.binarized:
        seed = int(seed)
        ds = dataclasses.replace(
            ds,
            train=_bernoulli_np(ds.train, [seed, 1]),
            test=binarize_static(ds.test, seed),
            valid=None if ds.valid is None else _bernoulli_np(ds.valid, [seed, 2]),
            binarized=True,
            note=(ds.note + " " if ds.note else "") + f"Statically binarized with seed {seed}.",
        )
    return ds
