"""DiT: the diffusion transformer of Peebles & Xie (2023), "Scalable Diffusion Models with
Transformers", with adaLN-Zero conditioning.

x [B, H, W, C] is cut into p x p patches, embedded linearly, given a fixed 2-D sin-cos
position embedding, and passed through `depth` transformer blocks whose LayerNorms are
modulated by c = emb(t) + emb(y). A final adaLN layer maps tokens back to patches.
With learn_sigma the output has 2C channels: eps and the variance interpolation v.
A freshly initialised DiT outputs exactly zero (adaLN-Zero).

context_dim > 0 adds a cross-attention to context tokens [B, L, context_dim] (e.g. a
text encoder's output) in every block (see DiTBlock); 0, the default, leaves the
network as the paper's.

Variants ("S/2", "XL/4", ...) follow the paper's table; `DiT.from_variant` builds them.

scan_blocks=True runs the blocks as one `nn.scan` over a stacked copy of the block
parameters (params["blocks"][name] has a leading [depth] axis) instead of `depth`
unrolled blocks (params["block_i"]): XLA compiles one block instead of depth copies
(DiT-XL/2's train step: see BENCHMARKS.md, "CPU speed (issue 12)"), with the same
outputs. `stack_blocks` / `unstack_blocks` convert parameters between the two layouts.
With remat the checkpointing is per block in both layouts.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusion.models.attention import check_context
from diffusion.models.dit_blocks import (DiTBlock, DiTTimestepEmbed, FinalLayer,
                                         ScanDiTBlock, sincos_pos_embed_2d, xavier)
from diffusion.models.embeddings import LabelEmbedding

# name -> (hidden_size, depth, num_heads); the patch size is the suffix "/p".
DIT_SIZES = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
SCANNED = "blocks"  # params[SCANNED]: every block's parameters, stacked on axis 0
# scan_blocks "auto" scans from this depth on: every paper variant (12-28 blocks), where
# the unrolled train step compiles for minutes, but not the 1-4 block test and CPU models,
# which compile fast either way and keep their checkpoint layout.
SCAN_MIN_DEPTH = 12


def scan_blocks_for(setting: str | bool, depth: int) -> bool:
    """config model.dit.scan_blocks ("auto" | "on" | "off", or a bool) -> scan or not."""
    if isinstance(setting, bool):
        return setting
    table = {"on": True, "true": True, "off": False, "false": False}
    setting = str(setting).lower()
    if setting == "auto":
        return depth >= SCAN_MIN_DEPTH
    if setting not in table:
        raise ValueError(f"model.dit.scan_blocks must be auto, on or off, got {setting!r}")
    return table[setting]
DIT_PATCH_SIZES = (2, 4, 8)
DIT_VARIANTS = tuple(f"{s}/{p}" for s in DIT_SIZES for p in DIT_PATCH_SIZES)


def dit_variant(name: str) -> dict:
    """"XL/2" -> dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2)."""
    size, _, patch = name.partition("/")
    if size not in DIT_SIZES or patch not in {str(p) for p in DIT_PATCH_SIZES}:
        raise ValueError(f"unknown DiT variant {name!r}; known: {', '.join(DIT_VARIANTS)}")
    hidden_size, depth, num_heads = DIT_SIZES[size]
    return dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                patch_size=int(patch))


def patchify(x: jnp.ndarray, p: int) -> jnp.ndarray:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], each patch flattened in (row, col, C) order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: jnp.ndarray, p: int, grid: int) -> jnp.ndarray:
    """[B, grid*grid, p*p*C] -> [B, grid*p, grid*p, C]; inverse of patchify."""
    b, _, ppc = x.shape
    c = ppc // (p * p)
    x = x.reshape(b, grid, grid, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * p, grid * p, c)


class DiT(nn.Module):
    """Diffusion transformer. Call: (x [B, H, W, C], t [B], y [B] | None) -> [B, H, W, C_out].

    num_classes=0 makes it unconditional (y must then be None). With num_classes=K the
    label table has K+1 rows, row K the null class; a negative label or y=None means null.
    attention_impl is passed to jax.nn.dot_product_attention: None/"xla", or "cudnn" for
    the fused kernel on GPUs (which needs dtype float16/bfloat16). context_dim > 0:
    every block cross-attends to context [B, L, context_dim], a required input then.
    """
    input_size: int
    patch_size: int
    in_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 0
    learn_sigma: bool = False
    remat: bool = False
    scan_blocks: bool = False
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    context_dim: int = 0

    def __post_init__(self):
        # Checked at construction, long before anything is traced or compiled.
        if self.input_size % self.patch_size:
            raise ValueError(f"patch size {self.patch_size} does not divide image size "
                             f"{self.input_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden size {self.hidden_size} must be divisible by 4 for "
                             f"the 2-D sin-cos position embedding")
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ValueError(f"attention_impl must be None, 'xla' or 'cudnn', got "
                             f"{self.attention_impl!r}")
        if self.attention_impl == "cudnn" and jnp.dtype(self.dtype) not in (
                jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"cuDNN fused attention needs dtype bfloat16 or float16, "
                             f"got {jnp.dtype(self.dtype).name}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        super().__post_init__()

    @classmethod
    def from_variant(cls, name: str, **kwargs) -> "DiT":
        """DiT.from_variant("XL/2", input_size=32, in_channels=4, num_classes=1000, ...)."""
        return cls(**dit_variant(name), **kwargs)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    def _check_inputs(self, x, t, y, context=None):
        expect = (self.input_size, self.input_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expect:
            raise ValueError(f"DiT expects x of shape [B, {expect[0]}, {expect[1]}, "
                             f"{expect[2]}], got {tuple(x.shape)}")
        b = x.shape[0]
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != b):
            raise ValueError(f"t must have shape [{b}] or [], got {tuple(t.shape)}")
        if y is not None:
            if self.num_classes == 0:
                raise ValueError("labels y were given to an unconditional DiT "
                                 "(num_classes=0)")
            if y.shape != (b,):
                raise ValueError(f"y must have shape [{b}], got {tuple(y.shape)}")
        check_context(context, self.context_dim, b, "DiT")

    @nn.compact
    def __call__(self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray | None = None,
                 train: bool = False, context: jnp.ndarray | None = None) -> jnp.ndarray:
        # `train` is accepted for the shared denoiser signature; DiT has no dropout.
        # Classifier-free-guidance label dropout belongs to the training step.
        del train
        t = jnp.asarray(t)
        self._check_inputs(x, t, y, context)
        b = x.shape[0]
        t = jnp.broadcast_to(t, (b,))
        p, d = self.patch_size, self.hidden_size

        # Patch embedding as a Dense over flattened patches: the official Conv2d with
        # stride p is the same map, and its init treats it as a linear layer too.
        h = nn.Dense(d, kernel_init=xavier, dtype=self.dtype,
                     name="x_embed")(patchify(x.astype(self.dtype), p))
        h = h + jnp.asarray(sincos_pos_embed_2d(d, self.grid_size), self.dtype)[None]

        c = DiTTimestepEmbed(d, dtype=self.dtype, name="t_embed")(t)
        if self.num_classes > 0:
            if y is None:
                y = jnp.full((b,), -1, jnp.int32)  # null class: unconditional
            c = c + LabelEmbedding(self.num_classes, d, dtype=self.dtype, name="y_embed")(y)

        block_args = dict(hidden_size=d, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                          dtype=self.dtype, attention_impl=self.attention_impl,
                          context_dim=self.context_dim)
        # Without cross-attention the blocks are called as before (no None argument).
        inputs = (h, c) if context is None else (h, c, context.astype(self.dtype))
        if self.scan_blocks:
            # prevent_cse=False: inside a scan the loop already stops XLA from merging
            # the recomputation into the forward pass, and the barrier would cost speed.
            cls = nn.remat(ScanDiTBlock, prevent_cse=False) if self.remat else ScanDiTBlock
            h, _ = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=nn.broadcast, length=self.depth)(**block_args,
                                                                    name=SCANNED)(*inputs)
        else:
            cls = nn.remat(DiTBlock) if self.remat else DiTBlock
            for i in range(self.depth):
                h = cls(**block_args, name=f"block_{i}")(*inputs)
                inputs = (h,) + inputs[1:]

        h = FinalLayer(d, p, self.out_channels, dtype=self.dtype, name="final")(h, c)
        return unpatchify(h, p, self.grid_size).astype(jnp.float32)


def stack_blocks(params: dict[str, Any], depth: int | None = None) -> dict[str, Any]:
    """Unrolled params (block_0 ... block_{depth-1}) -> the scan_blocks layout.

    Other entries are kept as they are. numpy in, numpy out; jax arrays are stacked by jnp."""
    if SCANNED in params:
        raise ValueError(f"params already hold {SCANNED!r} (the scanned layout)")
    names = [k for k in params if k.startswith("block_") and k[len("block_"):].isdigit()]
    n = len(names) if depth is None else depth
    if n == 0 or sorted(names) != sorted(f"block_{i}" for i in range(n)):
        raise ValueError(f"expected unrolled params block_0 ... block_{n - 1}, got "
                         f"{sorted(names)}")
    blocks = [params[f"block_{i}"] for i in range(n)]
    out = {k: v for k, v in params.items() if k not in names}
    out[SCANNED] = _tree_map(
        lambda *xs: np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs)
        else jnp.stack(xs), *blocks)
    return out


def unstack_blocks(params: dict[str, Any]) -> dict[str, Any]:
    """The scan_blocks layout -> unrolled params block_0 ... block_{depth-1}."""
    if SCANNED not in params:
        raise ValueError(f"params have no {SCANNED!r} entry (not the scanned layout)")
    stacked = params[SCANNED]
    depth = {np.shape(a)[0] for a in _leaves(stacked)}
    if len(depth) != 1:
        raise ValueError(f"stacked block params disagree on depth: {sorted(depth)}")
    out = {k: v for k, v in params.items() if k != SCANNED}
    for i in range(depth.pop()):
        out[f"block_{i}"] = _tree_map(lambda a, i=i: a[i], stacked)
    return out


def _tree_map(fn, *trees):
    # Plain nested dicts of arrays: no jax.tree here, so numpy params stay numpy.
    if isinstance(trees[0], dict):
        return {k: _tree_map(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)


def _leaves(tree):
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    return [tree]
