"""The import graph of refine_jax stays layered and acyclic (the contracts in .importlinter, run
by import-linter), loading a config imports no JAX, Flax or PIL, and only the entry points
parse a command line."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys

from conftest import REPO


def test_import_contracts_are_kept():
    lint_imports = shutil.which("lint-imports")
    assert lint_imports, "lint-imports is not installed: pip install -e '.[test]'"
    result = subprocess.run(
        [lint_imports, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_loading_a_config_imports_no_jax_flax_or_pil():
    code = (
        "import sys; from refine_jax.config import load_config_file; "
        "load_config_file('configs/shapes.py:tiny'); "
        "print(sorted(m for m in ('jax', 'flax', 'PIL', 'optax') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


COMMAND_LINE_MODULES = {"argparse", "absl.app", "absl.flags"}


def command_line_imports(path) -> set[str]:
    """The command-line parsing modules `path` imports (`from absl import flags` included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & COMMAND_LINE_MODULES
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            found |= names & COMMAND_LINE_MODULES
    return found


def test_only_main_and_the_commands_parse_a_command_line():
    package = REPO / "refine_jax"
    entry_points = {package / "main.py", *(package / "commands").glob("*.py")}
    parsing = {
        str(path.relative_to(REPO)): sorted(found)
        for path in sorted(package.rglob("*.py"))
        if path not in entry_points and (found := command_line_imports(path))
    }
    assert parsing == {}, f"move these modules' commands to refine_jax/commands/: {parsing}"


def test_the_readme_layout_table_names_every_library_module():
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in layout.splitlines() if line.startswith("| `")]
    package = REPO / "refine_jax"
    unnamed = [
        str(path.relative_to(REPO))
        for path in sorted(package.rglob("*.py"))
        if path.name != "__init__.py"
        and path.parent.name != "commands"  # the commands/ row names them
        and not any(f"`{path.name}`" in row or f"{path.relative_to(REPO)}`" in row for row in rows)
    ]
    assert not unnamed, f"README's layout table does not name {unnamed}"
