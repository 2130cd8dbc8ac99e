"""pixi.toml and pyproject.toml declare the same pinned packages; the environment is coherent."""

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict[str, dict[str, str]]:
    proj = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"base": proj["dependencies"], **proj["optional-dependencies"]}
    out = {}
    for group, reqs in groups.items():
        out[group] = {}
        for r in reqs:
            m = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", r)
            out[group][_norm(m.group(1))] = m.group(2).strip()
    return out


def test_pixi_lists_the_same_packages_as_pyproject():
    pixi = tomllib.loads((REPO / "pixi.toml").read_text())
    groups = {"base": {_norm(k): v for k, v in pixi["pypi-dependencies"].items() if _norm(k) != "lowbit-helpers"}}
    for feat, body in pixi["feature"].items():
        groups[feat] = {_norm(k): v for k, v in body["pypi-dependencies"].items()}
    assert groups == _pyproject()
    assert {"report", "test"} <= set(pixi["tasks"])
    assert "gpu" in pixi["environments"] and "onnxruntime-gpu" in groups["gpu"] and "tensorrt" in groups["gpu"]


def test_installed_environment_matches_the_pins():
    pins = {**_pyproject()["base"], **_pyproject()["cpu"]}
    for name, spec in pins.items():
        assert spec.startswith("=="), f"{name} is not pinned"
        assert metadata.version(name) == spec[2:].split("+")[0] or metadata.version(name).startswith(spec[2:] + "+"), name


def test_exactly_one_onnxruntime_and_pip_check_clean():
    dists = {_norm(d.metadata["Name"]) for d in metadata.distributions()}
    assert len({d for d in dists if d.startswith("onnxruntime")}) == 1, sorted(d for d in dists if "onnxruntime" in d)
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_wheel_holds_every_module_and_runs_installed(tmp_path):
    """``pip install .`` (not editable) gets the whole package: built from a copy of the sources,
    installed into a scratch target, imported from there (not from the editable checkout)."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "lowbit_helpers", src / "lowbit_helpers", ignore=shutil.ignore_patterns("__pycache__"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "pip", *a], capture_output=True, text=True, cwd=tmp_path)  # noqa: E731
    built = run("wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path / "dist"), str(src))
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("lowbit_helpers-*.whl")
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "lowbit_helpers").rglob("*.py") if "__pycache__" not in p.parts}
    assert {"lowbit_helpers/sensitivity/sweep.py", "lowbit_helpers/report/summary.py", "lowbit_helpers/steps/int8.py"} <= modules
    assert modules <= set(zipfile.ZipFile(wheel).namelist())
    site = tmp_path / "site"
    installed = run("install", "--no-deps", "--no-index", "--quiet", "--target", str(site), str(wheel))
    assert installed.returncode == 0, installed.stderr
    probe = ("import lowbit_helpers, lowbit_helpers.sensitivity.sweep, lowbit_helpers.report.summary, lowbit_helpers.steps.int8;"
             "print(lowbit_helpers.__file__)")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(site)  # the installed copy, not the checkout
    cli = subprocess.run([sys.executable, "-m", "lowbit_helpers", "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert cli.returncode == 0 and "validate-sensitivity" in cli.stdout, cli.stderr
    # the notebooks are the repository's, not the wheel's: `run` from the wheel alone says so, writes nothing
    (tmp_path / "p.yaml").write_text(f"name: w\noutput: {{runs_dir: {tmp_path / 'runs'}, reports_dir: {tmp_path / 'reports'}}}\n")
    main = subprocess.run([sys.executable, "-m", "lowbit_helpers", "run", "p.yaml"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert main.returncode == 2 and "error: expected notebooks 01..06" in main.stderr and "from a complete checkout" in main.stderr
    assert not (tmp_path / "runs").exists()
