"""A JAX/Flax research codebase for diffusion models.

Subpackages: `models` (U-Net, DiT, VAE), `samplers` (DDPM, DDIM, ...), `train`
(state, train step, loop), `data`, `evaluation`. The diffusion math lives in plain
`jnp` modules at this level: `schedules`, `forward_process`, `targets`, `losses`.

`diffusion.load(workdir)` returns a trained run as a `diffusion.pretrained.Pipeline`:
`diffusion.load("runs/default").sample("ddim", steps=50, num=16)`.
"""


def __getattr__(name: str):
    # `diffusion.load` imports JAX, the models, the samplers and orbax (seconds): only
    # when it is first used, so that `import diffusion` stays light.
    if name == "load":
        from diffusion.pretrained import load
        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
