"""Which samplers to run at which step counts: --samplers and --nfe parsing.

    specs = parse_samplers("ddim,ddim:eta=1.0,dpmpp_2m")   # or "all": the whole registry
    for spec, target_nfe, steps, nfe in sampler_runs(specs, [5, 10, 20], schedule.T,
                                                     schedule): ...
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
    """'ddim,ddim:eta=1.0,ddpm' -> specs; the item 'all' stands for every registered
    sampler with its default options ('all,flow_euler:shift=3.0' adds one more)."""
    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item == "all":
            specs += [SamplerSpec(n, n, {}) for n in samplers.SAMPLERS]
            continue
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
    unique = {}
    for spec in specs:  # a label given twice ("all,ddim") runs once
        unique.setdefault(spec.label, spec)
    return list(unique.values())


def parse_ints(text: str, what: str) -> list[int]:
    try:
        vals = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or vals[0] < 1:
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return vals


def steps_for_nfe(name: str, target: int, max_steps: int, schedule=None,
                  **options) -> tuple[int, int] | None:
    """(steps, nfe): the most steps whose NFE with these options (samplers.nfe, counted
    from the sampler's own plan) fits in target, and that NFE, which equals target when
    some step count reaches it exactly and is the nearest achievable below otherwise
    (heun: 2 N - 1 is odd; plms:warmup=prk: N + 9). None if even one step costs more."""
    count = lambda n: samplers.nfe(name, n, schedule, **options)
    lo, hi = 1, min(target, max_steps)
    if hi < 1 or count(1) > target:
        return None
    while lo < hi:  # NFE grows with the step count: binary search for the last fit
        mid = (lo + hi + 1) // 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo, count(lo)


def sampler_runs(specs: list[SamplerSpec], nfes: list[int], max_steps: int, schedule=None,
                 options_for=None):
    """Yields (spec, target_nfe, steps, nfe), skipping targets that repeat a step count.

    options_for(spec) -> the options the sampler will run with (default spec.options;
    a checkpoint benchmark adds the config's sampling options); nfe is counted with them.
    """
    for spec in specs:
        options = spec.options if options_for is None else options_for(spec)
        seen = set()
        for target in nfes:
            found = steps_for_nfe(spec.name, target, max_steps, schedule, **options)
            if found is None or found[0] in seen:
                print(f"  {spec.label}: no new step count for NFE {target}, skipped")
                continue
            steps, nfe = found
            if nfe != target:
                print(f"  {spec.label}: NFE {target} is not reachable; {steps} steps make "
                      f"{nfe}")
            seen.add(steps)
            yield spec, target, steps, nfe
