"""CLIP's text transformer (Radford et al. 2021) in Flax, the text encoder of Stable
Diffusion, with the parameter layout of transformers' `CLIPTextModel`.

Tokens [B, S] (S <= max_position_embeddings, 77 for SD) -> token + learned position
embeddings -> num_hidden_layers pre-LayerNorm blocks (causal self-attention with
q/k/v/out projections, then an MLP fc1 -> quick-GELU or GELU -> fc2, each added to its
input) -> final LayerNorm. Parameter names follow transformers' keys with list indices
folded into the name: `encoder.layers.0.self_attn.q_proj.weight` is
params['encoder']['layers_0']['self_attn']['q_proj']['kernel'] (the converter is
diffusion/convert/clip_text.py).

What SD feeds its U-Net is `prompt_embeds`: the last hidden state, or with `clip_skip=k`
the output of the k-th block from the end, through the final LayerNorm too (diffusers'
`encode_prompt`). SD 2.x needs no clip_skip: its checkpoint already has the penultimate
of OpenCLIP's 24 layers as its last (num_hidden_layers 23).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# transformers' pooling rule: configs written before its fix carry eos_token_id 2 and
# pool at argmax(ids) (the eos token has the largest id in CLIP's vocabulary).
LEGACY_EOS_TOKEN_ID = 2


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": exact_gelu}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The hyperparameters, under transformers' CLIPTextConfig names. Defaults: the
    text encoder of CLIP ViT-L/14 (SD 1.x); SD 2.x: hidden 1024, intermediate 4096,
    23 layers, 16 heads, gelu."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; known: "
                             f"{sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
        """From a transformers config.json dict: the fields above (defaults for absent
        ones), other keys ignored; a full CLIPModel config's `text_config` is used."""
        config = config.get("text_config", config)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})


def text_encoder_folder(path: str | os.PathLike) -> str:
    """The folder of a transformers CLIPTextModel (config.json + weights): `path` itself,
    or the `text_encoder/` subfolder of an SD pipeline folder."""
    folder = os.fspath(path)
    if not os.path.isfile(os.path.join(folder, "config.json")) and \
            os.path.isfile(os.path.join(folder, "text_encoder", "config.json")):
        folder = os.path.join(folder, "text_encoder")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"no config.json in {folder} (expected a transformers "
                                f"CLIPTextModel folder or an SD pipeline folder)")
    return folder


def read_text_config(path: str | os.PathLike) -> CLIPTextConfig:
    """The CLIPTextConfig of a CLIPTextModel folder or SD pipeline folder."""
    with open(os.path.join(text_encoder_folder(path), "config.json")) as fh:
        return CLIPTextConfig.from_dict(json.load(fh))


class CLIPTextOutput(NamedTuple):
    """last_hidden_state [B, S, D] (after the final LayerNorm); pooler_output [B, D],
    the final state at each row's eos token; prompt_embeds [B, S, D], what SD's U-Net
    attends to (see `clip_skip`); hidden_states: with output_hidden_states, the
    embeddings and each block's output (num_hidden_layers + 1 arrays [B, S, D], before
    the final LayerNorm, as transformers' `hidden_states`), else None."""
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    prompt_embeds: jax.Array
    hidden_states: tuple[jax.Array, ...] | None


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _layer_norm(eps: float, dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


class CLIPAttention(nn.Module):
    """Multi-head self-attention; mask [B, 1, S, S] bool, True where a query may look."""
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        b, s, d = x.shape
        heads = c.num_attention_heads
        q, k, v = (_dense(d, self.dtype, f"{n}_proj")(x).reshape(b, s, heads, d // heads)
                   for n in ("q", "k", "v"))
        h = jax.nn.dot_product_attention(q, k, v, mask=mask)  # scale head_dim^-1/2
        return _dense(d, self.dtype, "out_proj")(h.reshape(b, s, d))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = _dense(c.intermediate_size, self.dtype, "fc1")(x)
        return _dense(c.hidden_size, self.dtype, "fc2")(ACTIVATIONS[c.hidden_act](h))


class CLIPEncoderLayer(nn.Module):
    """x + attn(LN1(x)), then + fc2(act(fc1(LN2(x))))."""
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        h = _layer_norm(c.layer_norm_eps, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(c, self.dtype, name="self_attn")(h, mask)
        h = _layer_norm(c.layer_norm_eps, self.dtype, "layer_norm2")(x)
        h = CLIPMLP(c, self.dtype, name="mlp")(h)
        return x + h


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                          embedding_init=nn.initializers.normal(0.02),
                          name="token_embedding")(input_ids)
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                             embedding_init=nn.initializers.normal(0.01),
                             name="position_embedding")(jnp.arange(input_ids.shape[1]))
        return tokens + positions[None]


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> list[jax.Array]:
        """All hidden states: the input, then each layer's output."""
        states = [x]
        for i in range(self.config.num_hidden_layers):
            states.append(CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(
                states[-1], mask))
        return states


class CLIPTextModel(nn.Module):
    """`apply({'params': p}, input_ids [B, S] int, attention_mask [B, S] or None,
    clip_skip=None, output_hidden_states=False) -> CLIPTextOutput`.

    attention_mask (1 = token, 0 = padding) hides padded keys on top of the causal
    mask, as transformers does when it is given; SD pipelines pass none (the causal
    mask already keeps padding out of every state up to eos). clip_skip=k (diffusers'
    meaning): prompt_embeds = final LayerNorm of the output of block L - k; None or 0:
    the last hidden state.
    """
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 clip_skip: int | None = None,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {input_ids.shape}")
        b, s = input_ids.shape
        if s > c.max_position_embeddings:
            raise ValueError(f"sequence length {s} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}")
        if clip_skip is not None and not 0 <= clip_skip <= c.num_hidden_layers:
            raise ValueError(f"clip_skip must be in [0, {c.num_hidden_layers}] (the "
                             f"number of layers), got {clip_skip}")
        mask = jnp.tril(jnp.ones((s, s), bool))[None, None]  # [1, 1, S, S] causal
        if attention_mask is not None:
            if attention_mask.shape != (b, s):
                raise ValueError(f"attention_mask shape {attention_mask.shape} != "
                                 f"input_ids shape {(b, s)}")
            mask = mask & (attention_mask[:, None, None, :] > 0)
        x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
        states = CLIPEncoder(c, self.dtype, name="encoder")(x, mask)
        final_norm = _layer_norm(c.layer_norm_eps, self.dtype, "final_layer_norm")
        last = final_norm(states[-1])
        prompt_embeds = last if not clip_skip else final_norm(states[-(clip_skip + 1)])
        return CLIPTextOutput(
            last_hidden_state=last,
            pooler_output=pool_at_eos(last, input_ids, c.eos_token_id),
            prompt_embeds=prompt_embeds,
            hidden_states=tuple(states) if output_hidden_states else None)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """[B] index of each row's eos token, by transformers' rule: argmax of the ids for
    legacy configs (eos_token_id 2), else the first position holding eos_token_id."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


def pool_at_eos(hidden: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """hidden [B, S, D] -> [B, D], the state at each row's eos token."""
    index = eos_positions(input_ids, eos_token_id)
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
