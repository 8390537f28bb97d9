"""The code imports only what requirements.txt promises, and no library's private modules."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = {"pipeline", "space", "tests", "app", "bench"}


def _required() -> set[str]:
    names = set()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)", line.split("#")[0])
        if match:
            names.add(re.sub(r"[-_.]+", "-", match.group(1)).lower())
    return names


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def test_runtime_code_imports_only_required_packages_and_public_modules():
    dists = packages_distributions()
    required = _required()
    # Optional (imported inside try: bitsandbytes, gguf, lm_eval) or brought by a required package with an extra
    # (gradio[oauth]: authlib, itsdangerous; gradio and matplotlib: pillow).
    bundled = {"pillow", "authlib", "itsdangerous", "bitsandbytes", "gguf", "lm-eval"}
    problems = []
    for path in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "space").rglob("*.py"), ROOT / "app.py"]):
        for module in _imports(path):
            top = module.split(".")[0]
            if top in OURS or top in sys.stdlib_module_names:
                continue
            if any(part.startswith("_") and not part.startswith("__") for part in module.split(".")[1:]):
                problems.append(f"{path.name}: private module {module}")
            owners = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(top, [top])}
            if not owners & (required | bundled):
                problems.append(f"{path.name}: {module} is not in requirements.txt")
    assert problems == []
