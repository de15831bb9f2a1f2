"""FSDP-style sharding (train.fsdp): which arrays are split and along which dimension,
and that a class-conditional DiT trained with the state sharded over 8 devices takes
the same steps as one device with everything replicated."""
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from configs.dit_fashion_mnist_cond import get_config
from diffusion import parallel
from diffusion.train.setup import build_run

from train_steps import train_steps


def test_fsdp_spec_splits_the_largest_divisible_dimension():
    assert parallel.fsdp_spec((1152, 4608), 8) == P(None, "data")
    assert parallel.fsdp_spec((4608, 1152), 8) == P("data", None)
    # 1001 label rows (1000 classes + null) do not divide: split the hidden dimension.
    assert parallel.fsdp_spec((1001, 1152), 8) == P(None, "data")
    assert parallel.fsdp_spec((2, 2, 4, 1024), 8) == P(None, None, None, "data")
    assert parallel.fsdp_spec((1152,), 8) == P()              # biases stay replicated
    assert parallel.fsdp_spec((), 8) == P()                   # step counters, keys
    assert parallel.fsdp_spec((3, 3), 8) == P()               # small
    assert parallel.fsdp_spec((999, 1001), 8) == P()          # nothing divides
    assert parallel.fsdp_spec((1152, 4608), 1) == P()         # one device: nothing to split


def _build(devices, workdir, fsdp):
    cfg = get_config("runlocal")
    cfg.train.fsdp = fsdp
    cfg.optim.flatten = False  # per-array optimizer state, which FSDP splits
    cfg.conditioning.label_dropout = 0.5  # many null labels in a batch of 8
    cfg.model.dtype = "float32"  # bf16 rounding would depend on how work is split
    cfg.model.dit.depth = 1
    return build_run(cfg, workdir, devices)


def test_fsdp_on_eight_devices_equals_replicated_on_one(tmp_path):
    assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"
    run1 = _build(jax.devices()[:1], str(tmp_path / "one"), fsdp=False)
    run8 = _build(jax.devices(), str(tmp_path / "eight"), fsdp=True)
    state1 = jax.jit(run1.init_fn, out_shardings=run1.state_sharding)(jax.random.key(0))
    # The same initial state, resharded (cheaper than compiling a sharded init); from a
    # copy, since device_put may alias the buffers that run1's donation deletes.
    state8 = jax.device_put(jax.tree.map(lambda x: x.copy(), state1), run8.state_sharding)
    l1, s1 = train_steps(run1, state1, 2)
    l8, s8 = train_steps(run8, state8, 2)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in ((s8.params, s1.params), (s8.ema_params, s1.ema_params),
                 (s8.opt_state, s1.opt_state)):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                             atol=1e-5), a, b)

    # The big kernels and their EMA and Adam moments really are split, 1/8 per device.
    kernel = s8.params["block_0"]["fc1"]["kernel"]           # [32, 128]
    assert kernel.sharding.spec == P(None, "data")
    assert kernel.addressable_shards[0].data.shape == (32, 16)
    assert s8.ema_params["block_0"]["fc1"]["kernel"].sharding.spec == P(None, "data")
    moments = [x for x in jax.tree.leaves(s8.opt_state) if np.shape(x) == (32, 128)]
    assert moments and all(m.sharding.spec == P(None, "data") for m in moments)
    assert s8.params["block_0"]["fc1"]["bias"].sharding.spec == P()
    specs = [x.sharding.spec for x in jax.tree.leaves(s8.params)]
    assert sum("data" in tuple(s) for s in specs) >= 8, specs
