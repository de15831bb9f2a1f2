"""Stable Diffusion 1.x / 2.x from a diffusers folder, sampled in JAX.

    from diffusion.stable_diffusion import load_stable_diffusion
    sd = load_stable_diffusion("/path/to/stable-diffusion-v1-5")
    images = sd.sample("a photo of an astronaut riding a horse", "blurry",
                       sampler="dpmpp_2m", steps=25, guidance=7.5, seed=0)  # uint8 NHWC

What runs is what diffusers' StableDiffusionPipeline does:
- the prompt and the negative prompt ("" when there is none) are tokenized to 77 tokens
  and encoded by the CLIP text encoder; `clip_skip` = k takes the prompt's features from
  k layers before the last, through the final LayerNorm (diffusers applies it to the
  prompt only, not to the negative prompt, and so do we);
- the unconditional branch of classifier-free guidance is the negative prompt's
  embeddings, and the guided output is out_u + w (out_c - out_u) in the network's own
  parameterisation (eps for SD 1.x, v for SD 2.x-v: the scheduler config's
  prediction_type), both branches in one batched U-Net call; w = 1 runs the conditional
  branch alone (diffusers skips guidance for every w <= 1; here w < 1 extrapolates
  towards the negative prompt);
- the noise schedule and each sampler's options come from the scheduler config
  (`scheduler.setup`); every sampler of `diffusion.samplers` runs;
- the initial latents are N(0, I) [num, H/f, W/f, C] with row i drawn from
  fold_in(key(seed), i) (`samplers.base.per_sample_normal`, the noise the samplers
  themselves draw), so an image depends on the seed, its prompt and its row, not on the
  batch size or the number of devices; `latents` gives them explicitly (NHWC);
- the final latents are divided by the VAE's scaling_factor, decoded, and mapped from
  [-1, 1] to [0, 1] (`generate`, diffusers' output_type="np") or to uint8 (`sample`).

Rows are prompt-major, as in diffusers: prompt p's images are rows p num ... p num +
num - 1. The batch of each sampling call is split over the devices of a data mesh.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import parallel, samplers
from diffusion.convert.clip_text import load_clip_text
from diffusion.convert.diffusers_unet import load_diffusers_unet
from diffusion.convert.diffusers_vae import load_sd_vae
from diffusion.denoiser import Denoiser
from diffusion.models.clip_text import CLIPTextModel
from diffusion.models.unet_sd import UNetSD
from diffusion.models.vae import AutoencoderKL
from diffusion.samplers.base import per_sample_normal, sample_keys
from diffusion.schedules import Schedule
from diffusion.stable_diffusion import scheduler as sched
from diffusion.text.tokenizer import CLIPTokenizer, load_clip_tokenizer

SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)
COMPONENTS = ("unet", "text_encoder", "vae", "tokenizer", "scheduler")

Prompts = str | Sequence[str]


def _as_list(prompts: Prompts, what: str) -> list[str]:
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items or not all(isinstance(p, str) for p in items):
        raise ValueError(f"{what} must be a string or a non-empty list of strings, "
                         f"got {prompts!r}")
    return items


@dataclasses.dataclass(eq=False)
class StableDiffusion:
    """A loaded pipeline: tokenizer, text encoder, U-Net, VAE and noise schedule, with
    their parameters (float32; `dtype` of the modules is the activations')."""
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    text_params: Any
    unet: UNetSD
    unet_params: Any
    vae: AutoencoderKL
    vae_params: Any
    vae_scale: float
    scheduler_config: dict
    schedule: Schedule
    pred_type: str
    text_attention_mask: bool = False  # transformers' config use_attention_mask
    path: str = ""
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    # ---- shapes -------------------------------------------------------------------
    @property
    def vae_factor(self) -> int:
        return self.vae.downsample_factor

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width): the U-Net's sample_size times the VAE's factor (512 for SD
        1.x and SD 2 base, 768 for SD 2 v)."""
        s = self.unet.config.sample_size * self.vae_factor
        return s, s

    def latent_shape(self, height: Optional[int] = None,
                     width: Optional[int] = None) -> tuple[int, int, int]:
        """[h, w, C] of the latents of a height x width image (default_size if None)."""
        dh, dw = self.default_size
        height, width = height or dh, width or dw
        f, g = self.vae_factor, self.vae_factor * self.unet.config.downsample_factor
        if height % g or width % g:
            raise ValueError(f"height and width must be multiples of {g} (VAE factor {f} "
                             f"times the U-Net's {g // f}), got {height}x{width}")
        return height // f, width // f, self.unet.config.in_channels

    def _on_devices(self, name: str, mesh) -> Any:
        """Parameters `name` (text / unet / vae) replicated on the mesh's devices, put
        there once: the converters return host arrays, which jit would otherwise copy
        to the devices at every call (3.4 GB for SD's U-Net)."""
        key = ("params", name, tuple(d.id for d in mesh.devices.flat))
        if key not in self._cache:
            self._cache[key] = jax.device_put(getattr(self, f"{name}_params"),
                                              parallel.replicated(mesh))
        return self._cache[key]

    # ---- text ---------------------------------------------------------------------
    def _encode(self, texts: list[str], clip_skip: Optional[int]) -> jnp.ndarray:
        tokens = self.tokenizer(texts)
        key = ("text", clip_skip, len(texts))
        if key not in self._cache:
            def fn(params, ids, mask):
                out = self.text_encoder.apply({"params": params}, ids, attention_mask=mask,
                                              clip_skip=clip_skip)
                return out.prompt_embeds.astype(jnp.float32)
            self._cache[key] = jax.jit(fn)
        mask = jnp.asarray(tokens.attention_mask) if self.text_attention_mask else None
        params = self._on_devices("text", parallel.make_mesh(jax.devices()[:1]))
        return self._cache[key](params, jnp.asarray(tokens.input_ids), mask)

    def encode_prompts(self, prompt: Prompts, negative_prompt: Optional[Prompts] = None,
                       clip_skip: Optional[int] = None) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(prompt embeddings, negative prompt embeddings), each [P, 77, D], one row per
        prompt. negative_prompt: None (""), one string for all, or one per prompt.
        clip_skip applies to the prompts only (as in diffusers)."""
        prompts = _as_list(prompt, "prompt")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = _as_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            elif len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} "
                                 "prompts: give one, or one per prompt")
        return self._encode(prompts, clip_skip), self._encode(negatives, None)

    # ---- sampling -----------------------------------------------------------------
    def initial_latents(self, num: int, seed: int = 0, height: Optional[int] = None,
                        width: Optional[int] = None) -> np.ndarray:
        """N(0, I) [num, h, w, C]: row i from fold_in(key(seed), i), as the samplers draw
        their start noise, so the rows do not depend on how they are batched."""
        keys = sample_keys(jax.random.key(seed), num)
        return np.asarray(per_sample_normal(keys, self.latent_shape(height, width), 0))

    def _sample_fn(self, name: str, steps: int, setup: sched.SamplerSetup, batch: int,
                   latent_shape: tuple, guided: bool, mesh) -> Any:
        key = ("sample", name, steps, tuple(sorted(setup.options.items())), setup.clip_x0,
               setup.round_timesteps, batch, latent_shape, guided,
               tuple(d.id for d in mesh.devices.flat))
        if key in self._cache:
            return self._cache[key]
        sample = samplers.get_sampler(name)
        unet, schedule = self.unet, self.schedule

        def fn(unet_params, cond, uncond, w, x_T, rng, offset):
            def net(x, c_noise, y):
                del y  # the text arrives through cond / uncond
                t = jnp.round(c_noise) if setup.round_timesteps else c_noise
                if not guided:
                    return unet.apply({"params": unet_params}, x, t, cond)
                out = unet.apply({"params": unet_params}, jnp.concatenate([x, x]),
                                 jnp.concatenate([t, t]), jnp.concatenate([cond, uncond]))
                out_c, out_u = jnp.split(out, 2)
                return out_u + w * (out_c - out_u)
            denoiser = Denoiser(net, schedule, self.pred_type, clip_x0=setup.clip_x0)
            return sample(denoiser, rng, x_T.shape, steps, x_T=x_T, sample_offset=offset,
                          **setup.options)

        rows, rep = parallel.data_sharded(mesh), parallel.replicated(mesh)
        self._cache[key] = jax.jit(fn, in_shardings=(rep, rows, rows, rep, rows, rep, rep),
                                   out_shardings=rows)
        return self._cache[key]

    def sample_latents(self, prompt: Prompts, negative_prompt: Optional[Prompts] = None, *,
                       sampler: str = "dpmpp_2m", steps: int = 25, guidance: float = 7.5,
                       seed: int = 0, num: int = 1, height: Optional[int] = None,
                       width: Optional[int] = None, latents: Optional[np.ndarray] = None,
                       karras: Optional[bool] = None, eta: float = 0.0,
                       clip_skip: Optional[int] = None, batch_size: Optional[int] = None,
                       devices: Optional[Sequence[jax.Device]] = None,
                       **options) -> np.ndarray:
        """The final latents [P num, h, w, C] (unscaled: divide by vae_scale to decode).

        sampler: any name of diffusion.samplers; karras / eta / options: see
        `scheduler.setup` (options override what it derives from the scheduler config).
        latents: the initial noise [P num, h, w, C] (default `initial_latents`).
        batch_size: rows per sampling call (default all), rounded up to a multiple of
        the device count; devices: the mesh (default all devices).
        """
        if num < 1:
            raise ValueError(f"num must be >= 1 image per prompt, got {num}")
        name = samplers.canonical_name(sampler)
        setup = sched.setup(self.scheduler_config, self.schedule, name, karras=karras,
                            eta=eta)
        if options:
            setup = setup._replace(options={**setup.options, **options})
        samplers.check_options(name, setup.options)
        shape = self.latent_shape(height, width)
        cond, uncond = self.encode_prompts(prompt, negative_prompt, clip_skip)
        rows = np.repeat(np.arange(cond.shape[0]), num)  # prompt-major, as diffusers
        n = rows.size
        if latents is None:
            latents = self.initial_latents(n, seed, height, width)
        latents = np.asarray(latents, np.float32)
        if latents.shape != (n,) + shape:
            raise ValueError(f"latents must be [{n}, {', '.join(map(str, shape))}] (prompts "
                             f"x num, NHWC), got {latents.shape}")
        mesh = parallel.make_mesh(devices)
        n_dev = mesh.devices.size
        bs = -(-min(int(batch_size or n), n) // n_dev) * n_dev
        guided = float(guidance) != 1.0
        fn = self._sample_fn(name, int(steps), setup, bs, shape, guided, mesh)
        params, split = self._on_devices("unet", mesh), parallel.data_sharded(mesh)
        rng, out = jax.random.key(seed), []
        for offset in range(0, n, bs):
            idx = np.resize(rows[offset:offset + bs], bs)  # pads the last call
            x_T = np.zeros((bs,) + shape, np.float32)
            x_T[:min(bs, n - offset)] = latents[offset:offset + bs]
            c, u = (jax.device_put(e[idx], split) for e in (cond, uncond))
            x = fn(params, c, u, jnp.float32(guidance), x_T, rng, jnp.int32(offset))
            out.append(parallel.to_host(x))
        return np.concatenate(out)[:n]

    def decode(self, latents: np.ndarray, batch_size: Optional[int] = None,
               devices: Optional[Sequence[jax.Device]] = None) -> np.ndarray:
        """Latents [N, h, w, C] -> images [N, H, W, 3] float in [0, 1]."""
        latents = np.asarray(latents, np.float32)
        mesh = parallel.make_mesh(devices)
        n_dev, n = mesh.devices.size, latents.shape[0]
        bs = -(-min(int(batch_size or n), n) // n_dev) * n_dev
        key = ("decode", bs, latents.shape[1:], tuple(d.id for d in mesh.devices.flat))
        if key not in self._cache:
            def fn(params, z):
                x = self.vae.apply({"params": params}, z / self.vae_scale, method="decode")
                return jnp.clip(x.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)
            rows, rep = parallel.data_sharded(mesh), parallel.replicated(mesh)
            self._cache[key] = jax.jit(fn, in_shardings=(rep, rows), out_shardings=rows)
        out = []
        for offset in range(0, n, bs):
            z = np.zeros((bs,) + latents.shape[1:], np.float32)
            z[:min(bs, n - offset)] = latents[offset:offset + bs]
            out.append(parallel.to_host(self._cache[key](self._on_devices("vae", mesh), z)))
        return np.concatenate(out)[:n]

    def generate(self, prompt: Prompts, negative_prompt: Optional[Prompts] = None,
                 **kwargs) -> np.ndarray:
        """Images [P num, H, W, 3] float in [0, 1] (diffusers' output_type="np");
        keyword arguments as `sample_latents`."""
        latents = self.sample_latents(prompt, negative_prompt, **kwargs)
        return self.decode(latents, kwargs.get("batch_size"), kwargs.get("devices"))

    def sample(self, prompt: Prompts, negative_prompt: Optional[Prompts] = None, *,
               sampler: str = "dpmpp_2m", steps: int = 25, guidance: float = 7.5,
               seed: int = 0, num: int = 1, height: Optional[int] = None,
               width: Optional[int] = None, latents: Optional[np.ndarray] = None,
               karras: Optional[bool] = None, eta: float = 0.0,
               clip_skip: Optional[int] = None, **kwargs) -> np.ndarray:
        """Images [P num, H, W, 3] uint8 (round(255 x), as diffusers' PIL output);
        arguments as `sample_latents`."""
        x = self.generate(prompt, negative_prompt, sampler=sampler, steps=steps,
                          guidance=guidance, seed=seed, num=num, height=height, width=width,
                          latents=latents, karras=karras, eta=eta, clip_skip=clip_skip,
                          **kwargs)
        return np.round(x * 255.0).astype(np.uint8)


def _check_folder(path: str) -> None:
    index = os.path.join(path, "model_index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            cls = json.load(fh).get("_class_name")
        if cls not in SUPPORTED_PIPELINES:
            raise ValueError(f"{path} holds a {cls}; supported: "
                             f"{', '.join(SUPPORTED_PIPELINES)} (SD 1.x / 2.x)")
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise FileNotFoundError(f"{path} is not a diffusers Stable Diffusion folder: no "
                                f"{', '.join(c + '/' for c in missing)} (expected "
                                f"model_index.json and {', '.join(COMPONENTS)})")


def load_stable_diffusion(path: str | os.PathLike, dtype: Any = jnp.float32
                          ) -> StableDiffusion:
    """A diffusers SD 1.x / 2.x folder (model_index.json, unet/, text_encoder/, vae/,
    tokenizer/, scheduler/scheduler_config.json) -> StableDiffusion. dtype: the
    activations of the three networks (parameters stay float32)."""
    path = os.fspath(path)
    _check_folder(path)
    tokenizer = load_clip_tokenizer(os.path.join(path, "tokenizer"))
    text_encoder, text_params = load_clip_text(os.path.join(path, "text_encoder"), dtype)
    with open(os.path.join(path, "text_encoder", "config.json")) as fh:
        text_mask = bool(json.load(fh).get("use_attention_mask", False))
    unet_config, unet_params = load_diffusers_unet(os.path.join(path, "unet"))
    vae, vae_params, vae_scale = load_sd_vae(os.path.join(path, "vae"), dtype=dtype)
    if vae.latent_channels != unet_config.in_channels:
        raise ValueError(f"the VAE has {vae.latent_channels} latent channels, the U-Net "
                         f"takes {unet_config.in_channels}")
    if unet_config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ValueError(f"the U-Net attends to {unet_config.cross_attention_dim}-wide "
                         f"tokens, the text encoder gives {text_encoder.config.hidden_size}")
    config = sched.read_scheduler_config(path)
    return StableDiffusion(
        tokenizer=tokenizer, text_encoder=text_encoder, text_params=text_params,
        unet=UNetSD(unet_config, dtype=dtype), unet_params=unet_params, vae=vae,
        vae_params=vae_params, vae_scale=vae_scale, scheduler_config=config,
        schedule=sched.schedule_from_config(config), pred_type=sched.prediction_type(config),
        text_attention_mask=text_mask, path=path)
