"""The package's layout: the import graph read with ``ast`` has no circle and no import of a later stage.

Every import of an ``autobatch`` module counts: at module level, inside a function
(a lazy import), and under ``if TYPE_CHECKING:``. A new module must be given a
stage here, which is the point: its place in the pipeline is a decision.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autobatch"

STAGES: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (name, frozenset(modules))
    for name, modules in (
        # What every stage reads: units, errors, system memory, files, sequences, padding, the wire format, rendering.
        ("base", {
            "autobatch.errors", "autobatch._units", "autobatch._memory", "autobatch._cache", "autobatch._loading",
            "autobatch._tfdata", "autobatch._shipping", "autobatch._shard_files", "autobatch._data",
            "autobatch._sequences", "autobatch.padding", "autobatch._lengths", "autobatch._wire", "autobatch._render",
        }),
        ("probe", {
            "autobatch._result", "autobatch._preprocess", "autobatch._sweep", "autobatch._trial", "autobatch._child",
            "autobatch.probe", "autobatch._size_result", "autobatch.size_probe",
        }),
        ("plan", {
            "autobatch._peak_lines", "autobatch._plan_render", "autobatch._replicas", "autobatch.plan",
            "autobatch.bucket_plan", "autobatch._distribute",
        }),
        # The tf.data paths that pad in TensorFlow: the feeds use them, they never import a feed.
        ("native", {"autobatch.feeds.native"}),
        ("feeds", {"autobatch.feeds"}),
        ("monitor", {"autobatch._readings", "autobatch.monitor"}),
        ("api", {"autobatch._fit_checks", "autobatch._planning", "autobatch.api"}),
        # The package's surface, the command line, and the probe child's entry point (which loads the feeds).
        ("top", {"autobatch", "autobatch.cli", "autobatch.__main__", "autobatch._child_main"}),
    )
)
"""The pipeline's stages, lowest first; a module may import its own stage and the ones before it."""

MAX_MODULE_LINES = 500


def module_files(package: Path) -> dict[str, Path]:
    """Every module of ``package`` by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(package: Path) -> dict[str, set[str]]:
    """Which of the package's modules each module imports.

    ``from pkg.sub import name`` is an import of ``pkg.sub.name`` where that is a module, else of ``pkg.sub``
    (Python also runs ``pkg/sub/__init__.py`` first, which is the package's own business, not an edge).
    """
    modules = module_files(package)
    root = package.name
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target.split(".")[0] == root and target in modules and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def stage_of(module: str, stages: tuple[tuple[str, frozenset[str]], ...] = STAGES) -> int | None:
    """The stage of ``module``: listed by name, or inside a listed package (``autobatch.feeds.shards``)."""
    for number, (_, members) in enumerate(stages):
        if module in members or any(module.startswith(m + ".") for m in members if "." in m):
            return number
    return None


def upward_imports(graph: Mapping[str, set[str]], stages: tuple[tuple[str, frozenset[str]], ...] = STAGES) -> list[str]:
    """``"a (stage) -> b (later stage)"`` for every import of a later stage."""
    names = [name for name, _ in stages]
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            low, high = stage_of(module, stages), stage_of(target, stages)
            if low is not None and high is not None and high > low:
                found.append(f"{module} ({names[low]}) -> {target} ({names[high]})")
    return found


def test_every_module_has_a_stage():
    unplaced = [module for module in module_files(PACKAGE) if stage_of(module) is None]
    assert unplaced == [], f"give these modules a stage in tests/test_layout.py: {unplaced}"


def test_no_import_circles():
    assert circles(import_graph(PACKAGE)) == []


def test_no_stage_imports_a_later_stage():
    assert upward_imports(import_graph(PACKAGE)) == []


def test_no_module_is_over_the_size_limit():
    long = {m: n for m, p in module_files(PACKAGE).items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_the_graph_sees_lazy_type_checking_and_relative_imports_and_the_checks_fail_on_them(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from pkg import high  # lazy\n")
    (package / "high.py").write_text(
        "from typing import TYPE_CHECKING\nfrom pkg.low import f\nif TYPE_CHECKING:\n    from pkg.sub import leaf\n"
    )
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text("from ..low import f\nimport numpy\n")
    graph = import_graph(package)
    assert graph == {
        "pkg": set(),
        "pkg.low": {"pkg.high"},
        "pkg.high": {"pkg.low", "pkg.sub.leaf"},
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.low"},
    }
    assert circles(graph) == [["pkg.high", "pkg.low", "pkg.sub.leaf"]]
    stages = (("low", frozenset({"pkg", "pkg.low", "pkg.sub"})), ("high", frozenset({"pkg.high"})))
    assert stage_of("pkg.sub.leaf", stages) == 0 and stage_of("pkg.other", stages) is None
    assert upward_imports(graph, stages) == ["pkg.low (low) -> pkg.high (high)"]


@pytest.mark.parametrize(
    ("module", "imports"),
    [("autobatch.plan", "autobatch._peak_lines"), ("autobatch.feeds.shards", "autobatch.feeds.native.shards")],
)
def test_the_real_graph_holds_known_edges(module, imports):
    graph = import_graph(PACKAGE)
    assert imports in graph[module] and "autobatch.errors" in graph[module]
    assert graph["autobatch.errors"] == set()


def test_the_native_paths_are_a_stage_below_the_feeds():
    assert stage_of("autobatch.feeds.native.columns") < stage_of("autobatch.feeds.shards") == stage_of("autobatch.feeds")
