"""`python -m retina_sweep.report [table=1b] [sweep=NAME] [format=md,tex,csv,html] [out=DIR]
[tracking_uri=URI] [experiment=NAME] [figure4_run=RUN_ID]`: key=value arguments, like the main
command's overrides. `figure4_run` picks the run whose checkpoint draws the paper's Figure 4 and
its loss shares (default: the newest gamma 2 / alpha .25 run, else gamma 2, else any focal-loss
run)."""

from __future__ import annotations

import sys

from . import FORMATS, build_report

KEYS = ("table", "sweep", "format", "out", "tracking_uri", "experiment", "figure4_run")


def parse(argv: list[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise SystemExit(
                f"report: unknown argument {item!r}; use key=value with key one of "
                + ", ".join(KEYS)
            )
        args[key] = value
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    args = parse(argv)
    formats = args.get("format", ",".join(FORMATS)).split(",")
    try:
        report = build_report(
            tracking_uri=args.get("tracking_uri"),
            experiment=args.get("experiment", "retina_sweep"),
            table=args.get("table"),
            sweep=args.get("sweep"),
            formats=[f.strip() for f in formats if f.strip()],
            out=args.get("out"),
            figure4_run=args.get("figure4_run"),
        )
    except ValueError as exc:
        raise SystemExit(f"report: {exc}") from exc
    print(report.markdown)
    if report.index is not None:
        print(f"report written to {report.out_dir}/ (open {report.index})")
    else:
        print(f"report written to {report.out_dir}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
