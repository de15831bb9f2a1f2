"""Flow matching vs v-prediction diffusion on Fashion-MNIST at equal compute.

    python launch.py --config configs/flow_vs_diffusion.py --workdir runs/flow_vs_diffusion --sweep

runs configs/default.py (v-prediction on the cosine schedule) at the budget this study
was measured with (3000 steps at lr 1e-3, `default.with_flow_study_budget`) and the same
network, data, optimizer and steps trained by flow matching (configs/flow_fashion_mnist.py's
`flow` section), in runs/flow_vs_diffusion/train.objective=diffusion and
.../train.objective=flow (`--sweep_print` prints one command per arm, `--sweep_index=I`
runs arm I). Both arms sample and evaluate with DDIM, which runs on either path (on
the flow path it is Euler in x / alpha and sigma / alpha), so the in-training FID
compares the models and not the samplers; afterwards compare every sampler at equal NFE
with `python -m experiments.flow_vs_diffusion.run`. Measured (2026-12-02, n = 2000,
experiments/flow_vs_diffusion/results.md): the flow arm below the diffusion arm at every
NFE from 1 to 50, with Euler-type samplers and with DPM-Solver++(2M) (50 NFE Euler/DDIM:
FID 11.2 [9.7, 13.3] vs 16.2 [15.0, 17.6]).
Tiny mode for tests: configs/flow_vs_diffusion.py:runlocal
"""
from configs import default
from configs.flow_fashion_mnist import get_config as flow_config


def get_config(arg: str = ""):
    c = default.with_flow_study_budget(default.get_config(arg), arg)
    c.flow = flow_config(arg).flow  # read only by the flow arm
    return c


def sweep():
    """Dotted-key overrides, one dict per run."""
    return [{"train.objective": "diffusion"}, {"train.objective": "flow"}]
