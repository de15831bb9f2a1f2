"""Training objectives: what a train step optimises, looked up by `train.objective`.

An Objective bundles
  make_step(run)             -> train_step(state, batch) -> (state, metrics), pure;
  init_aux(run, state)       -> state with `aux` filled (traced under eval_shape/jit);
  prepare(run, state)        -> state, on the host after a fresh init (e.g. load a
                                teacher into aux; not called when resuming);
  denoiser(run, params)      -> the Denoiser that samplers call.
Plain diffusion is registered here; other objectives (EDM, consistency models) register
themselves in OBJECTIVES from their own modules.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from diffusion.denoiser import Denoiser
from diffusion.samplers.options import with_dynamic_thresholding
from diffusion.train.step import make_train_step


class Objective(NamedTuple):
    """See the module docstring. visualize(run, state) -> {tag: images}, optional:
    when set, the loop writes its images (uint8 grids [H, W, C], or [N, H, W, C] that
    it tiles) instead of sample grids, e.g. an autoencoder's reconstructions."""
    make_step: Callable
    init_aux: Callable
    prepare: Callable
    denoiser: Callable
    visualize: Callable | None = None


def _diffusion_step(run):
    c = run.config
    return make_train_step(
        run.model, run.schedule, run.tx, run.lr_fn, pred_type=c.diffusion.pred_type,
        weighting=c.diffusion.weighting, min_snr_gamma=c.diffusion.min_snr_gamma,
        time_sampling=c.diffusion.time_sampling, discrete_time=c.diffusion.discrete_time,
        learned_sigma=c.diffusion.learned_sigma, vlb_weight=c.diffusion.vlb_weight,
        num_classes=run.num_classes, label_dropout=c.conditioning.label_dropout,
        ema_rate=c.ema.decay, ema_warmup=c.ema.warmup)


def diffusion_denoiser(run, params) -> Denoiser:
    """The denoiser of a network trained by the plain diffusion objective."""
    c = run.config

    def net_fn(x, c_noise, y):
        return run.model.apply({"params": params}, x, c_noise, y, train=False)
    clip = c.sample.clip_x0 if c.sample.clip_x0 > 0 else None
    # Official DiT guides 3 of its 4 latent channels (sample.guidance_channels=3).
    channels = int(c.sample.get("guidance_channels", 0))
    if channels < 0:
        raise ValueError(f"sample.guidance_channels must be >= 0 (0 = all channels), "
                         f"got {channels}")
    denoiser = Denoiser(net_fn, run.schedule, c.diffusion.pred_type,
                        c.diffusion.learned_sigma, clip, channels or None)
    if c.sample.dynamic_threshold > 0:
        denoiser = with_dynamic_thresholding(denoiser, c.sample.dynamic_threshold)
    return denoiser


def _identity(run, state):
    return state


OBJECTIVES: dict[str, Objective] = {
    "diffusion": Objective(_diffusion_step, _identity, _identity, diffusion_denoiser),
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        _register_optional()
    if name not in OBJECTIVES:
        raise ValueError(f"unknown train.objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def _register_optional() -> None:
    """Imports the modules that register further objectives (kept explicit here)."""
    import diffusion.consistency.objectives  # noqa: F401  (registers on import)
    import diffusion.train.vae_objective  # noqa: F401  (registers "vae" on import)
