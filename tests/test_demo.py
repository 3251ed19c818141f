"""`make demo` (retina_sweep.demo): the product's own sweep and report commands, on a preset that
ships, with the extra arguments passed to the sweep."""

from __future__ import annotations

from pathlib import Path

import pytest

from retina_sweep import demo


@pytest.mark.parametrize("sweep_status", [0, 1])
def test_demo_runs_a_shipped_preset_then_its_report(monkeypatch, capsys, sweep_status) -> None:
    calls: list[list[str]] = []

    def call(cmd: list[str]) -> int:
        calls.append(cmd)
        return sweep_status if len(calls) == 1 else 0

    monkeypatch.setattr(demo.subprocess, "call", call)
    assert demo.main(["sweep.seeds=3"]) == sweep_status
    sweep, report = (c[1:] for c in calls)  # without the interpreter
    assert sweep[:3] == ["-m", "retina_sweep", "+sweep=gamma_quick"]
    assert sweep[-1] == "sweep.seeds=3"
    name = sweep[2].removeprefix("+sweep=")
    assert (Path(demo.__file__).parent / "conf" / "sweep" / f"{name}.yaml").is_file()
    # The report of that sweep, even when the sweep stopped early (it covers what finished).
    assert report == ["-m", "retina_sweep.report", f"sweep={name}"]
    out = capsys.readouterr().out
    assert f"reports/{name}/index.html" in out
    assert ("exited with status 1" in out) == bool(sweep_status)
