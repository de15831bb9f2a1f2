"""A denoiser conditioned on text: a CLIP text encoder whose token embeddings the
network (U-Net or DiT with context_dim > 0) reads through cross-attention.

    model = TextConditional(denoiser=UNet(..., context_dim=D), text_config=CLIPTextConfig(
        vocab_size=..., hidden_size=D, ...), train_encoder=True)
    params = model.init(key, x, t, tokens)["params"]   # {"denoiser": ..., "text": ...}
    out = model.apply({"params": params}, x_t, t, tokens, train=True)   # tokens [B, L]

Called like any denoiser of this codebase, (x, t, y, train), with y the captions' token
ids int32 [B, L] in place of class labels: the training step needs no other change, and
the encoder's parameters live beside the network's in one tree, so the optimizer, EMA,
checkpoints, resume and sharding treat them as they treat every parameter.
`train_encoder=False` stops the gradient at the embeddings (the optimizer then also
leaves the "text" subtree alone: train_state.make_optimizer(frozen=...)).

Sampling encodes the prompts once per call, not once per network evaluation:
`encode_prompts` turns the token ids of prompts and negative prompts [B, 2, L] into the
condition y = {"context", "negative"} (embeddings [B, L, D] each) that the Denoiser
passes to `denoise`; with guidance its unconditional branch reads the negative prompt's
embeddings (`negative_condition`).

`load_tokenizer(path)` is the tokenizer of a text run: "" the demo vocabulary learned from
the Fashion-MNIST captions (`diffusion.data.captions.demo_tokenizer`), else a folder of
CLIP tokenizer files; `run_tokenizer(model.text)` resolves the section's choice.

A pretrained encoder (model.text.pretrained: a transformers CLIPTextModel folder, or an
SD pipeline folder) fixes the encoder's shape from its config.json; its weights replace
the initialisation of a fresh run (diffusion/train/text_encoder.py). With a frozen
encoder, model.text.cache_embeddings encodes every caption of the source once and
trains on the stored embeddings (same file).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffusion.config_file import ConfigError
from diffusion.data.captions import demo_tokenizer
from diffusion.models.clip_text import (CLIPTextConfig, CLIPTextModel, read_text_config,
                                       text_encoder_folder)
from diffusion.text.tokenizer import CLIPTokenizer, load_clip_tokenizer


class TextConditional(nn.Module):
    """A denoiser network with cross-attention (`denoiser`, called as
    denoiser(x, t, None, train=..., context=...)) and the text encoder that writes its
    context (`text_config`, a CLIPTextConfig)."""
    denoiser: nn.Module
    text_config: CLIPTextConfig
    train_encoder: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        self.text = CLIPTextModel(self.text_config, self.dtype)

    @property
    def max_length(self) -> int:
        return self.text_config.max_position_embeddings

    def encode(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """Token ids int32 [B, L] -> embeddings [B, L, D] the denoiser attends to (the
        encoder's last hidden state after its final LayerNorm, no padding mask: as SD)."""
        context = self.text(tokens).prompt_embeds
        return context if self.train_encoder else jax.lax.stop_gradient(context)

    def denoise(self, x: jnp.ndarray, t: jnp.ndarray, context: jnp.ndarray,
                train: bool = False) -> jnp.ndarray:
        """The network's output for x [B, H, W, C] at noise level t [B] given the
        embeddings context [B, L, D]."""
        return self.denoiser(x, t, None, train=train, context=context)

    def __call__(self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray,
                 train: bool = False) -> jnp.ndarray:
        """y: the captions' token ids int32 [B, L], or their embeddings [B, L, D] from
        a cache of this (frozen) encoder, which then is not run."""
        if y is not None and y.ndim == 3 and jnp.issubdtype(y.dtype, jnp.floating):
            return self.denoise(x, t, y, train)
        if y is None or y.ndim != 2:
            raise ValueError("a text-conditional model takes token ids [B, L] or cached "
                             f"embeddings [B, L, D] as y, got {None if y is None else y.shape}")
        return self.denoise(x, t, self.encode(y), train)


def encode_prompts(model: TextConditional, params: Any, tokens: jnp.ndarray) -> dict:
    """The sampling condition of prompts: tokens int32 [B, 2, L] (prompt, negative
    prompt; diffusion.text.prompts.prompt_pairs) -> {"context": [B, L, D], "negative":
    [B, L, D]}, both encoded in one call."""
    b = tokens.shape[0]
    ids = jnp.concatenate([tokens[:, 0], tokens[:, 1]])
    embeds = model.apply({"params": params}, ids, method=TextConditional.encode)
    return {"context": embeds[:b], "negative": embeds[b:]}


def negative_condition(y: dict) -> dict:
    """The unconditional branch of guidance for a prompt condition: its negative
    prompt's embeddings (the empty prompt's when there is no negative prompt)."""
    return {"context": y["negative"], "negative": y["negative"]}


def denoise_fn(model: TextConditional, params: Any):
    """net_fn(x, c_noise, y) of a Denoiser over `model`, y a condition of
    `encode_prompts`."""
    def net_fn(x, c_noise, y):
        return model.apply({"params": params}, x, c_noise, y["context"],
                           method=TextConditional.denoise)
    return net_fn


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str = "") -> CLIPTokenizer:
    """The tokenizer of model.text.tokenizer: "" = the demo vocabulary of the
    Fashion-MNIST captions, else a folder of CLIP tokenizer files (vocab.json and
    merges.txt, or open_clip's bpe_simple_vocab_16e6.txt.gz)."""
    return load_clip_tokenizer(path) if path else demo_tokenizer()


def is_text_section(model: ml_collections.ConfigDict) -> bool:
    """Whether a config's model section asks for text conditioning (config.json files
    from before the text section have none)."""
    text = model.get("text")
    return bool(text is not None and text.get("enabled", False))


def tokenizer_path(text: ml_collections.ConfigDict) -> str:
    """model.text.tokenizer, or for a pretrained encoder given no tokenizer the
    `tokenizer/` folder of its SD pipeline folder (beside `text_encoder/`)."""
    path, pretrained = str(text.tokenizer), str(text.get("pretrained", ""))
    if path or not pretrained:
        return path
    folder = text_encoder_folder(pretrained)
    for candidate in (os.path.join(pretrained, "tokenizer"),
                      os.path.join(os.path.dirname(os.path.abspath(folder)), "tokenizer")):
        if os.path.isfile(os.path.join(candidate, "vocab.json")):
            return candidate
    raise ConfigError(f"model.text.pretrained={pretrained!r} has no tokenizer/ folder "
                      "beside its text encoder: set model.text.tokenizer to the folder of "
                      "its vocab.json and merges.txt")


def run_tokenizer(text: ml_collections.ConfigDict) -> CLIPTokenizer:
    """The tokenizer a model.text section names (see tokenizer_path)."""
    return load_tokenizer(tokenizer_path(text))


def context_width(text: ml_collections.ConfigDict) -> int:
    """Width D of the embeddings the denoiser cross-attends to: the pretrained
    encoder's hidden size, else model.text.width."""
    pretrained = str(text.get("pretrained", ""))
    return read_text_config(pretrained).hidden_size if pretrained else int(text.width)


def text_encoder_config(text: ml_collections.ConfigDict,
                        tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """The CLIPTextConfig of a model.text section: a pretrained encoder's own (its
    vocabulary must hold the tokenizer's ids), else width, layers, heads, MLP 4x the
    width, quick-GELU, with vocabulary, eos id and length from the tokenizer."""
    pretrained = str(text.get("pretrained", ""))
    if pretrained:
        config = read_text_config(pretrained)
        if (config.vocab_size < tokenizer.vocab_size
                or config.max_position_embeddings < tokenizer.max_length):
            raise ConfigError(
                f"model.text.pretrained={pretrained!r} embeds {config.vocab_size} tokens "
                f"at {config.max_position_embeddings} positions; its tokenizer "
                f"({tokenizer_path(text)!r}) writes {tokenizer.vocab_size} tokens at "
                f"{tokenizer.max_length}: use the tokenizer the encoder was trained with")
        return config
    width, layers, heads = int(text.width), int(text.layers), int(text.heads)
    if width <= 0 or layers <= 0 or heads <= 0:
        raise ValueError(f"model.text.width, layers and heads must be positive, got "
                         f"{width}, {layers}, {heads}")
    if width % heads:
        raise ValueError(f"model.text.width={width} is not a multiple of "
                         f"model.text.heads={heads}")
    return CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=width,
                          intermediate_size=4 * width, num_hidden_layers=layers,
                          num_attention_heads=heads,
                          max_position_embeddings=tokenizer.max_length,
                          eos_token_id=tokenizer.eos_id)


def with_text(denoiser: nn.Module, text: ml_collections.ConfigDict, dtype: Any) -> TextConditional:
    """`denoiser` (built with context_dim = context_width(text)) under the text
    encoder of the model.text section."""
    config = text_encoder_config(text, run_tokenizer(text))
    return TextConditional(denoiser, config, bool(text.train_encoder), dtype)


def frozen_subtrees(model: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Top-level parameter subtrees the optimizer must leave alone: ("text",) for a
    frozen text encoder (model.text.train_encoder=False), else ()."""
    if is_text_section(model) and not model.text.train_encoder:
        return ("text",)
    return ()


def source_options(model: ml_collections.ConfigDict) -> dict:
    """Options for make_source so that the captions are tokenized by the run's own
    tokenizer: vocab_dir=tokenizer_path(model.text) when that names a folder."""
    path = tokenizer_path(model.text) if is_text_section(model) else ""
    return {"vocab_dir": path} if path else {}


def check_caption_source(model: ml_collections.ConfigDict, source: Any, name: str) -> None:
    """A text-conditional model needs a data source whose batches carry token ids of
    the run's tokenizer (vocabulary size and the empty prompt's ids alike)."""
    if not is_text_section(model):
        return
    if model.text.get("cache_embeddings", False) and model.text.train_encoder:
        raise ConfigError(
            "model.text.cache_embeddings=True needs a frozen encoder: the embeddings of a "
            "trained encoder change every step; set model.text.train_encoder=False")
    if not hasattr(source, "null_tokens"):
        raise ConfigError(f"model.text.enabled needs a captioned data source (batches with "
                         f"token ids), e.g. data.source=fashion_mnist_captions; "
                         f"{name!r} has no captions")
    tokenizer = run_tokenizer(model.text)
    if (source.vocab_size != tokenizer.vocab_size
            or list(source.null_tokens) != list(tokenizer("").input_ids[0])):
        raise ConfigError(f"data source {name!r} tokenizes its captions with another "
                         f"vocabulary ({source.vocab_size} tokens) than "
                         f"the tokenizer {tokenizer_path(model.text)!r} "
                         f"({tokenizer.vocab_size} tokens)")
