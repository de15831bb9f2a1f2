"""Research fidelity (issue 9): silent numerical and parameterisation errors.

Each test pins a quantity that used to be wrong without any error: float32 posterior
coefficients, the training VLB of an exact model, and (see tests/test_guidance.py)
classifier-free guidance at alpha = 0.
"""
import numpy as np
import jax.numpy as jnp

from diffusion.forward_process import posterior_coefficients
from diffusion.schedules import make_schedule


def _posterior_float64(alpha_bar: np.ndarray, i: int):
    """(c_x0, c_xt, var) of q(x_{i-1} | x_i, x0) in float64; alpha_bar_{-1} = 1."""
    ab_t = alpha_bar[i]
    ab_s = alpha_bar[i - 1] if i > 0 else 1.0
    beta = 1.0 - ab_t / ab_s
    c_x0 = np.sqrt(ab_s) * beta / (1.0 - ab_t)
    c_xt = np.sqrt(ab_t / ab_s) * (1.0 - ab_s) / (1.0 - ab_t)
    var = (1.0 - ab_s) / (1.0 - ab_t) * beta
    return c_x0, c_xt, var


def test_posterior_coefficients_match_float64_at_the_first_steps():
    # 1 - exp(log ab) in float32 loses ~4 digits where ab is near 1 (var was 1.7e-4 off).
    sched = make_schedule("linear", 1000)
    for i in (0, 1, 2, 10):
        s, t = sched.t_of_index(jnp.array([i - 1])), sched.t_of_index(jnp.array([i]))
        got = [float(np.asarray(a)[0]) for a in posterior_coefficients(sched, s, t)]
        want = _posterior_float64(sched.alpha_bar_table, i)
        for name, g, w in zip(("c_x0", "c_xt", "var"), got, want):
            assert abs(g - w) <= 2e-6 * abs(w) + 1e-12, (i, name, g, w, abs(g - w) / max(abs(w), 1e-30))
