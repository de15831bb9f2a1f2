"""Analytic ground truth for samplers: Gaussian mixtures with exact noised marginals.

    from diffusion.analytic import exact_denoiser, make_problem
    problem = make_problem("gmm2d")
    denoiser = exact_denoiser(problem.gmm, schedule)      # a diffusion.denoiser.Denoiser

gmm: mixtures (full or low-rank-plus-isotropic covariances), exact posterior and score.
exact: exact denoiser and velocity on any Gaussian path (VP, VE, flow); closed-form
    flow map and consistency function of one Gaussian; exact consistency model of any
    mixture; RK4 reference solves of the flow ODE (in sigma, or in t for the velocity).
metrics: log-likelihood, mode weights, sliced Wasserstein, RMSE, convergence order.
end_time: where a sampler stops (t = 0 or a trained time such as 1/T).
problems: named benchmark mixtures.
"""
from diffusion.analytic.end_time import format_end_time, sampler_end_time
from diffusion.analytic.exact import (exact_consistency_denoiser, exact_consistency_function,
                                      exact_denoiser, exact_flow_map, exact_path_flow_map,
                                      exact_velocity, reference_ode_solve,
                                      velocity_ode_solve, vp_reference_solve)
from diffusion.analytic.gmm import (GaussianMixture, component_log_probs, from_covariances,
                                    from_low_rank, log_prob, posterior, responsibilities,
                                    sample, score)
from diffusion.analytic.problems import PROBLEMS, Problem, make_problem

__all__ = [
    "GaussianMixture", "PROBLEMS", "Problem", "component_log_probs",
    "exact_consistency_denoiser", "exact_consistency_function", "exact_denoiser",
    "exact_flow_map", "exact_path_flow_map", "exact_velocity", "format_end_time", "from_covariances", "from_low_rank", "log_prob",
    "make_problem", "posterior", "reference_ode_solve", "responsibilities", "sample",
    "sampler_end_time", "score", "velocity_ode_solve", "vp_reference_solve",
]
