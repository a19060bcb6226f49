import subprocess
import sys
from pathlib import Path

import tomllib

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


def test_import_fastvae_loads_neither_the_trainer_nor_tqdm():
    """The front door is light; the trainer and data load on first use."""
    code = ("import sys, fastvae, fastvae.kernels.numpy_ref;"
            "heavy = [m for m in ('tqdm', 'fastvae.trainer', 'fastvae.data', 'fastvae.state')"
            "         if m in sys.modules];"
            "assert not heavy, heavy;"
            "assert fastvae.Trainer.__module__ == 'fastvae.trainer' and 'tqdm' in sys.modules;"
            "assert fastvae.data.__name__ == 'fastvae.data';"
            "assert fastvae.TrainState.__name__ == 'TrainState'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_the_cli_reads_toml_with_tomli_where_tomllib_is_missing():
    """Python 3.10 has no tomllib: the CLI falls back to tomli, which pyproject declares."""
    code = ("import sys, types; sys.modules['tomllib'] = None;"
            "fake = types.ModuleType('tomli'); fake.TOMLDecodeError = ValueError;"
            "sys.modules['tomli'] = fake;"
            "import fastvae.cli as cli; assert cli.tomllib is fake")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "tomli>=2.0; python_version < '3.11'" in project["dependencies"]
    assert project["requires-python"] == ">=3.10"


def test_every_library_the_package_imports_is_declared():
    """Third-party imports of fastvae/*.py are dependencies (Pillow as PIL) or optional extras."""
    import ast
    imported = set()
    for path in (ROOT / "fastvae").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"fastvae"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {dependency.split(">")[0].split(";")[0].strip().lower()
                for group in [project["dependencies"], *project["optional-dependencies"].values()]
                for dependency in group}
    distribution = {"PIL": "pillow", "pytest_benchmark": "pytest-benchmark"}
    missing = [name for name in third_party
               if distribution.get(name, name).lower() not in declared]
    assert not missing, missing
    assert any(dep.lower().startswith("pillow") for dep in project["dependencies"])


def test_the_activation_table_is_defined_once():
    """Names, codes and the leaky slope live in kernels/__init__.py; backends import them."""
    import re
    patterns = {"slope": r"^LEAKY_SLOPE\s*=\s*[0-9.]", "names": r"^ACTIVATIONS\s*=\s*\(",
                "codes": r"=\s*range\(5\)|^_CODES\s*=\s*\{"}
    sources = list((ROOT / "kernels").glob("*.py")) + list((ROOT / "fastvae").glob("*.py"))
    for what, pattern in patterns.items():
        defining = [path.relative_to(ROOT).as_posix() for path in sources
                    if re.search(pattern, path.read_text(), re.MULTILINE)]
        assert defining == (["kernels/__init__.py"] if what != "codes" else []), (what, defining)
