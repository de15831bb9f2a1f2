"""Studies and benchmarks, each a folder with its scripts, results and README.

Run from the repository root as modules, e.g.
`python -m experiments.sampler_benchmark.run --problem gmm2d`: the root is then on the
import path, so `experiments` and `configs` import as packages next to `diffusion`.
"""
