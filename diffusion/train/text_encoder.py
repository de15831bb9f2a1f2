"""The text encoder of a text run, beyond its initialisation: pretrained weights, and the
cache of its caption embeddings when it is frozen.

- `load_pretrained(run, state)`: with model.text.pretrained (a transformers
  CLIPTextModel folder, or an SD pipeline folder), a fresh run's "text" parameters and
  their EMA are the converted weights of that folder instead of a random
  initialisation (a resumed run finds them in its checkpoint).
- `with_cached_captions(run, state)`: with model.text.cache_embeddings (which needs
  model.text.train_encoder=False), every caption the data source can write is encoded
  once by the run's frozen encoder and the batches carry those embeddings instead of
  token ids, so the train step runs no text encoder. The embeddings are kept in
  `workdir/text_cache/embeddings.npy` (read with mmap) under a fingerprint of the
  encoder's parameters and the caption table; a changed encoder or table re-encodes.
  Training on the cache equals training on the tokens with the frozen encoder
  (tests/test_text_conditioning.py checks the losses).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil

import jax
import numpy as np

from diffusion.convert.clip_text import load_clip_text
from diffusion.models.text_conditional import TextConditional
from diffusion.train_state import restart_from, same_shapes

log = logging.getLogger(__name__)

CACHE_DIR = "text_cache"
EMBEDDINGS = "embeddings.npy"
FINGERPRINT = "fingerprint.json"


def load_pretrained(run, state):
    """`state` with model.text.pretrained's weights as the "text" params and EMA (and
    a fresh optimizer state); unchanged without model.text.pretrained."""
    path = str(run.config.model.text.get("pretrained", "")) \
        if isinstance(run.model, TextConditional) else ""
    if not path:
        return state
    _, weights = load_clip_text(path)
    if not same_shapes(weights, state.params["text"]):
        raise ValueError(f"model.text.pretrained={path!r}: its weights do not fit the text "
                         "encoder its config.json describes")
    log.info("text encoder: pretrained weights from %s", path)
    return restart_from(state, dict(state.params, text=weights), run.state_sharding, run.tx)


def encode_captions(model: TextConditional, text_params, tokens: np.ndarray,
                    batch_size: int = 256) -> np.ndarray:
    """float32 [M, L, D]: the embeddings of token rows [M, L] by `model`'s encoder."""
    encode = jax.jit(lambda p, ids: model.apply({"params": {"text": p}}, ids,
                                                method=TextConditional.encode))
    out = [np.asarray(encode(text_params, tokens[i:i + batch_size]), np.float32)
           for i in range(0, len(tokens), batch_size)]
    return np.concatenate(out)


def fingerprint(text_params, tokens: np.ndarray) -> str:
    """sha256 of the encoder's parameters (names, shapes, bytes) and the token table."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(text_params)):
        leaf = np.ascontiguousarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}".encode())
        h.update(leaf.tobytes())
    h.update(np.ascontiguousarray(tokens, np.int32).tobytes())
    return h.hexdigest()


def _read_cache(folder: str, key: str, shape: tuple) -> np.ndarray | None:
    try:
        with open(os.path.join(folder, FINGERPRINT)) as f:
            if json.load(f).get("fingerprint") != key:
                return None
        cached = np.load(os.path.join(folder, EMBEDDINGS), mmap_mode="r")
    except (OSError, ValueError):
        return None
    return cached if cached.shape[:2] == shape and cached.dtype == np.float32 else None


def _write_cache(folder: str, key: str, embeddings: np.ndarray) -> None:
    """Writes the cache into a temporary folder, then renames it into place."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, EMBEDDINGS), "wb") as f:
        np.save(f, embeddings, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(tmp, FINGERPRINT), "w") as f:
        json.dump({"fingerprint": key, "shape": list(embeddings.shape)}, f)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def with_cached_captions(run, state):
    """`run` whose source's batches carry cached caption embeddings (model.text.
    cache_embeddings), or `run` unchanged."""
    if not (isinstance(run.model, TextConditional)
            and run.config.model.text.get("cache_embeddings", False)):
        return run
    tokens = np.asarray(run.source.caption_tokens)
    text_params = state.params["text"]
    key = fingerprint(text_params, tokens)
    folder = os.path.join(run.workdir, CACHE_DIR)
    embeddings = _read_cache(folder, key, tokens.shape)
    if embeddings is None:
        embeddings = encode_captions(run.model, text_params, tokens)
        if jax.process_index() == 0:
            _write_cache(folder, key, embeddings)
        log.info("text cache: encoded %d captions into %s", len(tokens), folder)
    else:
        log.info("text cache: %d caption embeddings from %s", len(tokens), folder)
    return dataclasses.replace(run, source=run.source.with_caption_embeddings(embeddings))
