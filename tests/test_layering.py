"""The library (`raydapt/`) runs without Ray: no module imports `ray` or `actors`, at the top or inside
a function. The Ray side (`actors/`) hands it pools, students and Train runs (`raydapt.serving.Runtime`)."""
import ast
import subprocess
import sys
from pathlib import Path

import raydapt

LIBRARY = Path(raydapt.__file__).parent
FORBIDDEN = ("ray", "actors")

# Importing every module with ray and actors made unimportable: any import of them, even a lazy
# one run at import time, fails the walk.
IMPORT_ALL = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {forbidden!r}:
            raise ImportError(f"blocked: {{name}}")
sys.meta_path.insert(0, Block())
import raydapt
names = [m.name for m in pkgutil.walk_packages(raydapt.__path__, "raydapt.")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def _forbidden_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        found += [f"{path}:{node.lineno} {n}" for n in names
                  if n.split(".")[0] in FORBIDDEN]
    return found


def test_no_library_module_imports_ray_or_actors_anywhere():
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 30  # the walk found the library, not an empty folder
    offenders = [hit for f in files for hit in _forbidden_imports(f)]
    assert offenders == []


def test_the_scan_finds_a_lazy_import(tmp_path):
    """A control: an import inside a function is reported."""
    sample = tmp_path / "probe.py"
    sample.write_text("import raydapt.x\ndef f():\n    from actors.runner import runtime_for\n    import ray.train\n")
    assert [h.split()[-1] for h in _forbidden_imports(sample)] == ["actors.runner", "ray.train"]


def test_every_library_module_imports_with_ray_and_actors_blocked():
    run = subprocess.run([sys.executable, "-c", IMPORT_ALL.format(forbidden=FORBIDDEN)],
                         capture_output=True, text=True, cwd=LIBRARY.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.split()[-1]) > 30


def test_the_blocker_blocks():
    """A control: with the same blocker, importing the Ray side fails."""
    code = IMPORT_ALL.format(forbidden=FORBIDDEN).replace("import raydapt\n", "import actors.runner\nimport raydapt\n", 1)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=LIBRARY.parent)
    assert run.returncode != 0 and "blocked: actors" in run.stderr
