"""DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2022b).

Both integrate the probability-flow ODE in lam = logsnr / 2 = log(alpha / sigma), where
its linear part is exact: from s to t, h = lam_t - lam_s,

    eps form (DPM-Solver):    x_t = alpha_t / alpha_s x_s - alpha_t int e^{-lam} eps(lam)
    data form (DPM-Solver++): x_t = sigma_t / sigma_s x_s + sigma_t int e^{lam} x0(lam)

and the integrals are approximated from Taylor expansions of eps or x0 in lam.

Grid (`skip_type`): num_steps + 1 times from t_T = 1 to t_0 = 1/T (the schedule's first
trained step; on any Gaussian path from its t_max to its t_min, where lam is finite:
1 - 1/T and 1/T on the flow path), uniform in lam ("logSNR", default), in t ("time_uniform") or in sqrt(t)
("time_quadratic"). The result is x at t_0 (the papers' default; its noise level is
sigma(1/T), 0.01 for DDPM's linear schedule), or with `denoise_to_zero` the model's x0
there, at one more evaluation. t_T = 1 is the last trained step: lam = -8.3 for a
zero-terminal-SNR schedule (its alpha_bar is floored at 2^-24, as in diffusers), -5.0 for
DDPM's linear one, -9.9 for cosine, so a uniform-in-lam grid spends no steps in noise no
model distinguishes from pure noise.

diffusers' DPMSolverMultistepScheduler grids, as skip_type values: "linspace",
"leading" (with steps_offset), "trailing" (its timestep_spacing: N discrete steps, see
`grids.dpm_discrete_indices`), and "karras" (use_karras_sigmas: N levels of Karras et
al.'s eq. 5 between sigma_min and sigma_max, by default as for the Karras samplers,
sigma_ve(1/T) and min(80, sigma_ve(1)); diffusers starts at the trained maximum, so pass
sigma_max=grids.ve_sigma_range(schedule)[1] to match it where that exceeds 80). Each is
followed by the final level, `final_step`: "sigma_min" (t = 1/T; diffusers'
final_sigmas_type="sigma_min") or "zero" (t = 0: the last step is first order and returns
the model's x0 at the last evaluation, no extra evaluation; diffusers' default). For the
lam-uniform grids, "zero" moves t_0 to 0. The network is evaluated at the exact time of
each level (a fractional c_noise on the Karras grid, where diffusers rounds the
timestep it feeds the network: the same for an exact model, within half a step of the
noise conditioning for a trained one).

num_steps counts solver steps (grid intervals):
  dpm_solver_{1,2,3}  singlestep, eps form, order k: k evaluations a step, NFE = k N.
                      dpm_solver_1 is DDIM on this grid.
  dpmpp_2s            singlestep second order, data form: NFE = 2 N.
  dpmpp_2m, dpmpp_3m  multistep, data form, reusing the last 1 or 2 steps' x0: NFE = N.
                      The first steps use orders 1, 2, ... until enough history exists;
                      with `lower_order_final` and N < lower_order_final_below (10, the
                      reference code's rule; diffusers uses 15), the last steps drop to
                      orders 2 and 1, which stabilises few-step runs.
                      dpmpp3m_coef: "derived" (ours, measured third order) or "diffusers"
                      (its 3M weight of D2, half ours; see `_multistep_update`).
(+1 with denoise_to_zero.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.denoiser import Denoiser
from diffusion.samplers import grids
from diffusion.samplers.base import SampleInputs
from diffusion.samplers.plan import Form, Plan, run_plan


def _coeffs(schedule, t):
    t = float(t)
    return (float(grids.alpha(schedule, t)), float(grids.sigma(schedule, t)),
            float(grids.lam(schedule, t)))


SKIP_TYPES = grids.SKIP_TYPES + grids.DPM_SPACINGS + ("karras",)
FINAL_STEPS = ("sigma_min", "zero")
DPMPP3M_COEFS = {"derived": 2.0, "diffusers": 1.0}


def _times(schedule, num_steps, skip_type, strength, *, final_step="sigma_min",
           steps_offset=0, sigma_min=None, sigma_max=None, rho=7.0):
    """num_steps + 1 descending times; see the module docstring."""
    if final_step not in FINAL_STEPS:
        raise ValueError(f"unknown final_step {final_step!r}; known: {FINAL_STEPS}")
    if steps_offset and skip_type != "leading":
        raise ValueError(f"steps_offset={steps_offset} applies to skip_type='leading' only")
    if (sigma_min is not None or sigma_max is not None) and skip_type != "karras":
        raise ValueError("sigma_min / sigma_max apply to skip_type='karras' only")
    final = 0.0 if final_step == "zero" else schedule.t_min
    if skip_type in grids.SKIP_TYPES:
        t = grids.dpm_solver_times(schedule, num_steps, skip_type)
        t[-1] = final
    elif skip_type in grids.DPM_SPACINGS:
        idx = grids.dpm_discrete_indices(schedule.T, num_steps, skip_type, steps_offset)
        t = np.concatenate([grids.clip_to_path(schedule, (idx + 1.0) / schedule.T), [final]])
    elif skip_type == "karras":
        sig = grids.ve_sigmas(schedule, num_steps, "karras", sigma_min=sigma_min,
                              sigma_max=sigma_max, rho=rho)[:-1]
        t = np.concatenate([grids.t_from_ve_sigma(schedule, sig), [final]])
    else:
        raise ValueError(f"unknown skip_type {skip_type!r}; known: {SKIP_TYPES}")
    return grids.truncate_for_strength(t, strength)


def _singlestep_eps(plan: Plan, schedule, x: Form, s: float, t: float, order: int) -> Form:
    """One DPM-Solver-k step in eps form (the papers' DPM-Solver-1/2/3, r1 = 1/2 for
    k = 2 and r1, r2 = 1/3, 2/3 for k = 3)."""
    a_s, _, l_s = _coeffs(schedule, s)
    a_t, sig_t, l_t = _coeffs(schedule, t)
    h = l_t - l_s
    p0 = plan.evaluate(x, s)
    x_s, eps_s = p0.x, p0.eps
    base = (a_t / a_s) * x_s - sig_t * np.expm1(h) * eps_s
    if order == 1:
        return base

    def at(r):
        t_r = float(grids.t_from_lam(schedule, l_s + r * h))
        a_r, sig_r, _ = _coeffs(schedule, t_r)
        return t_r, a_r, sig_r
    if order == 2:
        r1 = 0.5
        s1, a1, sig1 = at(r1)
        u = (a1 / a_s) * x_s - sig1 * np.expm1(r1 * h) * eps_s
        d1 = plan.evaluate(u, s1).eps - eps_s
        return base - (sig_t / (2.0 * r1) * np.expm1(h)) * d1
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    s1, a1, sig1 = at(r1)
    s2, a2, sig2 = at(r2)
    u1 = (a1 / a_s) * x_s - sig1 * np.expm1(r1 * h) * eps_s
    d1 = plan.evaluate(u1, s1).eps - eps_s
    u2 = ((a2 / a_s) * x_s - sig2 * np.expm1(r2 * h) * eps_s
          - (sig2 * r2 / r1 * (np.expm1(r2 * h) / (r2 * h) - 1.0)) * d1)
    d2 = plan.evaluate(u2, s2).eps - eps_s
    return base - (sig_t / r2 * (np.expm1(h) / h - 1.0)) * d2


def _singlestep_2s(plan: Plan, schedule, x: Form, s: float, t: float) -> Form:
    """DPM-Solver++(2S), data form, r = 1/2 (Lu et al. 2022b, Algorithm 1)."""
    _, sig_s, l_s = _coeffs(schedule, s)
    a_t, sig_t, l_t = _coeffs(schedule, t)
    h, r = l_t - l_s, 0.5
    s1 = float(grids.t_from_lam(schedule, l_s + r * h))
    a1, sig1, _ = _coeffs(schedule, s1)
    p0 = plan.evaluate(x, s)
    u = (sig1 / sig_s) * p0.x - a1 * np.expm1(-r * h) * p0.x0
    x0_1 = plan.evaluate(u, s1).x0
    d = (1.0 - 0.5 / r) * p0.x0 + (0.5 / r) * x0_1
    return (sig_t / sig_s) * p0.x - a_t * np.expm1(-h) * d


def _multistep_update(x: Form, hist: list, lam_t: float, a_t: float, sig_t: float,
                      sig_s: float, order: int, d2_coef: float = 2.0) -> Form:
    """DPM-Solver++ multistep step of `order` from the newest history point s to t.

    hist: [(lam, x0 form)], newest last. x0 is modelled as the polynomial through the
    last `order` points (Newton form), and the integral of e^{lam} times it is exact:
    with phi1 = expm1(-h), phi2 = phi1 / h + 1, phi3 = phi2 / h - 1/2,
        x_t = sigma_t / sigma_s x_s - alpha_t phi1 m0 + alpha_t phi2 D1 - 2 alpha_t phi3 D2,
    D1 ~ h x0'(lam_s), D2 ~ h^2 x0''(lam_s) / 2.
    """
    l_s, m0 = hist[-1]
    h = lam_t - l_s
    phi1 = np.expm1(-h)
    x_t = (sig_t / sig_s) * x - (a_t * phi1) * m0
    if order == 1:
        return x_t
    l_1, m1 = hist[-2]
    r0 = (l_s - l_1) / h
    d1_0 = (m0 - m1) / r0
    if order == 2:
        # The paper's 2M (Algorithm 2): x0 on [s, t] ~ m0 + (m0 - m1) / (2 r0).
        return x_t - (0.5 * a_t * phi1) * d1_0
    l_2, m2 = hist[-3]
    r1 = (l_1 - l_2) / h
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = phi1 / h + 1.0
    phi3 = phi2 / h - 0.5
    # int_0^h e^{-(h-u)} u^2 / 2 du = -h^2 phi3, and D2 holds h^2 x0'' / 2: hence the 2.
    # (The DPM-Solver and diffusers codes use 1 here, which measures as second order on
    # an exact Gaussian-mixture denoiser; with 2 the test sees third order.
    # dpmpp3m_coef="diffusers" passes d2_coef = 1 to reproduce them.)
    return x_t + (a_t * phi2) * d1 - (d2_coef * a_t * phi3) * d2


def plan_singlestep(schedule, num_steps: int, *, order: int, data_form: bool = False,
                    skip_type: str = "logSNR", denoise_to_zero: bool = False,
                    strength: float = 1.0):
    if data_form and order != 2:
        raise ValueError("DPM-Solver++ singlestep is implemented for order 2 (2S)")
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
    t = _times(schedule, num_steps, skip_type, strength)
    plan = Plan(t_start=t[0])
    x = plan.start
    for s, t_next in zip(t[:-1], t[1:]):
        if data_form:
            x = _singlestep_2s(plan, schedule, x, s, t_next)
        else:
            x = _singlestep_eps(plan, schedule, x, s, t_next, order)
    if denoise_to_zero:
        x = plan.evaluate(x, t[-1]).x0
    return plan.compile(x)


def plan_multistep(schedule, num_steps: int, *, order: int, skip_type: str = "logSNR",
                   lower_order_final: bool = True, lower_order_final_below: int = 10,
                   denoise_to_zero: bool = False, strength: float = 1.0,
                   final_step: str = "sigma_min", steps_offset: int = 0,
                   sigma_min: float | None = None, sigma_max: float | None = None,
                   rho: float = 7.0, dpmpp3m_coef: str = "derived"):
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ multistep order must be 1, 2 or 3, got {order}")
    if dpmpp3m_coef not in DPMPP3M_COEFS:
        raise ValueError(f"unknown dpmpp3m_coef {dpmpp3m_coef!r}; known: "
                         f"{tuple(DPMPP3M_COEFS)}")
    if denoise_to_zero and final_step == "zero":
        raise ValueError("denoise_to_zero=True with final_step='zero': the last step already "
                         "returns the model's x0; use one of them")
    t = _times(schedule, num_steps, skip_type, strength, final_step=final_step,
               steps_offset=steps_offset, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    n = len(t) - 1
    plan = Plan(t_start=t[0])
    x, hist = plan.start, []
    for i in range(n):
        _, sig_s, l_s = _coeffs(schedule, t[i])
        a_t, sig_t, l_t = _coeffs(schedule, t[i + 1])
        p = plan.evaluate(x, t[i])
        hist = (hist + [(l_s, p.x0)])[-order:]
        step_order = min(order, i + 1)
        if lower_order_final and n < lower_order_final_below:
            step_order = min(step_order, n - i)
        if t[i + 1] == 0.0 or l_t == l_s:
            # To sigma = 0 (final_step "zero") only the first-order step is defined (it
            # returns x0); a zero-length step (a Karras grid ending at sigma_min, then
            # final_step "sigma_min") leaves x as it is.
            step_order = 1
        x = _multistep_update(p.x, hist, l_t, a_t, sig_t, sig_s, step_order,
                              DPMPP3M_COEFS[dpmpp3m_coef])
    if denoise_to_zero:
        x = plan.evaluate(x, t[-1]).x0
    return plan.compile(x)




def sample_singlestep(denoiser: Denoiser, key: jax.Array, shape: tuple, num_steps: int, *,
                      order: int = 2, data_form: bool = False, y=None, guidance=None,
                      x_T=None, sample_offset=0, x_init=None, strength: float = 1.0,
                      mask=None, callback=None, return_intermediates: bool = False,
                      skip_type: str = "logSNR", denoise_to_zero: bool = False) -> jnp.ndarray:
    """DPM-Solver-{order} (eps form) or, with data_form, DPM-Solver++(2S)."""
    inputs = SampleInputs(y, guidance, x_T, sample_offset, x_init, strength, mask)
    inputs.check(shape)
    tables = plan_singlestep(denoiser.schedule, num_steps, order=order, data_form=data_form,
                             skip_type=skip_type, denoise_to_zero=denoise_to_zero,
                             strength=strength)
    return run_plan(tables, denoiser, key, shape, inputs, callback=callback,
                    return_intermediates=return_intermediates)


def sample_multistep(denoiser: Denoiser, key: jax.Array, shape: tuple, num_steps: int, *,
                     order: int = 2, y=None, guidance=None, x_T=None, sample_offset=0,
                     x_init=None, strength: float = 1.0, mask=None, callback=None,
                     return_intermediates: bool = False, skip_type: str = "logSNR",
                     lower_order_final: bool = True, lower_order_final_below: int = 10,
                     denoise_to_zero: bool = False, final_step: str = "sigma_min",
                     steps_offset: int = 0, sigma_min: float | None = None,
                     sigma_max: float | None = None, rho: float = 7.0,
                     dpmpp3m_coef: str = "derived") -> jnp.ndarray:
    """DPM-Solver++({order}M) in data form."""
    inputs = SampleInputs(y, guidance, x_T, sample_offset, x_init, strength, mask)
    inputs.check(shape)
    tables = plan_multistep(denoiser.schedule, num_steps, order=order, skip_type=skip_type,
                            lower_order_final=lower_order_final,
                            lower_order_final_below=lower_order_final_below,
                            denoise_to_zero=denoise_to_zero, strength=strength,
                            final_step=final_step, steps_offset=steps_offset,
                            sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                            dpmpp3m_coef=dpmpp3m_coef)
    return run_plan(tables, denoiser, key, shape, inputs, callback=callback,
                    return_intermediates=return_intermediates)
