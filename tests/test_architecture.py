"""The package layering of docs/architecture.md, checked on the source.

Every ``.py`` file of the project's packages is parsed (not imported) and each import, at module
level or inside a function, is resolved to the project module it names. A failure lists every
offending file:line with the import it makes.
"""

from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dataloading", "tsn", "tools", "app", "cluster", "cli")

# docs/architecture.md, "Allowed imports": the project modules each package may import besides
# its own ("dataloading.modality" allows that module and anything under it). None: everything.
ALLOWED: dict[str, tuple[str, ...] | None] = {
    "dataloading": (),
    "tsn": ("dataloading.modality",),
    "tools": ("dataloading",),
    "app": ("dataloading", "tsn", "tools"),
    "cluster": ("app", "tsn", "dataloading"),
    "cli": None,
}
RAY_PACKAGES = ("cluster",)  # the only package that may import ray

# docs/architecture.md, "Inside dataloading/": the parts of dataloading/ and the other parts each
# may import ("dataloading": the modules directly under dataloading/, the modality table and
# the process pool).
DATALOADING_PARTS: dict[str, tuple[str, ...]] = {
    "dataloading": (),
    "dataloading.planning": ("dataloading.modality",),
    "dataloading.store": (),
    "dataloading.sources": ("dataloading.store",),
    "dataloading.format": ("dataloading.modality", "dataloading.store", "dataloading.sources.video_io"),
    "dataloading.pipeline": ("dataloading.modality", "dataloading.planning", "dataloading.format",
                             "dataloading.store", "dataloading.sources.flow"),
    "dataloading.pack": ("dataloading.modality", "dataloading.procpool", "dataloading.format",
                         "dataloading.store", "dataloading.sources"),
}
# Pure parts: what they import besides the project modules their row allows (no file, socket or
# object-storage I/O, no DALI, no OpenCV).
PURE_PARTS = ("dataloading.planning", "dataloading.modality")
PURE_IMPORTS = {"__future__", "collections", "dataclasses", "fractions", "functools", "itertools", "math",
                "numpy", "typing"}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root
    line: int
    target: str  # the absolute module name, e.g. "dataloading.pipeline.loader" or "ray.train"
    statement: str  # the source text of the import

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.statement}  ({self.target})"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_project_module(name: str) -> bool:
    """A module or package of the repository (not necessarily one of PACKAGES)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports_of(path: Path, module: str, shown: str) -> list[Import]:
    """Every import in ``path``, the source of ``module`` (any nesting level, relative ones
    resolved), plus ``importlib.import_module("...")`` / ``__import__("...")`` of a literal name;
    ``shown``: the file name in messages."""
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def add(node, target):
        imp = Import(shown, node.lineno, target, ast.get_source_segment(source, node) or target)
        if imp not in found:  # `from m import a, b`: one import of m
            found.append(imp)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from ..y import z
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                # `from pkg import submodule` imports the submodule; `from mod import name` the module.
                sub = f"{base}.{alias.name}"
                add(node, sub if alias.name != "*" and _is_project_module(sub) else base)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                add(node, node.args[0].value)
    return found


def _all_imports() -> dict[str, list[Import]]:
    """package -> the imports made by its files."""
    return {pkg: [imp for path in sorted((ROOT / pkg).rglob("*.py"))
                  for imp in _imports_of(path, _module_name(path), str(path.relative_to(ROOT)))]
            for pkg in PACKAGES}


def _package_of(target: str) -> str | None:
    top = target.split(".")[0]
    return top if top in PACKAGES else None


def _allowed(importer: str, target: str) -> bool:
    allowed = ALLOWED[importer]
    to = _package_of(target)
    if allowed is None or to is None or to == importer:
        return True
    return any(target == a or target.startswith(a + ".") for a in allowed)


def _part_of(module: str) -> str | None:
    """The dataloading part a module belongs to (its sub-package, or "dataloading" for the
    modules directly under dataloading/); None outside dataloading."""
    if module.split(".")[0] != "dataloading":
        return None
    parts = module.split(".")
    sub = ".".join(parts[:2])
    return sub if sub in DATALOADING_PARTS else "dataloading"


def _part_allows(importer_module: str, target: str) -> bool:
    part, to = _part_of(importer_module), _part_of(target)
    if part is None or to is None or part == to:
        return True
    return any(target == a or target.startswith(a + ".") for a in DATALOADING_PARTS[part])


def _report(what: str, bad: list[Import]) -> str:
    return f"{len(bad)} {what}:\n" + "\n".join(f"  {imp}" for imp in bad)


def test_the_packages_exist():
    for pkg in PACKAGES:
        assert (ROOT / pkg / "__init__.py").is_file(), pkg


def test_the_import_parser_sees_every_form(tmp_path):
    """Module- and function-level, `from`, relative and importlib imports all resolve."""
    probe = tmp_path / "probe.py"
    probe.write_text("import ray.train\nfrom dataloading.pipeline import loader\nfrom dataloading import modality\nfrom . import model\n"
                     "from .engine import train_one_epoch\n"
                     "def f():\n    from app.config import Config\n    import importlib\n"
                     "    importlib.import_module('cluster.job')\n")
    targets = sorted((i.line, i.target) for i in _imports_of(probe, "tsn.probe", "tsn/probe.py"))
    assert targets == [(1, "ray.train"), (2, "dataloading.pipeline.loader"), (3, "dataloading.modality"),
                       (4, "tsn.model"), (5, "tsn.engine"), (7, "app.config"), (8, "importlib"), (9, "cluster.job")]
    assert _allowed("tsn", "dataloading.modality") and not _allowed("tsn", "dataloading.pipeline.loader")
    assert _allowed("tsn", "torch") and _allowed("tsn", "tsn.engine") and _allowed("cli", "cluster.job")


@pytest.mark.parametrize("package", PACKAGES)
def test_allowed_imports(package):
    """docs/architecture.md's table: a package imports only the packages below it."""
    bad = [imp for imp in _all_imports()[package] if not _allowed(package, imp.target)]
    allowed = ALLOWED[package]
    rule = "anything" if allowed is None else ", ".join(allowed) or "nothing of the project"
    if bad:
        pytest.fail(_report(f"forbidden imports in {package}/ (it may import {rule})", bad), pytrace=False)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (a node -> the nodes it imports), each node importing the next and
    the last one the first again; None when there is none."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return e.args[1][::-1]  # graphlib reports the importee first
    return None


def _file_module(imp: Import) -> str:
    return _module_name(ROOT / imp.file)


def test_every_dataloading_file_is_in_a_part():
    """Each sub-package of dataloading/ has a row (a new one gets its rule before its code)."""
    subs = {f"dataloading.{p.parent.name}" for p in (ROOT / "dataloading").glob("*/__init__.py")}
    assert subs == set(DATALOADING_PARTS) - {"dataloading"}


@pytest.mark.parametrize("part", list(DATALOADING_PARTS))
def test_dataloading_parts_import_only_what_their_row_allows(part):
    """docs/architecture.md's table for dataloading/: pure maths below I/O below the DALI graph."""
    bad = [imp for imp in _all_imports()["dataloading"]
           if _part_of(_file_module(imp)) == part and not _part_allows(_file_module(imp), imp.target)]
    rule = ", ".join(DATALOADING_PARTS[part]) or "no other part"
    if bad:
        pytest.fail(_report(f"forbidden imports in {part} (it may import {rule})", bad), pytrace=False)


@pytest.mark.parametrize("part", PURE_PARTS)
def test_pure_parts_do_no_io(part):
    """The per-sample maths imports only numpy and pure standard-library modules: what it
    computes depends on its arguments alone (no file, network, DALI or OpenCV)."""
    bad = [imp for imp in _all_imports()["dataloading"]
           if (_file_module(imp) == part or _file_module(imp).startswith(part + "."))
           and _package_of(imp.target) is None and imp.target.split(".")[0] not in PURE_IMPORTS]
    if bad:
        pytest.fail(_report(f"imports in {part} beyond {', '.join(sorted(PURE_IMPORTS))}", bad), pytrace=False)


def test_the_architecture_doc_lists_the_dataloading_rules():
    """docs/architecture.md's "Inside dataloading/" table says what DATALOADING_PARTS checks."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Inside dataloading/", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`dataloading"):
            rows[cells[0].strip("`/").replace("/", ".")] = tuple(
                sorted(c.strip("` ") for c in cells[2].split(",") if c.strip() and c.strip() != "nothing"))
    assert rows == {k: tuple(sorted(v)) for k, v in DATALOADING_PARTS.items()}


def test_no_file_imports_itself_through_others():
    """No import cycle between files anywhere in the product (a module-level or lazy import
    alike): a cycle means two files share a concern that belongs in a third."""
    imports = _all_imports()
    modules = {_module_name(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {m: set() for m in modules}
    for imps in imports.values():
        for imp in imps:
            if imp.target in modules:
                graph[_file_module(imp)].add(imp.target)
    for m in graph:
        graph[m].discard(m)
    cycle = _cycle(graph)
    if cycle:
        edges = [imp for a, b in zip(cycle, cycle[1:]) for pkg in imports.values() for imp in pkg
                 if _file_module(imp) == a and imp.target == b]
        pytest.fail(_report(f"imports closing the file cycle {' -> '.join(cycle)}", edges), pytrace=False)


@pytest.mark.parametrize("package", [p for p in PACKAGES if p not in RAY_PACKAGES])
def test_only_cluster_imports_ray(package):
    bad = [imp for imp in _all_imports()[package] if imp.target.split(".")[0] == "ray"]
    if bad:
        pytest.fail(_report(f"ray imports in {package}/ (only {', '.join(RAY_PACKAGES)}/ imports ray)", bad),
                    pytrace=False)


def test_the_package_graph_has_no_cycles():
    imports = _all_imports()
    # graphlib's graph maps a node to the nodes it needs: here, a package to those it imports.
    graph = {pkg: {_package_of(i.target) for i in imps} - {None, pkg} for pkg, imps in imports.items()}
    cycle = _cycle(graph)
    if not cycle:
        return
    edges = [imp for a, b in zip(cycle, cycle[1:]) for imp in imports[a] if _package_of(imp.target) == b]
    back = [imp for imp in edges if not _allowed(imp.file.split("/")[0], imp.target)] or edges
    pytest.fail(_report(f"imports closing the package cycle {' -> '.join(cycle)}", back), pytrace=False)


@pytest.mark.parametrize("module", ["tsn.model", "app.config"])
def test_import_pulls_in_neither_dali_nor_ray(module):
    """The model (and the config every command loads first) import without DALI and Ray, checked
    in a fresh interpreter: sys.modules after the import."""
    code = (f"import json, sys; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'ray' "
            "or m == 'nvidia.dali' or m.startswith('nvidia.dali.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert not heavy, f"`import {module}` imported {', '.join(heavy[:10])}"
