"""A trial's identity (`config_hash`) is what finds its finished runs and its checkpoint: the
hashes of the shipped presets are pinned here, so a change that would orphan every store (a new
key, a renamed one, a changed default) fails loudly instead of silently re-running every cell.

A deliberate change of an experiment (a new default, a new pretraining recipe version) updates
these values in the same commit, which then says so."""

from __future__ import annotations

import pytest
from helpers import compose_config

from retina_sweep.config import ConfigError, config_hash, validate

GOLDEN = {
    # the default proxy trial (the demo's gamma 2 / alpha .25 cell, seed 0)
    (): "f01fa3716b2db510",
    ("loss.gamma=1.0", "loss.alpha=0.5"): "e7675d93400129a0",
    ("loss=ohem",): "c0549047f395656e",
    ("loss=random_1to3",): "943c6e3134afc963",
    ("model.head.norm=BN",): "4a9fbfacec0c1055",
    ("scale=proxy_long",): "882e103b33aa371e",
    ("scale=smoke",): "420a539bc9b9f15f",
    ("scale=paper",): "452ab1e57f4ca688",  # lr steps at exactly 60k / 80k since 2026-11-29
}


@pytest.mark.parametrize("overrides", list(GOLDEN), ids=lambda o: " ".join(o) or "default")
def test_the_shipped_presets_keep_their_hashes(overrides: tuple[str, ...]) -> None:
    assert config_hash(compose_config(list(overrides))) == GOLDEN[overrides]


def test_weight_decay_norm_enters_the_identity_only_when_it_changes_the_training() -> None:
    """`train.weight_decay_norm` came after stores existed: null (the default) and a value equal
    to `train.weight_decay` train what every earlier trial trained, under the same hash."""
    base = GOLDEN[()]
    assert config_hash(compose_config(["train.weight_decay_norm=null"])) == base
    assert config_hash(compose_config(["train.weight_decay_norm=0.0001"])) == base
    exempt = config_hash(compose_config(["train.weight_decay_norm=0.0"]))
    assert exempt != base
    # 0 and 0.0 are one experiment; and a changed weight_decay is seen with the key at null.
    assert config_hash(compose_config(["train.weight_decay_norm=0"])) == exempt
    assert config_hash(compose_config(["train.weight_decay=0.0002"])) != base


def test_a_negative_weight_decay_norm_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.weight_decay_norm"):
        validate(compose_config(["train.weight_decay_norm=-1"]))


def test_local_pretrained_weights_are_identified_by_their_content(tmp_path) -> None:
    """Like a COCO dataset: another file at the same path is another experiment (it used to
    resume the first one's checkpoint and skip as finished), the same file elsewhere is not."""

    def hash_of(path) -> str:
        return config_hash(compose_config(["scale=paper", f"model.backbone.pretrained={path}"]))

    weights = tmp_path / "r50.pth"
    weights.write_bytes(b"first weights")
    first = hash_of(weights)
    copy = tmp_path / "elsewhere" / "r50.pth"
    copy.parent.mkdir()
    copy.write_bytes(b"first weights")
    assert hash_of(copy) == first
    weights.write_bytes(b"other weights!")
    assert hash_of(weights) != first
    # A torchvision weights name is not a file: it stays the name (the paper preset's hash).
    assert hash_of("IMAGENET1K_V1") == GOLDEN[("scale=paper",)]
