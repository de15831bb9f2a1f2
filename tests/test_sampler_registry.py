"""The sampler registry (diffusion.samplers.REGISTRY) is the one declaration of each
sampler: its function, its NFE count, the options its name fixes and the older
`sample.*` config keys that reach it (diffusion.sampling.sampler_options)."""
import pytest

from diffusion import sampling, samplers


def test_every_config_key_maps_to_an_option_its_sampler_takes():
    for name, entry in samplers.REGISTRY.items():
        takes = samplers.option_names(name)
        for key in entry.config_keys:
            option, _ = sampling._SECTION_KEYS[key]
            assert option in takes, (name, key, option, takes)


def test_fixed_options_are_set_once_and_cannot_be_overridden():
    assert samplers.SAMPLERS["dpmpp_2s"].keywords == {"order": 2, "data_form": True}
    assert "order" not in samplers.option_names("dpm_solver_2")
    assert "skip_type" in samplers.option_names("dpm_solver_2")
    # The plan gets the same fixed order: singlestep order k costs k evaluations a step.
    assert [samplers.nfe(f"dpm_solver_{k}", 6) for k in (1, 2, 3)] == [6, 12, 18]
    with pytest.raises(ValueError, match=r"'dpm_solver_2' fixes order=2; to change "
                                         r"\['order'\], pick another sampler"):
        samplers.check_options("dpm_solver_2", {"order": 3})
    with pytest.raises(ValueError, match="fixes order=2"):
        samplers.nfe("dpmpp_2m", 10, order=3)


def test_older_config_keys_reach_only_the_samplers_that_declare_them():
    from configs.base import get_base_config
    c = get_base_config().sample
    c.eta, c.ancestral_eta, c.rho, c.sigma_min = 0.7, 0.3, 5.0, 0.1
    assert sampling.sampler_options(c, "ddim")["eta"] == 0.7
    euler_a = sampling.sampler_options(c, "euler_a")
    assert euler_a["eta"] == 0.3 and euler_a["rho"] == 5.0 and euler_a["sigma_min"] == 0.1
    assert "S_churn" not in euler_a and "S_churn" in sampling.sampler_options(c, "heun")
    # DPM-Solver++ takes rho / sigma_min for its Karras grid, but only from sample.options.
    dpm = sampling.sampler_options(c, "dpmpp_2m")
    assert "rho" not in dpm and "sigma_min" not in dpm
    assert sampling.sampler_options(c, "flow_euler") == {}
    c.options = "rho=3.0"
    assert sampling.sampler_options(c, "dpmpp_2m")["rho"] == 3.0
    with pytest.raises(ValueError, match=r"'flow_euler' has no option\(s\) \['rho'\]"):
        sampling.sampler_options(c, "flow_euler")
