"""A JAX/Flax research codebase for diffusion models.

Subpackages: `models` (U-Net, DiT, VAE), `samplers` (DDPM, DDIM, ...), `train`
(state, train step, loop), `data`, `evaluation`. The diffusion math lives in plain
`jnp` modules at this level: `schedules`, `forward_process`, `targets`, `losses`.
"""
