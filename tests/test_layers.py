"""The package's layering, read from the source with ``ast`` (nothing is imported): no import circle between files,
every import points down the layer table, and ``unip`` imports inside functions only where a heavy dependency is
kept out of a module that must stay light (docs/architecture.md, "Layers").

``python tests/test_layers.py`` prints the measurement: circles, upward arrows and function-level imports.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, FrozenSet, List, Set, Tuple

SRC = Path(__file__).resolve().parents[1] / "src"

#: Layer of each module prefix (the longest prefix wins); an import may point to its own layer or one below.
LAYERS = {
    "unip.cli": 9,
    "unip.demo": 8, "unip.sweep": 8, "unip.deploy": 8, "unip.serve": 8, "unip.checkpoint_kinds": 8,
    "unip.seg": 7, "unip.distill": 7, "unip.analysis": 7,
    "unip.checkpoint": 6,
    "unip.data": 5,
    "unip.engine": 4, "unip.models": 4,
    "unip.outputs": 2,
    "unip.errors": 1, "unip.atomic": 1, "unip.text": 1, "unip.memory": 1, "unip.fingerprint": 1, "unip.optional": 1,
    "unip.run_lock": 1,
    "unip": 1,  # the package itself (this name only): its version and error classes
}

#: Third-party modules that make an import slow (seconds: torch, timm; about one: matplotlib) or need an extra.
HEAVY = frozenset({"torch", "torchvision", "timm", "matplotlib", "cv2", "onnx", "onnxruntime", "onnxscript",
                   "torchao", "tensorboard"})

#: Modules that import a part of unip inside functions to keep a heavy dependency out of their own import, and
#: why. A function-level ``unip`` import is allowed only here, only of a module that imports one of the named
#: dependencies, and only while the importing module itself does not (else the import gains nothing).
KEPT_LIGHT: Dict[str, Tuple[FrozenSet[str], str]] = {
    "unip.cli": (frozenset({"torch", "matplotlib", "timm"}),
                 "`unip --help` and a bad command line answer in a tenth of a second: each verb imports its "
                 "library (torch: seconds) when it runs"),
    "unip.seg.report": (frozenset({"matplotlib"}),
                        "fine-tuning uses the evaluation helpers here but draws no figure; only `unip evaluate` "
                        "imports matplotlib (about a second)"),
}


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    #: (target module, line, inside a function) of each import of unip that runs (not under TYPE_CHECKING)
    imports: List[Tuple[str, int, bool]] = field(default_factory=list)
    #: top-level third-party modules (first name)
    third_party: Set[str] = field(default_factory=set)
    #: (imported module, name) of private names taken from another package
    private: List[Tuple[str, str, int]] = field(default_factory=list)


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_modules(src: Path = SRC) -> Dict[str, Module]:
    """Every module under ``src/unip`` with the imports it makes."""
    modules = {}
    for path in sorted((src / "unip").rglob("*.py")):
        name = module_name(path, src)
        modules[name] = Module(name, path, path.name == "__init__.py")
    for module in modules.values():
        _read_imports(module, modules)
    return modules


def _reexports(package: Module, modules: Dict[str, Module]) -> Dict[str, str]:
    """name → the submodule of ``package`` that its ``__init__`` takes the name from."""
    found = {}
    for node in ast.parse(package.path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package.name + "."):
            for alias in node.names:
                found[alias.asname or alias.name] = _resolve(node.module, alias.name, modules)
    return found


def _resolve(base: str, name: str, modules: Dict[str, Module]) -> str:
    """The module ``from base import name`` depends on: the submodule ``base.name``, the submodule of package
    ``base`` that re-exports ``name``, or ``base``."""
    if f"{base}.{name}" in modules:
        return f"{base}.{name}"
    if base in modules and modules[base].is_package:
        return _reexports(modules[base], modules).get(name, base)
    return base


def _read_imports(module: Module, modules: Dict[str, Module]) -> None:
    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            checking = type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.dump(child.test))
            if isinstance(child, ast.Import) and not checking:
                for alias in child.names:
                    _record(alias.name, None, child.lineno, in_function)
            elif isinstance(child, ast.ImportFrom) and not checking:
                base = child.module or ""
                if child.level:  # relative: resolved against this module's package
                    parts = module.name.split(".")[:len(module.name.split(".")) - (not module.is_package)]
                    base = ".".join(parts[:len(parts) - child.level + 1] + ([base] if base else []))
                for alias in child.names:
                    _record(base, alias.name, child.lineno, in_function)
            visit(child, inside, checking)

    def _record(base: str, name, line: int, in_function: bool) -> None:
        root = base.split(".")[0]
        if root != "unip":
            if not in_function:
                module.third_party.add(root)
            return
        target = base if name is None else _resolve(base, name, modules)
        assert target in modules, f"{module.path}:{line}: imports {target}, which is not a module of unip"
        module.imports.append((target, line, in_function))
        if name and name.startswith("_") and not name.startswith("__") and \
                _package(target) != _package(module.name):
            module.private.append((target, name, line))

    visit(ast.parse(module.path.read_text(encoding="utf-8")), False, False)


def _package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def edges(modules: Dict[str, Module], top_level_only: bool = False) -> Dict[str, Set[str]]:
    """module → the modules importing it runs: each import's target and the packages above it, except a package's
    own ancestors (already being imported when its code runs)."""
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for module in modules.values():
        for target, _, in_function in module.imports:
            if top_level_only and in_function:
                continue
            parts = target.split(".")
            for depth in range(len(parts), 0, -1):
                ancestor = ".".join(parts[:depth])
                explicit = depth == len(parts)
                if ancestor == module.name or (not explicit and module.name.startswith(ancestor + ".")):
                    continue
                graph[module.name].add(ancestor)
    return graph


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
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


def layer(name: str) -> int:
    """The layer of the longest prefix of ``name`` in ``LAYERS``; ``KeyError`` for a module outside the table."""
    prefixes = [p for p in LAYERS if name == p or (p != "unip" and name.startswith(p + "."))]
    if not prefixes:
        raise KeyError(f"{name} has no layer: add it to LAYERS in tests/test_layers.py")
    return LAYERS[max(prefixes, key=len)]


def upward_arrows(graph: Dict[str, Set[str]]) -> List[Tuple[str, str]]:
    return sorted((module, target) for module, targets in graph.items() for target in targets
                  if layer(target) > layer(module))


def heavy_imports(modules: Dict[str, Module]) -> Dict[str, Set[str]]:
    """module → the heavy third-party modules that importing it imports (its top-level imports, transitively)."""
    graph = edges(modules, top_level_only=True)
    result: Dict[str, Set[str]] = {}

    def of(name: str, seen: Set[str]) -> Set[str]:
        if name in result:
            return result[name]
        seen = seen | {name}
        found = modules[name].third_party & HEAVY
        for target in graph[name]:
            if target not in seen:
                found = found | of(target, seen)
        return found

    for name in modules:
        result[name] = of(name, set())
    return result


def function_imports(modules: Dict[str, Module]) -> List[Tuple[str, int, str]]:
    """``(module, line, imported module)`` of each ``unip`` import inside a function."""
    return sorted({(m.name, line, target) for m in modules.values() for target, line, inside in m.imports if inside})


def _cost(heavy: Dict[str, Set[str]], importer: str, target: str) -> Set[str]:
    """The heavy modules that ``importer`` importing ``target`` brings in: the target's and its packages'."""
    parts = target.split(".")
    packages = [".".join(parts[:depth]) for depth in range(1, len(parts))]
    return heavy[target].union(*(heavy[p] for p in packages if not importer.startswith(p + ".")))


def lazy_import_problems(modules: Dict[str, Module]) -> List[str]:
    heavy = heavy_imports(modules)
    problems = []
    for name, line, target in function_imports(modules):
        where = f"{modules[name].path.name}:{line}: {target}"
        kept = next((entry for prefix, entry in KEPT_LIGHT.items() if name == prefix or name.startswith(prefix + ".")),
                    None)
        if kept is None:
            problems.append(f"{where} imported inside a function: import it at the top (or add the module to "
                            "KEPT_LIGHT with the reason)")
            continue
        dependencies, _ = kept
        cost = _cost(heavy, name, target)
        if not cost & dependencies:
            problems.append(f"{where} imports none of {sorted(dependencies)}: import it at the top")
        elif heavy[name] & cost & dependencies:
            problems.append(f"{where}: {name} imports {sorted(heavy[name] & dependencies)} at the top anyway")
    return problems


# ============================================================================================ tests
MODULES = read_modules()


def test_no_import_circle_between_files():
    assert circles(edges(MODULES)) == []


def test_every_import_points_down_the_layers():
    arrows = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})" for m, t in upward_arrows(edges(MODULES))]
    assert arrows == []


def test_imports_inside_functions_only_keep_heavy_dependencies_out():
    assert lazy_import_problems(MODULES) == []


def test_no_module_takes_a_private_name_of_another_package():
    taken = [f"{m.path.relative_to(SRC.parent)}:{line}: {name} of {target}" for m in MODULES.values()
             for target, name, line in m.private]
    assert taken == []


def test_every_module_has_a_layer_and_the_light_ones_are_light():
    for name in MODULES:
        layer(name)
    heavy = heavy_imports(MODULES)
    assert heavy["unip.cli"] == set() and heavy["unip.engine.config"] == set()
    assert "torch" in heavy["unip.seg.train"] and "matplotlib" in heavy["unip.seg.figures"]  # the reader sees them


def test_the_cli_builds_its_parser_without_importing_torch():
    """What the layers keep light, measured: ``unip --help`` (every verb's parser built) imports no heavy module."""
    code = ("import sys; import unip.cli; unip.cli.build_parser(); "
            f"print(sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_checker_finds_a_circle_an_upward_arrow_and_a_needless_lazy_import(tmp_path):
    """The rules catch what they are for, on a made-up package."""
    package = tmp_path / "unip"
    (package / "seg").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("")
    (package / "seg" / "__init__.py").write_text("from unip.seg.a import thing\n")
    (package / "seg" / "a.py").write_text("from unip.seg import b\nthing = 1\n")
    (package / "seg" / "b.py").write_text("import torch\nfrom unip.seg.a import thing\n")
    (package / "checkpoint.py").write_text("def f():\n    from unip.errors import E\n\nfrom unip.seg import thing\n")
    modules = read_modules(tmp_path)
    graph = edges(modules)
    assert circles(graph) == [["unip.seg.a", "unip.seg.b"]]
    assert ("unip.checkpoint", "unip.seg.a") in upward_arrows(graph)
    assert ("unip.checkpoint", "unip.seg") in upward_arrows(graph)
    assert heavy_imports(modules)["unip.seg"] == {"torch"}
    assert len(lazy_import_problems(modules)) == 1


def report(modules: Dict[str, Module]) -> str:
    graph = edges(modules)
    found, arrows, lazy = circles(graph), upward_arrows(graph), function_imports(modules)
    lines = [f"{len(modules)} modules, {sum(map(len, graph.values()))} import arrows",
             f"circles between files: {len(found)}", *(f"  {' ↔ '.join(c)}" for c in found),
             f"upward arrows: {len(arrows)}",
             *(f"  {m} (layer {layer(m)}) → {t} (layer {layer(t)})" for m, t in arrows),
             f"unip imports inside functions: {len({(m, line) for m, line, _ in lazy})} statements "
             f"(of {len({t for _, _, t in lazy})} modules)"]
    lines += [f"  {m}:{line} → {t}" for m, line, t in lazy if "-v" in sys.argv]
    return "\n".join(lines)


if __name__ == "__main__":  # python tests/test_layers.py [-v] [SRC]: SRC another checkout's src/ folder
    folders = [arg for arg in sys.argv[1:] if arg != "-v"]
    print(report(read_modules(Path(folders[0]).resolve()) if folders else MODULES))
