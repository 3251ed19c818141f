"""`python -m retina_sweep [overrides]`: one training run, or a sweep with `+sweep=NAME`."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .config import ConfigError
    from .data.coco import DatasetError
    from .train import run

    try:
        return run(cfg)
    except (ConfigError, DatasetError) as exc:
        if HydraConfig.get().mode != RunMode.RUN:
            raise  # a sweep's trial: the sweeper records it as FAILED and goes on
        # A bad value or a bad dataset is the user's to fix: one line naming the key or file,
        # not a traceback; exit status 2, as for a bad command line.
        print(f"retina_sweep: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
