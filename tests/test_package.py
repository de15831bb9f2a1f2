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


def test_readme_quick_start_runs_as_root_without_sudo():
    import re
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    quick = readme.split("## Quick start", 1)[1]
    command = quick.split("```bash\n", 1)[1].split("\n```", 1)[0]
    # Root on an image without sudo: a bare `sudo apt-get` fails there.
    assert not re.search(r"(^|&&\s*)sudo\s", command), command
    assert "pip install -r requirements.txt -e ." in command
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert "-r requirements.txt -r requirements-test.txt -e ." in ci  # what the README installs
