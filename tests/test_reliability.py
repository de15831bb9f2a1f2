"""Reliability: bad config values fail first, NaNs never reach a checkpoint, a full disk
stops the run, a corrupt checkpoint falls back, a second launch is refused, crafted
weight files give clear errors, and the logs stay consistent across a resume."""
import errno
import json
import os
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
