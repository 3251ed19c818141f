"""retina_sweep's grid sweeper for Hydra (`hydra/sweeper=retina_grid`, the default of
`python -m retina_sweep`). Hydra discovers sweepers only in the `hydra_plugins` namespace."""

from hydra.core.config_store import ConfigStore

from .grid_sweeper import RetinaGridSweeper, RetinaGridSweeperConf

ConfigStore.instance().store(
    group="hydra/sweeper", name="retina_grid", node=RetinaGridSweeperConf, provider="retina_sweep"
)

__all__ = ["RetinaGridSweeper", "RetinaGridSweeperConf"]
