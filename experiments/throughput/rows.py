"""The rows of the throughput benchmark: what each name means and how its network is built.

Names:
  DiT-<S|B|L|XL>/<2|4|8>   training, DiT of the paper's table on 32x32x4 latents (ImageNet
                           256 through SD's VAE), 1000 classes, learned sigma; batch 256
  UNet-CIFAR               training, DDPM's 35.7M CIFAR-10 U-Net on 32x32x3; batch 128
  Sample-<training row>    sampling with that network: 50 DDIM steps, classifier-free
                           guidance (both passes in one batched call) for a class model
--tiny shrinks every network to a few seconds of CPU (same names, same code paths).
"""
from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp

from diffusion.models import DiT, UNet, dit_variant
from diffusion.models.dit import scan_blocks_for

DEFAULT_ROWS = ("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2", "UNet-CIFAR", "Sample-DiT-XL/2")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
_DIT = re.compile(r"DiT-(S|B|L|XL)/(2|4|8)")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    kind: str            # "train" | "sample"
    net: str             # "dit" | "unet"
    variant: str         # DiT variant ("XL/2"); "" for the U-Net
    image_shape: tuple   # (H, W, C)
    num_classes: int
    learned_sigma: bool
    batch: int           # default global batch
    tiny: bool = False


def parse_row(name: str, tiny: bool = False) -> Row:
    """'DiT-XL/2', 'UNet-CIFAR', 'Sample-DiT-XL/2' -> Row; ValueError naming the known forms."""
    base, kind = name, "train"
    if name.startswith("Sample-"):
        base, kind = name[len("Sample-"):], "sample"
    match = _DIT.fullmatch(base)
    if match:
        variant = f"{match.group(1)}/{match.group(2)}"
        shape, classes = ((16, 16, 4), 10) if tiny else ((32, 32, 4), 1000)
        return Row(name, kind, "dit", variant, shape, classes, True, 256, tiny)
    if base == "UNet-CIFAR":
        shape = (16, 16, 3) if tiny else (32, 32, 3)
        return Row(name, kind, "unet", "", shape, 0, False, 128, tiny)
    raise ValueError(f"unknown benchmark row {name!r}; known: DiT-<S|B|L|XL>/<2|4|8>, "
                     f"UNet-CIFAR, and Sample-<either> (default rows: {','.join(DEFAULT_ROWS)})")


def parse_rows(spec: str, tiny: bool = False) -> list[Row]:
    names = DEFAULT_ROWS if spec in ("", "all") else [s.strip() for s in spec.split(",")
                                                      if s.strip()]
    return [parse_row(n, tiny) for n in names]


def attention_impl(row: Row, choice: str, platform: str, dtype: str) -> str | None:
    """The attention implementation for `row`: choice 'xla' | 'cudnn' | 'auto'.

    auto: cuDNN's fused kernel on GPUs when the dtype is half precision and every head
    is a multiple of 8 channels, at most 128 (DiT: 64, 64, 64, 72); else XLA. DDPM's
    U-Net has one 256-channel head at 16x16, which the fused kernel does not take.
    """
    if choice == "xla":
        return None
    half = dtype in ("bfloat16", "float16")
    if choice == "cudnn":
        if not half:
            raise ValueError(f"--attention cudnn needs a half-precision --dtype, got {dtype}")
        return "cudnn"
    if choice != "auto":
        raise ValueError(f"--attention must be auto, xla or cudnn, got {choice!r}")
    if platform != "gpu" or not half or row.net != "dit":
        return None
    arch = dit_arch(row)
    head_dim = arch["hidden_size"] // arch["num_heads"]
    return "cudnn" if head_dim % 8 == 0 and head_dim <= 128 else None


def dit_arch(row: Row) -> dict:
    """hidden_size, depth, num_heads, patch_size of a DiT row (tiny: 64, 1, 2, p)."""
    arch = dit_variant(row.variant)
    if row.tiny:
        arch.update(hidden_size=64, depth=1, num_heads=2)
    return arch


def build_model(row: Row, dtype: str, remat: bool, attention: str | None):
    """The network of `row` with activations in `dtype` (parameters stay float32)."""
    h, w, c = row.image_shape
    if row.net == "dit":
        arch = dit_arch(row)
        # as the configs' default (model.dit.scan_blocks "auto"): scanned from 12 blocks
        return DiT(input_size=h, in_channels=c, num_classes=row.num_classes,
                   learn_sigma=row.learned_sigma, remat=remat, dtype=DTYPES[dtype],
                   attention_impl=attention, scan_blocks=scan_blocks_for("auto", arch["depth"]),
                   **arch)
    if row.tiny:
        arch = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
    else:  # DDPM's CIFAR-10 network, as configs/cifar10_ddpm.py
        arch = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,))
    return UNet(**arch, num_heads=1, dropout=0.1, out_channels=c, num_classes=row.num_classes,
                remat=remat, attn_implementation=attention, dtype=DTYPES[dtype])
