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
