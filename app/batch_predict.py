"""Scoring a whole collection in parts, resumably, into one table (`tsn predict --address`).

The work is cut into parts that any process can score alone, with the checkpoint's protocol and
the same functions as the rest of the product:

* a packed split (``--shards``): part p of P is rank p of world size P of the split's test (or
  ``fast``: val) loader, `app.build.build_test_loader` and `tsn.evaluation.evaluate`, exactly
  what `tsn eval` runs on one process (so the scores are `tsn eval`'s); samples the loader finds
  corrupt are rows with their reason;
* video files (``--videos``): part p is a run of ``part_size`` files, scored by
  `app.predict.predict_videos` (PyAV decode, `tsn predict`'s protocol); a file that does not
  decode is a row with its reason.

Output (``out``, a parquet file): one row per video, in collection order: ``video`` (the file, or
``<split>/<shard>#<key>`` for a packed sample), ``sample_index`` (packed; else the file's
position), ``label`` / ``label_name`` (when known; -1 / null else), ``top_classes`` and
``top_scores`` (best first), ``scores`` (all classes, pre-softmax) and ``error`` (null when
scored). Each part is written to ``<out>.parts/part-<p>.parquet`` when it is done (atomically);
the table is committed (atomically) only once every part is there, and the parts directory then
removed. A re-run with the same job (``<out>.parts/job.json``, then the table's metadata:
checkpoint, data, protocol, part cut) scores only the missing parts (none once committed); a
different job on the same ``out`` is refused, so nothing of another run is overwritten.

Execution is the caller's: a `PartScorer` scores any part of a job in any process
(`cluster.batch_predict` holds one in each of a pool of Ray actors; `run_local` one in this
process).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dataloading.store.files import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")
DEFAULT_PART_SIZE = 256  # videos per part: what a re-run after a crash redoes at most, per part in flight


@dataclass(frozen=True)
class Job:
    """What is scored and how: the resume key of an output (``<out>.parts/job.json``)."""

    checkpoint: str
    checkpoint_bytes: int  # with the path: a retrained checkpoint at the same path is another job
    fast: bool
    top_k: int
    part_size: int
    num_parts: int
    shards: str | None = None
    split: str | None = None
    videos: tuple[str, ...] = ()

    def describe(self) -> str:
        what = f"{self.shards} split {self.split}" if self.shards else f"{len(self.videos)} video files"
        return f"{what} in {self.num_parts} part(s) of <= {self.part_size}"


def list_videos(source: str) -> list[str]:
    """The video files of ``source``: a directory (searched recursively for `VIDEO_EXTENSIONS`,
    sorted) or a text file with one path per line (relative to the file; blank and ``#`` lines
    skipped). ValueError naming ``source`` when it holds none."""
    p = Path(source)
    if p.is_dir():
        out = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in VIDEO_EXTENSIONS and f.is_file())
    elif p.is_file():
        lines = [ln.strip() for ln in p.read_text().splitlines()]
        out = [str((p.parent / ln) if not Path(ln).is_absolute() else Path(ln)) for ln in lines
               if ln and not ln.startswith("#")]
    else:
        raise FileNotFoundError(f"--videos {source}: no such file or directory")
    if not out:
        raise ValueError(f"--videos {source}: no video files ({', '.join(VIDEO_EXTENSIONS)})"
                         if p.is_dir() else f"--videos {source}: the list names no files")
    return out


def plan_job(checkpoint: str, *, shards: str | None = None, split: str | None = None,
             videos: Sequence[str] = (), fast: bool = False, top_k: int = 5,
             part_size: int = DEFAULT_PART_SIZE) -> Job:
    """The `Job` for a packed split (``shards``, ``split`` default the checkpoint's val split) or
    a list of video files. Reads the dataset's manifest (its sample count); fails before any
    work on a missing checkpoint, split or bad sizes."""
    from app.evaluate import config_of_checkpoint
    from dataloading.format import shards as shard_format
    from tsn.checkpoint import load_checkpoint

    if part_size < 1 or top_k < 1:
        raise ValueError(f"--part-size and --top-k must be >= 1, got {part_size}, {top_k}")
    if (shards is None) == (not videos):
        raise ValueError("give either packed shards or video files to score")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    size = Path(checkpoint).stat().st_size
    if shards is not None:
        cfg = config_of_checkpoint(load_checkpoint(checkpoint), checkpoint)
        split = split or cfg.data.val_split
        manifest = shard_format.load_manifest(shards)
        if split not in manifest["splits"]:
            raise ValueError(f"{shards}: no split {split!r} (splits: {', '.join(manifest['splits'])})")
        n = int(manifest["splits"][split]["num_samples"])
        if n == 0:
            raise ValueError(f"{shards}: split {split!r} has no samples")
        return Job(str(Path(checkpoint).resolve()), size, fast, top_k, part_size, math.ceil(n / part_size),
                   shards=str(shards), split=split)
    videos = tuple(str(v) for v in videos)
    return Job(str(Path(checkpoint).resolve()), size, fast, top_k, part_size, math.ceil(len(videos) / part_size),
               videos=videos)


# --- scoring one part (any process) ------------------------------------------------------------


class PartScorer:
    """Holds one checkpoint's model (loaded once) and scores parts of jobs on it."""

    def __init__(self, checkpoint: str, *, fast: bool, device: str = "cpu"):
        from app.predict import load_stream

        self.device = device
        self.stream = load_stream(checkpoint, fast=fast, device=device)
        self._shard_starts: dict[tuple[str, str], tuple[list[int], list[str]]] = {}  # (shards, split) -> manifest's

    def __call__(self, job: Job, part: int) -> dict:
        """Part ``part`` of ``job`` as columns (`COLUMNS`, the rows of `Output.write_part`)."""
        if not 0 <= part < job.num_parts:
            raise ValueError(f"part {part} not in [0, {job.num_parts})")
        return (self._packed if job.shards else self._files)(job, part)

    def _packed(self, job: Job, part: int) -> dict:
        import torch

        from app.build import build_test_loader, select_device
        from dataloading.format import shards as shard_format
        from tsn.evaluation import evaluate

        cfg = self.stream.cfg
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"shards": job.shards})})
        device = select_device(cfg) if self.device == "auto" else torch.device(self.device)
        loader = build_test_loader(cfg, job.split, device, rank=part, world_size=job.num_parts,
                                   mode="val" if job.fast else "test")
        names = self.stream.class_names
        try:
            result = evaluate(self.stream.model, loader, device, num_classes=len(names))
            skipped = list(loader.skipped)
        finally:
            loader.close()
        key = (job.shards, job.split)
        if key not in self._shard_starts:  # once per dataset, not once per part (a GET on s3://)
            listed = shard_format.load_manifest(job.shards)["splits"][job.split]["shards"]
            self._shard_starts[key] = ([int(s["first_sample_index"]) for s in listed],
                                       [Path(s["path"]).name for s in listed])
        first, shard_names = self._shard_starts[key]

        def where(i: int) -> str:
            return f"{job.split}/{shard_names[int(np.searchsorted(first, i, side='right')) - 1]}#{i}"

        rows = [_row(where(int(i)), int(i), int(lab), names, sc, job.top_k)
                for i, lab, sc in zip(result.sample_index, result.label, result.scores)]
        for s in skipped:
            n = shard_format.sample_number(s["key"])
            rows.append(_error_row(f"{job.split}/{Path(s['shard']).name}#{s['key']}", -1 if n is None else n, s["reason"]))
        rows.sort(key=lambda r: r["sample_index"])
        return _columns(rows)

    def _files(self, job: Job, part: int) -> dict:
        from app.predict import predict_videos

        first = part * job.part_size
        videos = job.videos[first:first + job.part_size]
        names = self.stream.class_names
        rows = []
        for i, p in enumerate(predict_videos(videos, [self.stream])):
            rows.append(_error_row(p.video, first + i, p.error) if p.error is not None
                        else _row(p.video, first + i, -1, names, p.scores, job.top_k))
        return _columns(rows)


def _row(video: str, index: int, label: int, names: Sequence[str], scores: np.ndarray, k: int) -> dict:
    from app.predict import Prediction

    s = np.asarray(scores, np.float32)
    top = Prediction(video, scores=s).top_k(names, k)  # tsn predict's ranking (stable on ties)
    return {"video": video, "sample_index": index, "label": label,
            "label_name": names[label] if 0 <= label < len(names) else None,
            "top_classes": [t["class"] for t in top], "top_scores": [t["score"] for t in top],
            "scores": s.tolist(), "error": None}


def _error_row(video: str, index: int, error: str) -> dict:
    return {"video": video, "sample_index": index, "label": -1, "label_name": None, "top_classes": None,
            "top_scores": None, "scores": None, "error": error}


COLUMNS = ("video", "sample_index", "label", "label_name", "top_classes", "top_scores", "scores", "error")


def _columns(rows: list[dict]) -> dict:
    return {c: [r[c] for r in rows] for c in COLUMNS}


def _schema():
    import pyarrow as pa

    return pa.schema([("video", pa.string()), ("sample_index", pa.int64()), ("label", pa.int64()),
                      ("label_name", pa.string()), ("top_classes", pa.list_(pa.string())),
                      ("top_scores", pa.list_(pa.float32())), ("scores", pa.list_(pa.float32())),
                      ("error", pa.string())])


# --- the output: parts, resume, commit ---------------------------------------------------------


class Output:
    """``out`` and its parts directory for one `Job` (see the module docstring)."""

    def __init__(self, out: str, job: Job):
        self.out, self.job = Path(out), job
        self.parts_dir = Path(f"{out}.parts")
        self._job_file = self.parts_dir / "job.json"
        self._committed = False  # `open` found this job's table already committed

    def open(self) -> list[int]:
        """Claim the output for this job; the parts still to score (none when ``out`` already
        holds this job's committed table). ValueError when ``out``'s parts or its committed table
        belong to another job (a different checkpoint, data, protocol or part cut): nothing of
        another run is overwritten."""
        doc = json.loads(json.dumps(asdict(self.job)))

        def refuse_other(recorded: dict, what: Path, kind: str) -> None:
            if recorded != doc:
                diff = sorted(k for k in doc if recorded.get(k) != doc[k])
                raise ValueError(f"{what} holds the {kind} of another job (differs in {', '.join(diff)}); "
                                 f"use another --out or delete it")

        if self._job_file.is_file():
            refuse_other(json.loads(self._job_file.read_text()), self.parts_dir, "parts")
        elif self.out.is_file():
            refuse_other(self._table_job(), self.out, "table")
            self._committed = True  # a finished run of this job: nothing to score again
            return []
        else:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self._job_file, json.dumps(doc, indent=1))
        return [p for p in range(self.job.num_parts) if not self.part_path(p).is_file()]

    def part_path(self, part: int) -> Path:
        return self.parts_dir / f"part-{part:05d}.parquet"

    def write_part(self, part: int, columns: dict) -> int:
        """Write one scored part (atomically); its row count."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(columns, schema=_schema())
        atomic_write(self.part_path(part), lambda f: pq.write_table(table, f))
        return table.num_rows

    def _table_job(self) -> dict:
        import pyarrow.parquet as pq

        try:
            meta = pq.read_schema(self.out).metadata or {}
        except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid: not a parquet file
            raise ValueError(f"{self.out} exists and is not a scores table ({e}); use another --out") from None
        return json.loads(meta.get(b"tsn.job", b"{}"))

    def commit(self) -> dict:
        """Concatenate every part into ``out`` (atomically), remove the parts; the summary (of
        the table already there when `open` found this job committed)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._committed:
            return _summary(pq.read_table(self.out))
        missing = [p for p in range(self.job.num_parts) if not self.part_path(p).is_file()]
        if missing:
            raise RuntimeError(f"{self.parts_dir}: parts {missing[:5]}... not scored; re-run to finish them")
        table = pa.concat_tables([pq.read_table(self.part_path(p), schema=_schema())
                                  for p in range(self.job.num_parts)])
        meta = {b"tsn.job": json.dumps(asdict(self.job)).encode()}
        table = table.replace_schema_metadata(meta)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out, lambda f: pq.write_table(table, f))
        shutil.rmtree(self.parts_dir)
        return _summary(table)


def _summary(table) -> dict:
    """``{"videos", "errors", "failed": [(video, reason)]}`` of a committed table."""
    errors = table.column("error").to_pylist()
    return {"videos": table.num_rows, "errors": sum(e is not None for e in errors),
            "failed": [(v, e) for v, e in zip(table.column("video").to_pylist(), errors) if e is not None]}


def run_local(job: Job, out: str, *, device: str = "cpu", progress: bool = False,
              on_part: Callable[[int, int], None] | None = None) -> dict:
    """Score ``job``'s missing parts in this process, then commit ``out``; the summary
    (`Output.commit`'s, plus ``scored_now``: the videos this call scored). ``progress``: a bar
    of parts on stderr (a resumed run's starts at the parts already done)."""
    import sys

    from tqdm import tqdm

    output = Output(out, job)
    todo = output.open()
    scored = 0
    if todo:
        scorer = PartScorer(job.checkpoint, fast=job.fast, device=device)
        with tqdm(total=job.num_parts, initial=job.num_parts - len(todo), unit="part", file=sys.stderr,
                  dynamic_ncols=True, desc="predict", disable=not progress) as bar:
            for p in todo:
                rows = output.write_part(p, scorer(job, p))
                scored += rows
                bar.update(1)
                if on_part is not None:
                    on_part(p, rows)
    return {**output.commit(), "scored_now": scored}


def read_table(path: str):
    """The committed table of `Output.commit` as a pyarrow Table (its job in ``schema.metadata``)."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise FileNotFoundError(f"scores table not found: {path}")
    return pq.read_table(path)
