"""vaeml_jax.data: loaders for every format, verification, binarization statistics, epoch batches.

Real MNIST comes from ``mnist_dir`` (the data folder's or the packaged copy: these tests run
anywhere); the other real datasets from ``data_dir`` (``$VAEML_DATA_DIR``; skipped without it).
Small fixtures in other formats (IDX, chardata.mat, omniglot28.npz, .amat, tensorflow-datasets
arrays) are generated in tmp_path.
"""

import gzip
import hashlib
import struct
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io

from vaeml_jax import data as D
from vaeml_jax.data import (
    DATASETS,
    DataError,
    Dataset,
    binarize_dynamic,
    binarize_static,
    binarized_test_set,
    epoch_batches,
    load_dataset,
)

IDX_TRAIN = "train-images-idx3-ubyte.gz"
IDX_TEST = "t10k-images-idx3-ubyte.gz"


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("VAEML_DATA_DIR", raising=False)
    monkeypatch.delenv("VAEML_DATA_VERIFY", raising=False)


@pytest.fixture
def no_tfds(monkeypatch):
    """Make `import tensorflow_datasets` fail as if it were not installed."""
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)


def idx_bytes(images: np.ndarray) -> bytes:
    n, r, c = images.shape
    return b"\x00\x00\x08\x03" + struct.pack(">3I", n, r, c) + images.astype(np.uint8).tobytes()


def raw_idx(path) -> np.ndarray:
    """Independent reference reader: skip the 16-byte header."""
    content = gzip.decompress(path.read_bytes())
    return np.frombuffer(content, np.uint8, offset=16).reshape(-1, 784)


# ---- names and arguments ---------------------------------------------------------------------


def test_unknown_dataset_lists_the_valid_names(mnist_dir):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", mnist_dir)
    for name in DATASETS:
        assert name in str(e.value)
    assert isinstance(e.value, ValueError)


def test_unknown_binarization_is_refused(mnist_dir):
    with pytest.raises(ValueError, match="dynamic, static"):
        load_dataset("mnist", mnist_dir, binarization="threshold")


# ---- real files ------------------------------------------------------------------------------


def test_mnist_idx_from_a_data_folder(mnist_dir, no_env):
    ds = load_dataset("mnist", mnist_dir)
    assert ds.name == "mnist" and not ds.binarized and ds.valid is None
    assert ds.train.shape == (60000, 784) and ds.test.shape == (10000, 784)
    assert ds.train.dtype == np.float32 and ds.source == str(mnist_dir / "mnist")
    ref = raw_idx(mnist_dir / "mnist" / IDX_TRAIN)
    np.testing.assert_array_equal(ds.train[:500], ref[:500] / np.float32(255))
    np.testing.assert_array_equal(
        ds.test[-50:], raw_idx(mnist_dir / "mnist" / IDX_TEST)[-50:] / np.float32(255)
    )
    assert abs(ds.train.mean() - 0.1307) < 1e-3  # the well-known MNIST pixel mean


def test_fashion_mnist_idx_from_data_dir(data_dir, no_env):
    ds = load_dataset("fashion_mnist", data_dir)
    assert ds.train.shape == (60000, 784) and ds.test.shape == (10000, 784)
    assert abs(ds.train.mean() - 0.2860) < 1e-3  # the well-known Fashion-MNIST pixel mean
    assert load_dataset("fashion-mnist", data_dir).source == ds.source  # spelling accepted


def test_shipped_mnist_equals_the_shared_copy(data_dir, no_env):
    pkg = D.Path(D.__file__).parent / "_data"
    for f in sorted((data_dir / "mnist").iterdir()):
        assert (pkg / "mnist" / f.name).read_bytes() == f.read_bytes(), f.name
    assert "CC BY-SA 3.0" in (pkg / "LICENSE-MNIST.txt").read_text()
    ds = load_dataset("mnist")  # no data dir at all
    assert ds.source == "package"
    ref = load_dataset("mnist", data_dir)
    np.testing.assert_array_equal(ds.train, ref.train)
    np.testing.assert_array_equal(ds.test, ref.test)


def test_env_var_and_package_fallback(data_dir, tmp_path, monkeypatch, no_tfds):
    monkeypatch.setenv("VAEML_DATA_DIR", str(data_dir))
    assert load_dataset("fashion_mnist").source == str(data_dir / "fashion-mnist")
    monkeypatch.setenv("VAEML_DATA_DIR", str(tmp_path))  # exists, but holds no mnist/
    assert load_dataset("mnist").source == "package"
    assert load_dataset("mnist", tmp_path).source == "package"


def test_binarized_mnist_amat(data_dir):
    ds = load_dataset("binarized_mnist", data_dir)
    assert ds.binarized and ds.source == str(data_dir / "binarized-mnist")
    assert ds.train.shape == (50000, 784) and ds.valid.shape == (10000, 784)
    assert ds.test.shape == (10000, 784)
    for a in (ds.train, ds.valid, ds.test):
        assert a.dtype == np.float32 and set(np.unique(a)) == {0.0, 1.0}
    # Test set: the file's rows under the fixed permutation (the file itself is sorted by digit).
    text = gzip.decompress(
        (data_dir / "binarized-mnist" / "binarized_mnist_test.amat.gz").read_bytes()
    )
    first = np.array(text[: 2 * 784].split(), dtype=np.float32)
    perm = np.random.default_rng(D.SHUFFLE_SEED).permutation(10000)
    np.testing.assert_array_equal(ds.test[np.argmax(perm == 0)], first)
    assert not np.array_equal(ds.test[0], first)
    assert abs(ds.train.mean() - 0.1307) < 0.01  # binarized MNIST keeps the intensity mean
    assert binarized_test_set(ds, seed=123) is not ds.test  # a copy, already binary
    np.testing.assert_array_equal(binarized_test_set(ds, seed=123), ds.test)
    assert load_dataset("binarized_mnist", data_dir, binarization="static").binarized


def test_omniglot28_npz_real(data_dir):
    ds = load_dataset("omniglot", data_dir)
    assert ds.train.shape == (24345, 784) and ds.test.shape == (8115, 784)
    assert ds.source.endswith("omniglot28.npz") and "not comparable" in ds.note
    with np.load(data_dir / "omniglot" / "omniglot28.npz") as z:
        np.testing.assert_array_equal(
            ds.test[:100], z["test5"][:100].reshape(-1, 784) / np.float32(255)
        )


def test_datasets_are_fresh_writable_copies(mnist_dir):
    a = load_dataset("mnist", mnist_dir)
    a.train[0] = 7.0
    b = load_dataset("mnist", mnist_dir)
    assert b.train[0].max() <= 1.0


# ---- generated fixtures ----------------------------------------------------------------------


def write_chardata(path, train_imgs, test_imgs):
    """The IWAE chardata.mat layout: (784, N) with column-major 28x28 columns."""
    col = lambda imgs: imgs.reshape(len(imgs), -1, order="F").T.astype(np.float64)  # noqa: E731
    scipy.io.savemat(path, {"data": col(train_imgs), "testdata": col(test_imgs)})


def test_chardata_mat_fixture(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    train = rng.random((7, 28, 28))
    test = rng.random((3, 28, 28))
    train[0] = 0.0
    train[0, 2, 5] = 1.0  # row 2, column 5: tests the orientation
    (tmp_path / "omniglot").mkdir()
    write_chardata(tmp_path / "omniglot" / "chardata.mat", train, test)
    np.savez(tmp_path / "omniglot" / "omniglot28.npz", train15=np.zeros((1, 28, 28), np.uint8))
    ds = load_dataset("omniglot", tmp_path)  # chardata.mat wins over omniglot28.npz
    assert ds.source == str(tmp_path / "omniglot" / "chardata.mat")
    np.testing.assert_allclose(ds.train, train.reshape(7, 784), rtol=1e-6)
    np.testing.assert_allclose(ds.test, test.reshape(3, 784), rtol=1e-6)
    assert np.flatnonzero(ds.train[0]).tolist() == [2 * 28 + 5]
    assert "not the IWAE" in ds.note  # 7 / 3 images, not 24,345 / 8,070
    monkeypatch.setattr(D, "IWAE_OMNIGLOT_SIZES", (7, 3))
    (tmp_path / "omniglot" / "chardata.mat").touch()  # new mtime: read again
    assert "IWAE paper's 28x28 Omniglot" in load_dataset("omniglot", tmp_path).note


def test_chardata_mat_bad_contents(tmp_path):
    (tmp_path / "omniglot").mkdir()
    path = tmp_path / "omniglot" / "chardata.mat"
    scipy.io.savemat(path, {"data": np.zeros((784, 2))})  # no testdata
    with pytest.raises(DataError, match="testdata"):
        load_dataset("omniglot", tmp_path)
    scipy.io.savemat(path, {"data": np.full((784, 2), 3.0), "testdata": np.zeros((784, 1))})
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        load_dataset("omniglot", tmp_path)
    path.write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(DataError, match="chardata.mat"):
        load_dataset("omniglot", tmp_path)


def test_omniglot28_npz_fixture_and_checksum(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    (tmp_path / "omniglot").mkdir()
    np.savez(tmp_path / "omniglot" / "omniglot28.npz", train15=train, test5=test)
    with pytest.raises(DataError, match="omniglot28.npz: the sha256"):  # not our file
        load_dataset("omniglot", tmp_path)
    ds = load_dataset("omniglot", tmp_path, verify=False)
    np.testing.assert_array_equal(ds.train, train.reshape(5, 784) / np.float32(255))
    np.testing.assert_array_equal(ds.test, test.reshape(2, 784) / np.float32(255))


def test_idx_fixture_gz_or_plain(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    train = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    (folder / IDX_TRAIN).write_bytes(gzip.compress(idx_bytes(train)))
    (folder / IDX_TEST[:-3]).write_bytes(idx_bytes(test))  # uncompressed works too
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: the sha256"):
        load_dataset("fashion_mnist", tmp_path)
    monkeypatch.setenv("VAEML_DATA_VERIFY", "0")
    ds = load_dataset("fashion_mnist", tmp_path)
    np.testing.assert_array_equal(ds.train, train.reshape(6, 784) / np.float32(255))
    np.testing.assert_array_equal(ds.test, test.reshape(4, 784) / np.float32(255))


def test_idx_structure_errors(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    good = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    (folder / IDX_TEST).write_bytes(gzip.compress(good))
    (folder / IDX_TRAIN).write_bytes(gzip.compress(good[:-10]))  # valid gzip, short payload
    with pytest.raises(DataError, match="header promises"):
        load_dataset("mnist", tmp_path, verify=False)
    (folder / IDX_TRAIN).write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 8))
    with pytest.raises(DataError, match="uint8 images"):
        load_dataset("mnist", tmp_path, verify=False)
    (folder / IDX_TRAIN).unlink()
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):  # partial folder
        load_dataset("mnist", tmp_path, verify=False)


def test_corrupt_and_truncated_gz_name_the_file(mnist_dir, tmp_path):
    """The damaged file is the (small) test file; train is a symlink to the shared copy."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / IDX_TRAIN).symlink_to(mnist_dir / "mnist" / IDX_TRAIN)
    raw = (mnist_dir / "mnist" / IDX_TEST).read_bytes()
    (folder / IDX_TEST).write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz is not a complete gzip") as e:
        load_dataset("mnist", tmp_path)
    assert str(folder / IDX_TEST) in str(e.value) and "cvdf-datasets" in str(e.value)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    (folder / IDX_TEST).write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path)
    # Recompressed content with one changed pixel: valid gzip, valid IDX, wrong sha256.
    content = bytearray(gzip.decompress(raw))
    content[1000] ^= 1
    (folder / IDX_TEST).write_bytes(gzip.compress(bytes(content), compresslevel=1))
    with pytest.raises(DataError, match="sha256"):
        load_dataset("mnist", tmp_path)
    assert load_dataset("mnist", tmp_path, verify=False).test.shape == (10000, 784)
    # The same content as the release, compressed differently, passes the check.
    content[1000] ^= 1
    (folder / IDX_TEST).write_bytes(gzip.compress(bytes(content), compresslevel=1))
    assert load_dataset("mnist", tmp_path).test.shape == (10000, 784)
    # A zero-byte file (an interrupted download) is named too.
    (folder / IDX_TEST).write_bytes(b"")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path)


def test_amat_fixture_and_truncation(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "binarized-mnist"
    folder.mkdir()
    parts = {s: rng.integers(0, 2, (n, 784)) for s, n in (("train", 5), ("test", 4))}

    def amat(a, eol="\n"):
        return "".join(" ".join(map(str, row)) + eol for row in a).encode()

    (folder / "binarized_mnist_train.amat.gz").write_bytes(gzip.compress(amat(parts["train"])))
    (folder / "binarized_mnist_test.amat").write_bytes(amat(parts["test"], eol=" \r\n"))
    ds = load_dataset("binarized_mnist", tmp_path, verify=False)  # valid is optional
    assert ds.valid is None and ds.binarized
    np.testing.assert_array_equal(ds.train, parts["train"])
    perm = np.random.default_rng(D.SHUFFLE_SEED).permutation(4)
    np.testing.assert_array_equal(ds.test, parts["test"][perm])
    (folder / "binarized_mnist_train.amat.gz").write_bytes(
        gzip.compress(amat(parts["train"])[: 2 * 784 + 300])
    )
    with pytest.raises(DataError, match="binarized_mnist_train.amat.gz"):
        load_dataset("binarized_mnist", tmp_path, verify=False)
    with pytest.raises(DataError, match="sha256"):
        load_dataset("binarized_mnist", tmp_path)


# ---- missing data ----------------------------------------------------------------------------


def test_missing_data_dir_is_an_error(tmp_path, no_env):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nope")


@pytest.mark.parametrize(
    "name, needles",
    [
        ("fashion_mnist", ["fashion-mnist/", "train-images-idx3-ubyte.gz", "zalandoresearch"]),
        ("binarized_mnist", ["binarized-mnist/", "binarized_mnist_test.amat", "larocheh"]),
        ("omniglot", ["omniglot/", "chardata.mat", "yburda/iwae"]),
    ],
)
def test_missing_files_without_tfds_say_where_to_put_what(name, needles, tmp_path, no_tfds, no_env):
    for data_dir in (tmp_path, None):
        with pytest.raises(DataError) as e:
            load_dataset(name, data_dir)
        msg = str(e.value)
        for needle in [*needles, "tensorflow-datasets is not installed", "VAEML_DATA_DIR"]:
            assert needle in msg, (needle, msg)
        assert "\n" not in msg


def test_missing_package_mnist_without_tfds(monkeypatch, no_tfds, no_env):
    monkeypatch.setattr(D, "_load_package_mnist", lambda verify: None)
    with pytest.raises(DataError, match="mnist/.*cvdf-datasets"):
        load_dataset("mnist")


# ---- tensorflow-datasets ---------------------------------------------------------------------


def fake_tfds(splits_by_name, fail=False):
    mod = types.ModuleType("tensorflow_datasets")

    def load(name, split, batch_size):
        assert batch_size == -1
        if fail:
            raise ConnectionError("no network")
        return splits_by_name[name][split]

    mod.load, mod.as_numpy = load, lambda x: x
    return mod


def test_tfds_conversion_mnist_like():
    rng = np.random.default_rng(4)
    img = {
        s: rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
        for s, n in [("train", 8), ("test", 3)]
    }
    ds = D._dataset_from_tfds(
        "fashion_mnist", {s: {"image": a, "label": None} for s, a in img.items()}
    )
    assert ds.source == "tensorflow-datasets" and not ds.binarized
    np.testing.assert_array_equal(ds.train, img["train"].reshape(8, 784) / np.float32(255))
    with pytest.raises(DataError, match="shape"):
        D._dataset_from_tfds("mnist", {"train": {"image": np.zeros((2, 32, 32, 3))}, "test": {}})


def test_tfds_conversion_from_a_list_of_examples():
    """Iterating tfds.as_numpy(tfds.load(name, split=...)) gives per-example dicts: stacked once."""
    rng = np.random.default_rng(6)
    img = {
        s: rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
        for s, n in [("train", 5), ("test", 2)]
    }
    examples = {
        s: [{"image": im, "label": i % 10} for i, im in enumerate(a)] for s, a in img.items()
    }
    ds = D._dataset_from_tfds("mnist", examples)
    assert ds.train.shape == (5, 784) and ds.test.shape == (2, 784) and not ds.binarized
    np.testing.assert_array_equal(ds.train, img["train"].reshape(5, 784) / np.float32(255))
    np.testing.assert_array_equal(ds.test, img["test"].reshape(2, 784) / np.float32(255))
    bin_examples = {
        s: [{"image": (im > 127).astype(np.uint8)} for im in img["train"]]
        for s in ("train", "validation", "test")
    }
    bds = D._dataset_from_tfds("binarized_mnist", bin_examples)
    assert bds.binarized and bds.valid.shape == (5, 784)
    np.testing.assert_array_equal(bds.train, (img["train"] > 127).reshape(5, 784))
    bad = [
        ({"train": [], "test": examples["test"]}, "empty"),
        ({"train": [{"label": 1}], "test": examples["test"]}, "'image' feature"),
        ({"train": [{"image": np.zeros((28, 28, 1))}, {"image": np.zeros((27, 28, 1))}]}, "differ"),
        ({"train": [{"image": np.zeros((32, 32, 3), np.uint8)}]}, r"expected \(N, 28, 28, C\)"),
        ({"test": examples["test"]}, "no 'train' split"),
        ({"train": {"label": np.zeros(3)}, "test": examples["test"]}, "no 'image' feature"),
    ]
    for splits, match in bad:
        with pytest.raises(DataError, match=match):
            D._dataset_from_tfds("mnist", splits)


def test_tfds_conversion_binarized_mnist():
    rng = np.random.default_rng(5)
    img = {
        s: rng.integers(0, 2, (6, 28, 28, 1), dtype=np.uint8)
        for s in ("train", "validation", "test")
    }
    ds = D._dataset_from_tfds("binarized_mnist", {s: {"image": a} for s, a in img.items()})
    assert ds.binarized and ds.valid.shape == (6, 784)
    perm = np.random.default_rng(D.SHUFFLE_SEED).permutation(6)
    np.testing.assert_array_equal(ds.test, img["test"].reshape(6, 784)[perm])


def test_tfds_omniglot_resize_reproduces_omniglot28(data_dir):
    """tfds gives 105x105 RGB (black ink on white); our area resampling must give omniglot28.npz."""
    with np.load(data_dir / "omniglot" / "images_background.npz") as z:
        big = z["images"].reshape(-1, 105, 105)[::150]  # bool, True = white background
    with np.load(data_dir / "omniglot" / "omniglot28.npz") as z:
        small = z["background"][::150].reshape(-1, 784)
    rgb = np.repeat(big[..., None].astype(np.uint8) * 255, 3, axis=-1)
    ds = D._dataset_from_tfds("omniglot", {"train": {"image": rgb}, "test": {"image": rgb[:5]}})
    np.testing.assert_array_equal(ds.train, small / np.float32(255))
    assert "not comparable" in ds.note and ds.test.shape == (5, 784)


def test_load_uses_tfds_when_files_are_missing(tmp_path, monkeypatch, no_env):
    img = {s: {"image": np.full((4, 28, 28, 1), 51, np.uint8)} for s in ("train", "test")}
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds({"fashion_mnist": img}))
    ds = load_dataset("fashion_mnist", tmp_path)
    assert ds.source == "tensorflow-datasets" and np.allclose(ds.train, 0.2)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds({}, fail=True))
    with pytest.raises(
        DataError, match="tensorflow-datasets could not load 'fashion_mnist'.*no network"
    ):
        load_dataset("fashion_mnist", tmp_path)


# ---- binarization ----------------------------------------------------------------------------


def test_binarize_dynamic_mean_matches_intensity():
    p = jnp.linspace(0.0, 1.0, 11, dtype=jnp.float32)
    n = 20000
    x = jnp.broadcast_to(p, (n, 11))
    draw = jax.jit(binarize_dynamic)  # compiled once, reused for every key
    b = draw(jax.random.key(0), x)
    assert b.dtype == jnp.float32 and b.shape == x.shape
    assert set(np.unique(np.asarray(b))) <= {0.0, 1.0}
    mean = np.asarray(b.mean(0))
    se = np.sqrt(np.asarray(p) * (1 - np.asarray(p)) / n)
    assert np.all(np.abs(mean - np.asarray(p)) <= 4 * se + 1e-7), (mean, p)
    assert mean[0] == 0.0 and mean[-1] == 1.0
    # Two keys: independent draws differ with probability 2 p (1 - p), 0.30 on average over p.
    frac_diff = float(jnp.mean(b != draw(jax.random.key(1), x)))
    assert abs(frac_diff - 0.30) < 4 * np.sqrt(0.3 * 0.7 / x.size)
    np.testing.assert_array_equal(b, draw(jax.random.key(0), x))  # same key, same draw
    half = jax.eval_shape(binarize_dynamic, jax.random.key(0), x.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="float"):
        binarize_dynamic(jax.random.key(0), jnp.zeros(3, jnp.uint8))


def test_binarize_static_is_deterministic_and_unbiased():
    x = np.full((5000, 20), 0.3, np.float32)
    a, b, c = binarize_static(x, 7), binarize_static(x, 7), binarize_static(x, 8)
    assert a.dtype == np.float32 and set(np.unique(a)) == {0.0, 1.0}
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    se = np.sqrt(0.3 * 0.7 / x.size)
    assert abs(a.mean() - 0.3) < 4 * se
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binarize_static(x * 255)


def test_static_dataset_and_binarized_test_set(mnist_dir):
    dyn = load_dataset("mnist", mnist_dir)
    test0 = binarized_test_set(dyn, seed=0)
    np.testing.assert_array_equal(test0, binarize_static(dyn.test, 0))
    assert not np.array_equal(test0, binarized_test_set(dyn, seed=1))
    st = load_dataset("mnist", mnist_dir, binarization="static", seed=0)
    assert st.binarized and "seed 0" in st.note
    np.testing.assert_array_equal(st.test, test0)  # the same test images as evaluation uses
    np.testing.assert_array_equal(binarized_test_set(st, seed=99), test0)
    assert not np.array_equal(st.train[:10000], binarize_static(dyn.train[:10000], 0))
    n = st.train.size
    assert abs(st.train.mean() - dyn.train.mean()) < 4 * 0.5 / np.sqrt(n) + 1e-4


# ---- epoch batches ---------------------------------------------------------------------------


def test_epoch_batches_is_a_fresh_permutation_with_remainder_dropped():
    n, bs = 1003, 100
    ids = jnp.arange(n, dtype=jnp.float32)[:, None] * jnp.ones((1, 784), jnp.float32)
    e1 = epoch_batches(jax.random.key(0), ids, bs, binarize=False)
    assert e1.shape == (10, 100, 784) and e1.dtype == jnp.float32
    first = np.asarray(e1[..., 0]).ravel().astype(int)
    assert len(set(first)) == 1000 and set(first) <= set(range(n))  # no repeats, 3 dropped
    np.testing.assert_array_equal(e1, ids[first].reshape(10, 100, 784))  # rows intact
    e2 = np.asarray(epoch_batches(jax.random.key(1), ids, bs, binarize=False)[..., 0]).ravel()
    assert set(first) != set(e2.astype(int)) or not np.array_equal(first, e2)
    assert np.mean(first == e2) < 0.05
    np.testing.assert_array_equal(e1, epoch_batches(jax.random.key(0), ids, bs, binarize=False))


def test_epoch_batches_binarizes_on_device_and_jits():
    x = jnp.full((4000, 784), 0.25, jnp.float32)

    @jax.jit
    def epoch_mean(key):  # epoch_batches inside another jit
        b = epoch_batches(key, x, 500)
        return b.shape, jnp.mean(b), jnp.all((b == 0) | (b == 1))

    shape, m1, binary = epoch_mean(jax.random.key(1))
    assert shape == (8, 500, 784) and bool(binary)
    se = np.sqrt(0.25 * 0.75 / (8 * 500 * 784))
    _, m2, _ = epoch_mean(jax.random.key(2))
    assert float(m1) != float(m2)
    assert abs(float(m1) - 0.25) < 4 * se and abs(float(m2) - 0.25) < 4 * se
    with pytest.raises(ValueError, match="batch_size"):
        jax.eval_shape(lambda k: epoch_batches(k, x, 5000), jax.random.key(0))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        jax.eval_shape(lambda k: epoch_batches(k, x[0], 10), jax.random.key(0))


def test_dataset_checks_shapes():
    with pytest.raises(ValueError, match="784"):
        Dataset("mnist", np.zeros((3, 10), np.float32), np.zeros((1, 784), np.float32), False, "x")
    text = repr(Dataset("mnist", np.zeros((3, 784)), np.zeros((1, 784)), False, "x"))
    assert "(3, 784)" in text and "array(" not in text


def test_sha256_table_matches_the_shared_files(data_dir):
    """The table's sums are those of the decompressed shared files (themselves the releases')."""
    files = {
        ("mnist", "train"): "mnist/train-images-idx3-ubyte.gz",
        ("fashion_mnist", "test"): "fashion-mnist/t10k-images-idx3-ubyte.gz",
        ("binarized_mnist", "valid"): "binarized-mnist/binarized_mnist_valid.amat.gz",
    }
    for key, rel in files.items():
        content = gzip.decompress((data_dir / rel).read_bytes())
        assert hashlib.sha256(content).hexdigest() == D._KNOWN_SHA256[key], rel
    assert len(D._KNOWN_SHA256) == 8
