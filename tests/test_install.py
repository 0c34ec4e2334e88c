"""The package works installed, away from the repository: its config defaults and the demo's shipped
teacher travel inside the wheel, so an installed ``distillm_jax`` checks a config without ``configs/``."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import distillm_jax
from distillm_jax import config
from distillm_jax.data import demo
assert "{where}" in distillm_jax.__file__, distillm_jax.__file__
c = config.defaults()  # a run of the shipped demo teacher into a copy of itself, written as a script would
c.tokenizer, c.data.task = "demo", "demo"
c.teacher.path = c.student.path = str(demo.TEACHER)
c.data.max_prompt_length, c.data.max_length = 96, 128
config.check(c)
assert (demo.TEACHER / "model.safetensors").is_file()
bad = config.defaults()
bad.optim.weight_decay = -1.0
try:
    config.check(bad)
except config.ConfigError as e:
    print("refused:", e)
"""


def test_installed_wheel_checks_configs_without_the_repository(tmp_path):
    src, wheels = tmp_path / "src", tmp_path / "wheels"  # built from a copy: no build/ in the repository
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "distillm_jax", src / "distillm_jax", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip, "-w", str(wheels)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("distillm_jax-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert not (site / "configs").exists()  # config files are the repository's, not the package's
    out = subprocess.run(
        [sys.executable, "-c", CHECK.format(where=site)],
        cwd=tmp_path,  # not the repository: nothing of it on the path
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: " in out.stdout, out.stdout
