"""Kinetics (400 / 600 / 700) annotation CSVs -> `VideoItem` s (`dataloading.sources.inputs.read_inputs`).

An annotation CSV has the header columns ``label,youtube_id,time_start,time_end,split`` (in any
order; extra columns such as Kinetics-400's ``is_cc`` are ignored). Each row names a clip of a
YouTube video, which the usual downloaders save as ``<youtube_id>_<start:06d>_<end:06d>.<ext>``
(start and end in whole seconds), in whatever folders (``<split>/<label>/``, flat, ...). So a
clip is found by that name anywhere under the video root, with any video extension
(`inputs.VIDEO_EXTENSIONS`). Parts of Kinetics are no longer on YouTube, so a clip that is not
there is not an error: it is left out and reported as a `MissingVideo`.

Classes: the sorted label names of every row of every given CSV, found or not, so a label's
index does not depend on which clips were downloaded (the standard Kinetics order is
alphabetical). Split values: ``train``; ``val`` / ``validate`` / ``validation`` -> ``val``;
``test``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from dataloading.sources.items import VIDEO_EXTENSIONS, MissingVideo, VideoItem, check_unique_paths, read_csv_rows
from dataloading.store.files import resolved

REQUIRED_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")
SPLIT_NAMES = {"train": "train", "val": "val", "validate": "val", "validation": "val", "test": "test"}
_SECONDS = re.compile(r"[0-9]+(\.0*)?")


def clip_name(youtube_id: str, start_s: int, end_s: int) -> str:
    """The file name (without extension) of a clip: ``<youtube_id>_<start:06d>_<end:06d>``."""
    return f"{youtube_id}_{start_s:06d}_{end_s:06d}"


def index_videos(root: Path) -> dict[str, list[str]]:
    """File name without extension -> absolute paths of the video files under ``root`` (recursive,
    hidden entries skipped), sorted."""
    found: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            stem, ext = os.path.splitext(name)
            if not name.startswith(".") and ext.lower() in VIDEO_EXTENSIONS:
                found.setdefault(stem, []).append(os.path.normpath(os.path.join(dirpath, name)))
    return {k: sorted(v) for k, v in found.items()}


def _seconds(text: str, where: str, column: str) -> int:
    text = text.strip()
    if not _SECONDS.fullmatch(text):
        raise ValueError(f"{where}: {column} {text!r} is not a whole number of seconds")
    return int(float(text))


def read_kinetics(csv_paths: Sequence[str | os.PathLike] | str | os.PathLike, video_root: str | os.PathLike, *,
                  missing: list[MissingVideo] | None = None) -> tuple[list[VideoItem], list[str]]:
    """Items of the clips found under ``video_root`` for every row of ``csv_paths`` (in file and
    row order) and the class names; clips not found are appended to ``missing``.

    Raises FileNotFoundError (a CSV or the root missing) or ValueError naming the file and line
    (bad header, empty label / id, bad times or split, a clip name matching several files, a
    clip listed twice) and when none of the listed clips is found.
    """
    if isinstance(csv_paths, (str, os.PathLike)):
        csv_paths = [csv_paths]
    if not csv_paths:
        raise ValueError("no Kinetics annotation CSV given")
    root = resolved(video_root, "--video-root")
    if not root.is_dir():
        raise FileNotFoundError(f"{video_root}: Kinetics video root not found (the directory holding the clips)")
    index = index_videos(root)

    rows: list[tuple[str, str, str, str]] = []  # (where, label, clip name, split)
    for csv_path in csv_paths:
        csv_path = Path(csv_path)
        table = read_csv_rows(csv_path)
        header = [h.strip().lower() for h in table[0][1]] if table else []
        absent = [c for c in REQUIRED_COLUMNS if c not in header]
        if absent:
            raise ValueError(f"{csv_path}:1: header {','.join(header) or '(empty file)'!r} lacks "
                             f"{', '.join(absent)}; expected {','.join(REQUIRED_COLUMNS)}")
        col = {c: header.index(c) for c in REQUIRED_COLUMNS}
        for lineno, row in table[1:]:
            if not any(cell.strip() for cell in row):
                continue
            where = f"{csv_path}:{lineno}"
            if len(row) != len(header):
                raise ValueError(f"{where}: expected {len(header)} columns ({','.join(header)}), got {len(row)}")
            cell = {c: row[i].strip() for c, i in col.items()}
            if not cell["label"]:
                raise ValueError(f"{where}: empty label (unlabelled test lists cannot be packed for training)")
            if not cell["youtube_id"]:
                raise ValueError(f"{where}: empty youtube_id")
            start, end = (_seconds(cell[c], where, c) for c in ("time_start", "time_end"))
            if end <= start:
                raise ValueError(f"{where}: time_end {end} is not after time_start {start}")
            split = SPLIT_NAMES.get(cell["split"].lower())
            if split is None:
                raise ValueError(f"{where}: bad split value {cell['split']!r}; expected one of "
                                 f"{', '.join(SPLIT_NAMES)}")
            rows.append((where, cell["label"], clip_name(cell["youtube_id"], start, end), split))
    if not rows:
        raise ValueError(f"{', '.join(map(str, csv_paths))}: no clips listed")

    classes = sorted({label for _, label, _, _ in rows})
    label_of = {name: i for i, name in enumerate(classes)}
    items: list[VideoItem] = []
    where_items: list[tuple[str, str]] = []
    for where, label, name, split in rows:
        paths = index.get(name, [])
        if not paths:
            if missing is not None:
                missing.append(MissingVideo(where, name))
            continue
        if len(paths) > 1:
            raise ValueError(f"{where}: clip {name} matches several files under {root}: {', '.join(paths)}")
        items.append(VideoItem(paths[0], label_of[label], label, split))
        where_items.append((where, paths[0]))
    if not items:
        raise ValueError(f"none of the {len(rows)} clips listed is under {root} "
                         f"(expected files named like {rows[0][2]}.mp4)")
    check_unique_paths(where_items)
    return items, classes
