"""The package's import graph is a DAG, and its math layer stands on plain jnp.

Every module of `diffusion/` is parsed with `ast` (nothing is imported, so this takes
milliseconds): each `import` / `from ... import`, at module level or inside a
function, is an edge. `from diffusion.x import name` is an edge to the module
`diffusion.x.name` where that is a module, else to `diffusion.x`; a package's
`__init__.py` is the node of the package, and importing `diffusion.a.b` is an edge to
the package `diffusion.a` too (Python runs its `__init__` first) unless the importer
is inside `diffusion.a`. A strongly connected component of more than
one module is a cycle, whether a function-level import hides it at run time or not.
"""
from __future__ import annotations

import ast
import functools
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "diffusion"

# Layer 1 (DESIGN.md, "Layers"): the diffusion math, plain jnp. A name is a module or a
# package (then every module under it).
MATH = ("diffusion.schedules", "diffusion.paths", "diffusion.forward_process",
        "diffusion.targets", "diffusion.losses", "diffusion.flow_matching",
        "diffusion.learned_variance",
        "diffusion.denoiser", "diffusion.samplers", "diffusion.analytic",
        "diffusion.consistency")
MATH_FORBIDDEN_THIRD_PARTY = ("flax", "ml_collections", "optax", "orbax")


def _modules(root: str) -> dict[str, str]:
    """{dotted module name: file path} for every .py file of the package."""
    out = {}
    base = os.path.join(root, PACKAGE)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        rel = os.path.relpath(dirpath, root).split(os.sep)
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            parts = rel if f == "__init__.py" else rel + [f[:-3]]
            out[".".join(parts)] = os.path.join(dirpath, f)
    return out


def _statements(body: list) -> list:
    """Every statement, at any depth (functions, classes, if / try / with blocks):
    import statements are statements, so expressions need no visit (fast)."""
    out = []
    for node in body:
        out.append(node)
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            inner = getattr(node, field, None)
            if isinstance(inner, list):
                out.extend(_statements(inner))
    return out


def _imports(name: str, path: str, modules: dict[str, str]) -> tuple[set[str], set[str]]:
    """(package modules, top-level third-party names) that module `name` imports."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    internal, external = set(), set()

    def resolve(dotted: str) -> str | None:
        # The longest prefix that is a module of the package.
        parts = dotted.split(".")
        for k in range(len(parts), 0, -1):
            candidate = ".".join(parts[:k])
            if candidate in modules:
                return candidate
        return None

    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    target = resolve(alias.name)
                    if target:
                        internal.add(target)
                else:
                    external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here[:len(here) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                external.add(base.split(".")[0])
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                target = full if full in modules else resolve(base)
                if target:
                    internal.add(target)
    # Importing diffusion.a.b runs diffusion/a/__init__.py first: an edge to each
    # enclosing subpackage that the importer is not itself inside (its own packages are
    # already initialised, and the root package is every module's).
    for target in list(internal):
        parts = target.split(".")
        for k in range(2, len(parts)):
            package = ".".join(parts[:k])
            if not name.startswith(package + "."):
                internal.add(package)
    internal.discard(name)
    return internal, external


@functools.lru_cache(maxsize=None)
def _graph(root: str = ROOT):
    """(modules, {module: package modules it imports}, {module: third-party names})."""
    modules = _modules(root)
    edges, external = {}, {}
    for name, path in modules.items():
        edges[name], external[name] = _imports(name, path, modules)
    return modules, edges, external


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in no particular order."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                out.append(sorted(component))
    return out


def _cycle_in(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One cycle through the component's first module, as a path a -> ... -> a."""
    members = set(component)
    start = component[0]
    parents, frontier = {start: None}, [start]
    while frontier:  # breadth first: the shortest way back to `start`
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    path = [v]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, v, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def _in_math(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in MATH)


def test_import_graph_has_no_cycle():
    _, edges, _ = _graph()
    cycles = [c for c in _strongly_connected(edges) if len(c) > 1]
    message = "\n".join(
        f"{len(c)} modules import each other: {', '.join(c)}\n  e.g. "
        + " -> ".join(_cycle_in(c, edges)) for c in cycles)
    assert not cycles, "import cycles in diffusion/:\n" + message


def test_math_layer_imports_no_network_or_config_code():
    modules, edges, external = _graph()
    math_modules = [m for m in modules if _in_math(m)]
    assert "diffusion.schedules" in math_modules and "diffusion.samplers.ddim" in math_modules
    bad = {m: sorted(external[m] & set(MATH_FORBIDDEN_THIRD_PARTY)) for m in math_modules}
    bad = {m: v for m, v in bad.items() if v}
    assert not bad, f"math modules import flax / config / optimizer code: {bad}"
    upward = {m: sorted(t for t in edges[m] if not _in_math(t)) for m in math_modules}
    upward = {m: v for m, v in upward.items() if v}
    assert not upward, f"math modules import from layers above: {upward}"


def test_graph_builder_sees_function_level_and_relative_imports(tmp_path):
    # The checks above must be able to fail: a two-module cycle through a
    # function-level relative import is found.
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from diffusion import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    _, edges, _ = _graph(str(tmp_path))
    assert edges["diffusion.a"] == {"diffusion.b"} and edges["diffusion.b"] == {"diffusion.a"}
    assert [c for c in _strongly_connected(edges) if len(c) > 1] == [["diffusion.a",
                                                                       "diffusion.b"]]
