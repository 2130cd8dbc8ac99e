"""pixi.toml and pyproject.toml declare the same pinned packages; the environment is coherent."""

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


def test_modelopt_onnx_ptq_imports():
    from modelopt.onnx.quantization import quantize

    assert callable(quantize)
