"""EDM and consistency models (CD, CT, iCT) as training objectives.

    edm         preconditioning D = c_skip x + c_out F(c_in x, t_net) and the EDM loss
    bridge      a sigma-space denoiser as the samplers' VP Denoiser, and back
    losses      curricula N(k), mu(k), pair sampling, distances, PF-ODE steps
    step        the pure train steps (EDM, consistency)
    config      the `consistency` config section and what it builds
    objectives  registers "edm", "consistency_training", "consistency_distillation"
                in diffusion.train.objectives (imported lazily from there)
"""
