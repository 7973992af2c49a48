"""The outcome of a `tsn tune` search (`cluster.tune`), without Ray: one row per trial, the
printed table, ``tune_summary.csv``, the best trial, ``best_config.yaml``.

A trial's status: ``error`` (its function failed: Ray Tune's ERROR), ``completed`` (it reported
every epoch; its run then ran the final test), ``stopped`` (ASHA ended it early; Tune's
TERMINATED without error). The best trial: the highest val top-1 any epoch of a trial that did
not fail reached (the metric ASHA ranks by; the first in trial order on a tie).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from app.config import Config, config_to_dict
from dataloading.store.files import atomic_write_text

COMPLETED, STOPPED, ERROR = "completed", "stopped", "error"


@dataclass(frozen=True)
class TrialRecord:
    """What Tune knows of one trial: its id, its values (dotted key -> value), val top-1 by
    epochs finished, and the last line of its error (None: it did not fail)."""

    trial_id: str
    values: dict
    val_top1: dict[int, float] = field(default_factory=dict)
    error: str | None = None


def status(record: TrialRecord, epochs: int) -> str:
    """The trial's status (module docstring)."""
    if record.error is not None:
        return ERROR
    return COMPLETED if max(record.val_top1, default=0) >= epochs else STOPPED


def row(record: TrialRecord, keys: list[str], *, epochs: int, run_dir: Path | str = "") -> dict:
    """One summary row: ``trial``, ``values`` (of ``keys``), ``best_val_top1`` / ``best_epoch``
    (None without a validation), ``epochs`` (finished), ``status``, ``error``, ``run_dir``."""
    best_epoch = max(record.val_top1, key=lambda e: (record.val_top1[e], -e), default=None)
    return {"trial": record.trial_id, "values": {k: record.values.get(k) for k in keys},
            "best_val_top1": record.val_top1[best_epoch] if best_epoch is not None else None,
            "best_epoch": best_epoch, "epochs": max(record.val_top1, default=0), "status": status(record, epochs),
            "error": record.error, "run_dir": str(run_dir)}


def rows(records: list[TrialRecord], keys: list[str], *, epochs: int,
         run_dir: Callable[[str], Path]) -> list[dict]:
    """`row` of every record; ``run_dir(trial_id)`` is where its training run lives."""
    return [row(r, keys, epochs=epochs, run_dir=run_dir(r.trial_id)) for r in records]


def best_row(table_rows: list[dict]) -> dict | None:
    """The best trial's row (module docstring), None when no trial that did not fail validated."""
    candidates = [r for r in table_rows if r["status"] != ERROR and r["best_val_top1"] is not None]
    return max(candidates, key=lambda r: r["best_val_top1"], default=None)  # max keeps the first of equals


def shown(value: Any) -> str:
    """A value as the table shows it (floats to 4 significant digits)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def line(record: TrialRecord, keys: list[str], *, epochs: int) -> str:
    """The driver's line for a finished trial."""
    r = row(record, keys, epochs=epochs)
    values = ", ".join(f"{k}={shown(v)}" for k, v in r["values"].items())
    best = f"best val top-1 {r['best_val_top1']:.4f}" if r["best_val_top1"] is not None else "no validation"
    tail = f": {r['error']}" if r["error"] else ""
    return f"{r['trial']} ({values}): {r['status']} after {r['epochs']}/{epochs} epoch(s), {best}{tail}"


def table(table_rows: list[dict], keys: list[str]) -> str:
    """The summary as aligned text columns, one line per trial."""
    header = ["trial", *keys, "best val top-1", "epochs", "status"]
    body = [[r["trial"], *(shown(r["values"][k]) for k in keys),
             "-" if r["best_val_top1"] is None else f"{r['best_val_top1']:.4f}", str(r["epochs"]), r["status"]]
            for r in table_rows]
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header, *body])


CSV_COLUMNS = ("trial", "best_val_top1", "best_epoch", "epochs", "status", "run_dir", "error")


def write_csv(table_rows: list[dict], keys: list[str], path: Path) -> Path:
    """``tune_summary.csv``: ``trial``, one column per searched key (full precision), then the
    outcome columns; empty cells for None."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", *keys, *CSV_COLUMNS[1:]])
    for r in table_rows:
        writer.writerow([r["trial"], *(r["values"][k] for k in keys), *(r[c] for c in CSV_COLUMNS[1:])])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, out.getvalue())
    return path


def write_best_config(cfg: Config, best: dict, path: Path, *, tune_name: str) -> Path:
    """``best_config.yaml``: ``cfg`` (the best trial's config) as YAML `tsn train --config`
    loads, under a comment naming the trial it came from."""
    values = ", ".join(f"{k}={v!r}" for k, v in best["values"].items())
    header = (f"# tsn tune {tune_name}: the best trial, {best['trial']} (val top-1 {best['best_val_top1']:.4f} after "
              f"{best['best_epoch']} epoch(s); {values}).\n"
              f"# Its run: {best['run_dir']}. `tsn train --config {path.name}` trains it as a new run, "
              f"{cfg.run.name}.\n")
    atomic_write_text(path, header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
