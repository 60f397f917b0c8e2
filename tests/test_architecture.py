"""The layering ARCHITECTURE.md promises: packages in a strict order (no upward import), no import cycle in src/,
nothing imports the CLI, and every module of the package has its line in ARCHITECTURE.md."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "tuneforge"


def _imports() -> dict[str, set[str]]:
    """{module: the tuneforge modules it imports}, lazy (function-level) imports included."""
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tuneforge"):
                # `from tuneforge import runs` imports the module runs; `from tuneforge.runs import x`, runs.
                found |= ({f"{node.module}.{a.name}" for a in node.names} & modules.keys()) or {node.module}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("tuneforge")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycle_and_nothing_imports_the_cli():
    graph = _imports()
    assert len(graph) > 40
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert not [m for m, deps in graph.items() if "tuneforge.cli" in deps]


def test_cycle_finder_finds_a_cycle():
    """The check above would see a cycle if there were one."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_is_in_architecture_md():
    text = (REPO / "ARCHITECTURE.md").read_text()
    missing = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
               if p.name != "__init__.py" and f"`{p.relative_to(PACKAGE).as_posix()}`" not in text
               and f"`{p.stem}.py`" not in text]
    assert not missing, f"ARCHITECTURE.md has no line for {missing}"


# Bottom to top: a module may import its own package and the packages before it, never one after it.
LAYERS = ("config", "runs", "models", "data", "eval", "tasks", "commands")


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 or parts[1] in LAYERS else len(LAYERS)  # tuneforge.cli: on top


def test_packages_import_only_the_packages_below_them():
    graph = _imports()
    top_level = sorted(m for m in graph if m.count(".") == 1 and m.split(".")[1] not in LAYERS)
    assert top_level == ["tuneforge.cli"], f"modules outside the role packages: {top_level}"
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                    if d != "tuneforge" and _layer(d) > _layer(m))
    assert not upward, "upward imports: " + "; ".join(upward)


def test_the_layer_check_sees_an_upward_import():
    assert _layer("tuneforge.config.tasks") < _layer("tuneforge.data.formats") < _layer("tuneforge.cli")
    assert _layer("tuneforge.commands") == LAYERS.index("commands")


def test_the_usage_reads_every_command_and_loads_no_library():
    """`tuneforge --help` (and the usage after a mistyped command) imports every command module for its summary: a
    command imports torch, transformers or datasets only when it runs, so the usage prints at once."""
    import subprocess
    import sys

    code = ("import sys; from tuneforge.cli import main; main(['--help']); "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'trl', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "reproduce" in out.stdout and out.stdout.strip().splitlines()[-1] == "[]"
