"""Print environment.yml's pip list as a requirements file, so pip installs exactly what conda would.

    python tools/requirements_from_env.py environment.yml > requirements.txt

Reads only the `- pip:` block (the standard-library parser keeps setup free of a YAML dependency).
"""

import re
import sys


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


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "environment.yml"
    with open(path, encoding="utf-8") as handle:
        print("\n".join(pip_requirements(handle.read())))
