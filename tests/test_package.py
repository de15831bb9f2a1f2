"""The library installs as the `diffusion` package: its data files ship inside it."""
import fnmatch
import os
import tomllib

import diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(diffusion.__file__))


def test_shipped_classifier_is_package_data():
    from diffusion.evaluation import classifier
    from diffusion.train import evaluator
    path = os.path.abspath(evaluator.DEFAULT_CLASSIFIER)
    assert path == os.path.abspath(classifier.DEFAULT_WEIGHTS)
    assert path.startswith(PACKAGE + os.sep), f"{path} is outside the package {PACKAGE}"
    assert os.path.isfile(path)
    # pyproject's package-data must name it, or a non-editable install drops the file.
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    rel = os.path.relpath(path, os.path.join(PACKAGE, "evaluation"))
    patterns = project["tool"]["setuptools"]["package-data"]["diffusion.evaluation"]
    assert any(fnmatch.fnmatch(rel, p) for p in patterns), (rel, patterns)


def test_pyproject_depends_on_every_pinned_requirement():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pinned = {line.split("==")[0].strip().lower() for line in f
                  if line.strip() and not line.startswith("#")}
    assert pinned - {"pytest"} <= names, pinned - names
