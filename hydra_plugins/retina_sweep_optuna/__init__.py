"""retina_sweep's Optuna sweeper for Hydra (`hydra/sweeper=optuna`), on current Optuna.

Hydra discovers sweepers only in the `hydra_plugins` namespace package; this one ships in the
retina-sweep distribution (hydra-optuna-sweeper pins optuna<3 and cannot prune)."""

from hydra.core.config_store import ConfigStore

from .optuna_sweeper import RetinaOptunaSweeper, RetinaOptunaSweeperConf

ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna", node=RetinaOptunaSweeperConf, provider="retina_sweep"
)

__all__ = ["RetinaOptunaSweeper", "RetinaOptunaSweeperConf"]
