"""Drawing samples from a model inside or outside training.

`sampler_options` turns a config's `sample` section into one sampler's options (for
training, `--mode sample` and `diffusion.load` alike). `make_sample_fn` compiles one
whole sampling loop (any sampler in the registry) as a function of (params, key,
sample_offset, guidance); sample i of a call gets its noise
from fold_in(key, sample_offset + i), so images do not depend on the batch size or
the number of devices, and a new guidance weight never recompiles.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import parallel, samplers
from diffusion.denoiser import Denoiser
from diffusion.config_file import ConfigError
from diffusion.models.text_conditional import TextConditional, encode_prompts, run_tokenizer
from diffusion.text import prompts as text_prompts


# The sample section's keys from before `sample.options`, kept working: config key ->
# (sampler option, conversion). Which keys reach which sampler is the sampler's own
# declaration (samplers.REGISTRY[name].config_keys); a key that an older config lacks is
# left to the sampler's default. New options need no row: `sample.options` passes them.
_SECTION_KEYS = {
    "spacing": ("spacing", str),
    "eta": ("eta", float),
    "ancestral_eta": ("eta", float),
    "variance": ("variance", str),
    "plms_warmup": ("warmup", str),
    "skip_type": ("skip_type", str),
    "denoise_to_zero": ("denoise_to_zero", bool),
    "lower_order_final": ("lower_order_final", bool),
    "sigma_schedule": ("sigma_schedule", str),
    "sigma_min": ("sigma_min", float),  # 0 = the sampler's default
    "sigma_max": ("sigma_max", float),
    "rho": ("rho", float),
    "s_noise": ("S_noise", float),
    "s_churn": ("S_churn", float),
    "s_tmin": ("S_tmin", float),
    "s_tmax": ("S_tmax", float),
    "consistency_sigmas": ("sigmas", lambda v: tuple(v) or None),
}
_ZERO_IS_DEFAULT = ("sigma_min", "sigma_max")


def _free_form(text: str, name: str) -> dict:
    """`sample.options` for sampler `name`: "k=v,..."; a key written "sampler.k" (e.g.
    "dpmpp_2m.final_step=zero") applies to that sampler only, so one config can carry
    the options of sample.sampler and eval.sampler."""
    out = {}
    for key, value in samplers.parse_options(text).items():
        scope, dot, option = key.rpartition(".")
        if dot and samplers.canonical_name(scope) != name:
            continue
        out[option] = value
    return out


def sampler_options(sample: ml_collections.ConfigDict, name: str) -> dict:
    """The options sampler `name` runs with, from the config's `sample` section: the
    older keys its registry entry reads (`config_keys`, mapped by _SECTION_KEYS),
    `sample.strength` when < 1 (image-to-image), `sample.inpaint_resample` when > 0
    (RePaint rounds; DDPM, DDIM), then the free-form `sample.options`
    ("steps_offset=1,final_step=zero"; see `samplers.parse_options`). Raises a
    ConfigError naming any option the sampler does not take (`samplers.check_options`),
    before anything is compiled.
    """
    name = samplers.canonical_name(name)
    options = {}
    for key in samplers.REGISTRY[name].config_keys:
        if key not in sample or (key in _ZERO_IS_DEFAULT and not sample[key] > 0):
            continue
        option, convert = _SECTION_KEYS[key]
        options[option] = convert(sample[key])
    strength = float(sample.get("strength", 1.0))
    if strength != 1.0:
        options["strength"] = strength
    # Passed to any sampler when set, so one that cannot resample says so.
    if int(sample.get("inpaint_resample", 0)) > 0:
        options["inpaint_resample"] = int(sample.inpaint_resample)
    try:
        options.update(_free_form(sample.get("options", ""), name))
        samplers.check_options(name, options)
    except ValueError as e:  # a config error: launch.py prints it and exits 2
        raise ConfigError(f"sample.options={sample.get('options', '')!r}: {e}") from None
    return options


def make_sample_fn(denoiser_fn: Callable[..., Denoiser], *, image_shape: tuple,
                   num_classes: int, sampler: str, num_steps: int, batch_size: int, mesh,
                   options: dict, prompt_tokens: Optional[np.ndarray] = None,
                   encode_fn: Optional[Callable] = None) -> Callable:
    """Returns a jitted fn(params, key, sample_offset, guidance, x_init=None, mask=None)
    -> x0 [batch, H, W, C].

    denoiser_fn(params) -> Denoiser (see diffusion.objectives).

    Class-conditional models sample label (offset + i) % num_classes for sample i, with
    classifier-free guidance weight `guidance` (1 = purely conditional). A text model
    samples prompt (offset + i) % P of prompt_tokens int32 [P, 2, L] (prompt and
    negative prompt ids; diffusion.text.prompts.prompt_pairs), which
    encode_fn(params, tokens [batch, 2, L]) turns into the Denoiser's condition y, once
    per call; guided from the negative prompt with weight `guidance`. x_init [batch,
    H, W, C] (image-to-image with options["strength"] < 1, or the known image) and mask
    [1 or batch, H, W, 1 or C] (inpainting, 1 = keep) are optional.
    """
    sample = samplers.get_sampler(sampler)
    parallel.check_batch_divisible(batch_size, mesh, "sample batch size")
    shape = (batch_size,) + tuple(image_shape)

    def fn(params, key, sample_offset, guidance, x_init=None, mask=None):
        denoiser = denoiser_fn(params)
        y, w = None, None
        if num_classes > 0:
            y = (sample_offset + jnp.arange(batch_size, dtype=jnp.int32)) % num_classes
            w = guidance
        if prompt_tokens is not None:
            rows = (sample_offset + jnp.arange(batch_size)) % len(prompt_tokens)
            y, w = encode_fn(params, jnp.asarray(prompt_tokens)[rows]), guidance
        extra = {}
        if x_init is not None:
            extra["x_init"] = x_init
        if mask is not None:
            extra["mask"] = mask
        return sample(denoiser, key, shape, num_steps, y=y, guidance=w,
                      sample_offset=sample_offset, **extra, **options)

    return jax.jit(fn, out_shardings=parallel.data_sharded(mesh))


def config_prompts(sample: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
    """(prompts, one negative prompt each) of a config's sample section for a
    text-conditional run: sample.prompt ("|"-separated) or sample.prompts_file, the
    empty prompt when neither is set; sample.negative_prompt ("" = the empty prompt)."""
    try:
        prompts = text_prompts.prompts_from(sample.get("prompt", ""),
                                            sample.get("prompts_file", "")) or [""]
        return prompts, text_prompts.negatives_for(sample.get("negative_prompt", ""),
                                                   len(prompts))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def prompt_inputs(model, config: ml_collections.ConfigDict) -> dict:
    """make_sample_fn's prompt_tokens and encode_fn for a text-conditional `model`
    (the prompts of config.sample, tokenized as model.text.tokenizer says); {} for any
    other model."""
    if not isinstance(model, TextConditional):
        return {}
    prompts, negatives = config_prompts(config.sample)
    tokenizer = run_tokenizer(config.model.text)
    return dict(prompt_tokens=text_prompts.prompt_pairs(tokenizer, prompts, negatives),
                encode_fn=lambda params, tokens: encode_prompts(model, params, tokens))


def batch_rows(a: Optional[np.ndarray], offset: int, batch_size: int) -> Optional[np.ndarray]:
    """Rows (offset + i) % N, i < batch_size, of a [N, ...] array (sample i's image);
    a single row [1, ...] (one mask for all) or None as it is."""
    if a is None or a.shape[0] == 1:
        return a
    return a[(offset + np.arange(batch_size)) % a.shape[0]]


def generate(sample_fn: Callable, params, key: jax.Array, num_samples: int, batch_size: int,
             guidance: float = 1.0, *, x_init: Optional[np.ndarray] = None,
             mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Draws num_samples images [N, H, W, C] in batches; on the host, on every process.

    batch_size must be the batch `sample_fn` was built for: sample i of the call at
    offset o is sample o + i of the whole set. x_init [M, H, W, C]: sample i starts from
    (or, with a mask, keeps the known pixels of) image i % M; mask [1 or M, ...]."""
    out = []
    for offset in range(0, num_samples, batch_size):
        extra = {}
        if x_init is not None:
            extra["x_init"] = jnp.asarray(batch_rows(x_init, offset, batch_size), jnp.float32)
        if mask is not None:
            extra["mask"] = jnp.asarray(batch_rows(mask, offset, batch_size), jnp.float32)
        x = sample_fn(params, key, jnp.int32(offset), jnp.float32(guidance), **extra)
        out.append(parallel.to_host(x))
    return np.concatenate(out)[:num_samples]
