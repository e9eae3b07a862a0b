"""The architecture holds: import layering (import-linter contracts in pyproject.toml) and no hidden
import cycles (no function-local imports inside runtime/ except optional third-party dependencies)."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# third-party packages the runtime may import lazily: optional extras, imported where they are used
OPTIONAL = {"mpi4py", "onnx", "onnxruntime", "sklearn", "torch", "torch_geometric", "matplotlib", "scipy"}


def test_import_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    res = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "BROKEN" not in res.stdout and "KEPT" in res.stdout


def _local_imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            else:
                continue
            for name in names:
                if name.split(".")[0] not in OPTIONAL:
                    yield f"{path.relative_to(ROOT)}:{node.lineno}: {name}"


def test_no_function_local_imports_in_the_runtime():
    # runtime/examples are user scripts (leaves nothing imports): they may import the profiler lazily
    found = [hit for p in sorted((ROOT / "runtime").rglob("*.py")) if "examples" not in p.parts
             for hit in _local_imports(p)]
    assert not found, "function-local imports hide import cycles; import at module level:\n" + "\n".join(found)


def test_the_local_import_scan_finds_one(tmp_path):
    p = ROOT / "runtime" / "_probe_for_test.py"
    try:
        p.write_text("def f():\n    from runtime import core\n    import sklearn\n")
        hits = list(_local_imports(p))
    finally:
        p.unlink()
    assert hits == ["runtime/_probe_for_test.py:2: runtime"]
