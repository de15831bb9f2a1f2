"""A trained run as a library object: `diffusion.load(workdir, step=None)`.

    import diffusion
    pipe = diffusion.load("runs/default")               # newest checkpoint's EMA params
    x = pipe.sample("dpmpp_2m", steps=20, num=16)       # np.ndarray [16, H, W, C] in [-1, 1]

`load` reads the run's `config.json` (its resolved config, diffusion.train.run_config)
and the EMA parameters of one finished checkpoint, restored alone by an orbax partial
restore into a target built by shape (`jax.eval_shape`): no optimizer state, raw
parameters, teacher or dataset is read, so a run loads where its training data is not.

The image shape comes from config.json, not from the data: `data.image_size` when set,
otherwise the source's own size where its name says it (`fashion_mnist_idx` 28x28x1,
`synthetic:HxWxC`, a latent dataset's small `manifest.json`). A channel count the config
does not tell (`tfds:`, `idx` sources) is the one whose parameter shapes match the
checkpoint's. Where neither works, `load(..., image_shape=(H, W, C))` says it.

Samples are drawn as in training and `--mode sample`: the whole sampler in one jit over
a mesh of all devices, the noise of sample i from fold_in(key(seed), i) (so images do not
depend on the batch size or device count), label i % num_classes by default for a
class-conditional run; a latent run's samples are decoded by its VAE (`latent.*`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from diffusion import parallel, samplers
from diffusion.checkpointing import Checkpointer
from diffusion.denoiser import Denoiser
from diffusion.models import build_model
from diffusion.schedules import Schedule, make_schedule
from diffusion.train import latent_decoding, sampling
from diffusion.train.objectives import get_objective
from diffusion.train.run_config import read_run_config

# Sources whose images have a fixed size known from the name alone.
_NATIVE_SHAPES = {"fashion_mnist_idx": (28, 28, 1)}
_SYNTHETIC = re.compile(r"synthetic(?::(\d+)x(\d+)x(\d+)(?::\d+)?)?")
_SYNTHETIC_DEFAULT = (32, 32, 3)  # diffusion.data.sources.synthetic_source's default
_LATENT_MANIFEST = "manifest.json"  # diffusion.latents.MANIFEST
_CHANNEL_GUESSES = (1, 3, 4, 2)


@dataclasses.dataclass
class Pipeline:
    """The EMA parameters of one checkpoint with everything needed to sample them.

    It carries the attributes an objective's `denoiser(run, params)` reads (config,
    model, schedule, num_classes, image_shape, mesh), so any objective's denoiser works.
    """
    workdir: str
    config: ml_collections.ConfigDict
    step: int
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
            latent, devices = self.config.latent, list(self.mesh.devices.flat)
            if latent.vae_workdir and not latent.vae_weights:
                run = load(latent.vae_workdir, devices=devices)
                if run.config.train.objective != "vae":
                    raise ValueError(f"latent.vae_workdir {run.workdir} is a run of "
                                     f"train.objective {run.config.train.objective!r}, "
                                     "not a VAE ('vae')")
                vae = (run.model, run.params)
            else:  # diffusers weights; both keys set is an error there
                vae = latent_decoding.load_vae(latent, devices)
            if vae is None:
                raise ValueError(f"{self.workdir} is a latent run but its config names no "
                                 "VAE: set latent.vae_workdir or latent.vae_weights in "
                                 "pipe.config")
            if vae[0].latent_channels != self.image_shape[-1]:
                raise ValueError(f"the VAE has {vae[0].latent_channels} latent channels but "
                                 f"{self.workdir} samples {self.image_shape[-1]}")
            self._vae = vae
        return self._vae

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Latents [N, h, w, c] as sampled -> images [N, H, W, C] in [-1, 1]."""
        module, params = self.vae
        scale = jnp.float32(_latent_manifest(self.config, self.workdir)["scale_factor"])
        return np.asarray(latent_decoding.decode_latents(module, params, jnp.asarray(z), scale))

    def sample(self, sampler: str = "ddim", steps: int = 50, num: int = 16, seed: int = 0,
               guidance: Optional[float] = None, labels: Optional[Sequence[int]] = None,
               batch_size: Optional[int] = None, **sampler_options) -> np.ndarray:
        """`num` images [num, H, W, C] clipped to [-1, 1], as a host array.

        sampler: a name of diffusion.samplers (ddim, dpmpp_2m, heun, ...); options default
        to the run's `sample.*` config and are overridden by `sampler_options`.
        guidance: classifier-free guidance weight (class-conditional runs; default the
        config's sample.guidance_scale). labels: the class of each sample (default
        i % num_classes). batch_size: images per call (default sample.batch_size).
        """
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        y = self._labels(labels, num)
        if guidance is None:
            guidance = float(self.config.sample.guidance_scale)
        elif self.num_classes == 0 and guidance != 1.0:
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
                yb = np.resize(y[offset:offset + bs], bs).astype(np.int32)  # pads the last
            x = fn(self.params, key, jnp.int32(offset), jnp.float32(guidance), yb)
            out.append(parallel.to_host(x))
        x = np.concatenate(out)[:num]
        # decode clips; a sampler's last step may overshoot [-1, 1] slightly.
        return self.decode(x) if self.is_latent else np.clip(x, -1.0, 1.0)

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
        """fn(params, key, offset, guidance, y) -> x0 [batch, H, W, C], jitted once per
        (sampler, steps, batch, options). Same noise and default labels as
        diffusion.train.sampling.make_sample_fn, with the labels as an input."""
        name = samplers.canonical_name(sampler)
        options = dict(sampling.sampler_options(self.config.sample, name), **overrides)
        cache_key = (name, steps, batch_size, repr(sorted(options.items())))
        if cache_key not in self._fns:
            sample = samplers.get_sampler(name)
            shape = (batch_size,) + tuple(self.image_shape)

            def fn(params, key, offset, guidance, y):
                w = guidance if y is not None else None
                return sample(self.objective.denoiser(self, params), key, shape, steps, y=y,
                              guidance=w, sample_offset=offset, **options)
            self._fns[cache_key] = jax.jit(fn, out_shardings=parallel.data_sharded(self.mesh))
        return self._fns[cache_key]


def load(workdir: str, step: Optional[int] = None,
         image_shape: Optional[tuple[int, int, int]] = None, devices=None) -> Pipeline:
    """The run in `workdir` at checkpoint `step` (default: the newest finished one) as a
    Pipeline holding its EMA parameters, replicated over `devices` (default: all).

    image_shape: (H, W, C) the network was trained on, only for a run whose config.json
    does not tell it (see the module docstring).
    """
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"no run directory {workdir}")
    config = read_run_config(workdir)
    step, state_dir = _checkpoint(workdir, step)
    meta = _stored_ema_shapes(state_dir)
    num_classes = int(config.conditioning.num_classes)
    mesh = parallel.make_mesh(devices)
    model, shape = _model_for(config, workdir, num_classes, meta, image_shape)
    abstract = _abstract_params(model, shape, num_classes)
    rep = parallel.replicated(mesh)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                            abstract)
    params = _restore_ema(state_dir, abstract)
    schedule = make_schedule(config.diffusion.schedule, config.diffusion.T,
                             config.diffusion.zero_terminal_snr)
    return Pipeline(workdir, config, step, params, model, schedule, tuple(shape), num_classes,
                    mesh, get_objective(config.train.objective))


def _checkpoint(workdir: str, step: Optional[int]) -> tuple[int, str]:
    """(step, its state directory); only finished (committed) checkpoints count."""
    directory = os.path.join(workdir, "checkpoints")
    steps = []
    if os.path.isdir(directory):
        ckpt = Checkpointer(directory)  # a reader: creates and deletes nothing
        try:
            steps = ckpt.all_steps()
        finally:
            ckpt.close()
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {directory}: train the run first")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no finished checkpoint for step {step} in {directory}; "
                                f"finished steps: {steps}")
    return int(step), os.path.join(directory, str(step), "state")


def _stored_ema_shapes(state_dir: str) -> Any:
    """The checkpoint's EMA parameter tree as (shape, dtype) leaves, from its metadata."""
    handler = ocp.PyTreeCheckpointHandler()  # the item alone: no step metadata to look up
    try:
        meta = handler.metadata(epath.Path(state_dir))
    finally:
        handler.close()
    tree = getattr(meta, "tree", meta)
    if "ema_params" not in tree:
        raise ValueError(f"checkpoint {state_dir} holds no ema_params (it has "
                         f"{sorted(tree)}): not a training state of this codebase")
    return jax.tree.map(lambda m: (tuple(m.shape), np.dtype(m.dtype)), tree["ema_params"])


def _latent_manifest(config: ml_collections.ConfigDict, workdir: str) -> dict:
    path = os.path.join(str(config.data.source)[len("latents:"):], _LATENT_MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{workdir} was trained on latents whose {path} (the latent shape and scale "
            "factor) is missing; copy the latent dataset's manifest.json there")
    with open(path) as f:
        return json.load(f)


def _source_shape(config: ml_collections.ConfigDict, workdir: str) -> tuple:
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
    if config.data.image_size:
        h = w = int(config.data.image_size)
    return h, w, c


def _abstract_params(model, image_shape: tuple, num_classes: int) -> Any:
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if num_classes > 0 else None
    init = lambda k, x, t, y: model.init({"params": k}, x, t, y, train=False)["params"]
    return jax.eval_shape(init, jax.random.key(0), x, t, y)


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), tree)


def _model_for(config, workdir: str, num_classes: int, stored: Any,
               image_shape: Optional[tuple]) -> tuple[Any, tuple]:
    """(model, image shape) whose parameters have the stored shapes."""
    if image_shape is not None:
        candidates = [tuple(int(d) for d in image_shape)]
    else:
        h, w, c = _source_shape(config, workdir)
        if h is None:
            raise ValueError(
                f"the config.json of {workdir} does not tell the image size: data.image_size "
                f"is 0 (the dataset's own) and data.source {config.data.source!r} names no "
                "size; pass it: diffusion.load(workdir, image_shape=(H, W, C))")
        candidates = [(h, w, c)] if c is not None else [(h, w, k) for k in _CHANNEL_GUESSES]
    learned_sigma = bool(config.diffusion.learned_sigma)
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
