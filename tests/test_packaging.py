import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_live_under_fastvae_not_as_a_bare_top_level_package():
    code = ("import sys, fastvae, fastvae.kernels.numpy_ref, fastvae.layers;"
            "assert 'kernels' not in sys.modules, 'bare kernels imported';"
            "print(fastvae.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", check=True).stdout
    assert Path(out.strip()).parent.name == "kernels"
    assert not (ROOT / "fastvae" / "kernels").exists()


def test_distribution_name_script_and_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] not in ("fastvae", "kernels")
    assert project["scripts"]["fastvae"] == "fastvae.cli:main"
    assert {"numba", "gpu", "dev"} <= set(project["optional-dependencies"])
    forbidden = ("torch", "jax", "tensorflow")
    required = " ".join(project["dependencies"]).lower()
    assert not any(name in required for name in forbidden)


def test_model_code_imports_no_framework():
    code = ("import sys, fastvae, fastvae.model, fastvae.gradcheck;"
            "bad = [m for m in ('torch', 'jax', 'tensorflow') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def _fastvae_imports(path):
    """The fastvae modules a source file imports (top level and inside functions)."""
    import ast
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastvae"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("fastvae"))
    return {name.split(".")[1] for name in names if "." in name}


def test_the_model_knows_nothing_of_training():
    """model.py imports no optimizer, checkpoint, archive or training state: no import cycle."""
    imported = _fastvae_imports(ROOT / "fastvae" / "model.py")
    training = ("optim", "state", "archive", "checkpoint", "trainer", "captured", "files")
    assert not imported & set(training), imported


def test_imports_go_one_way():
    """No fastvae module imports one that imports it back (directly or through others)."""
    modules = {path.stem: path for path in (ROOT / "fastvae").glob("*.py")}
    graph = {name: _fastvae_imports(path) & set(modules) for name, path in modules.items()}

    def reaches(start, target, seen):
        for nxt in graph[start] - seen:
            if nxt == target or reaches(nxt, target, seen | {nxt}):
                return True
        return False

    cycles = [name for name in graph if reaches(name, name, set())]
    assert not cycles, cycles
