"""Every shipped sweep preset composes and expands to the cells of the paper's table."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import compose_config
from omegaconf import OmegaConf

from retina_sweep.config import config_hash, validate
from retina_sweep.data.transforms import resize_factor, resized_size
from retina_sweep.sweep import Cell, SweepError, expand_cells, format_value, unique_cells


def cells_of(preset: str, extra: list[str] | None = None, seeds: int | None = None):
    cfg = compose_config([f"+sweep={preset}", *(extra or [])], hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    spec = cfg.sweep
    cells = expand_cells(
        grid=OmegaConf.to_container(spec.grid, resolve=True),
        rows=OmegaConf.to_container(spec.rows, resolve=True),
        seeds=seeds or int(spec.seeds),
    )
    return cfg, cells


def test_alpha_preset_is_table_1a() -> None:
    cfg, cells = cells_of("alpha")
    assert cfg.sweep.table == "1a" and cfg.loss.gamma == 0.0
    assert [c.overrides["loss.alpha"] for c in cells] == [0.10, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999]


def test_gamma_preset_is_table_1b_grid() -> None:
    cfg, cells = cells_of("gamma")
    assert cfg.sweep.table == "1b"
    pairs = {(c.overrides["loss.gamma"], c.overrides["loss.alpha"]) for c in cells}
    gammas = [0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
    assert pairs == {(g, a) for g in gammas for a in (0.25, 0.5, 0.75)}
    assert len(cells) == 21


def test_gamma_quick_runs_the_papers_alpha_of_each_gamma_as_the_grids_own_cells() -> None:
    """Its rows are the paper's Table 1(b) rows (gamma, alpha) in the paper's order, and each is the
    same experiment (config hash) as the `gamma` grid's cell, so neither sweep retrains the other's."""
    import pandas as pd

    from retina_sweep.report.core import load_paper

    paper = load_paper()
    paper = paper[paper["table"] == "1b"]
    cfg, cells = cells_of("gamma_quick")
    assert cfg.sweep.table == "1b" and cfg.loss.name == "focal"
    pairs = [(c.overrides["loss.gamma"], c.overrides["loss.alpha"]) for c in cells]
    assert pairs == [
        (float(g), float(a)) for g, a in zip(paper["gamma"], paper["alpha"], strict=True)
    ]
    assert len(pairs) == 7 and not pd.isna(paper["alpha"]).any()

    def hashes(preset: str, cells) -> dict[tuple[float, float], str]:
        return {
            (c.overrides["loss.gamma"], c.overrides["loss.alpha"]): config_hash(
                compose_config([f"+sweep={preset}", *c.override_list()])
            )
            for c in cells
        }

    quick = hashes("gamma_quick", cells)
    grid = hashes("gamma", cells_of("gamma")[1])
    assert quick == {pair: grid[pair] for pair in quick}


def test_anchors_preset_is_listed_rows_not_a_product() -> None:
    _, cells = cells_of("anchors")
    rows = [
        (
            c.overrides["model.anchors.scales_per_octave"],
            len(c.overrides["model.anchors.aspect_ratios"]),
        )
        for c in cells
    ]
    assert rows == [(1, 1), (2, 1), (3, 1), (1, 3), (2, 3), (3, 3), (4, 3)]


def test_ohem_preset_is_table_1d() -> None:
    _, cells = cells_of("ohem")
    got = [
        (
            c.overrides["loss"],
            c.overrides.get("loss.batch_size"),
            c.overrides.get("loss.nms_thresh"),
        )
        for c in cells
    ]
    ohem = [("ohem", b, n) for n in (0.7, 0.5) for b in (128, 256, 512)]
    ohem13 = [("ohem_1to3", b, 0.5) for b in (128, 256, 512)]
    assert got == ohem + ohem13 + [("random_1to3", 256, None), ("focal", None, None)]
    # the group selection comes before the keys inside the group
    assert cells[0].override_list()[0] == "loss=ohem"


def test_speed_preset_follows_the_scale() -> None:
    _, proxy = cells_of("speed")
    assert {c.overrides["model.backbone.depth"] for c in proxy} == {10, 18}
    _, paper = cells_of("speed", ["scale=paper", "data=coco", "data.root=/x"])
    pairs = {(c.overrides["model.backbone.depth"], c.overrides["data.scale"]) for c in paper}
    assert pairs == {(d, s) for d in (50, 101) for s in (400, 500, 600, 700, 800)}


@pytest.mark.parametrize(
    ("extra", "image_hw"),
    [
        ([], (128, 256)),  # the proxy's 1:2 images
        (["scale=paper", "data=coco", "data.root=/x"], (480, 640)),  # a typical COCO image
        (["scale=paper", "data=coco", "data.root=/x"], (427, 640)),  # COCO's commonest size
    ],
)
def test_speed_rows_are_not_capped_back_to_a_smaller_scale(extra: list, image_hw: tuple) -> None:
    """The longer-side cap follows the swept scale (Detectron's 1000 at 600, 1333 at 800); with
    the fixed 256 px cap the proxy's scale-160 row trained at 128, a duplicate of another row."""
    _, cells = cells_of("speed", extra)
    trained = set()
    for cell in cells:
        trial = compose_config(["+sweep=speed", *extra, *cell.override_list()])
        scale, max_size = int(trial.data.scale), int(trial.data.max_size)
        assert scale == cell.overrides["data.scale"]
        factor = resize_factor(*image_hw, scale, max_size)
        assert min(resized_size(*image_hw, factor)) == scale
        trained.add((trial.model.backbone.depth, resized_size(*image_hw, factor)))
    assert len(trained) == len(cells)
    if extra:
        paper = {c.overrides["data.scale"]: c for c in cells}
        trial = compose_config(["+sweep=speed", *extra, *paper[800].override_list()])
        assert trial.data.max_size == 1333


@pytest.mark.parametrize(
    ("scale", "levels"),
    [
        ("paper", [(3, 7, "fpn"), (3, 5, "fpn"), (4, 7, "fpn"), (3, 7, "c5_only")]),
        # the paper's rows are config.yaml's default: a scale that does not move them has them
        ("smoke", [(3, 7, "fpn"), (3, 5, "fpn"), (4, 7, "fpn"), (3, 7, "c5_only")]),
        # half-size images: one level finer, so that the anchors stay 4x their stride
        ("proxy", [(2, 6, "fpn"), (2, 4, "fpn"), (3, 6, "fpn"), (2, 6, "c5_only")]),
        ("proxy_long", [(2, 6, "fpn"), (2, 4, "fpn"), (3, 6, "fpn"), (2, 6, "c5_only")]),
    ],
)
def test_fpn_preset_levels_by_head_depth(scale: str, levels: list) -> None:
    _, cells = cells_of("fpn", [f"scale={scale}"])
    got = [
        (
            c.overrides["model.fpn.min_level"],
            c.overrides["model.fpn.max_level"],
            c.overrides["model.fpn.variant"],
            c.overrides["model.head.num_convs"],
        )
        for c in cells
    ]
    assert set(got) == {(*lv, h) for lv in levels for h in (2, 4)}
    assert len(cells) == 8


def test_seeds_repeat_every_cell() -> None:
    _, cells = cells_of("alpha", seeds=3)
    assert len(cells) == 21
    assert [c.seed for c in cells[:3]] == [0, 1, 2]
    assert cells[0].overrides == cells[2].overrides


# Every grid / rows preset shipped in conf/sweep (the Optuna study `hpo` has no cells): a new
# ablation axis is one YAML file, and it is checked here without being named.
GRID_PRESETS = sorted(
    p.stem
    for p in (Path(__file__).resolve().parents[1] / "retina_sweep" / "conf" / "sweep").glob(
        "*.yaml"
    )
    if p.stem != "hpo"
)


def test_the_preset_list_is_discovered() -> None:
    assert {"alpha", "gamma", "gamma_quick", "anchors", "ohem", "speed", "fpn"} <= set(GRID_PRESETS)


@pytest.mark.parametrize("preset", GRID_PRESETS)
def test_every_cell_of_every_preset_composes_validates_and_is_distinct(preset: str) -> None:
    cfg, cells = cells_of(preset)
    hashes = set()
    for cell in cells:
        trial = compose_config([f"+sweep={preset}", *cell.override_list()])
        validate(trial)
        hashes.add(config_hash(trial))
        for key, value in cell.overrides.items():
            if "." in key:
                assert OmegaConf.select(trial, key) == value or (
                    list(OmegaConf.select(trial, key)) == list(value)
                )
    assert len(hashes) == len(cells)


def test_a_grid_axis_overridden_on_the_command_line_runs_part_of_a_preset() -> None:
    """`'sweep.grid={loss.gamma:[...]}'` replaces that axis and keeps the others (Hydra merges
    the mapping), and each cell keeps the hash it has in the full preset, so a partial sweep
    resumes against the full one's runs and the other way round (docs/usage.md)."""
    part = "sweep.grid={loss.gamma:[0.5,2.0]}"
    _, cells = cells_of("gamma", [part])
    pairs = [(c.overrides["loss.gamma"], c.overrides["loss.alpha"]) for c in cells]
    assert pairs == [(g, a) for g in (0.5, 2.0) for a in (0.25, 0.5, 0.75)]
    for cell in cells:
        partial = compose_config(["+sweep=gamma", part, *cell.override_list()])
        full = compose_config(["+sweep=gamma", *cell.override_list()])
        assert config_hash(partial) == config_hash(full)


def test_a_command_line_value_of_a_grid_key_replaces_that_axis() -> None:
    """`+sweep=gamma loss.gamma=0,2` once crossed the command-line gammas with the grid's, the
    grid's value winning in every cell: the 21 preset cells each twice (42 trials). A fixed
    `loss.alpha=0.25` was overwritten by the grid's alphas in every cell."""
    cfg = compose_config(["+sweep=gamma"], hydra=True)
    grid = OmegaConf.to_container(cfg.sweep.grid, resolve=True)
    alphas, gammas = (0.25, 0.5, 0.75), list(grid["loss.gamma"])
    swept = expand_cells(grid=grid, rows=None, cli_sweeps={"loss.gamma": [0, 2]})
    pairs = [(c.overrides["loss.gamma"], c.overrides["loss.alpha"]) for c in swept]
    assert pairs == [(g, a) for g in (0, 2) for a in alphas]
    assert swept[0].label == "gamma=0,alpha=0.25"  # the axis keeps its place in the grid
    # A fixed value is a one-value axis; fixed overrides of other keys are left alone.
    fixed = expand_cells(grid=grid, rows=None, cli_fixed={"loss.alpha": 0.25, "scale": "smoke"})
    pairs = [(c.overrides["loss.gamma"], c.overrides["loss.alpha"]) for c in fixed]
    assert pairs == [(g, 0.25) for g in gammas]
    assert all("scale" not in c.overrides for c in fixed)
    # Each cell is the preset's own cell: the same config hash, so resume matches them.
    for cell in fixed[:2]:
        alone = compose_config(["+sweep=gamma", "loss.alpha=0.25", *cell.override_list()])
        full = compose_config(["+sweep=gamma", *cell.override_list()])
        assert config_hash(alone) == config_hash(full)
    # A command-line sweep of a key the grid does not sweep is still crossed with it.
    crossed = expand_cells(grid={"loss.gamma": [0.0, 2.0]}, rows=None, cli_sweeps={"seed": [0, 5]})
    assert [(c.seed, c.overrides["loss.gamma"]) for c in crossed] == [
        (0, 0.0),
        (0, 2.0),
        (5, 0.0),
        (5, 2.0),
    ]


@pytest.mark.parametrize("how", ["cli_sweeps", "cli_fixed"])
def test_a_command_line_value_of_a_key_the_rows_set_is_an_error_naming_it(how: str) -> None:
    """The rows would overwrite it (a row is one listed combination): said, not ignored."""
    _, cells = cells_of("anchors")
    cfg = compose_config(["+sweep=anchors"], hydra=True)
    rows = OmegaConf.to_container(cfg.sweep.rows, resolve=True)
    key = "model.anchors.scales_per_octave"
    value = {"cli_sweeps": {key: [1, 2]}, "cli_fixed": {key: 2}}[how]
    with pytest.raises(SweepError, match=key):
        expand_cells(grid=None, rows=rows, **{how: value})
    # A key no row sets is not affected.
    assert len(expand_cells(grid=None, rows=rows, cli_fixed={"loss.alpha": 0.5})) == len(cells)


def test_a_swept_seed_overlapping_the_seed_repeats_runs_each_seed_once() -> None:
    """`seed=0,1 sweep.seeds=2` expands to seeds 0,1,1,2: the two seed-1 cells are one
    experiment (one config hash); the sweeper launches the first only."""
    cells = expand_cells(
        grid={"loss.gamma": [0.0]}, rows=None, cli_sweeps={"seed": [0, 1]}, seeds=2
    )
    assert [c.seed for c in cells] == [0, 1, 1, 2]
    for cell in cells:
        cell.config_hash = config_hash(compose_config(cell.override_list()))
    kept, dropped = unique_cells(cells)
    assert [c.seed for c in kept] == [0, 1, 2]
    assert [c.seed for c in dropped] == [1] and dropped[0] is cells[2]
    # Cells not yet hashed are all kept.
    assert unique_cells([Cell({}, seed=0), Cell({}, seed=0)])[1] == []


def test_format_value_round_trips_through_hydra() -> None:
    trial = compose_config(
        [
            f"model.anchors.aspect_ratios={format_value([0.5, 1.0])}",
            f"sweep.cell={format_value('gamma=2.0,alpha=0.25')}",
            f"train.clip_grad_norm={format_value(None)}",
            f"train.progress={format_value(False)}",
        ]
    )
    assert list(trial.model.anchors.aspect_ratios) == [0.5, 1.0]
    assert trial.sweep.cell == "gamma=2.0,alpha=0.25"
    assert trial.train.clip_grad_norm is None and trial.train.progress is False


def test_grid_and_rows_cross() -> None:
    cells = expand_cells(grid={"a.x": [1, 2]}, rows=[{"b.y": 1}, {"b.y": 2, "b.z": 0}], seeds=1)
    assert [c.overrides for c in cells] == [
        {"a.x": 1, "b.y": 1},
        {"a.x": 1, "b.y": 2, "b.z": 0},
        {"a.x": 2, "b.y": 1},
        {"a.x": 2, "b.y": 2, "b.z": 0},
    ]
    with pytest.raises(ValueError, match="a.x"):
        expand_cells(grid={"a.x": [1]}, rows=[{"a.x": 2}])


def test_a_swept_seed_is_the_cells_seed() -> None:
    cells = expand_cells(grid=None, rows=None, cli_sweeps={"seed": [5, 7]}, seeds=2)
    assert [(c.seed, c.overrides) for c in cells] == [(5, {}), (6, {}), (7, {}), (8, {})]
    assert cells[0].override_list()[0] == "seed=5"


def test_hpo_preset_is_an_optuna_study_with_pruning() -> None:
    cfg = compose_config(["+sweep=hpo"], hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("RetinaOptunaSweeper")
    assert sweeper.sampler == "tpe" and sweeper.pruner == "hyperband"
    # TPE guides most of the study: fewer random start-up trials than trials.
    assert sweeper.sampler_args.n_startup_trials < sweeper.n_trials
    assert set(sweeper.params) == {
        "loss.alpha",
        "loss.gamma",
        "model.anchors.scales_per_octave",
    }
    assert cfg.train.eval_every > 0  # the pruner needs periodic values
    # gamma on the log scale of the paper's grid, as Optuna will sample it.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.retina_sweep_optuna.optuna_sweeper import (
        RetinaOptunaSweeper,
        to_distribution,
    )

    (gamma,) = OverridesParser.create().parse_overrides([f"g={sweeper.params['loss.gamma']}"])
    dist = to_distribution(gamma)
    assert dist.log and (dist.low, dist.high) == (0.1, 5.0)
    # `hydra.sweeper.pruner=NAME` alone switches to any pruner the preset has arguments for.
    # The constructor builds the pruner, so a wrong argument would raise here.
    assert {"hyperband", "median"} <= set(sweeper.pruner_args)
    for name in sweeper.pruner_args:
        built = RetinaOptunaSweeper(pruner=name, pruner_args=sweeper.pruner_args)
        assert built.pruner_args == dict(sweeper.pruner_args[name])
    assert RetinaOptunaSweeper(pruner="none", pruner_args=sweeper.pruner_args).pruner_args == {}
    # The budget is 40 % of the gamma grid's compute (its cells x a full trial each).
    gamma = compose_config(["+sweep=gamma"], hydra=True)
    cells = len(gamma.sweep.grid["loss.gamma"]) * len(gamma.sweep.grid["loss.alpha"])
    assert sweeper.compute_budget == pytest.approx(0.4 * cells)


@pytest.mark.parametrize(("overrides", "folder"), [([], "multirun"), (["+sweep=gamma"], "gamma")])
def test_sweep_dir_is_named_after_the_sweep_or_multirun(overrides: list[str], folder: str) -> None:
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_config([*overrides, "paths.root=/out"], hydra=True)
    HydraConfig.instance().set_config(cfg)  # the ${now:...} part reads Hydra's runtime config
    parts = Path(str(cfg.hydra.sweep.dir)).parts
    assert parts[:3] == ("/", "out", folder)  # a null sweep.name once made sweeps/None


def test_progress_line_counts_the_trials_of_every_process_sharing_a_study(monkeypatch) -> None:
    from retina_sweep import sweep

    clock = iter([0.0, 60.0, 90.0])
    monkeypatch.setattr(sweep.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    # 4 of 10 trials finished before this process joined; 60 s later the study has 6.
    progress = sweep.Progress(10, name="s", echo=lines.append, done=4)
    progress.update("trial 7", 30.0, "done", done=6)
    assert lines[-1] == "[s 6/10] trial 7: done AP=30.00 | elapsed 1:00 | ETA 2:00"
    # Without a shared count it counts its own trials.
    progress.update("trial 8", None, "PRUNED")
    assert lines[-1].startswith("[s 7/10] trial 8: PRUNED AP=n/a | elapsed 1:30 | ETA 1:30")


def test_progress_eta_counts_batches_of_trials_that_finish_together(monkeypatch) -> None:
    from retina_sweep import sweep

    # Two trials at a time, reported together after 6 minutes: 19 left is 10 more batches.
    clock = iter([0.0, 360.0, 360.0, 720.0])
    monkeypatch.setattr(sweep.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    progress = sweep.Progress(21, name="g", echo=lines.append, batch=2)
    progress.update("a", 1.0, "done")
    assert lines[-1].endswith("elapsed 6:00 | ETA 1:00:00")  # 20 left: 10 batches (not 2:00:00)
    progress.update("b", 2.0, "done")
    assert lines[-1].endswith("elapsed 6:00 | ETA 1:00:00")  # 19 left: still 10 batches
    progress.update("c", 3.0, "done")
    assert lines[-1].endswith("elapsed 12:00 | ETA 54:00")  # 2 batches in 12 min, 9 left
    with pytest.raises(ValueError, match="batch"):
        sweep.Progress(3, batch=0)
