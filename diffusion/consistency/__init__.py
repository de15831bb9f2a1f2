"""The math of EDM and consistency models (CD, CT, iCT), plain jnp:

    edm      preconditioning D = c_skip x + c_out F(c_in x, t_net) and the EDM loss
    bridge   a sigma-space denoiser as the samplers' VP Denoiser, and back
    losses   curricula N(k), mu(k), pair sampling, distances, PF-ODE steps, and
             ConsistencySpec (one objective's choices of them)

Their train steps and the `consistency` config section are objectives
(diffusion.objectives.edm, .consistency, .consistency_config).
"""
