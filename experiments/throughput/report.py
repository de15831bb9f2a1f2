"""MFU, targets and the written report (results.json, results.md) of the throughput
benchmark.

MFU = model FLOPs per second / (peak x devices), model FLOPs counting 3 forward passes a
train step (recomputation under remat is not counted) and 2 a guided sampling step.
The peak is the measured dense matmul rate (or --peak_tflops); MFU against the
datasheet's dense rate is given too where the device kind is known.
"""
from __future__ import annotations

import json
import os

# Dense (no sparsity) bf16 TFLOP/s from vendors' datasheets, matched on device_kind.
NOMINAL_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4),
                       ("A100", 312.0), ("L4", 121.0))

# The targets for this codebase, and the PyTorch references it quotes; all at
# the rows' default batch (256; 128 for the U-Net), on one H100.
TARGETS = {
    "DiT-XL/2": {"mfu": 0.55, "images_per_s": 580, "pytorch": "526 img/s (compiled)"},
    "DiT-B/2": {"mfu": 0.50, "images_per_s": 2750, "pytorch": "2,503 img/s"},
    "UNet-CIFAR": {"images_per_s": 6500, "pytorch": "4,703 img/s"},
    "Sample-DiT-XL/2": {"steps_per_s": 4.3, "pytorch": "3.94 steps/s"},
}


def nominal_peak(device_kind: str) -> float:
    for key, tflops in NOMINAL_BF16_TFLOPS:
        if key.lower() in device_kind.lower():
            return tflops
    return 0.0


def add_mfu(rows: list[dict], peak_tflops: float, nominal_tflops: float,
            num_devices: int) -> None:
    for r in rows:
        achieved = r.get("model_tflops_per_s")
        if achieved is None:
            continue
        if peak_tflops > 0:
            r["mfu"] = achieved / (peak_tflops * num_devices)
        if nominal_tflops > 0:
            r["mfu_nominal"] = achieved / (nominal_tflops * num_devices)


def meets_target(r: dict, default_batch: bool) -> str:
    """'yes' / 'no' against TARGETS (at the default batch), '' where none applies."""
    target = TARGETS.get(r["name"])
    if not target or "error" in r or not default_batch:
        return ""
    ok = all(r.get(k, 0) >= v for k, v in target.items() if k != "pytorch")
    return "yes" if ok else "no"


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _target_text(name: str) -> str:
    t = TARGETS.get(name, {})
    parts = []
    if "mfu" in t:
        parts.append(f">= {t['mfu']:.0%} MFU")
    if "images_per_s" in t:
        parts.append(f">= {t['images_per_s']:,} img/s")
    if "steps_per_s" in t:
        parts.append(f">= {t['steps_per_s']} steps/s")
    return ", ".join(parts)


def markdown(result: dict) -> str:
    d, p = result["device"], result["peak"]
    lines = [
        f"# Throughput: {d.get('device_kind', '?')} x {d.get('num_devices', '?')}",
        "",
        f"- date: {result['date']}",
        f"- command: `{result['command']}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- matmul peak: {_fmt(p.get('peak_tflops'), '.4g')} TFLOP/s "
        f"({p.get('matmul_dtype', '')} {p.get('matmul_n', '')}^3, median); MFU uses "
        f"{result['mfu_peak_tflops']:.4g} TFLOP/s per device"
        + (f"; datasheet {result['nominal_tflops']:.1f}" if result["nominal_tflops"] else ""),
        f"- options: {result['options']}",
        "",
        "| row | batch | ms/step | img/s | steps/s | compile s | peak mem GiB | fwd GFLOPs/img "
        "| model TFLOP/s | MFU | MFU (datasheet) | target | met | PyTorch ref | notes |",
        "|" + "---|" * 15,
    ]
    for r in result["rows"]:
        note = r.get("error", "")
        if not note:
            note = f"attention {r.get('attention')}" + (", remat" if r.get("remat") else "") \
                + (" (after OOM)" if r.get("retried_after_oom") else "") \
                + (", fsdp" if r.get("fsdp") else "") \
                + (f", {r['sampler']}" if "sampler" in r else "")
        mem = r.get("peak_bytes_in_use", r.get("xla_bytes"))
        lines.append("| " + " | ".join([
            r["name"], str(r.get("batch", "")), _fmt(r.get("ms_per_step"), ".2f"),
            _fmt(r.get("images_per_s"), ",.1f"), _fmt(r.get("steps_per_s"), ".2f"),
            _fmt(r.get("compile_s"), ".1f"), _fmt(None if mem is None else mem / 2 ** 30, ".2f"),
            _fmt(r.get("fwd_gflops"), ".4g"), _fmt(r.get("model_tflops_per_s"), ".4g"),
            _fmt(r.get("mfu"), ".1%"), _fmt(r.get("mfu_nominal"), ".1%"),
            _target_text(r["name"]), r.get("meets_target", ""),
            TARGETS.get(r["name"], {}).get("pytorch", ""), note.replace("|", "/")]) + " |")
    lines += ["", "ms/step: median of per-step times, each ended by block_until_ready, after "
              "warm-up (sampling: per DDIM step of a whole call). Peak memory: the row's "
              "process peak (peak_bytes_in_use), else XLA's estimate for the program."]
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    md_path = os.path.join(out_dir, "results.md")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    with open(md_path, "w") as f:
        f.write(markdown(result))
    return json_path, md_path
