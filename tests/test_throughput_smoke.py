"""The throughput benchmark (experiments/throughput) runs end to end on CPU with tiny
networks and writes its report; row names, attention choice and targets behave."""
import json
import math
import os

import pytest

from experiments.throughput import report, run
from experiments.throughput.rows import attention_impl, parse_row, parse_rows


def test_rows_parse_and_bad_names_fail():
    rows = parse_rows("all")
    assert [r.name for r in rows] == ["DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2",
                                      "UNet-CIFAR", "Sample-DiT-XL/2"]
    xl = parse_row("DiT-XL/2")
    assert (xl.image_shape, xl.num_classes, xl.learned_sigma, xl.batch) == \
        ((32, 32, 4), 1000, True, 256)
    unet = parse_row("UNet-CIFAR")
    assert (unet.image_shape, unet.num_classes, unet.batch) == ((32, 32, 3), 0, 128)
    assert parse_row("Sample-DiT-XL/2").kind == "sample"
    with pytest.raises(ValueError, match="DiT-XXL/2"):
        parse_row("DiT-XXL/2")


def test_attention_choice():
    xl = parse_row("DiT-XL/2")  # 16 heads of 72 channels
    assert attention_impl(xl, "auto", "gpu", "bfloat16") == "cudnn"
    assert attention_impl(xl, "auto", "gpu", "float32") is None
    assert attention_impl(xl, "auto", "cpu", "bfloat16") is None
    assert attention_impl(parse_row("UNet-CIFAR"), "auto", "gpu", "bfloat16") is None
    with pytest.raises(ValueError, match="half-precision"):
        attention_impl(xl, "cudnn", "gpu", "float32")


def test_mfu_and_targets():
    rows = [{"name": "DiT-XL/2", "model_tflops_per_s": 440.0, "images_per_s": 600.0}]
    report.add_mfu(rows, peak_tflops=800.0, nominal_tflops=989.4, num_devices=1)
    assert rows[0]["mfu"] == pytest.approx(0.55)
    assert report.meets_target(rows[0], default_batch=True) == "yes"
    assert report.meets_target(rows[0], default_batch=False) == ""
    rows[0]["mfu"] = 0.5
    assert report.meets_target(rows[0], default_batch=True) == "no"
    assert report.nominal_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert report.nominal_peak("cpu") == 0.0


def test_tiny_run_end_to_end(tmp_path):
    out = str(tmp_path / "out")
    result = run.main(["run", "--rows", "DiT-S/8,Sample-DiT-S/8", "--batch", "2", "--steps", "2",
                       "--warmup", "1", "--tiny", "--devices", "1", "--noisolate",
                       "--out", out])
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["rows"] == result["rows"] and saved["device"]["num_devices"] == 1
    assert saved["versions"]["jax"] and "--tiny" in saved["command"]
    assert saved["peak"]["peak_tflops"] > 0
    train, sample = saved["rows"]
    for r in (train, sample):
        assert "error" not in r, r
        for key in ("ms_per_step", "images_per_s", "compile_s", "fwd_gflops", "mfu"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert train["batch"] == 2 and math.isfinite(train["loss"])
    # Sampling: one call of 2 DDIM steps, so steps/s = 2 x calls/s = 2 x images/s / batch.
    assert sample["steps_per_s"] == pytest.approx(sample["images_per_s"])
    # 3 forward passes per training image; a guided step is 2 passes per image.
    assert train["model_tflops_per_s"] == pytest.approx(
        3 * train["fwd_gflops"] * train["images_per_s"] / 1e3)
    md = open(os.path.join(out, "results.md")).read()
    assert "| DiT-S/8 | 2 |" in md and "Sample-DiT-S/8" in md


def test_worker_process_and_failed_row():
    options = {"matmul_size": 64, "dtype": "float32", "devices": 1}
    peak = run._in_subprocess({"task": "peak", "options": options})
    assert peak["peak"]["matmul_n"] == 64 and peak["peak"]["peak_tflops"] > 0
    assert peak["device"]["num_devices"] == 1
    bad = run._safe_task({"task": "row", "name": "DiT-Q/2", "options": {"tiny": True}})
    assert "unknown benchmark row" in bad["error"]
