"""Consistency distillation on Fashion-MNIST from the EDM teacher, sized for one H100.

    python launch.py --config configs/edm_fashion_mnist.py --workdir runs/edm_fashion_mnist
    python launch.py --config configs/cd_fashion_mnist.py --workdir runs/cd_fashion_mnist \
        --config.consistency.teacher_workdir=runs/edm_fashion_mnist

CD (Song et al. 2023, Algorithm 2): N = 18 Karras levels, one Heun step of the teacher's
PF-ODE per pair, target network EMA mu = 0.95, pseudo-Huber distance (the paper used
LPIPS), student initialised from the teacher. Any diffusion model trained here can be
the teacher, e.g. configs/default.py's eps/cosine model (its network differs from this
one: add --config.consistency.init_from_teacher=False). What it should reach
(expected, not yet measured): 1-step samples are recognisable items but blurrier than
the teacher's 35-NFE Heun samples, 2-step samples sharper. 10k steps at batch 128:
minutes on one H100 (an estimate; a step costs two student and two teacher passes).
Distilling configs/default.py's v-prediction model instead (the diffusion arm of
configs/flow_vs_diffusion.py), sized for 2 CPU cores (8000 steps at batch 32, inverse-step
weighting; about 1.5 h there): `:teacher=default`. The student
is that network started from the teacher's EMA params and read as the teacher reads it
(consistency.parameterisation "diffusion": f = c_skip x + (1 - c_skip) x0 of the
v-prediction network, as latent consistency models do), so it starts as the teacher's
one-step denoiser:

    python launch.py --config configs/cd_fashion_mnist.py:teacher=default \
        --workdir runs/cd_default \
        --config.consistency.teacher_workdir=runs/flow_vs_diffusion/train.objective=diffusion

Tiny mode for tests (needs a teacher workdir, e.g. one trained with
configs/edm_fashion_mnist.py:runlocal): configs/cd_fashion_mnist.py:runlocal
"""
from configs import default
from configs.base import get_base_config, make_tiny, parse_arg
from configs.edm_fashion_mnist import fashion_unet
from diffusion.objectives.consistency_config import add_consistency_config


def get_config(arg: str = ""):
    args = parse_arg(arg, teacher="edm")
    if args.teacher not in ("edm", "default"):
        raise ValueError(f"teacher={args.teacher!r}: edm (configs/edm_fashion_mnist.py) or "
                         "default (configs/default.py)")
    c = add_consistency_config(get_base_config())
    c.train.objective = "consistency_distillation"
    c.data.source = "fashion_mnist_idx"
    c.data.global_batch_size = 128
    fashion_unet(c)
    c.consistency.update(teacher_workdir="runs/edm_fashion_mnist", init_from_teacher=True,
                         curriculum="fixed", num_scales=18, ode_solver="heun",
                         target_ema=0.95, target_ema_schedule="constant",
                         index_sampling="uniform", weighting="uniform",
                         distance="pseudo_huber")
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 500
    c.optim.decay = "constant"
    c.optim.grad_clip = 0.0
    c.ema.decay = 0.9995
    c.train.num_steps = 10000
    c.train.log_every = 100
    c.train.checkpoint_every = 2000
    c.train.sample_every = 2500
    c.sample.sampler = "consistency"
    c.sample.num_steps = 1
    c.eval.sampler = "consistency"
    c.eval.num_steps = 1
    if args.teacher == "default":
        teacher = default.get_config()
        c.model, c.diffusion = teacher.model, teacher.diffusion
        c.data.global_batch_size = 32
        # iCT's inverse-step weighting: uniform weights let the large high-noise errors
        # pull the low-noise levels away from the teacher (experiments/flow_vs_diffusion).
        c.consistency.update(teacher_workdir="runs/flow_vs_diffusion/train.objective=diffusion",
                             parameterisation="diffusion", weighting="inverse_step")
        c.optim.update(lr=5e-5, warmup_steps=100)
        c.ema.decay = 0.999
        c.train.update(num_steps=8000, log_every=50, checkpoint_every=1000, sample_every=1000,
                       eval_every=2000)
        c.eval.num_samples = 500
    if args.runlocal:
        make_tiny(c)
        c.consistency.teacher_workdir = ""  # a tiny teacher must be given explicitly
    return c
