"""The house's lines, read from the imports themselves (``ast``, every import, also those
inside functions): which package may import which, and no circle between modules.

- ``producer/`` (the client library and the shared core) imports no other package of ours.
- ``gateway/`` and ``worker/`` import ``producer/``, never each other, nor the command.
- ``batchery/`` (the command) ties them together; its lazy import of ``bench`` for
  ``batchery bench`` is the one arrow that runs up (named below).
- ``bench/`` uses the command's processes (``batchery/local.py``) and the packages below.
- Nothing of ours imports TensorFlow outside ``worker/`` (and ``bench/``, which runs models).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("producer", "gateway", "worker", "batchery", "bench")
ALLOWED = {
    "producer": {"producer"},
    "gateway": {"producer", "gateway"},
    "worker": {"producer", "worker"},
    "batchery": {"producer", "gateway", "worker", "batchery"},
    "bench": {"producer", "gateway", "worker", "batchery", "bench"},
}
#: The one arrow up: the command runs the benchmarks, lazily, for ``batchery bench``.
EXCEPTIONS = {("batchery.cli", "bench.suite"), ("batchery.cli", "bench.capacity")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: frozenset[str] = frozenset()) -> set[str]:
    """Every module ``path`` imports (absolute names), wherever the import statement is:
    ``from producer import connections`` is ``producer.connections`` when that is one of
    ``modules``, else ``producer``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    modules = frozenset(paths)
    return {
        name: {m for m in imports(path, modules) if m in modules and m != name}
        for name, path in paths.items()
    }


def test_each_package_imports_only_what_its_room_allows() -> None:
    wrong = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        for target in targets
        if target.split(".")[0] not in ALLOWED[name.split(".")[0]]
        and (name, target) not in EXCEPTIONS
    ]
    assert wrong == []


def test_no_module_is_in_a_circle_of_imports() -> None:
    edges = graph()
    circles: list[list[str]] = []

    def visit(node: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt in on_path:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt], on_path | {nxt}, done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start], {start}, done)
    assert circles == []


def test_only_the_worker_and_the_bench_import_tensorflow() -> None:
    for pkg in ("producer", "gateway", "batchery"):
        for path in (ROOT / pkg).rglob("*.py"):
            assert not any(m.split(".")[0] == "tensorflow" for m in imports(path)), path


def test_the_rules_catch_a_forbidden_import(tmp_path: Path) -> None:
    """The reader itself: an import inside a function counts, ``from x import y`` too."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from worker import models\n    import gateway.app\n")
    assert imports(sample, frozenset({"worker.models"})) == {"worker.models", "gateway.app"}
    assert imports(sample) == {"worker", "gateway.app"}
