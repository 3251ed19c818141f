"""retina_sweep: RetinaNet ablation sweeps."""

from omegaconf import OmegaConf

__version__ = "0.1.0"

# `${rs.or:${sweep.name},multirun}`: the first value unless it is null. (`oc.select`'s default
# applies only to a missing key, so a null sweep name used to make a `sweeps/None` directory.)
if not OmegaConf.has_resolver("rs.or"):
    OmegaConf.register_new_resolver(
        "rs.or", lambda value, default: default if value is None else value
    )
# `${rs.mul_int:${data.scale},2.0}`: a product rounded to an integer (the `speed` sweep's cap on
# the longer side follows the swept shorter side).
if not OmegaConf.has_resolver("rs.mul_int"):
    OmegaConf.register_new_resolver(
        "rs.mul_int", lambda value, factor: int(round(float(value) * float(factor)))
    )
