"""The Ray classes `tsn tune` (`cluster.tune`) extends: Ray Train's report to Ray Tune
(`EpochReport`), ASHA that lets a trial at its last epoch finish (`ASHAToTheEnd`), the
driver's line per finished trial (`TrialLines`). Imported only where Ray runs (the Tune
driver, a trial), so it imports Ray at the top.
"""

from __future__ import annotations

import math

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from cluster.tune_summary import TrialRecord, line


class EpochReport(TuneReportCallback):
    """Ray's Train-to-Tune bridge (runs in the trial's Train controller), for epoch ends only.

    RayHooks reports at every checkpoint: at each epoch end with the validation metrics, and at
    mid-epoch checkpoints (``checkpoint.every_n_steps``) without them. Tune refuses a result
    lacking the search metric, and ASHA counts time in epochs, so only reports carrying
    ``metric`` are passed on, with ``time_attr`` = epochs finished (the report's 0-based
    ``epoch`` + 1: right after a worker-group restart too, where Tune's own iteration count
    would count an epoch twice)."""

    def __init__(self, *, metric: str, time_attr: str):
        super().__init__()  # must run in a Tune session (the trial's function)
        self.metric, self.time_attr = metric, time_attr

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        first = metrics[0]
        if self.metric not in first:
            return  # a mid-epoch checkpoint: nothing for Tune
        super().after_report(run_context, [{**first, self.time_attr: int(first["epoch"]) + 1}, *metrics[1:]],
                             checkpoint)


class ASHAToTheEnd(ASHAScheduler):
    """ASHA (asynchronous successive halving) that never stops a trial at its last epoch.

    With ``stop_last_trials=False`` a trial surviving the rungs runs on, but when ``max_t`` is
    ``grace_period`` times a power of the reduction factor (epochs 4, grace 1, factor 4) ASHA
    keeps a rung at ``max_t`` itself and could stop a trial at its last report: after every
    epoch is trained, killing only its final test (results.json). A result at ``max_t`` still
    enters the rung (later trials are compared with it); the trial always goes on."""

    def __init__(self, *, time_attr: str, max_t: int, grace_period: int):
        super().__init__(time_attr=time_attr, max_t=max_t, grace_period=grace_period, stop_last_trials=False)
        self.last = (time_attr, max_t)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        time_attr, max_t = self.last
        return TrialScheduler.CONTINUE if result.get(time_attr, 0) >= max_t else decision


class TrialLines(tune.Callback):
    """In the Tune driver: one line per finished trial (completed, stopped by ASHA, or
    failed), from what Tune saw of it (`cluster.tune_summary.line`)."""

    def __init__(self, keys: list[str], *, epochs: int, num_samples: int, metric: str, time_attr: str):
        self.keys, self.epochs, self.num_samples = keys, epochs, num_samples
        self.metric, self.time_attr = metric, time_attr
        self.val: dict[str, dict[int, float]] = {}  # trial id -> epochs finished -> val top-1
        self.finished = 0

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if value is not None and not math.isnan(value):
            self.val.setdefault(trial.trial_id, {})[int(result[self.time_attr])] = float(value)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._say(trial, None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(trial, "failed (its error is in the summary)")

    def _say(self, trial, error: str | None) -> None:
        self.finished += 1
        record = TrialRecord(trial.trial_id, dict(trial.config), self.val.get(trial.trial_id, {}), error)
        print(f"[tsn] trial {self.finished}/{self.num_samples} {line(record, self.keys, epochs=self.epochs)}",
              flush=True)
