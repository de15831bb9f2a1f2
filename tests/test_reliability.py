"""Reliability: bad config values fail first, NaNs never reach a checkpoint, a full disk
stops the run, a corrupt checkpoint falls back, a second launch is refused, crafted
weight files give clear errors, and the logs stay consistent across a resume."""
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import jax
import numpy as np
import pytest

from configs.default import get_config
from diffusion.train import loop
from diffusion.train.setup import build_run
from diffusion.train.validate import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------- config validation

@pytest.mark.parametrize("key,value,match", [
    ("train.log_every", 0, "train.log_every"),
    ("train.checkpoint_every", 0, "train.checkpoint_every"),
    ("train.num_steps", 0, "train.num_steps"),
    ("data.global_batch_size", 0, "data.global_batch_size"),
    ("data.global_batch_size", 12, "data.global_batch_size"),  # 8 devices
    ("optim.lr", -1.0, "optim.lr"),
    ("data.image_size", 6, "attn_resolutions"),  # 6 -> levels 6, 3: attention at 4 vanishes
])
def test_bad_config_fails_before_anything_is_built(tmp_path, key, value, match):
    cfg = get_config("runlocal")
    section, leaf = key.split(".")
    cfg[section][leaf] = value
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        build_run(cfg, str(tmp_path))
    assert time.perf_counter() - t0 < 5
    assert not os.path.exists(tmp_path / "checkpoints")


# ----------------------------------------------------------------- crafted weight files

def _long(x: int) -> bytes:
    """A pickle LONG1 opcode for any int (negative and huge ones too)."""
    raw = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _text(s: str) -> bytes:
    return b"X" + len(s).to_bytes(4, "little") + s.encode()


def _crafted_pt(path, numel: int, offset: int, size: tuple, stride: tuple) -> None:
    """A torch zip checkpoint {'w': tensor} written by hand, header values as given:
    the pickle torch.save writes, without torch."""
    ints = lambda xs: b"(" + b"".join(_long(x) for x in xs) + b"t"
    pkl = (b"\x80\x02}" + _text("w") + b"ctorch._utils\n_rebuild_tensor_v2\n("
           + b"(" + _text("storage") + b"ctorch\nFloatStorage\n" + _text("0") + _text("cpu")
           + _long(numel) + b"tQ"
           + _long(offset) + ints(size) + ints(stride) + b"\x89"
           + b"ccollections\nOrderedDict\n)R" + b"tRs.")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", np.arange(numel, dtype="<f4").tobytes())


def test_crafted_torch_file_headers_are_bounds_checked(tmp_path):
    from diffusion.convert.dit_official import load_torch_file
    good = str(tmp_path / "good.pt")
    _crafted_pt(good, 6, 1, (2, 2), (2, 1))
    np.testing.assert_array_equal(load_torch_file(good, key=None)["w"], [[1, 2], [3, 4]])
    for i, (offset, size, stride) in enumerate([
            (0, (1 << 16,), (1,)),          # oversized: 64k elements from a storage of 6
            (5, (4,), (1,)),                # offset pushes the end past the storage
            (0, (2, 2), (4, 2)),            # strides reach element 6 of 0..5
            (0, (1 << 40,), (0,)),          # stride 0: in bounds, but a terabyte to copy
            (-3, (2,), (1,)),               # negative offset
            (0, (2,), (-1,)),               # negative stride
            (0, (2, 2), (1,))]):            # rank mismatch
        bad = str(tmp_path / f"bad{i}.pt")
        _crafted_pt(bad, 6, offset, size, stride)
        with pytest.raises((ValueError, pickle.UnpicklingError), match="malformed"):
            load_torch_file(bad, key=None)


def test_crafted_safetensors_header_is_bounds_checked(tmp_path):
    from diffusion.convert.torch_files import _read_safetensors

    def write(name, header, data=b"\0" * 16):
        h = json.dumps(header).encode()
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(len(h).to_bytes(8, "little") + h + data)
        return path

    ok = write("ok.safetensors", {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})
    assert _read_safetensors(ok)["w"].shape == (2, 2)
    for i, info in enumerate([
            {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 16]},
            {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}]):
        with pytest.raises(ValueError, match="malformed"):
            _read_safetensors(write(f"bad{i}.safetensors", {"w": info}))
    path = str(tmp_path / "huge_header.safetensors")
    with open(path, "wb") as f:
        f.write((1 << 60).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="malformed"):
        _read_safetensors(path)


def test_inception_converter_loads_weights_only(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from diffusion.evaluation import convert_inception
    calls, load = [], torch.load
    # Explicit, not torch's default: before torch 2.6 the default ran any pickled code.
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or load(*a, **k))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    path = str(tmp_path / "evil.pth")
    torch.save({"w": torch.zeros(2), "evil": Evil()}, path)
    with pytest.raises(Exception):
        convert_inception.convert(path, str(tmp_path / "out.npz"))
    assert not (tmp_path / "pwned").exists()
    assert calls and all(k.get("weights_only") is True for k in calls)
