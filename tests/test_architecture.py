"""The package's import graph, read from the source (AST): no cycle, ``core/`` pure torch, the harness outside.

Every import counts, at any depth (inside functions and ``if TYPE_CHECKING:`` too): a lazy import still ties two
modules together. A name taken from a lazy package (``from fora_lightning.lora import ForaLoRA``) is an arrow to
the module that defines it (the package's ``_EXPORTS``). Check it with ``python -m pytest tests/test_architecture.py``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fora_lightning"
CORE_MAY_IMPORT = {
    "torch",
    "safetensors",
    "bitsandbytes",
}  # + the standard library; bitsandbytes: lazily, to dequantize
CORE_MUST_NOT_IMPORT = {"lightning", "pytorch_lightning", "lightning_fabric", "transformers", "datasets", "peft"}
# Cycles another change is removing; the lead empties this list at merge (each entry: the modules of one cycle).
ALLOWED_CYCLES: list[frozenset[str]] = []  # none: keep it empty


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lazy_exports(tree: ast.Module) -> dict[str, str]:
    """A package ``__init__``'s ``_EXPORTS = {name: module}`` literal (empty when it has none)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            if isinstance(node.value, ast.Dict):
                return {ast.literal_eval(k): ast.literal_eval(v) for k, v in zip(node.value.keys, node.value.values)}
    return {}


def in_type_checking_block(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (a package ``__init__`` repeats its exports there)."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            ids |= {id(n) for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)}
    return ids


def parse_package() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, tree: ast.Module, is_package: bool) -> set[str]:
    """Every module ``name`` imports (absolute names; relative imports resolved)."""
    skip = in_type_checking_block(tree) if is_package else set()
    base = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                source = f"{anchor}.{node.module}" if node.module else anchor
            else:
                source = node.module or ""
            out.add(source)
            out |= {f"{source}.{alias.name}" for alias in node.names}  # a submodule, when it is one
    return out


def package_graph() -> dict[str, set[str]]:
    """``module -> modules of fora_lightning it imports`` (a lazy package's name resolved to its defining module)."""
    parsed = parse_package()
    exports = {name: lazy_exports(tree) for name, (path, tree) in parsed.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for name, (path, tree) in parsed.items():
        edges: set[str] = set()
        for target in imports_of(name, tree, path.name == "__init__.py"):
            package, _, attr = target.rpartition(".")
            if target in parsed:
                edges.add(target)
            elif package in exports and attr in exports[package]:
                edges.add(exports[package][attr])
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_cycles_and_lazy_names():
    """The checks below can fail: a known cycle is found, and a lazy package's name leads to its module."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = package_graph()
    assert "fora_lightning.protection" in graph["fora_lightning.lora.callback"]
    assert "fora_lightning.lora.callback" in graph["fora_lightning.llm.report"]  # through lora/__init__'s _EXPORTS
    tree = ast.parse("from . import layer\nfrom .model import x\nfrom ..core import targets\n")
    assert imports_of("fora_lightning.lora.merge", tree, False) >= {
        "fora_lightning.lora.layer",
        "fora_lightning.lora.model",
        "fora_lightning.core.targets",
    }


def test_no_import_cycle_in_the_package():
    found = [sorted(c) for c in cycles(package_graph()) if c not in ALLOWED_CYCLES]
    assert not found, f"import cycles in fora_lightning/: {found}"


def test_core_imports_torch_and_itself_only():
    stdlib = set(sys.stdlib_module_names)
    bad: list[str] = []
    for name, (path, tree) in parse_package().items():
        if not name.startswith("fora_lightning.core"):
            continue
        for target in imports_of(name, tree, path.name == "__init__.py"):
            top = target.split(".")[0]
            if top == "fora_lightning":
                if not target.startswith("fora_lightning.core"):
                    bad.append(f"{name} -> {target}")
            elif top in CORE_MUST_NOT_IMPORT or (top not in CORE_MAY_IMPORT and top not in stdlib):
                bad.append(f"{name} -> {target}")
    assert not bad, f"core/ imports outside {sorted(CORE_MAY_IMPORT)}, the standard library and core/: {bad}"


def test_the_package_never_imports_the_harness():
    bad = [
        f"{name} -> {t}"
        for name, (path, tree) in parse_package().items()
        for t in imports_of(name, tree, path.name == "__init__.py")
        if t.split(".")[0] in {"experiments", "scripts", "benchmarks", "tests"}
    ]
    assert not bad, bad


def test_importing_the_library_loads_nothing_of_the_harness():
    """In a fresh interpreter (from the repository root, where ``experiments`` is importable): after each statement,
    no module of ``experiments`` is loaded."""
    statements = [
        "from fora_lightning import FORA",
        "from fora_lightning import FORA, ForaLoRA, ForaModule, CausalLMModule, TextDataModule",
        "import fora_lightning.baselines, fora_lightning.metrics, fora_lightning.llm.report",
    ]
    code = "import json, sys\nseen = []\n"
    for statement in statements:
        code += f"{statement}\nseen.append(sorted(m for m in sys.modules if m.split('.')[0] == 'experiments'))\n"
    code += "import experiments\nprint(json.dumps(seen))\n"  # the harness itself is importable there
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [[]] * len(statements)
