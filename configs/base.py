"""The base config: every key the codebase reads, with its default.

Experiment configs start from `get_base_config()` and change only what they study.
A key that is not defined here cannot be set from the command line (configs are
locked), so `--config.optim.lrr=1` is an error that names the key.
"""
from __future__ import annotations

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "fashion_mnist_idx"  # see diffusion.data.make_source
    c.data.data_dir = ""                  # "" = the source's default location
    c.data.split = "train"
    c.data.image_size = 0                 # 0 = the dataset's own size
    c.data.random_flip = False
    c.data.global_batch_size = 128

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet"                 # unet | dit
    c.model.dtype = "float32"             # activations: float32 | bfloat16
    c.model.remat = False
    # Denoiser attention (jax.nn.dot_product_attention): "" = JAX's default (XLA) |
    # xla | cudnn (fused kernel: NVIDIA GPU, model.dtype bfloat16, head_dim % 8 == 0).
    c.model.attention_impl = ""
    c.model.unet = ml_collections.ConfigDict(dict(
        ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,), num_heads=4,
        dropout=0.1, scale_shift_norm=False, resblock_updown=False))
    # DiT: a named variant ("S/2" ... "XL/8"); non-zero sizes override the variant's.
    c.model.dit = ml_collections.ConfigDict(dict(variant="S/2", hidden_size=0, depth=0,
                                                 num_heads=0))
    # Blocks as one nn.scan over stacked params (compiles one block, not depth copies):
    # auto = on from depth 12 (every paper variant) | on | off. Checkpoints of the two
    # layouts differ: diffusion.models.dit.stack_blocks / unstack_blocks convert.
    c.model.dit.scan_blocks = "auto"
    # KL autoencoder (model.name "vae", train.objective "vae"); defaults: SD's VAE.
    # Downsampling factor f = 2 ** (len(block_out_channels) - 1).
    c.model.vae = ml_collections.ConfigDict(dict(
        latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        norm_num_groups=32, mid_attention=True))
    # Text conditioning (a captioned data source, e.g. fashion_mnist_captions): a CLIP
    # text encoder of this size (vocabulary from the tokenizer: "" = the demo vocabulary
    # of the Fashion-MNIST captions, or a folder of CLIP tokenizer files) whose token
    # embeddings the U-Net / DiT cross-attend to (context_dim = width). pretrained: a
    # transformers CLIPTextModel folder (or SD pipeline folder) whose shape and weights
    # replace width/layers/heads and the initialisation (tokenizer "" = its tokenizer/
    # folder). train_encoder: jointly with the denoiser, or frozen. cache_embeddings
    # (frozen only): encode every caption once into workdir/text_cache, train on those.
    c.model.text = ml_collections.ConfigDict(dict(
        enabled=False, tokenizer="", width=128, layers=2, heads=4, train_encoder=True,
        pretrained="", cache_embeddings=False))

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "linear"       # linear | cosine | scaled_linear | sigmoid
    c.diffusion.T = 1000
    c.diffusion.zero_terminal_snr = False
    c.diffusion.pred_type = "eps"         # eps | x0 | v
    c.diffusion.weighting = "simple"      # simple | snr | min_snr | truncated_snr
    c.diffusion.min_snr_gamma = 5.0
    c.diffusion.time_sampling = "uniform"  # uniform | antithetic | low_discrepancy
    c.diffusion.discrete_time = True
    c.diffusion.learned_sigma = False
    c.diffusion.vlb_weight = 0.001

    c.conditioning = ml_collections.ConfigDict()
    c.conditioning.num_classes = 0        # 0 = unconditional
    c.conditioning.label_dropout = 0.1    # p(label -> null) in training, for CFG
    c.conditioning.caption_dropout = 0.1  # p(caption -> "") in training (text runs)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 500
    c.optim.decay = "constant"            # constant | cosine | linear (after warm-up)
    c.optim.end_lr_factor = 0.1           # final lr = lr * this, for cosine / linear
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0               # global-norm clip; 0 = off
    # Optimizer, EMA and grad norm on the parameters raveled into one vector: the same
    # numbers in a few large kernels, not a few per parameter; compiles twice as fast
    # for small models (the tests use it). Not with train.fsdp (it shards per array).
    c.optim.flatten = False

    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.9999
    c.ema.warmup = True                   # decay_k = min(decay, (1 + k) / (10 + k))

    c.train = ml_collections.ConfigDict()
    c.train.objective = "diffusion"      # see diffusion.objectives
    c.train.num_steps = 10000
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.sample_every = 2000           # 0 = never during training
    c.train.eval_every = 0                # 0 = never during training
    c.train.fsdp = False                  # shard params/EMA/optimizer over `data` (FSDP)
    c.train.peak_tflops = 0.0             # device peak for MFU in the logs; 0 = no MFU
    # jax.profiler trace of steps [START, END) into WORKDIR/plugins/profile, for
    # TensorBoard's Profile tab: "START,END" (e.g. "10,15"); "" = off.
    c.train.profile_steps = ""

    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ddim"
    c.sample.num_steps = 50
    c.sample.num_samples = 64
    c.sample.batch_size = 256             # per sampling call, across all devices
    c.sample.eta = 0.0
    c.sample.spacing = "trailing"
    c.sample.variance = "small"           # DDPM: small | large | learned
    c.sample.guidance_scale = 1.0         # classifier-free guidance w (class, text models)
    c.sample.guidance_channels = 0        # guide the first N output channels; 0 = all
    c.sample.clip_x0 = 1.0                # 0 = no clipping
    c.sample.dynamic_threshold = 0.0      # percentile p in (0, 1) of |x0|; 0 = off
    # DPM-Solver / DPM-Solver++
    c.sample.skip_type = "logSNR"         # logSNR | time_uniform | time_quadratic
    c.sample.lower_order_final = True
    c.sample.denoise_to_zero = False
    # Euler / Heun / Euler ancestral (Karras et al. 2022); sigmas are VE noise levels
    c.sample.sigma_schedule = "karras"    # karras | timesteps
    c.sample.sigma_min = 0.0              # 0 = the schedule's trained range
    c.sample.sigma_max = 0.0
    c.sample.rho = 7.0
    c.sample.s_churn = 0.0
    c.sample.s_tmin = 0.0
    c.sample.s_tmax = float("inf")
    c.sample.s_noise = 1.0
    c.sample.ancestral_eta = 1.0
    c.sample.plms_warmup = "pseudo_euler"  # pseudo_euler | prk | lower_order
    c.sample.consistency_sigmas = ()      # intermediate sigmas of multistep consistency
    # Any other sampler option, "key=value,..." (e.g. "steps_offset=1,final_step=zero";
    # "dpmpp_2m.final_step=zero" for one sampler only): samplers/README.md lists them.
    c.sample.options = ""
    c.sample.strength = 1.0               # image-to-image: start at t = strength (< 1)
    # Sample mode: images to start from (.npz arr_0 uint8 NHWC or float in [-1, 1], or a
    # directory of PNGs) and an inpainting mask (PNG / .npz, 1 = keep the known pixel).
    c.sample.init_images = ""
    c.sample.mask = ""
    c.sample.inpaint_resample = 0         # RePaint rounds per step (ddpm, ddim); 0 = off
    c.sample.seed = 0
    # Text-to-image (a pretrained Stable Diffusion, pretrained.path, or a run with
    # model.text.enabled): the prompt, or a file with one prompt a line; the negative
    # prompt ("" = none: the empty prompt is guidance's unconditional branch); CLIP layers
    # to skip. Text runs also take several prompts "a|b" and negatives "x|y", one each;
    # sample.num_samples is then the number of images per prompt.
    c.sample.prompt = ""
    c.sample.negative_prompt = ""
    c.sample.prompts_file = ""
    c.sample.clip_skip = 0

    # Training the autoencoder (train.objective "vae"), after LDM's loss: see
    # diffusion.autoencoder.losses. The optimizer of the discriminator is `optim`'s.
    c.vae_loss = ml_collections.ConfigDict()
    c.vae_loss.rec_kind = "l1"            # l1 | l2, summed per image
    c.vae_loss.kl_weight = 1e-6
    c.vae_loss.disc = True                # PatchGAN term; False = rec + KL only
    c.vae_loss.disc_start = 50001         # step at which the adversarial terms start
    c.vae_loss.disc_weight = 0.5          # times LDM's adaptive weight
    c.vae_loss.disc_channels = 64
    c.vae_loss.disc_layers = 3
    c.vae_loss.disc_norm = "group"        # group | none

    # Latent diffusion (data.source "latents:<dir>"): the VAE that decodes samples.
    # Set one of the two; both "" for pixel-space models.
    c.latent = ml_collections.ConfigDict()
    c.latent.vae_workdir = ""             # a workdir of train.objective "vae" (EMA params)
    c.latent.vae_weights = ""             # a diffusers VAE folder or weight file

    # A pretrained pipeline that --mode sample draws from instead of a trained run: a
    # diffusers Stable Diffusion 1.x / 2.x folder (configs/sd_text_to_image.py); "" = off.
    c.pretrained = ml_collections.ConfigDict()
    c.pretrained.path = ""

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 1000
    c.eval.sampler = "ddim"
    c.eval.num_steps = 50
    c.eval.feature_net = "classifier"     # classifier | inception
    c.eval.feature_weights = ""           # "" = the shipped Fashion-MNIST classifier
    c.eval.reference_source = ""          # "" = data.source; latent runs need a pixel one
    c.eval.reference_split = "test"
    return c


def _convert(name: str, value: str, default):
    """A config argument's value in the type of its default."""
    if isinstance(default, bool):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"config argument {name}={value}: not a bool (true/false)")
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(value)
            except ValueError:
                raise ValueError(f"config argument {name}={value}: not an "
                                 f"{kind.__name__}") from None
    return value


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """Parses a config argument as big_vision does: "variant=B/2,runlocal".

    The text after the first ":" of `--config configs/NAME.py:ARG` is a comma-separated
    list of `key=value` pairs and bare words; a bare word sets a bool key to True.
    `spec` gives every key the config accepts with its default, whose type converts the
    value; `runlocal` (the tiny mode, default False) is always accepted. An unknown key
    is a ValueError naming it. Returns a ConfigDict with every key of the spec.
    """
    spec = dict(runlocal=False, **spec)
    out = ml_collections.ConfigDict(spec)
    for part in (arg or "").split(","):
        if not part.strip():
            continue
        name, has_value, value = part.partition("=")
        name = name.strip()
        if name not in spec:
            raise ValueError(f"unknown config argument {name!r}; known: {', '.join(spec)}")
        if not has_value:
            if not isinstance(spec[name], bool):
                raise ValueError(f"config argument {name} needs a value: {name}=VALUE")
            out[name] = True
        else:
            out[name] = _convert(name, value.strip(), spec[name])
    return out


def is_tiny(arg: str | ml_collections.ConfigDict | None) -> bool:
    """Whether a config argument asks for the tiny mode (`runlocal`).

    A string is parsed by parse_arg with no keys but `runlocal`, so configs without
    arguments of their own reject any other; configs with arguments parse them first
    and pass the parsed ConfigDict.
    """
    if isinstance(arg, ml_collections.ConfigDict):
        return bool(arg.runlocal)
    return bool(parse_arg(arg).runlocal)


def make_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks any config to a few seconds of CPU: synthetic data, a tiny network."""
    c.data.source = "synthetic"
    c.data.image_size = 8
    c.data.global_batch_size = 8
    c.model.unet.ch = 16
    # One level (no down/up-sampling; U-Net's own tests cover those): the tiny U-Net's
    # train step then compiles in ~30 % less CPU time, and most test time is compiling.
    c.model.unet.ch_mult = (1,)
    c.model.unet.num_res_blocks = 1
    c.model.unet.attn_resolutions = (8,)
    c.model.unet.num_heads = 1
    c.model.dit.update(variant="S/2", hidden_size=32, depth=2, num_heads=2)
    c.diffusion.T = 100
    c.optim.warmup_steps = 2
    # A constant rate after warm-up: the compiled train step then does not depend on
    # train.num_steps (a decay's length is a constant of the program), so tiny runs of
    # any length share one compilation through the compile cache.
    c.optim.decay = "constant"
    # One optimizer vector: the tiny train step compiles in ~40 % less CPU time.
    c.optim.flatten = True
    c.train.num_steps = 4
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.sample_every = 4
    c.train.eval_every = 0
    c.sample.num_steps = 4
    c.sample.num_samples = 8
    c.eval.num_samples = 16
    c.eval.num_steps = 4
    return c
