# %% [markdown]
# # Quick start: sample a trained run
#
# Loads the EMA parameters of a run trained with `launch.py` (train one first:
# `python launch.py --config configs/default.py --workdir runs/default`) and draws the
# same 16 samples (seed 0) with three samplers, one row each: DDIM, DPM-Solver++(2M) and
# Heun. Paths are relative to the repository root (start Jupyter there); set the `WORKDIR`
# environment variable to sample another run.
#
# This file and `quickstart.ipynb` hold the same cells (`python notebooks/sync_quickstart.py`
# writes the notebook from this file; `tests/test_pretrained.py` checks that they match).

# %%
import os

import numpy as np
from PIL import Image

import diffusion
from diffusion import images

# %%
pipe = diffusion.load(os.environ.get("WORKDIR", "runs/default"))
steps = int(os.environ.get("STEPS", "50"))
rows = [pipe.sample(name, steps=steps, num=16, seed=0) for name in ("ddim", "dpmpp_2m", "heun")]
images.save_png("quickstart_samples.png", images.make_grid(np.concatenate(rows), nrow=16))
Image.open("quickstart_samples.png")
