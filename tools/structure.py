"""The shape of a package: import circles between its modules, its longest functions, its modules' sizes.

    python tools/structure.py [raftlib] [--max-lines 100]

Reads the source only (ast; nothing is imported). Every import counts, at module level or inside a function
(a lazy import still ties two modules together). `from pkg import name` counts as importing the module
`pkg.name` when that is a module, else `pkg`; importing a package's submodule does not count as importing the
package's `__init__` (Python runs it, but an `__init__` that imports nothing cannot close a circle; one that
imports does appear in the graph as its own module). Exit 1 when there is a circle or a function over the limit.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Function:
    module: str
    name: str
    lines: int
    line: int


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package directory `root`."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `module` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` names a.b.c; a name that is not a module resolves to the module holding it
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def functions(names: dict[str, Path]) -> list[Function]:
    """Every function and method, longest first (lines from `def` to its last line, decorators excluded)."""
    found = []
    for module, path in names.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append(Function(module, node.name, node.end_lineno - node.lineno + 1, node.lineno))
    return sorted(found, key=lambda f: -f.lines)


def import_graph(root: Path) -> dict[str, set[str]]:
    names = module_names(root)
    return {module: imports_of(module, path, set(names)) for module, path in names.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", nargs="?", default="raftlib")
    parser.add_argument("--max-lines", type=int, default=100)
    args = parser.parse_args(argv)
    root = Path(args.package)
    names = module_names(root)
    found_circles = circles(import_graph(root))
    longest = functions(names)
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in names.items()}
    print(
        f"{len(names)} modules, {sum(sizes.values())} lines; largest: "
        + ", ".join(f"{m} {n}" for m, n in sorted(sizes.items(), key=lambda x: -x[1])[:5])
    )
    print("longest functions: " + ", ".join(f"{f.module}.{f.name} {f.lines}" for f in longest[:5]))
    print("import circles: " + ("; ".join(" <-> ".join(c) for c in found_circles) or "none"))
    over = [f for f in longest if f.lines > args.max_lines]
    for f in over:
        print(f"over {args.max_lines} lines: {f.module}.{f.name} ({f.lines} lines, line {f.line})")
    return 1 if found_circles or over else 0


if __name__ == "__main__":
    sys.exit(main())
