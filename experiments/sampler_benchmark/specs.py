"""Which samplers to run at which step counts: --samplers and --nfe parsing.

    specs = parse_samplers("ddim,ddim:eta=1.0,dpmpp_2m")   # or "all": the whole registry
    for spec, target_nfe, steps in sampler_runs(specs, [5, 10, 20], schedule.T): ...
"""
from __future__ import annotations

import ast
import dataclasses

from diffusion import samplers


@dataclasses.dataclass
class SamplerSpec:
    label: str    # as given, e.g. "ddim:eta=1.0"
    name: str     # canonical registry name
    options: dict


def parse_samplers(text: str) -> list[SamplerSpec]:
    """'ddim,ddim:eta=1.0,ddpm' -> specs; 'all' -> every registered sampler."""
    if text.strip() == "all":
        return [SamplerSpec(n, n, {}) for n in samplers.SAMPLERS]
    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, *opts = item.split(":")
        options = {}
        for opt in opts:
            if "=" not in opt:
                raise ValueError(f"sampler option {opt!r} in {item!r} is not key=value")
            k, v = opt.split("=", 1)
            try:
                options[k] = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                options[k] = v
        specs.append(SamplerSpec(item, samplers.canonical_name(name), options))
    if not specs:
        raise ValueError("--samplers names no sampler")
    return specs


def parse_ints(text: str, what: str) -> list[int]:
    try:
        vals = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or vals[0] < 1:
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return vals


def steps_for_nfe(name: str, target: int, max_steps: int) -> int | None:
    """The most steps whose NFE fits in target (None if even one step does not)."""
    best = None
    for steps in range(1, min(target, max_steps) + 1):
        if samplers.nfe(name, steps) <= target:
            best = steps
    return best


def sampler_runs(specs: list[SamplerSpec], nfes: list[int], max_steps: int):
    """Yields (spec, target_nfe, steps), skipping targets that repeat a step count."""
    for spec in specs:
        seen = set()
        for target in nfes:
            steps = steps_for_nfe(spec.name, target, max_steps)
            if steps is None or steps in seen:
                print(f"  {spec.label}: no new step count for NFE {target}, skipped")
                continue
            seen.add(steps)
            yield spec, target, steps
