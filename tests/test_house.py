"""The rules of the house, checked on the source (docs/design.md §3).

The package ``lgm_ray/`` is read with :mod:`ast` (nothing is imported): every ``import`` and
``from … import`` at any depth (inside functions too), relative ones resolved against the importing
module. On that graph:

(a) no import cycle between modules;
(b) no cycle between subpackages (``__main__`` modules, the roof, left out);
(c) ``lgm_ray.core`` imports only ``lgm_ray.core`` and ``lgm_ray.common``; ``lgm_ray.common`` nothing
    else of lgm_ray;
(d) no module but a ``__main__`` imports a ``__main__`` module;
(e) no ``inspect.signature`` anywhere in lgm_ray;
(f) no citation of the old design notes (the word DESIGN, a space, a section sign) left in the
    project's sources: they cite docs/design.md §N;
(g) every module has a docstring;
(h) imports point one way: common ← core ← backbones ← shards ← distill ← evaluate ← results ←
    report ← sweep (a package imports only itself and packages to its left; ``__main__`` modules
    may import anything);
(i) the package map of docs/design.md §3 has one row for every module, and none for a module that
    is gone.

Every check is a function returning the offences (empty: the rule holds), each naming the offending
modules; the tests at the end run each one on a small synthetic package where it must fail.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lgm_ray"
# The import order, lowest first: a package may import itself and the packages before it.
LAYERS = ("common", "core", "backbones", "shards", "distill", "evaluate", "results", "report", "sweep")
# Where no old citation may be left (the needle is built in two parts so that this file holds none).
CITATION = "DESIGN" + " §"
CITATION_PLACES = ("lgm_ray", "tests", "sweeps", "configs", "benchmarks", "scripts",
                   "README.md", "cluster.yaml", "Makefile", "pyproject.toml")
DESIGN_DOC = ROOT / "docs" / "design.md"
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".txt", ".toml", ".cfg", ".ini", ".json", ""}


@dataclass
class Module:
    """One module of the package as the checks see it."""

    name: str
    path: Path
    tree: ast.Module
    rel: str = ""  # the path below the package folder, e.g. ``core/matching.py``
    imports: set[str] = field(default_factory=set)

    @property
    def is_main(self) -> bool:
        return self.name.rsplit(".", 1)[-1] == "__main__"

    @property
    def subpackage(self) -> str:
        """The first level below the package (``core``, ``sweep``, …); the package's own ``__init__``: ``""``."""
        parts = self.name.split(".")
        return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import names (``from ..core import seeds`` → ``pkg.core``)."""
    if not node.level:
        return node.module or ""
    here = module.name.split(".")
    if module.path.name != "__init__.py":
        here = here[:-1]  # a plain module's relative imports start from its package
    base = here[: len(here) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str, modules: dict[str, Module]) -> str | None:
    """The package module ``name`` denotes: itself, or the nearest enclosing module that exists."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def scan(package_dir: Path) -> dict[str, Module]:
    """Every module of the package at ``package_dir``, with the package modules each one imports."""
    base = package_dir.parent
    modules: dict[str, Module] = {}
    for path in sorted(package_dir.rglob("*.py")):
        name = _module_name(path, base)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        modules[name] = Module(name, path, tree, path.relative_to(package_dir).as_posix())
    for mod in modules.values():
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                origin = _resolve(mod, node)
                # ``from pkg import sub`` imports the module ``pkg.sub`` when there is one, else ``pkg``.
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
            else:
                continue
            for target in targets:
                known = _known(target, modules)
                if known is not None and known != mod.name:
                    mod.imports.add(known)
    return modules


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(comp[0], set(comp), graph) for comp in components]


def _cycle_through(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path start → … → start inside one component (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a component of more than one node always has one


def module_cycles(modules: dict[str, Module]) -> list[str]:
    """(a) Import cycles between modules."""
    graph = {m.name: set(m.imports) for m in modules.values()}
    return ["import cycle: " + " → ".join(c) for c in _cycles(graph)]


def package_cycles(modules: dict[str, Module]) -> list[str]:
    """(b) Cycles between subpackages, ``__main__`` modules left out; each edge names its importers."""
    graph: dict[str, set[str]] = {}
    why: dict[tuple[str, str], list[str]] = {}
    for m in modules.values():
        if m.is_main:
            continue
        for t in m.imports:
            dst = modules[t]
            if dst.is_main or dst.subpackage == m.subpackage or not dst.subpackage or not m.subpackage:
                continue
            graph.setdefault(m.subpackage, set()).add(dst.subpackage)
            why.setdefault((m.subpackage, dst.subpackage), []).append(f"{m.name} → {t}")
    out = []
    for cycle in _cycles(graph):
        edges = [f"{a}→{b} ({'; '.join(sorted(why[a, b]))})" for a, b in zip(cycle, cycle[1:], strict=False)]
        out.append("package cycle: " + " → ".join(cycle) + "\n    because " + "\n    and ".join(edges))
    return out


def core_purity(modules: dict[str, Module]) -> list[str]:
    """(c) core imports only core and common; common imports only common."""
    allowed = {"core": {"core", "common"}, "common": {"common"}}
    out = []
    for m in modules.values():
        if m.subpackage not in allowed:
            continue
        for t in sorted(m.imports):
            if modules[t].subpackage not in allowed[m.subpackage]:
                out.append(f"{m.name} imports {t} ({PACKAGE}.{m.subpackage} may import only "
                           f"{' and '.join(PACKAGE + '.' + p for p in sorted(allowed[m.subpackage]))})")
    return out


def main_imports(modules: dict[str, Module]) -> list[str]:
    """(d) Only ``__main__`` modules import ``__main__`` modules."""
    return [f"{m.name} imports {t} (a command module; move what it needs into an engine module)"
            for m in modules.values() if not m.is_main for t in sorted(m.imports) if modules[t].is_main]


def signature_checks(modules: dict[str, Module]) -> list[str]:
    """(e) ``inspect.signature`` (as an attribute or imported by name) anywhere in the package."""
    out = []
    for m in modules.values():
        for node in ast.walk(m.tree):
            by_attr = (isinstance(node, ast.Attribute) and node.attr == "signature"
                       and isinstance(node.value, ast.Name) and node.value.id == "inspect")
            by_name = (isinstance(node, ast.ImportFrom) and node.module == "inspect"
                       and any(a.name == "signature" for a in node.names))
            if by_attr or by_name:
                out.append(f"{m.name}:{node.lineno} uses inspect.signature")
    return out


def stale_citations(root: Path, places: tuple[str, ...] = CITATION_PLACES) -> list[str]:
    """(f) Text files under ``places`` (relative to ``root``) that still hold the old citation :data:`CITATION`."""
    out = []
    for place in places:
        top = root / place
        files = sorted(top.rglob("*")) if top.is_dir() else [top] if top.exists() else []
        for path in files:
            if not path.is_file() or path.suffix not in TEXT_SUFFIXES or "__pycache__" in path.parts:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            lines = [str(i) for i, line in enumerate(text.splitlines(), 1) if CITATION in line]
            if lines:
                out.append(f"{path.relative_to(root)}:{','.join(lines)} cites {CITATION}N (cite docs/design.md §N)")
    return out


def missing_docstrings(modules: dict[str, Module]) -> list[str]:
    """(g) Modules without a docstring."""
    return [f"{m.name} ({m.path.name}) has no module docstring"
            for m in modules.values() if not (ast.get_docstring(m.tree) or "").strip()]


def wrong_direction(modules: dict[str, Module]) -> list[str]:
    """(h) A package importing one to its right in :data:`LAYERS` (``__main__`` modules excepted)."""
    rank = {p: i for i, p in enumerate(LAYERS)}
    out = [f"{PACKAGE}.{p} is not placed in the import order {LAYERS} (add it to LAYERS and docs/design.md §3)"
           for p in sorted({m.subpackage for m in modules.values()} - set(LAYERS) - {""})]
    for m in modules.values():
        if m.is_main or m.subpackage not in rank:
            continue
        for t in sorted(m.imports):
            dst = modules[t].subpackage
            if dst in rank and rank[dst] > rank[m.subpackage]:
                out.append(f"{m.name} imports {t} ({PACKAGE}.{m.subpackage} lies below {PACKAGE}.{dst})")
    return out


def map_mismatches(modules: dict[str, Module], design: str) -> list[str]:
    """(i) Modules missing from the package map of the design document's §3, and rows naming no module.

    A row of the map is a table row whose first cell is a module's path below the package, in
    backticks (```core/matching.py```, ```__init__.py```).
    """
    section = design.split("\n## 3.", 1)[-1].split("\n## 4.", 1)[0]
    rows = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `") and ".py`" in line}
    paths = {m.rel for m in modules.values()}
    return ([f"{p} has no row in docs/design.md §3" for p in sorted(paths - rows)]
            + [f"docs/design.md §3 has a row for {p}, which is not a module" for p in sorted(rows - paths)])


# --- the rules on the project ------------------------------------------------------------------


@pytest.fixture(scope="module")
def project() -> dict[str, Module]:
    return scan(ROOT / PACKAGE)


def _report(problems: list[str]) -> str:
    return f"{len(problems)} offence(s):\n  " + "\n  ".join(problems)


def test_no_module_cycle(project):
    problems = module_cycles(project)
    assert not problems, _report(problems)


def test_no_package_cycle(project):
    problems = package_cycles(project)
    assert not problems, _report(problems)


def test_core_and_common_stay_pure(project):
    problems = core_purity(project)
    assert not problems, _report(problems)


def test_no_module_imports_a_command(project):
    problems = main_imports(project)
    assert not problems, _report(problems)


def test_no_signature_inspection(project):
    problems = signature_checks(project)
    assert not problems, _report(problems)


def test_no_old_design_citation():
    problems = stale_citations(ROOT)
    assert not problems, _report(problems)


def test_every_module_has_a_docstring(project):
    problems = missing_docstrings(project)
    assert not problems, _report(problems)


def test_imports_point_one_way(project):
    problems = wrong_direction(project)
    assert not problems, _report(problems)


def test_the_design_map_lists_every_module(project):
    problems = map_mismatches(project, DESIGN_DOC.read_text(encoding="utf-8"))
    assert not problems, _report(problems)


def test_the_scan_sees_the_project(project):
    # A scan that found nothing (a moved package, a broken walk) would pass every rule above.
    assert {m.subpackage for m in project.values()} >= set(LAYERS)
    assert "lgm_ray.core.matching" in project["lgm_ray.core.reference"].imports


# --- every check can fail ---------------------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Module]:
    """Write a small ``lgm_ray`` under ``tmp_path`` (documented ``__init__``s added) and scan it."""
    for rel, body in files.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    for folder in [tmp_path / PACKAGE, *(p for p in (tmp_path / PACKAGE).rglob("*") if p.is_dir())]:
        init = folder / "__init__.py"
        if not init.exists():
            init.write_text('"""A package."""\n')
    return scan(tmp_path / PACKAGE)


DOC = '"""A module."""\n'


def test_relative_imports_resolve(tmp_path):
    mods = _package(tmp_path, {
        "core/seeds.py": DOC,
        "core/matching.py": DOC + "from .seeds import x\nfrom . import seeds\n",
        "distill/loop.py": DOC + "def f():\n    from ..core import matching\n    from ..core.seeds import y\n",
        "distill/__init__.py": DOC + "from .loop import f\n",
    })
    assert mods["lgm_ray.core.matching"].imports == {"lgm_ray.core.seeds"}
    assert mods["lgm_ray.distill.loop"].imports == {"lgm_ray.core.matching", "lgm_ray.core.seeds"}
    assert mods["lgm_ray.distill"].imports == {"lgm_ray.distill.loop"}


def test_a_module_cycle_is_named(tmp_path):
    mods = _package(tmp_path, {
        "common/a.py": DOC + "import lgm_ray.common.b\n",
        "common/b.py": DOC + "def late():\n    from . import a\n",
        "common/c.py": DOC + "from lgm_ray.common import a\n",
    })
    assert module_cycles(mods) == ["import cycle: lgm_ray.common.a → lgm_ray.common.b → lgm_ray.common.a"]


def test_a_package_cycle_is_named_and_main_is_the_roof(tmp_path):
    mods = _package(tmp_path, {
        "results/tables.py": DOC + "from lgm_ray.sweep.spec import X\n",
        "sweep/spec.py": DOC,
        "sweep/driver.py": DOC + "from lgm_ray.results.folder import F\n",
        "results/folder.py": DOC,
        "report/__main__.py": DOC + "from lgm_ray.sweep.driver import run\n",
        "sweep/__main__.py": DOC + "from lgm_ray.report.build import b\n",
        "report/build.py": DOC + "from lgm_ray.results.folder import F\n",
    })
    (problem,) = package_cycles(mods)
    assert problem.startswith("package cycle: results → sweep → results")
    assert "lgm_ray.results.tables → lgm_ray.sweep.spec" in problem
    assert "lgm_ray.sweep.driver → lgm_ray.results.folder" in problem
    assert "__main__" not in problem
    assert module_cycles(mods) == []


def test_an_impure_core_is_named(tmp_path):
    mods = _package(tmp_path, {
        "core/matching.py": DOC + "def f():\n    import lgm_ray.distill.loop\n",
        "core/seeds.py": DOC + "from lgm_ray.common.errors import E\n",
        "common/errors.py": DOC,
        "common/cli.py": DOC + "from lgm_ray.core import seeds\n",
        "distill/loop.py": DOC,
    })
    assert core_purity(mods) == [
        "lgm_ray.common.cli imports lgm_ray.core.seeds (lgm_ray.common may import only lgm_ray.common)",
        "lgm_ray.core.matching imports lgm_ray.distill.loop "
        "(lgm_ray.core may import only lgm_ray.common and lgm_ray.core)",
    ]


def test_importing_a_command_is_named(tmp_path):
    mods = _package(tmp_path, {
        "distill/__main__.py": DOC + "from lgm_ray.distill.run import run\n",
        "distill/run.py": DOC,
        "sweep/trial.py": DOC + "from lgm_ray.distill.__main__ import main\n",
        "sweep/driver.py": DOC + "from lgm_ray.distill import __main__\n",
        "sweep/__main__.py": DOC + "from lgm_ray.distill.__main__ import main\n",
    })
    assert [p.split(" ")[0] for p in main_imports(mods)] == ["lgm_ray.sweep.driver", "lgm_ray.sweep.trial"]


def test_signature_inspection_is_named(tmp_path):
    mods = _package(tmp_path, {
        "distill/config.py": DOC + "import inspect\n\ndef f(g):\n    return inspect.signature(g)\n",
        "sweep/spec.py": DOC + "from inspect import signature\n",
        "sweep/ok.py": DOC + "import inspect\n\nx = inspect.isclass\n",
    })
    assert signature_checks(mods) == ["lgm_ray.distill.config:5 uses inspect.signature",
                                      "lgm_ray.sweep.spec:2 uses inspect.signature"]


def test_a_stale_citation_is_named(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text(f"# fine\n# see {CITATION}2\n")
    (tmp_path / "configs" / "b.yaml").write_text("# see docs/design.md §2\n")
    (tmp_path / "README.md").write_text(f"{CITATION}1\n")
    assert stale_citations(tmp_path, ("configs", "README.md", "absent")) == [
        f"configs/a.yaml:2 cites {CITATION}N (cite docs/design.md §N)",
        f"README.md:1 cites {CITATION}N (cite docs/design.md §N)",
    ]


def test_a_missing_docstring_is_named(tmp_path):
    mods = _package(tmp_path, {"core/bare.py": "import torch\n", "core/empty.py": "", "core/fine.py": DOC})
    assert missing_docstrings(mods) == ["lgm_ray.core.bare (bare.py) has no module docstring",
                                        "lgm_ray.core.empty (empty.py) has no module docstring"]


def test_an_upward_import_is_named(tmp_path):
    mods = _package(tmp_path, {
        "shards/reader.py": DOC + "from lgm_ray.distill.config import C\n",
        "distill/config.py": DOC + "from lgm_ray.shards.reader import R\n",
        "distill/__main__.py": DOC + "from lgm_ray.sweep.driver import d\n",
        "sweep/driver.py": DOC,
        "extras/thing.py": DOC,
    })
    assert wrong_direction(mods) == [
        f"lgm_ray.extras is not placed in the import order {LAYERS} (add it to LAYERS and docs/design.md §3)",
        "lgm_ray.shards.reader imports lgm_ray.distill.config (lgm_ray.shards lies below lgm_ray.distill)",
    ]


def test_a_map_out_of_date_is_named(tmp_path):
    mods = _package(tmp_path, {"core/matching.py": DOC, "core/seeds.py": DOC})
    design = ("# d\n## 2. x\n| `core/seeds.py` | not the map |\n## 3. Map\n| module | what |\n|---|---|\n"
              "| `__init__.py` | the package |\n| **core/** | the method |\n| `core/__init__.py` | its face |\n"
              "| `core/seeds.py` | seeds |\n| `core/old.py` | gone |\n## 4. Later\n| `core/matching.py` | not the map |\n")
    assert map_mismatches(mods, design) == ["core/matching.py has no row in docs/design.md §3",
                                            "docs/design.md §3 has a row for core/old.py, which is not a module"]
