"""retina_sweep: RetinaNet ablation sweeps."""

from omegaconf import OmegaConf

__version__ = "0.1.0"

# `${rs.or:${sweep.name},multirun}`: the first value unless it is null. (`oc.select`'s default
# applies only to a missing key, so a null sweep name used to make a `sweeps/None` directory.)
if not OmegaConf.has_resolver("rs.or"):
    OmegaConf.register_new_resolver(
        "rs.or", lambda value, default: default if value is None else value
    )
