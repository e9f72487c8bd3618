"""The package's layout rules, read from its source with ast: no import cycles (lazy imports
included), no private names imported across modules, the library never imports the command layer,
and `import nanoseek` pulls in no server, plotting or test library."""

import ast
import subprocess
import sys
from pathlib import Path

import nanoseek

ROOT = Path(nanoseek.__file__).parent
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported nanoseek module, names taken from it) for every import in the module, also those
    inside functions."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("nanoseek")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("nanoseek"):
                continue
            names = [a.name for a in node.names]
            subs = [n for n in names if f"{base}.{n}" in MODULES]  # `from pkg import module`
            found += [(f"{base}.{n}", []) for n in subs]
            if len(subs) < len(names):  # `from pkg import module` alone needs no more of pkg than any submodule does
                found.append((base, [n for n in names if n not in subs]))
    return found


def graph() -> dict[str, set[str]]:
    return {m: {target for target, _ in imports(m) if target in MODULES and target != m} for m in MODULES}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in g:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_no_private_names_imported_across_modules():
    bad = [f"{m} imports {n} from {target}" for m in MODULES for target, names in imports(m)
           for n in names if target != m and n.startswith("_") and not n.startswith("__")]
    assert bad == []


def test_the_library_never_imports_the_command_layer():
    bad = [f"{m} imports {target}" for m in MODULES if not m.startswith("nanoseek.cli") and m != "nanoseek.__main__"
           for target, _ in imports(m) if target == "nanoseek.cli" or target.startswith("nanoseek.cli.")]
    assert bad == []


def test_importing_nanoseek_pulls_in_no_server_plotting_or_test_library():
    code = ("import sys, nanoseek, nanoseek.inference, nanoseek.chat; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'matplotlib', 'transformers', 'pytest', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_file_is_longer_than_a_reader_can_hold():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
