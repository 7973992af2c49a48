"""`tsn tune`: a Ray Tune search over the `tsn train` job, ASHA early stopping on val top-1.

Design: a Tune **function trainable** (`_trial`) that runs the ordinary training job
(`cluster.job.run_job`: the same `TorchTrainer`, `app.worker.train` with `RayHooks`, run store,
checkpoints, plots) once per trial, reporting to Tune through a `TuneReportCallback` on the
trainer (`cluster.tune_ray.EpochReport`). Why not ``Tuner(TorchTrainer)``: Ray 2.60 runs
Ray Train V2, where that API is deprecated; V2's supported way is exactly this one (a Tune
function per trial that launches the `TorchTrainer` and acts as its driver; Ray docs, "Hyperparameter
Tuning with Ray Tune"). It also keeps one code path: a trial IS a `tsn train` run (same
driver preflight, resume rule, retention, results), not a second training loop to keep in step.

* The space (`load_space`, `parse_space`): YAML mapping dotted config keys to a distribution,
  ``{choice: [v, ...]}``, ``{uniform: [low, high]}``, ``{loguniform: [low, high]}`` (low > 0),
  ``{randint: [low, high]}`` (integers, high exclusive as in Ray Tune), or a plain value (fixed
  for every trial). Every key and every value a trial can get (each choice, both bounds,
  randint's largest value) goes through the config loader's own dotted overrides
  (`app.config.config_from_dict`, the ``--set`` path) before Ray starts: an unknown key or a
  value of the wrong type fails naming the file and the key. Values are checked one key at a
  time against the base config and the space's fixed values; a combination of searched values
  that is invalid only together fails that trial (status "error").
  Not searchable: ``run.name`` and ``run.storage_path`` (each trial's run is named here),
  ``train.epochs`` (ASHA's budget) and ``cluster.*`` (resources per trial are options).
* A trial: the base config (``--config`` + ``--set``, ``cluster.num_workers`` =
  ``--workers-per-trial``) with its sampled values, named ``<run.name>-<trial id>`` under
  ``run.storage_path/run.name`` (the tune directory): a normal run directory (checkpoints,
  history.jsonl, config.yaml, results.json; ``tsn train --config <it>/config.yaml`` resumes
  it). That run name is the ``run`` label of its Prometheus metrics (`cluster.metrics`): the
  trial id is in the existing label, no new label, so the Grafana dashboard and alerts work
  per trial unchanged. The dataset is prepared once, here in the driver, from the base config.
* Resources: each trial holds ``TRIAL_DRIVER_CPUS`` for its Tune function (the Train driver;
  Ray's default) plus its workers' ``W x cluster.cpus_per_worker`` (Train V2 places its workers
  in a group of its own, outside the trial's). Concurrency (``--max-concurrent``, default what
  fits, `trials_that_fit`): on a cluster joined with ``--address``, its CPUs (and GPUs) over a
  trial's; on the local cluster, the machine's cores over a trial's workers (the drivers mostly
  wait: logical CPUs are added for them, as `tsn train` adds one for its controller). The
  limit is the search generator's own, so no trial exists before it can run: Tune reserves a
  pending trial's driver CPU ahead, outside what Train V2 waits for, and on a 2-CPU cluster two
  such reservations left the running trial's worker group waiting for good (seen here, with
  Tune's ``max_concurrent_trials``, which it ignores beside a ``search_alg``).
* ASHA (Ray's ``ASHAScheduler``, `cluster.tune_ray.ASHAToTheEnd`) on ``val_top1`` (mode max)
  with time in epochs (``epochs_done``: only epoch-end reports reach Tune, `EpochReport`),
  ``max_t = train.epochs``, grace period ``--grace-epochs``, reduction factor 4 (Ray's), never
  stopping a trial at its last epoch: one that survives every rung finishes its run (final
  test, results.json) instead of being cut at its last report. A trial ASHA stops ends as
  TERMINATED, not as an error (Tune ends its actor, and with it the Train run it drives):
  status "stopped" in the summary, its run directory holding the epochs it trained.
* Output, in the tune directory: ``tune_summary.csv`` (`cluster.tune_summary`; the same table
  printed at the end), ``best_config.yaml`` (the best trial's config, which `tsn train --config`
  trains as a new run ``<run.name>-best``), ``ray_tune/`` (Tune's own experiment state). One
  line per finished trial while the search runs (`cluster.tune_ray.TrialLines`). Running the
  command again with the same ``run.name`` starts a new search (new trial ids) beside the old
  trials' runs; the summary and the best config are then the new search's.
"""

from __future__ import annotations

import enum
import logging
import math
import numbers
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from app.config import Config, ConfigError, config_from_dict, config_to_dict
from app.run_store import BEST_METRIC, RunStore, checkpoint_location

log = logging.getLogger(__name__)

VAL_METRIC = BEST_METRIC  # "val_top1": what RayHooks reports at each epoch end, the run store's best
EPOCHS_DONE = "epochs_done"  # ASHA's time attribute: the epochs finished (EpochReport adds it)
TRIAL_DRIVER_CPUS = 1.0  # a trial's Tune function, the Train driver (Ray Tune's default request)
TUNE_STATE_DIR = "ray_tune"  # Ray Tune's experiment state, inside the tune directory
SUMMARY_FILE = "tune_summary.csv"
BEST_CONFIG_FILE = "best_config.yaml"
# Keys a space may not search: prefix -> why (a key equal to it or under it).
RESERVED = {
    "run.name": "each trial's run is named <run.name>-<trial id>",
    "run.storage_path": "the trials live under run.storage_path/run.name",
    "train.epochs": "it is ASHA's budget (max_t); set it with --set train.epochs=N",
    "cluster": "resources per trial are --workers-per-trial and --set cluster.cpus_per_worker=C",
}


# --- the search space --------------------------------------------------------------------


class Distribution(enum.Enum):
    """How Ray Tune samples a key (the YAML names)."""

    CHOICE = "choice"
    UNIFORM = "uniform"
    LOGUNIFORM = "loguniform"
    RANDINT = "randint"


@dataclass(frozen=True)
class Searched:
    """A key Ray Tune samples: ``distribution`` over ``args`` (choice: the values; uniform and
    loguniform: ``(low, high)`` floats; randint: ``(low, high)`` integers, high exclusive)."""

    distribution: Distribution
    args: tuple

    def domain(self):
        """The Ray Tune sampling object."""
        from ray import tune

        if self.distribution is Distribution.CHOICE:
            return tune.choice(list(self.args))
        if self.distribution is Distribution.UNIFORM:
            return tune.uniform(*self.args)
        if self.distribution is Distribution.LOGUNIFORM:
            return tune.loguniform(*self.args)
        return tune.randint(*self.args)


@dataclass(frozen=True)
class Fixed:
    """A key with the same value in every trial (a plain value in the space file)."""

    value: Any

    def domain(self):
        return self.value


Space = dict  # dotted config key -> Searched | Fixed, in the file's order

_NAMES = ", ".join(d.value for d in Distribution)
_EXAMPLE = "optim.lr: {loguniform: [0.001, 0.1]}"


def load_space(path: str | Path, base: Config) -> Space:
    """Read and check a space file (`parse_space`); errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: space file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return parse_space(data, base, source=str(path))


def parse_space(data: Any, base: Config, source: str = "space") -> Space:
    """The space of a parsed YAML mapping (module docstring), every value a trial can get
    checked against ``base`` through the config loader. A problem is a ConfigError (a
    ValueError) ``"<source>: <key>: <problem>"``."""
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source}: expected a mapping of dotted config keys to distributions, e.g. {_EXAMPLE}")
    space: Space = {}
    for key, spec in data.items():
        if not isinstance(key, str) or not key or not all(key.split(".")) or "=" in key or key != key.strip():
            raise ConfigError(f"{source}: {key!r}: a key is a dotted config key, e.g. {_EXAMPLE}")
        for prefix, why in RESERVED.items():
            if key == prefix or key.startswith(prefix + "."):
                raise ConfigError(f"{source}: {key}: not searchable: {why}")
        try:
            space[key] = _entry(spec)
        except ValueError as e:
            raise ConfigError(f"{source}: {key}: {e}") from None
    # Searched values are checked on top of the fixed ones (a fixed model.snippet_length: 1
    # makes a model.modality choice of rgb valid), each key on its own.
    fixed = {k: e.value for k, e in space.items() if isinstance(e, Fixed)}
    try:
        trial_config(base, fixed)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e} (a fixed value)") from None
    for key, entry in space.items():
        for value, what in _values_to_check(entry) if isinstance(entry, Searched) else ():
            try:
                trial_config(base, {**fixed, key: value})
            except ConfigError as e:
                where = what if str(e).startswith(f"{key}:") else f"{key}: {what}"  # the error names another key
                raise ConfigError(f"{source}: {e} ({where})") from None
    return space


def _entry(spec: Any) -> Searched | Fixed:
    """One key's value in the space file as a `Searched` or `Fixed` (ValueError: what is wrong)."""
    if not isinstance(spec, dict):
        return Fixed(spec)
    if len(spec) != 1:
        raise ValueError(f"one distribution ({_NAMES}) per key, got {', '.join(map(str, spec)) or 'none'}")
    (name, args), = spec.items()
    try:
        distribution = Distribution(name)
    except ValueError:
        raise ValueError(f"unknown distribution {name!r}; use one of {_NAMES} (a nested key is written "
                         f"dotted, e.g. {_EXAMPLE})") from None
    if distribution is Distribution.CHOICE:
        if not isinstance(args, list) or not args:
            raise ValueError(f"choice takes a non-empty list of values, got {args!r}")
        return Searched(distribution, tuple(args))
    is_int = distribution is Distribution.RANDINT
    kind = "integers" if is_int else "numbers"
    if not (isinstance(args, list) and len(args) == 2 and all(_is_number(v, integer=is_int) for v in args)):
        raise ValueError(f"{name} takes [low, high], two {kind}, got {args!r}")
    low, high = args
    if not low < high:
        raise ValueError(f"{name}: low must be < high, got [{low}, {high}]")
    if distribution is Distribution.LOGUNIFORM and low <= 0:
        raise ValueError(f"loguniform: low must be > 0, got [{low}, {high}]")
    return Searched(distribution, (low, high) if is_int else (float(low), float(high)))


def _is_number(value: Any, *, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)


def _values_to_check(entry: Searched) -> list[tuple[Any, str]]:
    """The values that stand for every value ``entry`` can give a trial, with what each is.
    The config's value rules are bounds, so checking a range's ends checks the range."""
    d, args = entry.distribution, entry.args
    if d is Distribution.CHOICE:
        return [(v, f"choice value {i + 1} of {len(args)}, {v!r}") for i, v in enumerate(args)]
    if d is Distribution.RANDINT:
        return [(args[0], "randint low bound"), (args[1] - 1, "randint's largest value, high - 1")]
    return [(args[0], f"{d.value} low bound"), (args[1], f"{d.value} high bound")]


def trial_config(base: Config, values: Mapping[str, Any]) -> Config:
    """``base`` with ``values`` (dotted key -> value) applied as ``--set`` overrides
    (`app.config.config_from_dict`: unknown keys and wrong types fail naming the key)."""
    return config_from_dict(config_to_dict(base), [_override(k, v) for k, v in values.items()])


def _override(key: str, value: Any) -> str:
    """``key=<value as YAML>``: parse_override reads it back to the same value (floats too:
    PyYAML writes the shortest exact repr, with the ``.0e`` YAML 1.1 needs)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=math.inf).strip()
    return f"{key}={text.removesuffix('...').strip()}"  # a scalar document ends with '...'


def _plain(value: Any) -> Any:
    """NumPy scalars (what Tune's samplers may give) as Python values; lists item by item."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


# --- resources ---------------------------------------------------------------------------


def trial_cpus(workers: int, cpus_per_worker: float) -> float:
    """The logical CPUs one trial holds: its workers' and its Tune function's."""
    return workers * cpus_per_worker + TRIAL_DRIVER_CPUS


def trials_that_fit(cpus: float, gpus: float, *, workers: int, cpus_per_worker: float, use_gpu: bool) -> int:
    """How many trials a cluster of ``cpus`` (and ``gpus``) runs at once, at least 1 (a
    cluster that autoscales may grow; a trial then waits for resources as Ray Train does)."""
    n = int(cpus // trial_cpus(workers, cpus_per_worker))
    if use_gpu:
        n = min(n, int(gpus // workers))
    return max(1, n)


def local_trials(cores: int, *, workers: int, cpus_per_worker: float) -> int:
    """Trials at once on a local cluster of this machine's ``cores``: as many as their workers
    fit the cores (the trial drivers mostly wait; logical CPUs are added for them)."""
    return max(1, int(cores // (workers * cpus_per_worker)))


def trial_run_name(name: str, trial_id: str) -> str:
    """A trial's ``run.name`` (and so its ``run`` metrics label, `cluster.metrics`)."""
    return f"{name}-{trial_id}"


def _trial_dirname(trial) -> str:
    """Ray Tune's directory of a trial (in ``ray_tune/``): ``trial_<id>``, which `_records` reads back."""
    return f"trial_{trial.trial_id}"


# --- the driver --------------------------------------------------------------------------


def run_tune(cfg: Config, space: Space, *, num_samples: int, address: str | None = None, grace_epochs: int = 1,
             workers_per_trial: int = 1, max_concurrent: int | None = None, seed: int | None = None) -> dict:
    """Run the search (module docstring): ``num_samples`` trials of ``cfg`` with ``space``'s
    values, ASHA with ``grace_epochs``, ``workers_per_trial`` workers each, at most
    ``max_concurrent`` at once (None: what fits), the sampler seeded with ``seed`` (None: a
    fresh one, printed). Returns ``{"rows", "best", "dir", "summary", "best_config", "seconds"}``
    (`cluster.tune_summary`); ``best`` is None when no trial reported a validation."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from app.data import check_dataset_fits, check_training_splits, prepare_dataset
    from cluster import tune_summary
    from cluster.job import default_run_dir, object_storage_env, ray_process_env, resolve_paths, start_or_join
    from cluster.metrics import DEFAULT_SD_DIR
    from cluster.recovery import reap_previous_session, remove_stale_sd_entries
    from cluster.tune_ray import ASHAToTheEnd, TrialLines

    epochs = cfg.train.epochs
    if num_samples < 1:
        raise ValueError(f"--num-samples: must be >= 1, got {num_samples}")
    if not 1 <= grace_epochs <= epochs:
        raise ValueError(f"--grace-epochs: must be in [1, train.epochs={epochs}], got {grace_epochs}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ValueError(f"--max-concurrent: must be >= 1, got {max_concurrent}")
    if workers_per_trial < 1:
        raise ValueError(f"--workers-per-trial: must be >= 1, got {workers_per_trial}")
    base = trial_config(cfg, {"cluster.num_workers": workers_per_trial})
    seed = secrets.randbelow(2**31) if seed is None else seed

    manifest = prepare_dataset(base)  # once, here: the trials only check it (their paths are absolute)
    check_training_splits(base, manifest)
    check_dataset_fits(base, manifest, workers_per_trial)
    resolved = resolve_paths(base)
    tune_dir = default_run_dir(resolved)
    trials_storage = checkpoint_location(resolved.run.storage_path, resolved.run.name)
    store = RunStore(tune_dir)
    reap_previous_session(store)  # what a killed `tsn tune` of this name left of its local cluster

    c = base.cluster
    env_vars = {**ray_process_env(), **object_storage_env(resolved.data.shards, resolved.run.storage_path)}
    t0 = time.time()

    def local_cpus() -> int:  # the trials that fit this machine's cores, each with its driver CPU
        concurrent = max_concurrent or min(num_samples, local_trials(
            len(os.sched_getaffinity(0)), workers=workers_per_trial, cpus_per_worker=c.cpus_per_worker))
        return math.ceil(concurrent * trial_cpus(workers_per_trial, c.cpus_per_worker))

    start_or_join(store, address, env_vars, local_cpus)
    have = ray.cluster_resources()
    fit = trials_that_fit(have.get("CPU", 0), have.get("GPU", 0), workers=workers_per_trial,
                          cpus_per_worker=c.cpus_per_worker, use_gpu=c.use_gpu)
    if max_concurrent is None:
        max_concurrent = min(num_samples, fit)
    elif max_concurrent > fit:
        # Tune would start the trials' drivers, whose CPUs then starve the Train workers they wait for.
        log.warning("--max-concurrent %d: the cluster fits %d trial(s) of %g CPUs at once; the others wait for "
                    "resources (or the cluster to grow)", max_concurrent, fit,
                    trial_cpus(workers_per_trial, c.cpus_per_worker))
    keys = list(space)
    print(f"[tsn] tune {resolved.run.name}: {num_samples} trial(s) over {', '.join(keys)} (seed {seed}); ASHA on "
          f"{VAL_METRIC}, grace {grace_epochs} of {epochs} epoch(s); {max_concurrent} at once, {workers_per_trial} "
          f"worker(s) x {c.cpus_per_worker:g} CPU each -> {tune_dir}", flush=True)

    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=config_to_dict(resolved), storage_path=trials_storage,
                             run_root=str(tune_dir)),
        {"cpu": TRIAL_DRIVER_CPUS})
    tuner = tune.Tuner(
        trainable,
        param_space={k: entry.domain() for k, entry in space.items()},
        tune_config=tune.TuneConfig(
            metric=VAL_METRIC, mode="max", num_samples=num_samples,
            # The concurrency is the generator's own (module docstring, "Resources").
            search_alg=BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed),
            scheduler=ASHAToTheEnd(time_attr=EPOCHS_DONE, max_t=epochs, grace_period=grace_epochs),
            trial_dirname_creator=_trial_dirname, reuse_actors=False),
        run_config=tune.RunConfig(name=TUNE_STATE_DIR, storage_path=trials_storage, verbose=0,
                                  callbacks=[TrialLines(keys, epochs=epochs, num_samples=num_samples,
                                                        metric=VAL_METRIC, time_attr=EPOCHS_DONE)]))
    grid = tuner.fit()
    records = _records(grid)
    for r in records:  # workers of a stopped trial were ended without their clean-up
        remove_stale_sd_entries(trial_run_name(resolved.run.name, r.trial_id), DEFAULT_SD_DIR)

    rows = tune_summary.rows(records, keys, epochs=epochs,
                             run_dir=lambda trial_id: tune_dir / trial_run_name(resolved.run.name, trial_id))
    summary = tune_summary.write_csv(rows, keys, tune_dir / SUMMARY_FILE)
    best = tune_summary.best_row(rows)
    best_config = None
    if best is not None:
        # From the unresolved base (the user's own data paths), as a new run: not the trial's
        # name, whose finished run `tsn train` would only read back.
        best_cfg = trial_config(base, {**best["values"], "run.name": f"{resolved.run.name}-best"})
        best_config = tune_summary.write_best_config(best_cfg, best, tune_dir / BEST_CONFIG_FILE,
                                                     tune_name=resolved.run.name)
    seconds = time.time() - t0
    print(tune_summary.table(rows, keys), flush=True)
    for r in rows:
        if r["error"]:
            print(f"[tsn] trial {r['trial']} failed: {r['error']} (its run: {r['run_dir']})")
    print(f"[tsn] tune finished in {seconds:.0f}s: {len(rows)} trial(s), "
          + (f"best {best['trial']} val top-1 {best['best_val_top1']:.4f}" if best else "no trial reported a validation"))
    print(f"[tsn] summary       : {summary}")
    if best_config is not None:
        print(f"[tsn] best config   : {best_config} (tsn train --config {best_config})")
    return {"rows": rows, "best": best, "dir": tune_dir, "summary": summary, "best_config": best_config,
            "seconds": seconds}


def _records(grid) -> list:
    """Ray Tune's results as `tune_summary.TrialRecord`s, in trial order."""
    from cluster.tune_summary import TrialRecord

    records = []
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial_")  # `_trial_dirname`
        frame = result.metrics_dataframe  # every result Tune got (epoch ends: EpochReport)
        reports = frame.to_dict("records") if frame is not None else []
        val_top1 = {int(r[EPOCHS_DONE]): float(r[VAL_METRIC]) for r in reports
                    if _number(r.get(EPOCHS_DONE)) and _number(r.get(VAL_METRIC))}
        error = str(result.error).strip().splitlines()[-1] if result.error else None
        records.append(TrialRecord(trial_id, dict(result.config or {}), val_top1, error))
    return sorted(records, key=lambda r: r.trial_id)


def _number(value: Any) -> bool:
    """A value a results table holds for a metric (a missing one is NaN there)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _trial(config: dict, base: dict, storage_path: str, run_root: str) -> None:
    """Ray Tune's function trainable, in the trial's actor: one `tsn train` job
    (`cluster.job.run_job`) of ``base`` (a resolved config) with the trial's sampled
    ``config``, named ``<run.name>-<trial id>`` under ``storage_path`` (run directory under
    ``run_root``, the tune directory), each epoch's validation reported to Tune
    (`cluster.tune_ray.EpochReport`). Ray's TuneReportCallback must be made here, in
    the Tune session."""
    from ray import tune

    from cluster.job import run_job
    from cluster.tune_ray import EpochReport

    base_cfg = config_from_dict(base)
    name = trial_run_name(base_cfg.run.name, tune.get_context().get_trial_id())
    cfg = trial_config(base_cfg, {**config, "run.name": name, "run.storage_path": storage_path})
    run_job(cfg, Path(run_root) / name, callbacks=[EpochReport(metric=VAL_METRIC, time_attr=EPOCHS_DONE)])
