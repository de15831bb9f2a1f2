"""A trained run as a library object: `diffusion.load(workdir, step=None)`.

    import diffusion
    pipe = diffusion.load("runs/default")               # newest checkpoint's EMA params
    x = pipe.sample("dpmpp_2m", steps=20, num=16)       # np.ndarray [16, H, W, C] in [-1, 1]

`load` reads the run's `config.json` (its resolved config, diffusion.config_file)
and the EMA parameters of one finished checkpoint, restored alone by an orbax partial
restore into a target built by shape (`jax.eval_shape`): no optimizer state, raw
parameters, teacher or dataset is read, so a run loads where its training data is not.
With the default step, a newest checkpoint that does not restore is skipped with a
warning (and left in place). `load(..., restore=False)` builds the run by shape only
(`params` are ShapeDtypeStructs; `.restore(step)` reads them later): how a consistency
distillation student holds its teacher.

The image shape comes from config.json, not from the data: `data.image_size` when set,
otherwise the source's own size where its name says it (`fashion_mnist_idx` 28x28x1,
`synthetic:HxWxC`, a latent dataset's small `manifest.json`). A channel count the config
does not tell (`tfds:`, `idx` sources) is the one whose parameter shapes match the
checkpoint's. Where neither works, `load(..., image_shape=(H, W, C))` says it.

Samples are drawn as in training and `--mode sample`: the whole sampler in one jit over
a mesh of all devices, the noise of sample i from fold_in(key(seed), i) (so images do not
depend on the batch size or device count), label i % num_classes by default for a
class-conditional run; a latent run's samples are decoded by its VAE (`latent.*`). A
text-conditional run (model.text) is sampled with prompts, `num` images per prompt,
prompt-major: `pipe.sample(prompt=["a photo of a bag", "a dark sneaker"],
negative_prompt="sneaker", guidance=3.0)`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from diffusion import parallel, samplers, sampling
from diffusion.autoencoder.decode import check_latent_channels, decode_latents
from diffusion.checkpointing import Checkpointer
from diffusion.config_file import read_run_config
from diffusion.convert.diffusers_vae import load_sd_vae
from diffusion.denoiser import Denoiser
from diffusion.models import build_model, init_params
from diffusion.models.text_conditional import TextConditional, encode_prompts, run_tokenizer
from diffusion.objectives import get_objective
from diffusion.schedules import Schedule, make_schedule
from diffusion.text import prompts as text_prompts

log = logging.getLogger(__name__)

# Sources whose images have a fixed size known from the name alone.
_NATIVE_SHAPES = {"fashion_mnist_idx": (28, 28, 1), "fashion_mnist_captions": (28, 28, 1)}
_SYNTHETIC = re.compile(r"synthetic(?::(\d+)x(\d+)x(\d+)(?::\d+)?)?")
_SYNTHETIC_DEFAULT = (32, 32, 3)  # diffusion.data.sources.synthetic_source's default
_LATENT_MANIFEST = "manifest.json"  # diffusion.data.latents.MANIFEST
_CHANNEL_GUESSES = (1, 3, 4, 2)


@dataclasses.dataclass
class Pipeline:
    """The EMA parameters of one checkpoint with everything needed to sample them.

    It carries the attributes an objective's `denoiser(run, params)` reads (config,
    model, schedule, num_classes, image_shape, mesh), so any objective's denoiser works.
    """
    workdir: str
    config: ml_collections.ConfigDict
    step: Optional[int]              # None: not restored yet (params by shape)
    params: Any                      # the EMA parameters, replicated over `mesh`
    model: Any
    schedule: Schedule
    image_shape: tuple               # (H, W, C) the network sees (latents for a latent run)
    num_classes: int
    mesh: Any
    objective: Any
    _fns: dict = dataclasses.field(default_factory=dict, repr=False)
    _vae: Any = dataclasses.field(default=None, repr=False)

    @property
    def denoiser(self) -> Denoiser:
        """The Denoiser (what samplers call) bound to the EMA parameters."""
        return self.objective.denoiser(self, self.params)

    def restore(self, step: Optional[int] = None) -> "Pipeline":
        """This run with the EMA parameters of checkpoint `step` (default: the newest
        finished one that restores; a newer one that fails is skipped with a warning)."""
        steps = finished_steps(self.workdir)
        directory = os.path.join(self.workdir, "checkpoints")
        if not steps:
            raise FileNotFoundError(f"no finished checkpoint in {directory}: train the run "
                                    "first")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no finished checkpoint for step {step} in {directory}; "
                                    f"finished steps: {steps}")
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.params)
        failed = []
        for s in ([step] if step is not None else steps[::-1]):
            try:
                params = _restore_ema(_state_dir(self.workdir, s), abstract)
            except Exception as e:  # noqa: BLE001 - with step=None: try the previous one
                if step is not None:
                    raise
                log.warning("checkpoint %s/%d cannot be restored (%s); trying the previous "
                            "one", directory, s, _first_line(e))
                failed.append((s, e))
                continue
            return dataclasses.replace(self, step=int(s), params=params, _fns={})
        s, e = failed[0]
        raise ValueError(f"no checkpoint in {directory} can be restored; the newest, step "
                         f"{s}, fails with: {_first_line(e)}") from e

    @property
    def is_latent(self) -> bool:
        return str(self.config.data.source).startswith("latents:")

    @property
    def vae(self) -> tuple[Any, Any] | None:
        """(module, params) of the VAE that decodes a latent run's samples, else None:
        a VAE trained here (latent.vae_workdir, loaded by `load`, so without its
        dataset) or diffusers weights (latent.vae_weights). Loaded once."""
        if not self.is_latent:
            return None
        if self._vae is None:
            named = latent_vae_path(self.config.latent)
            if named is None:
                raise ValueError(f"{self.workdir} is a latent run but its config names no "
                                 "VAE: set latent.vae_workdir or latent.vae_weights in "
                                 "pipe.config")
            path, is_workdir = named
            module, params, _ = load_vae(path, is_workdir=is_workdir,
                                         devices=list(self.mesh.devices.flat))
            check_latent_channels(module, self.image_shape[-1], f"{self.workdir}'s samples")
            self._vae = (module, params)
        return self._vae

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Latents [N, h, w, c] as sampled -> images [N, H, W, C] in [-1, 1]."""
        module, params = self.vae
        scale = jnp.float32(_latent_manifest(self.config, self.workdir)["scale_factor"])
        return np.asarray(decode_latents(module, params, jnp.asarray(z), scale))

    def sample(self, sampler: str = "ddim", steps: int = 50, num: int = 16, seed: int = 0,
               guidance: Optional[float] = None, labels: Optional[Sequence[int]] = None,
               batch_size: Optional[int] = None, x_init: Optional[np.ndarray] = None,
               mask: Optional[np.ndarray] = None, prompt=None, negative_prompt=None,
               **sampler_options) -> np.ndarray:
        """`num` images [num, H, W, C] clipped to [-1, 1], as a host array; with
        prompts, `num` per prompt [P num, H, W, C], prompt-major.

        sampler: a name of diffusion.samplers (ddim, dpmpp_2m, heun, ...); options default
        to the run's `sample.*` config and are overridden by `sampler_options`.
        guidance: classifier-free guidance weight (class-conditional runs; default the
        config's sample.guidance_scale). labels: the class of each sample (default
        i % num_classes). batch_size: images per call (default sample.batch_size).
        x_init [M, H, W, C] in [-1, 1]: sample i starts from image i % M (image-to-image
        with strength < 1) or, with mask [1 or M, H, W, 1 or C] (1 = keep), keeps its
        known pixels (inpainting); in the space the network samples.
        prompt: text-conditional runs: a prompt or a list of P prompts (default the empty
        prompt); negative_prompt: one for all or one per prompt, the unconditional branch
        of guidance (default the empty prompt); image i of a prompt gets the noise of
        sample p num + i, so the same seed and prompts give the same images anywhere.
        """
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        if self.step is None:
            raise ValueError(f"{self.workdir} was loaded by shape only (restore=False): "
                             "call .restore() first")
        y = self._labels(labels, num)
        if self.is_text:
            y = self._prompt_rows(prompt, negative_prompt, num)
            num = len(y)
        elif prompt is not None or negative_prompt is not None:
            raise ValueError(f"prompts need a text-conditional run; {self.workdir} is not "
                             "one (model.text.enabled=False)")
        if guidance is None:
            guidance = float(self.config.sample.guidance_scale)
        elif self.num_classes == 0 and not self.is_text and guidance != 1.0:
            raise ValueError(f"guidance={guidance} needs a class-conditional run; "
                             f"{self.workdir} is unconditional (conditioning.num_classes=0)")
        n_dev = self.mesh.devices.size
        bs = min(int(batch_size or self.config.sample.batch_size), num)
        bs = -(-bs // n_dev) * n_dev  # a multiple of the device count
        fn = self._sample_fn(sampler, int(steps), bs, sampler_options)
        key = jax.random.key(seed)
        out = []
        for offset in range(0, num, bs):
            yb = None
            if y is not None:
                yb = np.resize(y[offset:offset + bs],  # pads the last
                               (bs,) + y.shape[1:]).astype(np.int32)
            extra = {}
            if x_init is not None:
                extra["x_init"] = jnp.asarray(sampling.batch_rows(x_init, offset, bs),
                                              jnp.float32)
            if mask is not None:
                extra["mask"] = jnp.asarray(sampling.batch_rows(mask, offset, bs), jnp.float32)
            x = fn(self.params, key, jnp.int32(offset), jnp.float32(guidance), yb, **extra)
            out.append(parallel.to_host(x))
        x = np.concatenate(out)[:num]
        # decode clips; a sampler's last step may overshoot [-1, 1] slightly.
        return self.decode(x) if self.is_latent else np.clip(x, -1.0, 1.0)

    @property
    def is_text(self) -> bool:
        return isinstance(self.model, TextConditional)

    def _prompt_rows(self, prompt, negative_prompt, num: int) -> np.ndarray:
        """int32 [P num, 2, L]: each sample's prompt and negative prompt ids."""
        prompts = text_prompts.as_list(prompt) or [""]
        negatives = text_prompts.negatives_for(negative_prompt, len(prompts))
        tokenizer = run_tokenizer(self.config.model.text)
        pairs = text_prompts.prompt_pairs(tokenizer, prompts, negatives)
        return np.repeat(pairs, num, axis=0)

    def _labels(self, labels, num: int) -> Optional[np.ndarray]:
        if self.num_classes == 0:
            if labels is not None:
                raise ValueError(f"labels need a class-conditional run; {self.workdir} is "
                                 "unconditional (conditioning.num_classes=0)")
            return None
        if labels is None:
            return np.arange(num, dtype=np.int32) % self.num_classes
        y = np.asarray(labels, np.int32).reshape(-1)
        if len(y) != num or y.min() < 0 or y.max() >= self.num_classes:
            raise ValueError(f"labels must be {num} class indices in [0, {self.num_classes}), "
                             f"got {len(y)} in [{y.min()}, {y.max()}]")
        return y

    def _sample_fn(self, sampler: str, steps: int, batch_size: int, overrides: dict):
        """fn(params, key, offset, guidance, y, x_init=None, mask=None) -> x0 [batch, H, W,
        C], jitted once per (sampler, steps, batch, options). Same noise and default labels
        as diffusion.sampling.make_sample_fn, with the labels as an input."""
        name = samplers.canonical_name(sampler)
        options = dict(sampling.sampler_options(self.config.sample, name), **overrides)
        cache_key = (name, steps, batch_size, repr(sorted(options.items())))
        if cache_key not in self._fns:
            sample = samplers.get_sampler(name)
            shape = (batch_size,) + tuple(self.image_shape)

            def fn(params, key, offset, guidance, y, x_init=None, mask=None):
                if self.is_text:  # prompt and negative ids [batch, 2, L], encoded once
                    y = encode_prompts(self.model, params, y)
                w = guidance if y is not None else None
                extra = {k: v for k, v in (("x_init", x_init), ("mask", mask)) if v is not None}
                return sample(self.objective.denoiser(self, params), key, shape, steps, y=y,
                              guidance=w, sample_offset=offset, **extra, **options)
            self._fns[cache_key] = jax.jit(fn, out_shardings=parallel.data_sharded(self.mesh))
        return self._fns[cache_key]


def load(workdir: str, step: Optional[int] = None,
         image_shape: Optional[tuple[int, int, int]] = None, devices=None,
         config: Optional[ml_collections.ConfigDict] = None, restore: bool = True) -> Pipeline:
    """The run in `workdir` at checkpoint `step` (default: the newest finished one that
    restores) as a Pipeline holding its EMA parameters, replicated over `devices`
    (default: all).

    image_shape: (H, W, C) the network was trained on, only for a run whose config.json
    does not tell it (see the module docstring). config: the run's config with other
    sampling keys (sample.*, latent.*; diffusion.train.run_config.sample_config makes
    one), default config.json's. restore=False: by shape only, no checkpoint needed
    where the config tells the image shape (`Pipeline.restore` reads the params).
    """
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"no run directory {workdir}")
    if config is None:
        config = read_run_config(workdir)
    steps = finished_steps(workdir)
    if restore and not steps:
        raise FileNotFoundError(f"no finished checkpoint in {workdir}/checkpoints: train the "
                                "run first")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no finished checkpoint for step {step} in "
                                f"{workdir}/checkpoints; finished steps: {steps}")
    meta = _stored_ema_shapes(workdir, [step] if step is not None else steps[::-1])
    num_classes = int(config.conditioning.num_classes)
    mesh = parallel.make_mesh(devices)
    model, shape = _model_for(config, workdir, num_classes, meta, image_shape)
    abstract = _abstract_params(model, shape, num_classes)
    rep = parallel.replicated(mesh)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                            abstract)
    schedule = make_schedule(config.diffusion.schedule, config.diffusion.T,
                             config.diffusion.zero_terminal_snr)
    pipe = Pipeline(workdir, config, None, abstract, model, schedule, tuple(shape),
                    num_classes, mesh, get_objective(config.train.objective))
    return pipe.restore(step) if restore else pipe


def load_vae_run(workdir: str, step: Optional[int] = None, devices=None) -> Pipeline:
    """`load` for a run of train.objective "vae": .model is its AutoencoderKL, .params
    the EMA parameters (no sampler: it has no denoiser)."""
    run = load(workdir, step, devices=devices)
    if run.config.train.objective != "vae":
        raise ValueError(f"{run.workdir} is a run of train.objective "
                         f"{run.config.train.objective!r}, not a VAE ('vae')")
    return run


def load_vae(path: str, *, is_workdir: Optional[bool] = None,
             devices=None) -> tuple[Any, Any, Optional[float]]:
    """(module, params, scale_factor) of a VAE, its params replicated over `devices`
    (default: all). `path` is the workdir of a train.objective "vae" run (the EMA params
    of its newest checkpoint, by load_vae_run; scale_factor None: it has none of its
    own) or diffusers weights (a folder or weight file, with their scaling_factor).
    is_workdir None: a path with a checkpoints/ folder is a workdir.

    Cached: a run's sample grids, its evaluation and `--mode sample` share one copy
    (a new checkpoint in the VAE's workdir is a new cache entry)."""
    path = os.path.abspath(path)
    ckpts = os.path.join(path, "checkpoints")
    if is_workdir is None:
        is_workdir = os.path.isdir(ckpts)
    stamp = os.path.getmtime(ckpts) if is_workdir and os.path.isdir(ckpts) else 0.0
    devices = tuple(jax.devices() if devices is None else devices)
    return _load_vae_cached(path, bool(is_workdir), devices, stamp)


@functools.lru_cache(maxsize=2)
def _load_vae_cached(path: str, is_workdir: bool, devices: tuple, stamp: float):
    del stamp  # only part of the cache key
    if is_workdir:
        run = load_vae_run(path, devices=list(devices))
        return run.model, run.params, None
    module, params, scale = load_sd_vae(path)
    mesh = parallel.make_mesh(list(devices))
    return module, jax.device_put(params, parallel.replicated(mesh)), scale


def latent_vae_path(latent: ml_collections.ConfigDict) -> Optional[tuple[str, bool]]:
    """(path, is_workdir) of the VAE a config's `latent` section names (latent.vae_workdir:
    a VAE trained here; latent.vae_weights: diffusers weights), None when it names none."""
    workdir, weights = latent.vae_workdir, latent.vae_weights
    if workdir and weights:
        raise ValueError("set only one of latent.vae_workdir and latent.vae_weights")
    if not (workdir or weights):
        return None
    return str(workdir or weights), bool(workdir)


def finished_steps(workdir: str) -> list[int]:
    """The run's finished (committed) checkpoint steps, oldest first."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    ckpt = Checkpointer(directory)  # a reader: creates and deletes nothing
    try:
        return [int(s) for s in ckpt.all_steps()]
    finally:
        ckpt.close()


def _state_dir(workdir: str, step: int) -> str:
    return os.path.join(workdir, "checkpoints", str(step), "state")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _stored_ema_shapes(workdir: str, steps: Sequence[int]) -> Any:
    """The EMA parameter tree as (shape, dtype) leaves, from the metadata of the first
    of `steps` whose metadata reads; None for no steps."""
    error = None
    for step in steps:
        state_dir = _state_dir(workdir, step)
        handler = ocp.PyTreeCheckpointHandler()  # the item alone: no step metadata
        try:
            meta = handler.metadata(epath.Path(state_dir))
        except Exception as e:  # noqa: BLE001 - a damaged step: the previous one may do
            error = error or e
            continue
        finally:
            handler.close()
        tree = getattr(meta, "tree", meta)
        if "ema_params" not in tree:
            raise ValueError(f"checkpoint {state_dir} holds no ema_params (it has "
                             f"{sorted(tree)}): not a training state of this codebase")
        return jax.tree.map(lambda m: (tuple(m.shape), np.dtype(m.dtype)), tree["ema_params"])
    if error is not None:
        raise error
    return None


def _latent_manifest(config: ml_collections.ConfigDict, workdir: str) -> dict:
    path = os.path.join(str(config.data.source)[len("latents:"):], _LATENT_MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{workdir} was trained on latents whose {path} (the latent shape and scale "
            "factor) is missing; copy the latent dataset's manifest.json there")
    with open(path) as f:
        return json.load(f)


def config_image_shape(config: ml_collections.ConfigDict, workdir: str) -> tuple:
    """(H, W, C) of the training images as far as the config tells them; None where not."""
    name = str(config.data.source)
    h = w = c = None
    if name in _NATIVE_SHAPES:
        h, w, c = _NATIVE_SHAPES[name]
    elif _SYNTHETIC.fullmatch(name):
        groups = _SYNTHETIC.fullmatch(name).groups()[:3]
        h, w, c = (tuple(map(int, groups)) if groups[0] else _SYNTHETIC_DEFAULT)
    elif name.startswith("latents:"):
        h, w, c = _latent_manifest(config, workdir)["latent_shape"]
    elif name.startswith("pairs:") and os.path.isfile(name[len("pairs:"):]):
        # a reflow run: the .npy header of its (sample, noise) pairs [N, 2, H, W, C]
        h, w, c = np.load(name[len("pairs:"):], mmap_mode="r").shape[2:]
    if config.data.image_size:
        h = w = int(config.data.image_size)
    return h, w, c


def _abstract_params(model, image_shape: tuple, num_classes: int) -> Any:
    return jax.eval_shape(lambda k: init_params(model, k, image_shape, num_classes),
                          jax.random.key(0))


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), tree)


def _model_for(config, workdir: str, num_classes: int, stored: Any,
               image_shape: Optional[tuple]) -> tuple[Any, tuple]:
    """(model, image shape) whose parameters have the stored shapes (stored None, no
    checkpoint: the one shape the config or `image_shape` tells)."""
    if image_shape is not None:
        candidates = [tuple(int(d) for d in image_shape)]
    else:
        h, w, c = config_image_shape(config, workdir)
        if h is None:
            raise ValueError(
                f"the config.json of {workdir} does not tell the image size: data.image_size "
                f"is 0 (the dataset's own) and data.source {config.data.source!r} names no "
                "size; pass it: diffusion.load(workdir, image_shape=(H, W, C))")
        candidates = [(h, w, c)] if c is not None else [(h, w, k) for k in _CHANNEL_GUESSES]
    learned_sigma = bool(config.diffusion.learned_sigma)
    if stored is None:
        if len(candidates) > 1:
            raise ValueError(
                f"the config.json of {workdir} does not tell the image channels and the run "
                "has no checkpoint to read them from; pass image_shape=(H, W, C)")
        return build_model(config.model, candidates[0], num_classes,
                           learned_sigma), candidates[0]
    for shape in candidates:
        model = build_model(config.model, shape, num_classes, learned_sigma)
        if _shapes(_abstract_params(model, shape, num_classes)) == stored:
            return model, shape
    raise ValueError(
        f"the model of {workdir}'s config.json for images {' or '.join(map(str, candidates))} "
        "does not have the parameter shapes of its checkpoint; pass the trained shape: "
        "diffusion.load(workdir, image_shape=(H, W, C))")


def _restore_ema(state_dir: str, abstract: Any) -> Any:
    """Only the `ema_params` subtree of a checkpoint's state, into abstract's shardings."""
    item = {"ema_params": abstract}
    args = ocp.args.PyTreeRestore(item=item,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.restore(epath.Path(state_dir), args=args)["ema_params"]
    finally:
        handler.close()
