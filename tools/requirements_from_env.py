"""Print environment.yml's pip list as a requirements file, so pip installs exactly what conda would.

    python tools/requirements_from_env.py environment.yml [--swap OLD NEW ...] > requirements.txt

Reads only the `- pip:` block (the standard-library parser keeps setup free of a YAML dependency).
`--swap OLD NEW` replaces the requirement OLD by NEW (the Makefile swaps the CPU build of vLLM for the CUDA
one on a GPU machine); an OLD that is not in the list is an error, so a rename in environment.yml cannot
silently skip the swap.
"""

import re


def pip_requirements(text: str) -> list[str]:
    requirements, pip_indent = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.split("#", 1)[0].rstrip()
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        if re.fullmatch(r"\s*-\s*pip:\s*", stripped):
            pip_indent = indent
            continue
        if pip_indent is not None:
            item = re.fullmatch(r"\s*-\s*(\S.*)", stripped)
            if indent > pip_indent and item:
                requirements.append(item.group(1).strip())
            elif indent <= pip_indent:
                pip_indent = None
            else:
                raise SystemExit(f"environment.yml:{number}: expected '- package' under '- pip:', got {line.strip()!r}")
    if not requirements:
        raise SystemExit("environment.yml: no '- pip:' list found")
    return requirements


def swapped(requirements: list[str], swaps: list[tuple[str, str]]) -> list[str]:
    for old, new in swaps:
        if old not in requirements:
            raise SystemExit(f"--swap {old} {new}: {old!r} is not in the pip list ({', '.join(requirements)})")
        requirements = [new if r == old else r for r in requirements]
    return requirements


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="environment.yml's pip list as a requirements file")
    parser.add_argument("path", nargs="?", default="environment.yml")
    parser.add_argument("--swap", nargs=2, action="append", default=[], metavar=("OLD", "NEW"))
    args = parser.parse_args()
    with open(args.path, encoding="utf-8") as handle:
        print("\n".join(swapped(pip_requirements(handle.read()), [tuple(s) for s in args.swap])))
