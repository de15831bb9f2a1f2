"""Tests of diffusion.data: IDX files, sources, the registry and BatchIterator."""

import io
import os
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion import data
from diffusion.data import idx as idx_lib
from diffusion.data import iterator as iterator_lib
from diffusion.data import prepare as prepare_lib


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


# ---- IDX ------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    for arr in (rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
                rng.integers(-1000, 1000, (6,), dtype=np.int32),
                rng.standard_normal((2, 3)).astype(np.float32)):
        path = tmp_path / f"a{arr.dtype}{suffix}"
        data.write_idx(path, arr)
        back = data.read_idx(path)
        assert back.dtype == arr.dtype and back.shape == arr.shape
        np.testing.assert_array_equal(back, arr)
    # gzip is detected from the content, not the file name
    raw = (tmp_path / f"auint8{suffix}").read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == (suffix == ".gz")


def test_idx_split_directory(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (9, 6, 5), dtype=np.uint8)
    labels = np.arange(9, dtype=np.uint8) % 4
    data.write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)  # mixed gz and raw
    data.write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    source = data.make_source("idx", data_dir=str(tmp_path))
    assert len(source) == 9 and source.image_shape == (6, 5, 1) and source.num_classes == 4
    got = source.get(np.array([3, 0, 3]))
    assert got["image"].dtype == np.uint8 and got["label"].dtype == np.int32
    np.testing.assert_array_equal(got["image"][..., 0], images[[3, 0, 3]])
    np.testing.assert_array_equal(got["label"], [3, 0, 3])
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte.*t10k-labels"):
        data.make_source("idx", split="test", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown IDX split 'valid'"):
        data.make_source("idx", split="valid", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="needs data_dir"):
        data.make_source("idx")


def test_idx_corrupt_files(tmp_path):
    data.write_idx(tmp_path / "x", np.zeros((4, 3), np.uint8))
    (tmp_path / "trunc").write_bytes((tmp_path / "x").read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "trunc")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")


def test_real_fashion_mnist():
    if not os.path.isdir(data.FASHION_MNIST_DIR):
        pytest.fail(f"{data.FASHION_MNIST_DIR} is missing; install it with: "
                    f"{data.FASHION_MNIST_APT}")
    t0 = time.perf_counter()
    train = data.make_source("fashion_mnist_idx")
    seconds = time.perf_counter() - t0
    print(f"Fashion-MNIST train load: {seconds:.2f} s")
    assert seconds < 10  # ~0.5 s measured; generous for a loaded CI machine
    assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
    assert train.num_classes == 10 and len(train.class_names) == 10
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    test = data.make_source("fashion_mnist_idx", split="test")
    assert test.images.shape == (10000, 28, 28, 1)
    assert 0 < train.images.mean() < 255


def test_missing_fashion_mnist_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_lib, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError) as err:
        data.make_source("fashion_mnist_idx")
    assert "sudo apt-get install dataset-fashion-mnist" in str(err.value)
    assert "absent" in str(err.value)
    # an explicit directory without the files names the files and still mentions apt
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.make_source("fashion_mnist_idx", data_dir=str(tmp_path))


def test_unknown_source_lists_known_names():
    with pytest.raises(ValueError) as err:
        data.make_source("cifar10")
    for name in ("fashion_mnist_idx", "idx", "synthetic", "tfds:<name>"):
        assert name in str(err.value)


# ---- synthetic ------------------------------------------------------------------------

def test_synthetic_source():
    a = data.make_source("synthetic:12x10x2:30", num_classes=3)
    b = data.make_source("synthetic:12x10x2:30", num_classes=3)
    assert len(a) == 30 and a.image_shape == (12, 10, 2) and a.num_classes == 3
    np.testing.assert_array_equal(a.images, b.images)  # deterministic
    np.testing.assert_array_equal(a.labels, np.arange(30) % 3)
    assert len({im.tobytes() for im in a.images}) == 30  # all examples differ
    test = data.make_source("synthetic:12x10x2:30", split="test", num_classes=3)
    assert not np.array_equal(test.images, a.images)
    assert data.make_source("synthetic").image_shape == (32, 32, 3)


# ---- BatchIterator --------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    return data.synthetic_source((8, 6, 3), num_examples=37, num_classes=5)


def test_batches_are_scaled_images_and_labels(small):
    it = data.BatchIterator(small, 8, seed=0, shuffle=False)
    b = next(it)
    assert b["image"].dtype == np.float32 and b["image"].shape == (8, 8, 6, 3)
    assert b["label"].dtype == np.int32 and b["label"].shape == (8,)
    np.testing.assert_allclose(b["image"], small.images[:8] / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(b["label"], small.labels[:8])
    assert it.step == 1


def test_iterator_determinism_and_resume(small):
    kw = dict(random_flip=True)
    ref = _batches(data.BatchIterator(small, 8, seed=3, **kw), 12)  # crosses 2 epochs
    _assert_same(ref, _batches(data.BatchIterator(small, 8, seed=3, **kw), 12))
    resumed = data.BatchIterator(small, 8, seed=3, start_step=7, **kw)
    assert resumed.step == 7
    _assert_same(ref[7:], _batches(resumed, 5))
    assert resumed.step == 12
    other = _batches(data.BatchIterator(small, 8, seed=4, **kw), 12)
    assert not all(np.array_equal(a["label"], b["label"]) for a, b in zip(ref, other))


def test_epochs_cover_every_example_once(small):
    n, b = len(small), 8
    it = data.BatchIterator(small, b, seed=1)
    stream = np.concatenate([it.indices_at(k) for k in range(3 * n // b + 1)])
    for e in range(3):
        epoch = stream[e * n:(e + 1) * n]
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
        np.testing.assert_array_equal(epoch, it.epoch_permutation(e))
    assert not np.array_equal(stream[:n], stream[n:2 * n])  # reshuffled per epoch
    assert not np.array_equal(stream[:n], np.arange(n))
    unshuffled = data.BatchIterator(small, b, seed=1, shuffle=False)
    np.testing.assert_array_equal(unshuffled.indices_at(4), [32, 33, 34, 35, 36, 0, 1, 2])
    # the labels delivered are those of the indices
    batch = it.batch_at(4)
    np.testing.assert_array_equal(batch["label"], small.labels[it.indices_at(4)])


def test_finite_epochs(small):
    it = data.BatchIterator(small, 8, seed=0, num_epochs=1, drop_remainder=True)
    assert it.num_batches == 4 and len(list(it)) == 4
    it = data.BatchIterator(small, 8, seed=0, num_epochs=1, drop_remainder=False)
    batches = list(it)
    assert [len(x["label"]) for x in batches] == [8, 8, 8, 8, 5]
    np.testing.assert_array_equal(np.sort(np.concatenate([it.indices_at(k) for k in range(5)])),
                                  np.arange(37))


def test_process_slices_concatenate_to_global_batch(small):
    kw = dict(seed=5, random_flip=True)
    full = _batches(data.BatchIterator(small, 8, **kw), 6)
    parts = [_batches(data.BatchIterator(small, 8, process_index=p, process_count=2, **kw), 6)
             for p in range(2)]
    for k in range(6):
        assert parts[0][k]["image"].shape == (4, 8, 6, 3)
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([parts[0][k][key], parts[1][k][key]]), full[k][key])
    with pytest.raises(ValueError, match="not divisible by the process count 3"):
        data.BatchIterator(small, 8, seed=0, process_count=3)
    with pytest.raises(ValueError, match="process_index 2"):
        data.BatchIterator(small, 8, seed=0, process_index=2, process_count=2)


def test_random_flip(small):
    it = data.BatchIterator(small, 32, seed=2, random_flip=True)
    flipped = []
    for k in range(4):
        batch, idx = it.batch_at(k), it.indices_at(k)
        original = small.images[idx] / 127.5 - 1
        is_flipped = it.flips_at(k)
        np.testing.assert_allclose(batch["image"][~is_flipped], original[~is_flipped], atol=1e-6)
        np.testing.assert_allclose(batch["image"][is_flipped],
                                   original[is_flipped][:, :, ::-1], atol=1e-6)
        flipped.append(is_flipped)
    frac = np.concatenate(flipped).mean()
    assert 0.3 < frac < 0.7
    # the synthetic images are not mirror-symmetric, so flipping changed something
    assert not np.allclose(small.images[:, :, ::-1], small.images)


def test_image_size(small):
    it = data.BatchIterator(small, 4, seed=0, image_size=16, shuffle=False)
    b = next(it)
    assert b["image"].shape == (4, 16, 16, 3)
    assert it.source.image_shape == (16, 16, 3)  # in-memory sources are resized once
    assert np.abs(b["image"]).max() <= 1
    it = data.BatchIterator(small, 4, seed=0, image_size=(4, 4))  # crop 8x6 -> 6x6, resize
    assert next(it)["image"].shape == (4, 4, 4, 3)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        data.BatchIterator(small, 4, seed=0, image_size=0)


def test_resize_matches_jax():
    import jax
    import jax.numpy as jnp

    x = np.random.default_rng(0).integers(0, 256, (3, 20, 20, 2), dtype=np.uint8)
    for size in (28, 9):  # up and down (antialiased)
        ours = data.crop_resize(x, size).astype(np.float32)
        ref = jax.image.resize(jnp.asarray(x, jnp.float32), (3, size, size, 2), "linear",
                               antialias=True)
        np.testing.assert_allclose(ours, np.asarray(ref), atol=0.5 + 1e-3)  # uint8 rounding


def test_prefetch_gives_the_same_batches(small):
    ref = _batches(data.BatchIterator(small, 8, seed=9, random_flip=True), 10)
    it = data.BatchIterator(small, 8, seed=9, random_flip=True, prefetch=3, start_step=2)
    _assert_same(ref[2:], _batches(it, 8))
    assert it.step == 10
    it.close()


# ---- tensorflow-datasets ----------------------------------------------------------------

def _png(image):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class DiffusionTestTiny(tfds.core.GeneratorBasedBuilder):
    """12 images of 10x8x3, image i filled with value 10*i, label i % 3; PNG-encoded like
    the real catalogue image datasets (passing bytes avoids TensorFlow's encoder)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(10, 8, 3)),
            "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": _png(np.full((10, 8, 3), 10 * i, np.uint8)), "label": i % 3}


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds"))
    DiffusionTestTiny(data_dir=root).download_and_prepare(file_format="array_record")
    return root


def test_tfds_source_reads_without_tensorflow(tiny_tfds_dir):
    source = data.make_source("tfds:diffusion_test_tiny", data_dir=tiny_tfds_dir)
    assert len(source) == 12 and source.image_shape == (10, 8, 3)
    assert source.num_classes == 3 and source.class_names == ("a", "b", "c")
    got = source.get(np.arange(12))
    assert got["image"].dtype == np.uint8 and got["image"].shape == (12, 10, 8, 3)
    ids = got["image"][:, 0, 0, 0] // 10
    np.testing.assert_array_equal(np.sort(ids), np.arange(12))  # every record once
    np.testing.assert_array_equal(got["label"], ids % 3)
    it = data.BatchIterator(source, 4, seed=0, image_size=6, random_flip=True)
    b = next(it)
    assert b["image"].shape == (4, 6, 6, 3) and b["label"].dtype == np.int32
    # constant images stay constant through crop/resize, and keep their own label
    ids = np.rint((b["image"][:, 0, 0, 0] + 1) * 127.5 / 10).astype(int)
    expected = np.broadcast_to((10 * ids[:, None, None, None]) / 127.5 - 1, b["image"].shape)
    np.testing.assert_allclose(b["image"], expected, atol=1e-6)
    np.testing.assert_array_equal(b["label"], ids % 3)
    assert len(data.make_source("tfds:diffusion_test_tiny", split="test",
                                data_dir=tiny_tfds_dir)) == 3
    with pytest.raises(ValueError, match="Unknown split"):
        data.make_source("tfds:diffusion_test_tiny", split="valid", data_dir=tiny_tfds_dir)
    assert "tensorflow" not in sys.modules


def test_tfds_decode_workers_give_the_same_batches(tiny_tfds_dir, monkeypatch):
    # chunks of 1 example, so that the 12-image dataset is really read by several threads
    monkeypatch.setattr(iterator_lib, "_MIN_CHUNK", 1)
    source = data.make_source("tfds:diffusion_test_tiny", data_dir=tiny_tfds_dir)
    assert source.parallel_reads

    def batches(workers, start_step=0, prefetch=0, n=5):
        it = data.BatchIterator(source, 8, seed=3, random_flip=True, image_size=6,
                                decode_workers=workers, start_step=start_step,
                                prefetch=prefetch)
        out = [next(it) for _ in range(n)]
        it.close()
        return out, it

    ref, it0 = batches(0)
    assert it0.decode_workers == 0
    for workers in (1, 3, -1):
        got, it = batches(workers)
        assert it.decode_workers == workers or (workers == -1 and it.decode_workers >= 1)
        _assert_same(ref, got)
    _assert_same(ref[2:], batches(3, start_step=2, prefetch=2, n=3)[0])  # resume
    assert all(b["image"].dtype == np.float32 and b["label"].dtype == np.int32 for b in ref)
    # in-memory sources never start threads
    small = data.synthetic_source((8, 8, 3), 40, 4)
    assert data.BatchIterator(small, 8, seed=0, decode_workers=4).decode_workers == 0
    with pytest.raises(ValueError, match="decode_workers"):
        data.BatchIterator(source, 8, seed=0, decode_workers=-2)


def test_tfds_decoded_cache(tiny_tfds_dir, monkeypatch):
    monkeypatch.setattr(iterator_lib, "_MIN_CHUNK", 1)
    plain = data.make_source("tfds:diffusion_test_tiny", data_dir=tiny_tfds_dir,
                             cache_decoded=False)
    cached = data.make_source("tfds:diffusion_test_tiny", data_dir=tiny_tfds_dir)
    assert plain.cached_fraction == 0 and cached.cached_fraction == 0  # auto: small, cached

    def batches(source, n=6):
        it = data.BatchIterator(source, 8, seed=5, random_flip=True, image_size=6,
                                decode_workers=3)
        out = [next(it) for _ in range(n)]
        it.close()
        return out

    ref = batches(plain)
    _assert_same(ref, batches(cached))  # 48 examples: 4 epochs, the last 3 from memory
    assert cached.cached_fraction == 1.0
    monkeypatch.setattr(cached, "_read", lambda *a: pytest.fail("read a cached example"))
    _assert_same(ref, batches(cached))
    np.testing.assert_array_equal(cached.get(np.array([3, 3, 0]))["image"],
                                  plain.get(np.array([3, 3, 0]))["image"])
    monkeypatch.setattr(type(plain), "CACHE_MAX_BYTES", 100)
    assert data.make_source("tfds:diffusion_test_tiny", data_dir=tiny_tfds_dir)._cache is None
    with pytest.raises(ValueError, match="cache_decoded"):
        data.make_source("tfds:diffusion_test_tiny", data_dir=tiny_tfds_dir,
                         cache_decoded="yes")


def test_tfds_missing_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.make_source("tfds:cifar10", data_dir=str(tmp_path))
    msg = str(err.value)
    assert f"-m diffusion.data.prepare --dataset cifar10 --data_dir {tmp_path}" in msg
    assert "pip install tensorflow-cpu" in msg
    with pytest.raises(ValueError, match="no dataset 'no_such_dataset_xyz'"):
        data.make_source("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))


def test_prepare_without_tensorflow_explains(monkeypatch, capsys):
    monkeypatch.setattr(prepare_lib, "_tensorflow_available", lambda: False)
    assert prepare_lib.main(["prepare", "--dataset", "cifar10", "--data_dir", "/tmp/x"]) == 1
    err = capsys.readouterr().err
    assert "pip install tensorflow-cpu" in err and "network" in err
