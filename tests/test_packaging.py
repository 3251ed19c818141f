"""The configs and the Hydra plugins ship inside the wheel and work from an installed copy."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_carries_configs_and_plugins_and_composes(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("retina_sweep-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "retina_sweep/conf/config.yaml",
        "retina_sweep/conf/sweep/gamma.yaml",
        "retina_sweep/conf/scale/proxy.yaml",
        "retina_sweep/reference/paper_table1.csv",
        "hydra_plugins/retina_sweep_grid/grid_sweeper.py",
    ):
        assert needed in names, needed
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    # From the unpacked wheel (not this checkout), in an unrelated folder.
    out = subprocess.run(
        [sys.executable, "-m", "retina_sweep", "--cfg", "job", "+sweep=gamma", "scale=smoke"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "name: gamma" in out.stdout and "depth: 10" in out.stdout
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import retina_sweep, hydra_plugins.retina_sweep_grid as g;"
            "print(retina_sweep.__file__); print(g.__file__)",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(p.startswith(str(site)) for p in where), where


def test_help_names_the_product_its_commands_and_groups(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "retina_sweep", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("retina_sweep: RetinaNet")
    assert "python -m retina_sweep.evaluate eval.checkpoint=PATH" in proc.stdout
    # Every shipped preset, as the group list Hydra builds from conf/sweep (a new preset is one
    # YAML file; nothing in the help names them by hand).
    presets = sorted(p.stem for p in (ROOT / "retina_sweep" / "conf" / "sweep").glob("*.yaml"))
    assert {"alpha", "anchors", "fpn", "gamma", "gamma_quick", "hpo", "ohem", "speed"} <= set(
        presets
    )
    assert f"sweep: {', '.join(presets)}\n" in proc.stdout
    assert "powered by Hydra" not in proc.stdout
