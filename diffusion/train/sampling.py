"""Drawing samples from a model inside or outside training.

`make_sample_fn` compiles one whole sampling loop (any sampler in the registry) as a
function of (params, key, sample_offset, guidance); sample i of a call gets its noise
from fold_in(key, sample_offset + i), so images do not depend on the batch size or
the number of devices, and a new guidance weight never recompiles.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import parallel, samplers
from diffusion.denoiser import Denoiser


def sampler_options(sample: ml_collections.ConfigDict, name: str) -> dict:
    """The options of the config's `sample` section that sampler `name` takes.

    Keys newer than a config fall back to the samplers' defaults (`sample.get`), and
    sigma_min / sigma_max of 0 mean "the sampler's default".
    """
    name = samplers.canonical_name(name)
    get = sample.get
    options = {}
    if name in ("ddpm", "ddim", "plms", "euler", "heun", "euler_a"):
        options["spacing"] = sample.spacing
    if name == "ddim":
        options["eta"] = sample.eta
    if name == "ddpm":
        options["variance"] = sample.variance
    if name == "plms":
        options["warmup"] = get("plms_warmup", "pseudo_euler")
    if name.startswith("dpm"):
        options["skip_type"] = get("skip_type", "logSNR")
        options["denoise_to_zero"] = bool(get("denoise_to_zero", False))
        if name in ("dpmpp_2m", "dpmpp_3m"):
            options["lower_order_final"] = bool(get("lower_order_final", True))
    if name in ("euler", "heun", "euler_a", "consistency"):
        for key in ("sigma_min", "sigma_max"):
            if get(key, 0.0) > 0:
                options[key] = float(get(key, 0.0))
        options["rho"] = float(get("rho", 7.0))
    if name in ("euler", "heun", "euler_a"):
        options["sigma_schedule"] = get("sigma_schedule", "karras")
        options["S_noise"] = float(get("s_noise", 1.0))
    if name in ("euler", "heun"):
        options["S_churn"] = float(get("s_churn", 0.0))
        options["S_tmin"] = float(get("s_tmin", 0.0))
        options["S_tmax"] = float(get("s_tmax", float("inf")))
    if name == "euler_a":
        options["eta"] = float(get("ancestral_eta", 1.0))
    if name == "consistency":
        sigmas = tuple(get("consistency_sigmas", ()))
        options["sigmas"] = sigmas if sigmas else None
    return options


def make_sample_fn(denoiser_fn: Callable[..., Denoiser], *, image_shape: tuple,
                   num_classes: int, sampler: str, num_steps: int, batch_size: int, mesh,
                   options: dict) -> Callable:
    """Returns a jitted fn(params, key, sample_offset, guidance) -> x0 [batch, H, W, C].

    denoiser_fn(params) -> Denoiser (see diffusion.train.objectives).

    Class-conditional models sample label (offset + i) % num_classes for sample i, with
    classifier-free guidance weight `guidance` (1 = purely conditional).
    """
    sample = samplers.get_sampler(sampler)
    parallel.check_batch_divisible(batch_size, mesh, "sample batch size")
    shape = (batch_size,) + tuple(image_shape)

    def fn(params, key, sample_offset, guidance):
        denoiser = denoiser_fn(params)
        y, w = None, None
        if num_classes > 0:
            y = (sample_offset + jnp.arange(batch_size, dtype=jnp.int32)) % num_classes
            w = guidance
        return sample(denoiser, key, shape, num_steps, y=y, guidance=w,
                      sample_offset=sample_offset, **options)

    return jax.jit(fn, out_shardings=parallel.data_sharded(mesh))


def generate(sample_fn: Callable, params, key: jax.Array, num_samples: int, batch_size: int,
             guidance: float = 1.0) -> np.ndarray:
    """Draws num_samples images [N, H, W, C] in batches; on the host, on every process.

    batch_size must be the batch `sample_fn` was built for: sample i of the call at
    offset o is sample o + i of the whole set."""
    out = []
    for offset in range(0, num_samples, batch_size):
        x = sample_fn(params, key, jnp.int32(offset), jnp.float32(guidance))
        out.append(parallel.to_host(x))
    return np.concatenate(out)[:num_samples]
