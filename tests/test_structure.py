"""raftlib's shape, as issue 15 asked it to stay: no import circle between its modules, no function over 100 lines.

The checker (`tools/structure.py`) reads the source with `ast`; the first test shows it finds a circle (a lazy
import counts) and a long function in a package written here, so a pass below means something.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import structure  # noqa: E402


def test_the_checker_finds_a_lazy_import_circle_and_a_long_function(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from pkg import a\n" + "    x = 1\n" * 120)
    (package / "c.py").write_text("from pkg import a\n")  # imports into the circle, is not part of it
    assert structure.circles(structure.import_graph(package)) == [["pkg.a", "pkg.sub.b"]]
    longest = structure.functions(structure.module_names(package))[0]
    assert (longest.module, longest.name, longest.lines) == ("pkg.sub.b", "f", 122)
    assert structure.main([str(package)]) == 1


def test_raftlib_has_no_import_circle():
    assert structure.circles(structure.import_graph(ROOT / "raftlib")) == []


def test_no_raftlib_function_is_over_100_lines():
    over = [f for f in structure.functions(structure.module_names(ROOT / "raftlib")) if f.lines > 100]
    assert over == [], [f"{f.module}.{f.name}: {f.lines} lines" for f in over]


ONE_EVALUATION_EXCEPTIONS = {
    "hh.py": "the tiny setup's preference pairs (CPU-only, before any run), not an evaluation",
    "bench_generation.py": "the generation benchmark, which times the decoders themselves",
}


def test_every_evaluation_goes_through_raftlib_evaluation():
    """One evaluation path: no raftsuite module draws completions itself (raftlib.text.generate) except the
    listed ones, and every causal LM a baseline loads is moved to the run's device (hh.load_causal_lm), so no
    stage evaluates on another device than the run's."""
    import ast

    offenders = []
    for path in sorted((ROOT / "raftsuite").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "raftlib.text.generate":
                if path.name not in ONE_EVALUATION_EXCEPTIONS:
                    offenders.append(f"{path.name}:{node.lineno} imports raftlib.text.generate")
    assert offenders == []
    loads = [
        line
        for line in (ROOT / "raftsuite" / "hh.py").read_text().splitlines()
        if "AutoModelForCausalLM.from_pretrained(str(path)" in line
    ]
    assert loads and all(".to(model_device())" in line for line in loads)
    reasoning = (ROOT / "raftsuite" / "reasoning.py").read_text()
    assert "evaluate_policy(" in reasoning and "generate_samples" not in reasoning
