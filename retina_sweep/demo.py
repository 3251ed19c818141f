"""`make demo`: Table 1(b) on the CPU proxy (the paper's 7 gamma / alpha rows), then its report.

Runs the product's own commands, nothing special-cased:

    python -m retina_sweep +sweep=gamma_quick launcher=parallel [extra overrides]
    python -m retina_sweep.report sweep=gamma_quick

`gamma_quick` trains the paper's own row of each gamma (7 trials); `+sweep=gamma` adds the other
alphas of each gamma (21 trials, 3x the time) and reuses these 7.

and prints where to look. Extra command-line arguments are passed to the sweep, e.g.
`python -m retina_sweep.demo sweep.seeds=3`.
"""

from __future__ import annotations

import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    # Two trials at a time (joblib, one torch thread each): faster than one trial with two
    # threads on a 2-core laptop for the proxy's small convolutions.
    sweep = [sys.executable, "-m", "retina_sweep", "+sweep=gamma_quick", "launcher=parallel", *args]
    print("$", " ".join(sweep[2:]), flush=True)
    code = subprocess.call(sweep)
    if code != 0:
        print(f"demo: the sweep exited with status {code}; the report covers what finished")
    report = [sys.executable, "-m", "retina_sweep.report", "sweep=gamma_quick"]
    print("$", " ".join(report[2:]), flush=True)
    rcode = subprocess.call(report)
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\ndemo finished in {minutes:.1f} min.\n"
        "  runs:    mlflow ui --host 127.0.0.1   (then open http://127.0.0.1:5000)\n"
        "  report:  reports/gamma_quick/index.html\n"
        "  more:    python -m retina_sweep +sweep=gamma | alpha | anchors | ohem | speed | fpn"
    )
    return code or rcode


if __name__ == "__main__":
    raise SystemExit(main())
