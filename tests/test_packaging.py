"""A regular (non-editable) install carries conf/ and recipes/ inside the package and works from
any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from tests.conftest import REPO


def test_wheel_ships_configs_and_recipes_and_composes_outside_the_checkout(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheel_dir), str(REPO)], check=True, capture_output=True, text=True)
    wheel = next(wheel_dir.glob("tuneforge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "tuneforge/_conf/config.yaml" in names and "tuneforge/_recipes/demo.yaml" in names
    # The Optuna sweeper, in Hydra's plugin namespace (no hydra_plugins/__init__.py: it would hide other plugins).
    assert "hydra_plugins/tuneforge_optuna_sweeper/sweeper.py" in names and "hydra_plugins/__init__.py" not in names

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import tuneforge.config.paths as p, tuneforge.cli as c; print(p.conf_dir()); print(p.recipes_dir()); "
            "c.main(['train', '--cfg', 'job', 'recipe=demo'])")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    conf, recipes = out.stdout.splitlines()[:2]
    assert conf == str(site / "tuneforge" / "_conf") and recipes == str(site / "tuneforge" / "_recipes")
    assert "max_steps:" in out.stdout
