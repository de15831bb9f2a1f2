"""Measurements of the throughput benchmark, each on the devices of the current process.

matmul_peak: the device's dense matmul rate (n x n x n, random data, median of repeats).
train_row: one full train step of the project (diffusion.objectives.diffusion: loss, AdamW with
  fp32 moments, EMA) on a synthetic batch [B, H, W, C] sharded over every device;
  compile time apart, then the median of per-step times (each ended by
  block_until_ready) after warm-up, and the mean of a pipelined run of the same steps.
sample_row: one jitted sampling call (diffusion.sampling: 50 DDIM steps in one
  lax.scan, CFG batched), median over repeats.
FLOPs: forward_flops (XLA's count of the forward pass, one multiply-add = 2 FLOPs); a
train step counts 3 forward passes (forward + backward), a guided sampling step 2.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs.base import get_base_config
from diffusion import parallel
from diffusion.denoiser import Denoiser
from diffusion.models.flops import dit_forward_macs, forward_flops
from diffusion.schedules import make_schedule
from diffusion import sampling
from diffusion.objectives.diffusion import make_train_step
from diffusion.train_state import init_state, make_optimizer
from experiments.throughput.rows import Row, attention_impl, build_model, dit_arch


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def device_info(num_devices: int = 0) -> dict:
    """Kind of device 0 and how many devices the rows use (num_devices, 0 = all)."""
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind,
            "num_devices": num_devices or jax.device_count(),
            "num_processes": jax.process_count()}


def matmul_peak(n: int, dtype: str = "bfloat16", repeats: int = 20) -> dict:
    """TFLOP/s of one device on an [n, n] @ [n, n] product (2 n^3 FLOPs)."""
    ka, kb = jax.random.split(jax.random.key(0))
    dev = jax.devices()[0]
    a = jax.device_put(jax.random.normal(ka, (n, n), dtype), dev)
    b = jax.device_put(jax.random.normal(kb, (n, n), dtype), dev)
    f = jax.jit(jnp.matmul)
    for _ in range(3):
        jax.block_until_ready(f(a, b))
    t, _ = _median_time(lambda: f(a, b), repeats)
    return {"matmul_n": n, "matmul_dtype": dtype, "matmul_ms": 1e3 * t,
            "peak_tflops": 2.0 * n ** 3 / t / 1e12}


def _memory(compiled) -> dict:
    """Peak device memory of the process so far, and XLA's estimate for this program."""
    out = {}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
    try:
        m = compiled.memory_analysis()
        out["xla_bytes"] = int(m.temp_size_in_bytes + m.argument_size_in_bytes
                               + m.output_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # not every backend reports it
        pass
    return out


def _flops(row: Row, model) -> dict:
    h, w, c = row.image_shape
    out = {"fwd_gflops": forward_flops(model, None, (1, h, w, c)) / 1e9}
    if row.net == "dit":
        a = dit_arch(row)
        out["fwd_gflops_analytic"] = 2 * dit_forward_macs(
            h, a["patch_size"], c, a["hidden_size"], a["depth"],
            learn_sigma=row.learned_sigma) / 1e9
    return out


def _optim(row: Row) -> ml_collections.ConfigDict:
    """The papers' optimizers: DiT AdamW 1e-4 no clipping; DDPM Adam 2e-4, clip 1."""
    o = get_base_config().optim
    if row.net == "dit":
        o.update(lr=1e-4, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=0.0)
    else:
        o.update(lr=2e-4, warmup_steps=5000, decay="constant", weight_decay=0.0, grad_clip=1.0)
    return o


def _param_count(tree) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def _mesh(num_devices: int):
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"--devices {num_devices}: only {len(devices)} devices here")
        devices = devices[:num_devices]
    return parallel.make_mesh(devices)


def train_row(row: Row, *, batch: int, steps: int, warmup: int, dtype: str, remat: bool,
              fsdp: bool, attention: str, num_devices: int = 0) -> dict:
    mesh = _mesh(num_devices)
    parallel.check_batch_divisible(batch, mesh, "--batch")
    impl = attention_impl(row, attention, jax.devices()[0].platform, dtype)
    model = build_model(row, dtype, remat, impl)
    schedule = make_schedule("linear", 1000)
    tx, lr_fn = make_optimizer(_optim(row), 1_000_000)
    k = row.num_classes
    step = make_train_step(
        model, schedule, tx, lr_fn, pred_type="eps", weighting="simple", min_snr_gamma=5.0,
        time_sampling="uniform", discrete_time=True, learned_sigma=row.learned_sigma,
        vlb_weight=0.001, num_classes=k, label_dropout=0.1 if k else 0.0,
        ema_rate=0.9999, ema_warmup=False)

    def init(key):
        return init_state(model, tx, key, image_shape=row.image_shape, num_classes=k)
    abstract = jax.eval_shape(init, jax.random.key(0))
    state_sharding = parallel.state_sharding(abstract, mesh, fsdp)
    state = jax.jit(init, out_shardings=state_sharding)(jax.random.key(0))
    kx, ky = jax.random.split(jax.random.key(1))
    data = parallel.data_sharded(mesh)
    batch_arrays = {
        "image": jax.device_put(jax.random.normal(kx, (batch,) + row.image_shape), data),
        "label": jax.device_put(jax.random.randint(ky, (batch,), 0, max(k, 1)), data)}
    def sharded_step(state, batch):
        if fsdp:  # gather the weights for the step; states stay sharded between steps
            state = state.replace(params=parallel.gathered(state.params, mesh))
        return step(state, batch)
    jitted = jax.jit(sharded_step, in_shardings=(state_sharding, data),
                     out_shardings=(state_sharding, parallel.replicated(mesh)),
                     donate_argnums=0)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch_arrays).compile()
    compile_s = time.perf_counter() - t0

    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch_arrays)
        return holder["state"], metrics

    for _ in range(warmup):
        jax.block_until_ready(one_step())
    t_step, _ = _median_time(one_step, steps)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = one_step()
    jax.block_until_ready(out)
    t_pipe = (time.perf_counter() - t0) / steps
    loss = float(out[1]["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"{row.name}: loss is {loss}")
    result = {"batch": batch, "devices": mesh.devices.size, "attention": impl or "xla",
              "remat": remat, "fsdp": fsdp,
              "params_m": _param_count(abstract.params) / 1e6, "compile_s": compile_s,
              "ms_per_step": 1e3 * t_step, "ms_per_step_pipelined": 1e3 * t_pipe,
              "images_per_s": batch / t_step, "loss": loss, **_memory(compiled),
              **_flops(row, model)}
    result["model_tflops_per_s"] = 3 * result["fwd_gflops"] * result["images_per_s"] / 1e3
    return result


def sample_row(row: Row, *, batch: int, num_steps: int, repeats: int, dtype: str,
               fsdp: bool, attention: str, num_devices: int = 0,
               guidance: float = 4.0) -> dict:
    mesh = _mesh(num_devices)
    impl = attention_impl(row, attention, jax.devices()[0].platform, dtype)
    model = build_model(row, dtype, False, impl)
    schedule = make_schedule("linear", 1000)
    h, w, c = row.image_shape
    k = row.num_classes

    def init(key):
        y = jnp.zeros((1,), jnp.int32) if k else None
        return model.init(key, jnp.zeros((1, h, w, c)), jnp.zeros((1,)), y)["params"]
    abstract = jax.eval_shape(init, jax.random.key(0))
    params = jax.jit(init, out_shardings=parallel.state_sharding(abstract, mesh, fsdp))(
        jax.random.key(0))

    def denoiser_fn(p):
        if fsdp:
            p = parallel.gathered(p, mesh)

        def net_fn(x, c_noise, y):
            return model.apply({"params": p}, x, c_noise, y)
        return Denoiser(net_fn, schedule, "eps", row.learned_sigma, None)
    fn = sampling.make_sample_fn(denoiser_fn, image_shape=row.image_shape, num_classes=k,
                                 sampler="ddim", num_steps=num_steps, batch_size=batch,
                                 mesh=mesh, options={"eta": 0.0, "spacing": "trailing"})
    args = (params, jax.random.key(2), jnp.int32(0), jnp.float32(guidance))
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    t_call, _ = _median_time(lambda: compiled(*args), repeats)
    x = np.asarray(compiled(*args))
    if not np.isfinite(x).all():
        raise FloatingPointError(f"{row.name}: non-finite samples")
    passes = 2 if k else 1  # CFG: conditional and unconditional in one batched call
    result = {"batch": batch, "devices": mesh.devices.size, "attention": impl or "xla",
              "fsdp": fsdp, "sampler": f"ddim {num_steps} steps" + (", CFG" if k else ""),
              "compile_s": compile_s, "ms_per_call": 1e3 * t_call,
              "ms_per_step": 1e3 * t_call / num_steps, "steps_per_s": num_steps / t_call,
              "images_per_s": batch / t_call, **_memory(compiled), **_flops(row, model)}
    result["model_tflops_per_s"] = (passes * num_steps * result["fwd_gflops"]
                                    * result["images_per_s"] / 1e3)
    return result
