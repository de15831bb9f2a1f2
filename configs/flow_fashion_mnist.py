"""Flow matching on Fashion-MNIST: configs/default.py's U-Net, data and budget.

    python launch.py --config configs/flow_fashion_mnist.py --workdir runs/flow_fashion_mnist

The network predicts the rectified-flow velocity u = eps - x0 on x_t = (1 - t) x0 + t eps
(train.objective "flow", the `flow` section: diffusion.objectives.flow_config), with
SD3's logit-normal times (location 0, scale 1), no shift and the plain velocity MSE;
its time input is c_noise = 1000 t - 1, recorded as flow.T in config.json so that
sampling feeds it the same. Everything else is configs/default.py's at the budget
the flow-vs-diffusion study was measured with (`default.with_flow_study_budget`: 3000
steps at batch 32, lr 1e-3): the same U-Net, optimizer and EMA (the `diffusion` section
is unused here), so the two compare at equal compute (configs/flow_vs_diffusion.py runs both).
Samples and the in-training FID use flow_euler (Euler in t) with 50 steps; any sampler
works on the run: `diffusion.load(workdir).sample("dpmpp_2m", steps=10)`.
What it should reach (expected, not yet measured): recognisable items at 50 Euler steps,
a loss (velocity MSE) that falls well below its initial ~2, and an FID comparable to
the v-prediction default at 50 steps.
Tiny mode for tests: configs/flow_fashion_mnist.py:runlocal
"""
from configs import default
from diffusion.objectives.flow_config import add_flow_config


def get_config(arg: str = ""):
    c = add_flow_config(default.with_flow_study_budget(default.get_config(arg), arg))
    c.train.objective = "flow"
    c.flow.update(path="flow", T=1000, time_sampling="logit_normal", location=0.0,
                  scale=1.0, shift=1.0, weighting="simple")
    c.sample.sampler = "flow_euler"
    c.eval.sampler = "flow_euler"
    return c
