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


MODEL_LOADS_OFF_THE_RUN_DEVICE = {
    ("hh.py", "prepare_setup"): "the tiny setup's SFT policy: trained on this CPU before any run, never on a GPU",
    ("hh.py", "train_reward_model"): "the tiny setup's reward model, as prepare_setup",
    ("bench_generation.py", "main"): "the generation benchmark's model, placed by the benchmark itself",
    ("reasoning.py", "grpo_policy"): "TRL's GRPOTrainer places the policy it is given, as it places a path",
    ("hh_paper.py", "safetensors_reward_model"): "converts the RM's weight file on the CPU; it evaluates nothing",
}
"""Where a raftsuite module may load a model other than through `hh.load_causal_lm` (which moves it to the run's
device), and why."""


def _model_loads(tree, where: str) -> list[tuple[str, str, int]]:
    """(where, enclosing function, line) of every `<...>ForCausalLM/ForSequenceClassification.from_pretrained` and
    `create_model_from_path` call in a parsed module or cell."""
    import ast

    found = []

    def visit(node, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                target = child.func
                loads_model = (
                    isinstance(target, ast.Attribute)
                    and target.attr == "from_pretrained"
                    and isinstance(target.value, ast.Name)
                    and target.value.id.endswith(("ForCausalLM", "ForSequenceClassification"))
                ) or (isinstance(target, ast.Name) and target.id == "create_model_from_path")
                if loads_model:
                    found.append((where, function, child.lineno))
            visit(child, name)

    visit(tree, "<module>")
    return found


def test_every_evaluation_goes_through_raftlib_evaluation():
    """One evaluation path: no raftsuite module draws completions itself (raftlib.text.generate) except the
    listed ones, and every `<Name>ForCausalLM` / `<Name>ForSequenceClassification.from_pretrained` and
    `create_model_from_path` call in a raftsuite module or notebook cell is `hh.load_causal_lm` (which moves the
    model to the run's device) or a load listed with its reason. The scan sees those names only: raftlib's own
    loaders (`load_policy`) place their models themselves, and TRL places a model it is given by path."""
    import ast
    import json

    offenders = []
    for path in sorted((ROOT / "raftsuite").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "raftlib.text.generate":
                if path.name not in ONE_EVALUATION_EXCEPTIONS:
                    offenders.append(f"{path.name}:{node.lineno} imports raftlib.text.generate")
    assert offenders == []
    loads = [
        load
        for path in sorted((ROOT / "raftsuite").glob("*.py"))
        for load in _model_loads(ast.parse(path.read_text()), path.name)
    ]
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for index, cell in enumerate(json.loads(notebook.read_text())["cells"]):
            if cell["cell_type"] == "code":
                loads += _model_loads(ast.parse("".join(cell["source"])), f"{notebook.name} cell {index}")
    the_loader = [load for load in loads if load[:2] == ("hh.py", "load_causal_lm")]
    others = [load for load in loads if load[:2] != ("hh.py", "load_causal_lm")]
    assert (
        len(the_loader) == 1
        and ".to(model_device())" in (ROOT / "raftsuite" / "hh.py").read_text().splitlines()[the_loader[0][2] - 1]
    )
    assert [load for load in others if load[:2] not in MODEL_LOADS_OFF_THE_RUN_DEVICE] == []
    assert {load[:2] for load in others} == set(MODEL_LOADS_OFF_THE_RUN_DEVICE)  # no stale exception
    reasoning = (ROOT / "raftsuite" / "reasoning.py").read_text()
    assert "evaluate_policy(" in reasoning and "generate_samples" not in reasoning


def test_the_model_load_scan_sees_a_load_in_a_cell_and_in_a_function():
    import ast

    source = "def f():\n    m = AutoModelForCausalLM.from_pretrained('x')\nq = Qwen2ForSequenceClassification.from_pretrained('y')\n"
    assert _model_loads(ast.parse(source), "cell") == [("cell", "f", 2), ("cell", "<module>", 3)]


def public_functions_over(limit: int) -> list[str]:
    """Public functions and methods of raftlib and raftsuite taking more than `limit` parameters (self excluded)."""
    import ast

    over = []
    for package in ("raftlib", "raftsuite"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
                    continue
                a = node.args
                count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                count -= bool(a.args) and a.args[0].arg in ("self", "cls")
                if count > limit:
                    over.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} takes {count}")
    return over


def test_no_public_function_takes_more_than_8_parameters():
    """Settings travel as frozen records (MethodSettings, ReasoningSettings, SetupRequest, SelectionSection...)."""
    assert public_functions_over(8) == []


def test_formatting_markers_stay_rare():
    markers = sum(p.read_text().count("fmt: skip") for p in ROOT.rglob("*.py") if ".venv" not in p.parts)
    assert markers <= 30, f"{markers} `# fmt: skip` markers in the tree (at most 30: use fewer arguments instead)"


def test_the_algorithm_is_at_least_a_fifth_of_loop_py():
    """Code lines of `_execute` (the loop read top to bottom) and the stages' calls into the algorithm's parts
    (sampling, scoring, the ranking key and selection, the fine-tune, the evaluation), over all code lines."""
    import ast
    import re

    source = (ROOT / "raftlib" / "loop.py").read_text()
    tree, lines = ast.parse(source), source.splitlines()
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.FunctionDef) and ast.get_docstring(node):
            docstrings.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    code = [
        n
        for n, line in enumerate(lines, 1)
        if line.strip() and not line.strip().startswith("#") and n not in docstrings
    ]
    execute = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_execute")
    calls = re.compile(r"prompts_for_iteration\(|modality\.generate\(|score_samples\(|kl_ranking_key\(|\bselect\("
                       r"|modality\.finetune\(|evaluation\.(draw|measure)\(|reference_logprobs\(")  # fmt: skip
    algorithm = [n for n in code if execute.lineno <= n <= execute.end_lineno or calls.search(lines[n - 1])]
    assert len(algorithm) / len(code) >= 0.2, f"{len(algorithm)} of {len(code)} code lines"


MAX_CELL_LINES = 30
"""Issue 23: a notebook shows its science in short cells that call raftsuite; logic lives in modules."""


def cell_problems(notebook: Path) -> list[str]:
    """Code cells over MAX_CELL_LINES lines, or defining a function, class or lambda (`notebook: cell i: why`)."""
    import ast

    import nbformat

    problems = []
    for index, cell in enumerate(nbformat.read(notebook, as_version=4).cells):
        if cell.cell_type != "code":
            continue
        lines = len(cell.source.splitlines())
        if lines > MAX_CELL_LINES:
            problems.append(f"{notebook.name}: cell {index}: {lines} lines (at most {MAX_CELL_LINES})")
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                problems.append(
                    f"{notebook.name}: cell {index}: defines a {type(node).__name__} (move it to raftsuite)"
                )
    return problems


def test_the_cell_check_finds_a_long_cell_and_a_definition(tmp_path):
    import nbformat

    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("x = 1\n" * 31), nbformat.v4.new_code_cell("f = lambda: 1")]
    )
    nbformat.write(notebook, tmp_path / "n.ipynb")
    assert cell_problems(tmp_path / "n.ipynb") == [
        "n.ipynb: cell 0: 31 lines (at most 30)",
        "n.ipynb: cell 1: defines a Lambda (move it to raftsuite)",
    ]


def test_no_notebook_cell_is_over_30_lines_or_defines_a_function():
    problems = [p for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")) for p in cell_problems(notebook)]
    assert problems == []
