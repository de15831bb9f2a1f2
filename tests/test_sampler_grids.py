"""Host-side sampler tests: step grids (timestep spacings, Karras and DPM-Solver grids,
consistency sigmas), steps for a target NFE, option errors and the sampler options a
config gives. Split from tests/test_samplers.py, whose tests run samplers on exact
Gaussian-mixture denoisers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.denoiser import Denoiser
from diffusion.schedules import make_schedule
from diffusion.samplers import canonical_name, get_sampler, grids
from diffusion.samplers.consistency import resolve_sigmas
from diffusion.samplers.dpm_solver import plan_multistep, plan_singlestep
from diffusion.samplers.karras import plan_karras
from diffusion.samplers.plms import plan_plms

SCHED = make_schedule("linear", T=1000)


def test_steps_for_nfe_counts_with_the_options():
    from experiments.sampler_benchmark.specs import parse_samplers, sampler_runs, steps_for_nfe
    assert steps_for_nfe("plms", 10, 1000, SCHED, warmup="prk") == (3, 9)  # N + 3 min(3, N-1)
    assert steps_for_nfe("dpmpp_2m", 10, 1000, SCHED, denoise_to_zero=True) == (9, 10)
    assert steps_for_nfe("heun", 10, 1000) == (5, 9)       # 2 N - 1: 10 is not reachable
    assert steps_for_nfe("ddim", 50, 20) == (20, 20)       # capped by max_steps
    assert steps_for_nfe("dpm_solver_3", 2, 1000) is None
    runs = list(sampler_runs(parse_samplers("pndm:warmup='prk',dpmpp_2m"), [12, 20], 1000,
                             SCHED))
    assert [(s.label, target, steps, n) for s, target, steps, n in runs] == [
        ("pndm:warmup='prk'", 12, 3, 9), ("pndm:warmup='prk'", 20, 11, 20),
        ("dpmpp_2m", 12, 12, 12), ("dpmpp_2m", 20, 20, 20)]


def test_ddim_last_step_to_the_first_trained_level_keeps_float32_precision():
    """set_alpha_to_one=False ends at alpha_bar[0] = 1 - 1e-4: the direction coefficient
    sqrt(1 - alpha_bar) must come from expm1 (1 - exp(log ab) lost 1.7e-4 there)."""
    zero_x0 = Denoiser(lambda x, c, y: jnp.zeros_like(x), SCHED, pred_type="x0")
    x_T = jnp.ones((1, 2))
    x = get_sampler("ddim")(zero_x0, jax.random.key(0), (1, 2), 1, x_T=x_T,
                            set_alpha_to_one=False)
    ab = SCHED.alpha_bar_table
    want = np.sqrt(1.0 - ab[0]) / np.sqrt(1.0 - ab[-1])   # x0 = 0: x = sigma_s eps
    np.testing.assert_allclose(np.asarray(x), want, rtol=1e-5)


def _space_timesteps_reference(T, n):
    """improved-diffusion's respace.space_timesteps(T, str(n)), one section, as written
    there: a float stride accumulated step by step, Python's round (half to even)."""
    frac_stride = 1 if n <= 1 else (T - 1) / (n - 1)
    cur_idx, taken = 0.0, []
    for _ in range(n):
        taken.append(round(cur_idx))
        cur_idx += frac_stride
    return set(taken)


def test_iddpm_spacing_is_improved_diffusions_respacing():
    from diffusion.samplers.base import step_times, timesteps
    for T, n in [(1000, 250), (1000, 25), (1000, 1), (1000, 3), (4000, 100), (100, 7)]:
        idx = timesteps(T, n, "iddpm")
        assert set(idx.tolist()) == _space_timesteps_reference(T, n) and len(idx) == n
    idx = timesteps(1000, 250, "iddpm")
    assert idx[0] == 999 and idx[-1] == 0                 # DiT's grid ends at index 0
    t, s = step_times(SCHED, 250, "iddpm")
    assert s[-1] == 0.0 and t[-1] == 1.0 / SCHED.T


def test_time_grids():
    t = grids.dpm_solver_times(SCHED, 10, "logSNR")
    assert t[0] == 1.0 and t[-1] == 1.0 / SCHED.T and np.all(np.diff(t) < 0)
    np.testing.assert_allclose(np.diff(grids.lam(SCHED, t)), np.diff(grids.lam(SCHED, t))[0],
                               rtol=1e-6)
    np.testing.assert_allclose(grids.dpm_solver_times(SCHED, 4, "time_uniform"),
                               np.linspace(1.0, 1e-3, 5))
    np.testing.assert_allclose(np.sqrt(grids.dpm_solver_times(SCHED, 4, "time_quadratic")),
                               np.linspace(1.0, np.sqrt(1e-3), 5))
    # The float64 host view agrees with the Schedule's own (float32) one.
    for t_ in (1e-3, 0.37, 1.0):
        np.testing.assert_allclose(grids.lam(SCHED, t_), 0.5 * float(SCHED.logsnr(t_)),
                                   rtol=1e-5)
        np.testing.assert_allclose(grids.t_from_ve_sigma(SCHED, grids.ve_sigma(SCHED, t_)), t_,
                                   rtol=1e-9)
    lo, hi = grids.ve_sigma_range(SCHED)
    sig = grids.ve_sigmas(SCHED, 18)
    assert sig.shape == (19,) and sig[-1] == 0.0
    # EDM's sigma_max = 80 (the linear schedule is trained up to 157) and the lowest level.
    np.testing.assert_allclose([sig[0], sig[-2]], [80.0, lo])
    ramp = sig[:-1] ** (1 / 7)                           # rho = 7: linear in sigma^(1/rho)
    np.testing.assert_allclose(np.diff(ramp), np.diff(ramp)[0], rtol=1e-9)
    clipped = grids.ve_sigmas(SCHED, 5, sigma_min=1e-4, sigma_max=1e4)
    np.testing.assert_allclose(clipped[[0, 4]], [hi, lo])  # clipped into the trained range


def test_consistency_sigmas():
    s_min, s_max, mid = resolve_sigmas(SCHED, 3)
    assert s_min == pytest.approx(grids.ve_sigma_range(SCHED)[0])   # 0.002 -> 0.01
    assert s_max == 80.0 and mid.shape == (2,) and s_max > mid[0] > mid[1] > s_min
    assert resolve_sigmas(SCHED, 2, sigmas=[0.8])[2].tolist() == [0.8]
    with pytest.raises(ValueError, match="needs 1 intermediate"):
        resolve_sigmas(SCHED, 2, sigmas=[2.0, 1.0])
    with pytest.raises(ValueError, match="decrease strictly"):
        resolve_sigmas(SCHED, 3, sigmas=[1.0, 2.0])


def test_bad_options():
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("nope")
    assert canonical_name("PNDM") == "plms" and canonical_name("dpm2") == "dpm_solver_2"
    with pytest.raises(ValueError, match="skip_type"):
        plan_multistep(SCHED, 10, order=2, skip_type="nope")
    with pytest.raises(ValueError, match="sigma_schedule"):
        plan_karras(SCHED, 10, sigma_schedule="nope")
    with pytest.raises(ValueError, match="warmup"):
        plan_plms(SCHED, 10, warmup="nope")
    with pytest.raises(ValueError, match="order"):
        plan_singlestep(SCHED, 10, order=4)
    # diffusers-convention options
    with pytest.raises(ValueError, match="final_step"):
        plan_multistep(SCHED, 10, order=2, final_step="nope")
    with pytest.raises(ValueError, match="use one of them"):
        plan_multistep(SCHED, 10, order=2, final_step="zero", denoise_to_zero=True)
    with pytest.raises(ValueError, match="dpmpp3m_coef"):
        plan_multistep(SCHED, 10, order=3, dpmpp3m_coef="nope")
    with pytest.raises(ValueError, match="steps_offset"):
        plan_multistep(SCHED, 10, order=2, skip_type="trailing", steps_offset=1)
    with pytest.raises(ValueError, match="skip_type='karras' only"):
        plan_multistep(SCHED, 10, order=2, sigma_max=80.0)
    with pytest.raises(ValueError, match="leading spacing only"):
        plan_plms(SCHED, 10, spacing="trailing", steps_offset=1)
    with pytest.raises(ValueError, match="out of"):
        plan_plms(SCHED, 10, spacing="leading", steps_offset=100)
    with pytest.raises(ValueError, match="prev_timestep"):
        plan_plms(SCHED, 10, prev_timestep="nope")
    with pytest.raises(ValueError, match="fractional_timesteps needs"):
        plan_karras(SCHED, 10, fractional_timesteps=True)
    with pytest.raises(ValueError, match="init_noise"):
        plan_karras(SCHED, 10, init_noise="nope")
    with pytest.raises(ValueError, match="needs init_noise='vp'"):
        plan_karras(SCHED, 10, init_noise="sigma_max", strength=0.5)


# ---- options from the config (diffusion.sampling) ------------------------------------
def test_sampler_options_from_the_config_and_the_free_form_section():
    """Legacy sample.* keys still reach the samplers that take them; sample.options
    ("k=v,k=v", settable from the command line of a locked config) adds any option,
    checked against the sampler's signature before anything compiles."""
    from configs.base import get_base_config
    from diffusion import sampling
    c = get_base_config()
    c.lock()
    assert sampling.sampler_options(c.sample, "ddim") == {"spacing": "trailing", "eta": 0.0}
    assert sampling.sampler_options(c.sample, "euler_a")["eta"] == 1.0  # ancestral_eta
    assert sampling.sampler_options(c.sample, "dpmpp_2m") == {
        "skip_type": "logSNR", "denoise_to_zero": False, "lower_order_final": True}
    c.sample.options = "steps_offset=1, set_alpha_to_one=False,prev_timestep=stride"
    c.sample.spacing = "leading"
    assert sampling.sampler_options(c.sample, "ddim") == {
        "spacing": "leading", "eta": 0.0, "steps_offset": 1, "set_alpha_to_one": False,
        "prev_timestep": "stride"}
    c.sample.options = "final_step=zero,lower_order_final_below=15,dpmpp3m_coef=diffusers"
    opts = sampling.sampler_options(c.sample, "dpmpp_3m")
    assert opts["final_step"] == "zero" and opts["lower_order_final_below"] == 15
    c.sample.options = "sigmas=(2.0, 1.0),rho=5"      # a tuple keeps its commas
    assert sampling.sampler_options(c.sample, "consistency")["sigmas"] == (2.0, 1.0)
    c.sample.options = "steps_ofset=1"
    with pytest.raises(ValueError, match=r"'ddim' has no option\(s\) \['steps_ofset'\]") as e:
        sampling.sampler_options(c.sample, "ddim")
    assert getattr(e.value, "exit_code", None) == 2  # a ConfigError: launch.py exits 2
    c.sample.options = "steps_offset"
    with pytest.raises(ValueError, match="not key=value"):
        sampling.sampler_options(c.sample, "ddim")
    c.sample.options = ""
    c.sample.strength = 0.5                            # image-to-image strength
    assert sampling.sampler_options(c.sample, "heun")["strength"] == 0.5
    c.sample.inpaint_resample = 3                      # RePaint rounds: DDPM / DDIM only
    assert sampling.sampler_options(c.sample, "ddpm")["inpaint_resample"] == 3
    with pytest.raises(ValueError, match=r"has no option\(s\) \['inpaint_resample'\]"):
        sampling.sampler_options(c.sample, "heun")


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "iddpm"])
def test_every_step_count_visits_that_many_valid_indices(spacing):
    # Trailing spacing built with np.arange(T, 0, -T / N) got an extra index -1 from float
    # error at N = 61 of T = 1000 (a step to t = 0 that the NFE count did not know).
    from diffusion.samplers.base import timesteps
    from diffusion.samplers.grids import DPM_SPACINGS, dpm_discrete_indices
    for n in range(1, 1001):
        idx = timesteps(1000, n, spacing)
        assert len(idx) == n and idx.min() >= 0 and idx.max() <= 999, (spacing, n)
        if spacing in DPM_SPACINGS:  # DPM-Solver's diffusers grids: the same N indices
            idx = dpm_discrete_indices(1000, n, spacing)
            assert len(idx) == n and idx.min() >= 0 and idx.max() <= 999, (spacing, n)
