"""Samplers written as straight-line programs over network evaluations, run by one scan.

Every solver built on this module (DPM-Solver, DPM-Solver++, Euler, Heun, Euler
ancestral, PLMS, consistency sampling) forms each point where it calls the network, and
its final answer, as a linear combination of the start x_T, earlier evaluation points
x_n, the model's x0_n and eps_n there, and fresh Gaussian noise, with coefficients that
depend on the time grid only. So a sampler is written once, on the host, with symbolic
`Form`s that read like the paper's formulas:

    plan = Plan(t_start=s)
    p = plan.evaluate(plan.start, s)             # a network call; p.x, p.x0, p.eps
    x = sigma_t / sigma_s * p.x - alpha_t * np.expm1(-h) * p.x0    # DPM-Solver++, s -> t
    ...
    tables = plan.compile(x)                     # coefficient tables (float64 numbers)

and `run_plan` executes the tables: one `lax.scan` iteration per network evaluation
(the network appears once in the compiled program, whatever the solver's order), the
last few (x, x0, eps) kept in a small ring buffer. The NFE is exactly the number of
`evaluate` calls: nothing is computed and thrown away.

Noise: the form of evaluation k (and the output form, k = M) may draw one fresh
standard normal, taken per sample from fold_in(sample key, k + 1) (salt 0 is x_T).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.denoiser import Denoiser
from diffusion.samplers.base import (SampleInputs, Trajectory, paste_final, paste_known,
                                     per_sample_normal, report, sample_keys, start_from)

_QUANTITIES = ("x", "x0", "eps")


class Form:
    """A linear combination sum_s c_s s of symbols: ("start",), (q, n) for q in x, x0,
    eps at evaluation n, and ("z", i) for the i-th fresh noise."""
    __slots__ = ("terms",)

    def __init__(self, terms: dict):
        self.terms = terms

    def __add__(self, other: "Form") -> "Form":
        terms = dict(self.terms)
        for s, c in other.terms.items():
            terms[s] = terms.get(s, 0.0) + c
        return Form(terms)

    def __neg__(self) -> "Form":
        return Form({s: -c for s, c in self.terms.items()})

    def __sub__(self, other: "Form") -> "Form":
        return self + (-other)

    def __mul__(self, a) -> "Form":
        a = float(a)
        return Form({s: a * c for s, c in self.terms.items()})

    __rmul__ = __mul__

    def __truediv__(self, a) -> "Form":
        return self * (1.0 / float(a))


class Point(NamedTuple):
    """An evaluation: the point x it was made at, the model's x0 and eps there, and t."""
    x: Form
    x0: Form
    eps: Form
    t: float


class Tables(NamedTuple):
    """A compiled plan: M evaluations, then the output form (row M of each table)."""
    t: np.ndarray            # [M] evaluation times
    t_start: float           # time of the start state x_T
    start: np.ndarray        # [M + 1] coefficient of x_T
    noise: np.ndarray        # [M + 1] coefficient of the fresh noise of each form
    coef: dict               # q -> [M + 1, K_q]: coefficient of q at evaluation k - 1 - j

    @property
    def num_evals(self) -> int:
        return int(self.t.shape[0])


class Plan:
    """Records a sampler's evaluations as forms; see the module docstring."""

    def __init__(self, t_start: float):
        self.t_start = float(t_start)
        self._forms: list[Form] = []
        self._times: list[float] = []
        self._num_noises = 0

    @property
    def start(self) -> Form:
        return Form({("start",): 1.0})

    def noise(self) -> Form:
        self._num_noises += 1
        return Form({("z", self._num_noises - 1): 1.0})

    def evaluate(self, x: Form, t: float) -> Point:
        n = len(self._forms)
        self._forms.append(x)
        self._times.append(float(t))
        return Point(Form({("x", n): 1.0}), Form({("x0", n): 1.0}),
                     Form({("eps", n): 1.0}), float(t))

    @property
    def num_evals(self) -> int:
        return len(self._forms)

    def compile(self, out: Form) -> Tables:
        forms = self._forms + [out]
        m = len(self._forms)
        if m == 0:
            raise ValueError("a sampling plan needs at least one network evaluation")
        start = np.zeros(m + 1)
        noise = np.zeros(m + 1)
        refs: dict[str, dict] = {q: {} for q in _QUANTITIES}
        noise_owner: dict[int, int] = {}
        for k, form in enumerate(forms):
            for sym, c in form.terms.items():
                if c == 0.0:
                    continue
                if sym[0] == "start":
                    start[k] += c
                elif sym[0] == "z":
                    # Noise lives only in the form that draws it; later forms must refer
                    # to the evaluation point built from it instead.
                    if noise_owner.setdefault(sym[1], k) != k or noise[k] != 0.0:
                        raise ValueError("each noise draw may enter one form only, at most "
                                         "one per form")
                    noise[k] = c
                else:
                    j = k - 1 - sym[1]
                    refs[sym[0]][(k, j)] = refs[sym[0]].get((k, j), 0.0) + c
        coef = {}
        for q, entries in refs.items():
            if entries:  # each quantity keeps as many past evaluations as it needs
                table = np.zeros((m + 1, 1 + max(j for _, j in entries)))
                for (k, j), c in entries.items():
                    table[k, j] = c
                coef[q] = table
        return Tables(np.asarray(self._times), self.t_start, start, noise, coef)


def run_plan(tables: Tables, denoiser: Denoiser, key: jax.Array, shape: tuple,
             inputs: Optional[SampleInputs] = None, *, callback: Optional[Callable] = None,
             return_intermediates: bool = False, **legacy):
    """Executes a compiled plan; x_T (or, for image-to-image, x_init noised to the plan's
    start time) is the state at tables.t_start. Returns x0 [B, ...], and with
    return_intermediates the `Trajectory` of its evaluations as well.

    inputs: the call's `SampleInputs` (legacy keywords y=, x_T=, ... replace its fields).
    With an inpainting mask the known pixels of each evaluation point are pasted in as
    it is formed, so every later form builds on the pasted state (base.paste_known).
    callback(i, t, x, x0) is called at each evaluation (base.report)."""
    inputs = (inputs if inputs is not None else SampleInputs())._replace(**legacy)
    sched = denoiser.schedule
    b = shape[0]
    keys = sample_keys(key, b, inputs.sample_offset)
    x_start = start_from(sched, keys, shape, inputs, tables.t_start)
    quantities = tuple(q for q in _QUANTITIES if q in tables.coef)
    has_noise = bool(np.any(tables.noise != 0.0))
    f32 = lambda a: jnp.asarray(a, jnp.float32)

    def combine(buffers, c_start, c_noise, c_rows, salt):
        x = c_start * x_start
        for q in quantities:
            x = x + jnp.tensordot(c_rows[q], buffers[q], axes=1)
        if has_noise:
            x = x + c_noise * per_sample_normal(keys, tuple(shape[1:]), salt)
        return x

    def step(buffers, inp):
        k, t, c_start, c_noise, c_rows = inp
        x = combine(buffers, c_start, c_noise, c_rows, k + 1)
        x = paste_known(sched, x, t, inputs, keys, k)
        pred = denoiser.predict(x, t, inputs.y, inputs.guidance)
        report(callback, k, t, x, pred.x0)
        new = {"x": x, "x0": pred.x0, "eps": pred.eps}
        buffers = {q: jnp.concatenate([new[q][None], buffers[q][:-1]]) for q in quantities}
        return buffers, ((x, pred.x0) if return_intermediates else None)

    m = tables.num_evals
    buffers = {q: jnp.zeros((tables.coef[q].shape[1],) + tuple(shape), jnp.float32)
               for q in quantities}
    xs = (jnp.arange(m, dtype=jnp.uint32), f32(tables.t), f32(tables.start[:m]),
          f32(tables.noise[:m]), {q: f32(tables.coef[q][:m]) for q in quantities})
    buffers, path = jax.lax.scan(step, buffers, xs)
    out = combine(buffers, f32(tables.start[m]), f32(tables.noise[m]),
                  {q: f32(tables.coef[q][m]) for q in quantities}, jnp.uint32(m + 1))
    out = paste_final(out, inputs)
    if return_intermediates:
        return out, Trajectory(f32(tables.t), *path)
    return out
