"""Latent dataset job: shard contents, the LatentSource reader (memory-mapped .npy shards,
clear errors for a truncated or corrupt shard and for the old .npz format), resuming
after a crash, the scale-factor estimate, and the CLI end to end on a tiny VAE."""
from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest
from absl import app

from diffusion.autoencoder.encode import encode_dataset, main
from diffusion.data.latents import LatentSource, load_shard, read_manifest, shard_dir
from diffusion.models.vae import AutoencoderKL


class FakeSource:
    """Duck-typed Source: uint8 [n, 4, 4, 1] images whose pixels encode the index."""
    image_shape = (4, 4, 1)
    num_classes = 3

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def get(self, indices):
        indices = np.asarray(indices)
        pix = (indices[:, None, None, None] * 7 + np.arange(16).reshape(1, 4, 4, 1)) % 256
        return {"image": pix.astype(np.uint8), "label": (indices % 3).astype(np.int32)}


def fake_encode(x):
    """2x2 average pool as the 'mean', a position-dependent logvar."""
    b = x.shape[0]
    mean = x.reshape(b, 2, 2, 2, 2, 1).mean(axis=(2, 4))
    logvar = np.broadcast_to(np.linspace(-3, -1, 4).reshape(1, 2, 2, 1), mean.shape)
    return mean, logvar


class CountingEncoder:
    """fake_encode that counts calls and can fail on a given call (a crash)."""

    def __init__(self, fail_on: int | None = None):
        self.calls, self.fail_on = 0, fail_on

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated crash")
        return fake_encode(x)


def expected_latents(indices):
    x = FakeSource(10**6).get(indices)["image"].astype(np.float32) / 127.5 - 1.0
    return fake_encode(x)


def test_shards_and_latent_source(tmp_path):
    out = str(tmp_path / "lat")
    manifest = encode_dataset(FakeSource(30), fake_encode, out, shard_size=8, batch_size=3,
                              scale_factor=0.5, log=None, info={"vae": "fake"})
    assert manifest["complete"] and manifest["num_shards"] == 4
    assert manifest["latent_shape"] == [2, 2, 1] and manifest["info"] == {"vae": "fake"}
    assert sorted(os.listdir(out)) == ["manifest.json"] + [shard_dir(k) for k in range(4)]
    assert sorted(os.listdir(os.path.join(out, shard_dir(3)))) == \
        ["index.npy", "label.npy", "mean.npy", "std.npy"]
    last = load_shard(out, 3, manifest)
    for key in ("mean", "std", "label", "index"):
        assert isinstance(last[key], np.memmap)  # read lazily, not loaded whole
        ref = np.load(os.path.join(out, shard_dir(3), f"{key}.npy"))  # read whole
        np.testing.assert_array_equal(last[key], ref)
    np.testing.assert_array_equal(last["index"], np.arange(24, 30))
    assert last["mean"].shape == (6, 2, 2, 1) and last["label"].dtype == np.int32

    src = LatentSource(out, with_std=True)
    assert len(src) == 30 and src.image_shape == (2, 2, 1) and src.num_classes == 3
    assert src.scale_factor == 0.5
    idx = np.array([29, 0, 8, 7, 15, 16, 3, 29])  # across shards, unsorted, repeated
    batch = src.get(idx)
    mean, logvar = expected_latents(idx)
    assert batch["image"].dtype == np.float32
    np.testing.assert_allclose(batch["image"], 0.5 * mean, rtol=1e-6)
    np.testing.assert_allclose(batch["image_std"], 0.5 * np.exp(0.5 * logvar), rtol=1e-6)
    np.testing.assert_array_equal(batch["label"], idx % 3)
    assert set(LatentSource(out).get(idx)) == {"image", "label"}
    with pytest.raises(IndexError):
        src.get(np.array([30]))
    with pytest.raises(ValueError, match="cannot be resized"):
        src.get(idx, (4, 4))


def test_resume_after_crash_redoes_nothing(tmp_path):
    out = str(tmp_path / "lat")
    # 30 examples, shards of 8 in batches of 4: 2 calls per shard; call 5 is shard 2's first.
    with pytest.raises(RuntimeError, match="simulated crash"):
        encode_dataset(FakeSource(30), CountingEncoder(fail_on=5), out, 8, 4, log=None)
    assert sorted(f for f in os.listdir(out) if f.startswith("shard-")) == \
        [shard_dir(0), shard_dir(1)]
    with pytest.raises(ValueError, match="(?s)incomplete.*python -m diffusion.autoencoder.encode"):
        LatentSource(out)
    # Backdate the finished shards' files so a rewrite would show in their mtimes.
    stamped = [os.path.join(out, shard_dir(k), f"{a}.npy") for k in (0, 1)
               for a in ("mean", "std", "label", "index")]
    for path in stamped:
        os.utime(path, ns=(10**18, 10**18))
    # A folder left by a write that died half-way is not a shard, and is replaced.
    os.makedirs(os.path.join(out, shard_dir(2) + ".tmp"))
    enc = CountingEncoder()
    manifest = encode_dataset(FakeSource(30), enc, out, 8, 4, log=None)
    assert enc.calls == 4  # shards 2 and 3 only
    for path in stamped:
        assert os.stat(path).st_mtime_ns == 10**18
    assert manifest["complete"]
    src = LatentSource(out)
    mean, _ = expected_latents(np.arange(30))
    np.testing.assert_allclose(src.get(np.arange(30))["image"],
                               manifest["scale_factor"] * mean, rtol=1e-6)
    assert not any(f.endswith(".tmp") for f in os.listdir(out))
    assert read_manifest(out) == manifest
    # A third run finds it complete and encodes nothing.
    enc = CountingEncoder()
    encode_dataset(FakeSource(30), enc, out, 8, 4, log=None)
    assert enc.calls == 0
    with pytest.raises(ValueError, match="different latent dataset"):
        encode_dataset(FakeSource(30), fake_encode, out, 10, 4, log=None)
    with pytest.raises(ValueError, match="different latent dataset.*info"):
        encode_dataset(FakeSource(30), fake_encode, out, 8, 4, log=None, info={"vae": "b"})


def test_scale_factor_estimate_and_float16_storage(tmp_path):
    manifest = encode_dataset(FakeSource(20), fake_encode, str(tmp_path), 16, 5,
                              dtype="float16", log=None)
    mean, logvar = expected_latents(np.arange(20))
    var = mean.astype(np.float64).var() + np.exp(logvar).mean()
    assert manifest["scale_factor"] == pytest.approx(1 / np.sqrt(var), rel=1e-3)
    assert load_shard(str(tmp_path), 0, manifest)["mean"].dtype == np.float16
    got = LatentSource(str(tmp_path)).get(np.arange(20))["image"]
    np.testing.assert_allclose(got, manifest["scale_factor"] * mean, rtol=2e-3, atol=1e-3)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        encode_dataset(FakeSource(0), fake_encode, str(tmp_path), 8, 4, log=None)
    with pytest.raises(ValueError, match="positive"):
        encode_dataset(FakeSource(5), fake_encode, str(tmp_path), 0, 4, log=None)
    with pytest.raises(FileNotFoundError, match="not a latent dataset"):
        LatentSource(str(tmp_path))


@pytest.fixture
def small_dataset(tmp_path):
    out = str(tmp_path / "lat")
    manifest = encode_dataset(FakeSource(12), fake_encode, out, shard_size=8, batch_size=4,
                              scale_factor=1.0, log=None, info={"vae": "/runs/vae",
                                                                "source": "fake"})
    return out, manifest


def test_truncated_shard_is_a_clear_error(small_dataset):
    out, _ = small_dataset
    path = os.path.join(out, shard_dir(1), "mean.npy")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 5)  # a copy or write cut short
    with pytest.raises(ValueError, match=rf"{re.escape(path)} is truncated or corrupt.*"
                                         rf"delete {re.escape(os.path.join(out, shard_dir(1)))}"):
        LatentSource(out)


def test_corrupt_header_wrong_rows_and_missing_file_are_clear_errors(small_dataset):
    out, manifest = small_dataset
    folder = os.path.join(out, shard_dir(0))
    label = os.path.join(folder, "label.npy")
    good = open(label, "rb").read()
    with open(label, "wb") as f:
        f.write(b"not an npy file" + good[15:])
    with pytest.raises(ValueError, match="label.npy is truncated or corrupt"):
        LatentSource(out)
    # A well-formed file of the wrong length (e.g. shard 1's copied over shard 0's).
    np.save(label, np.zeros(4, np.int32))
    with pytest.raises(ValueError, match=r"label.npy holds int32 \(4,\), the manifest says "
                                         r"int32 \(8,\)"):
        LatentSource(out)
    np.save(label, np.zeros(8, np.int64))  # right length, wrong dtype
    with pytest.raises(ValueError, match="label.npy holds int64"):
        LatentSource(out)
    with open(label, "wb") as f:
        f.write(good)
    np.save(os.path.join(folder, "index.npy"), np.arange(1, 9))
    with pytest.raises(ValueError, match=r"index.npy does not hold the examples \[0, 8\)"):
        LatentSource(out)
    os.remove(os.path.join(folder, "index.npy"))
    with pytest.raises(FileNotFoundError, match="index.npy is missing"):
        LatentSource(out)
    assert load_shard(out, 1, manifest)["mean"].shape == (4, 2, 2, 1)  # the other is fine


def test_old_npz_format_names_the_command_that_re_encodes(tmp_path):
    manifest = {"format_version": 1, "num_examples": 30, "shard_size": 8, "num_shards": 4,
                "image_shape": [32, 32, 1], "num_classes": 10, "dtype": "float16",
                "complete": True, "latent_shape": [4, 4, 4], "scale_factor": 0.5,
                "info": {"vae": "/runs/vae", "source": "fashion_mnist_idx", "split": "train"}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "latents-00000.npz").write_bytes(b"PK")
    with pytest.raises(ValueError) as e:
        LatentSource(str(tmp_path))
    msg = str(e.value)
    assert "format_version 1 (.npz shards)" in msg
    assert (f"python -m diffusion.autoencoder.encode --vae=/runs/vae "
            f"--source=fashion_mnist_idx --split=train --image_size=32 --shard_size=8 "
            f"--dtype=float16 --out={tmp_path}_v2") in msg
    # The encoder will not write new shards into it either.
    with pytest.raises(ValueError, match="different latent dataset.*format_version"):
        encode_dataset(FakeSource(30), fake_encode, str(tmp_path), 8, 4, dtype="float16",
                       log=None)


def test_cli_flags_are_checked_before_any_work(tmp_path):
    out = str(tmp_path / "lat")
    with pytest.raises(app.UsageError, match="vae"):
        main(["encode", "--source=synthetic:8x8x3:4", f"--out={out}"])
    with pytest.raises(app.UsageError, match="dtype"):
        main(["encode", "--vae=x", "--source=synthetic", f"--out={out}", "--dtype=float64"])
    with pytest.raises(app.UsageError, match="shard_sze"):
        main(["encode", "--vae=x", "--source=synthetic", f"--out={out}", "--shard_sze=3"])
    assert not os.path.exists(out)


def _write_diffusers_vae(folder, module, seed):
    """A diffusers-format VAE folder (config.json + safetensors) holding random weights
    of `module`'s shapes, written with numpy only."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, 8, 8, 3)))["params"]
    rng = np.random.default_rng(seed)
    tensors = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = [p.key for p in path]
        key = ".".join(re.sub(r"_(\d+)$", r".\1", n) for n in names[:-1])
        shape = leaf.shape
        if names[-1] == "kernel":
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], *shape[:2])
            arr = rng.normal(0, 0.3, shape)
        else:
            arr = (names[-1] == "scale") + 0.1 * rng.normal(size=shape)
        tensors[f"{key}.{'bias' if names[-1] == 'bias' else 'weight'}"] = arr.astype("<f4")
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        raw = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    os.makedirs(folder)
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors"), "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))
    config = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
              "latent_channels": 4, "down_block_types": ["DownEncoderBlock2D"] * 2,
              "up_block_types": ["UpDecoderBlock2D"] * 2, "scaling_factor": 0.25}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)


def test_cli_encodes_a_source_with_a_vae_folder(tmp_path, capsys):
    from diffusion.convert.diffusers_vae import load_sd_vae
    from diffusion.data import make_source
    module = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    _write_diffusers_vae(str(tmp_path / "vae"), module, seed=0)
    out = str(tmp_path / "lat")
    summary = main(["encode", "--vae", str(tmp_path / "vae"), "--source", "synthetic:8x8x3:10",
                    "--out", out, "--shard_size=6", "--batch_size=4"])
    assert '"scale_factor": 0.25' in capsys.readouterr().out
    assert summary == {"num_examples": 10, "latent_shape": [4, 4, 4], "scale_factor": 0.25}
    src = LatentSource(out)
    assert len(src) == 10 and src.image_shape == (4, 4, 4) and src.scale_factor == 0.25
    # The stored latents are the VAE's posterior means, scaled.
    vae, params, _ = load_sd_vae(str(tmp_path / "vae"))
    images = make_source("synthetic:8x8x3:10").get(np.arange(10))["image"]
    mean, _ = jax.jit(lambda x: vae.apply({"params": params}, x, method="encode"))(
        images.astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_allclose(src.get(np.arange(10))["image"], 0.25 * np.asarray(mean),
                               rtol=1e-4, atol=1e-5)
    assert float(np.abs(mean).max()) > 0.1
