"""Converts pytorch-fid's Inception weights (.pth) into an .npz of the state dict.

    python -m diffusion.evaluation.convert_inception \
        --in pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz

This one step needs torch (`pip install torch`, CPU build is enough); nothing else in
the project does. Download the .pth from the pytorch-fid release "fid_weights":
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
The keys are checked against the expected layout before the file is written.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from absl import app, flags

from diffusion import cli
from diffusion.evaluation.inception_weights import state_dict_to_variables

FLAGS = flags.FlagValues()  # the tool's own registry (see diffusion.cli)
flags.DEFINE_string("in", None, "pytorch-fid .pth", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output .npz", flag_values=FLAGS)
flags.mark_flags_as_required(["in", "out"], flag_values=FLAGS)


def convert(in_path: str, out_path: str) -> int:
    """Writes the state dict of in_path (.pth) to out_path (.npz); returns the key count."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise SystemExit("converting a .pth needs torch: pip install torch") from e
    # weights_only: a .pth is a pickle, and a plain pickle can run any code on load.
    state_dict = torch.load(in_path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{in_path} does not hold a state dict "
                         f"(got {type(state_dict).__name__})")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    arrays = {k: v.detach().cpu().numpy() for k, v in state_dict.items()
              if isinstance(v, torch.Tensor) and not k.endswith(".num_batches_tracked")}
    state_dict_to_variables(arrays)  # raises with the offending key if the layout differs
    np.savez(out_path, **arrays)
    return len(arrays)


def main(argv: Sequence[str]) -> None:
    if len(cli.parse(FLAGS, argv)) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    n = convert(FLAGS["in"].value, FLAGS.out)
    print(f"wrote {n} arrays to {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main, FLAGS)
