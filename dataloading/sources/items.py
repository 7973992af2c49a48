"""What every input format gives and shares: `VideoItem` (one source video with its label and
split), `MissingVideo`, the split and file names, and the list-file helpers the readers use
(text and CSV lines with their numbers, class files, the stratified val split, duplicate paths).
The readers are `inputs` (labels CSV, UCF101, HMDB51, and `read_inputs`, the one entry point),
`folder_tree`, `kinetics` and `ssv2`; they import this module, never each other.
"""

from __future__ import annotations

import csv
import io
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")
CLASSES_FILENAME = "classes.txt"
# What a directory walk takes for a video (folder trees, Kinetics clip look-up); anything else
# (notes, thumbnails, partial downloads such as .part) is ignored.
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv",
                              ".ogv", ".3gp", ".ts"})
MISSING_FILENAME = "missing_clips.txt"  # `tsn pack` lists the missing clips of a Kinetics / SSv2 list here


@dataclass(frozen=True)
class VideoItem:
    path: str  # absolute path of the source video
    label: int  # index into the class list
    class_name: str
    split: str  # one of SPLITS


@dataclass(frozen=True)
class MissingVideo:
    """A clip a list names that is not on disk: where it is listed (``file:line`` or ``file: entry
    N``) and the file name (Kinetics: the clip's name without extension) or path expected."""

    where: str
    name: str


def format_missing(missing: list[MissingVideo]) -> str:
    """One line per missing clip, ``<name> TAB <where>``: the `MISSING_FILENAME` text."""
    return "".join(f"{m.name}\t{m.where}\n" for m in missing)


def read_classes(path: str | os.PathLike) -> list[str]:
    """A classes file: one class name per line, label = 0-based line number among non-blank lines."""
    path = Path(path)
    lines = read_lines(path)
    classes: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in lines:
        name = line.strip()
        if not name:
            continue
        if name in seen:
            raise ValueError(f"{path}:{lineno}: duplicate class {name!r} (first on line {seen[name]})")
        seen[name] = lineno
        classes.append(name)
    if not classes:
        raise ValueError(f"{path}: no class names")
    return classes


def stratified_val_split(items: list[VideoItem], val_fraction: float, seed: int) -> list[VideoItem]:
    """Move ``round(val_fraction * n)`` videos of each class to split ``val`` (see `read_labels_csv`)."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for item in items:
        by_class[item.class_name].append(item.path)
    val_paths: set[str] = set()
    for name, paths in by_class.items():
        n = len(paths)
        n_val = round(val_fraction * n)
        if n >= 2:
            n_val = min(max(n_val, 1), n - 1)  # keep at least one training video per class
        # str seeds hash deterministically (sha512) across runs and Python versions.
        rng = random.Random(f"{seed}/{name}")
        chosen = sorted(paths)
        rng.shuffle(chosen)
        val_paths.update(chosen[:n_val])
    return [VideoItem(it.path, it.label, it.class_name, "val" if it.path in val_paths else it.split) for it in items]


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file (a BOM is ignored). Lines end at
    ``\n``, ``\r\n`` or ``\r`` only: `str.splitlines` would also split at U+2028, U+0085,
    form feeds..., characters a file name may hold."""
    text = read_text(path)
    return [(i, line.rstrip("\n")) for i, line in enumerate(io.StringIO(text, newline=None), start=1)]


def read_text(path: Path) -> str:
    """A UTF-8 text file (a BOM is ignored); a missing file, a directory or bad UTF-8 raise naming it."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, expected a text file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def read_csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) for each CSV row (the row's last line, if quoted newlines span several).
    The csv module splits the lines itself (``newline=""``), so a quoted cell keeps a newline
    or a U+2028 (which `str.splitlines` would cut at)."""
    text = read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    return rows


def check_unique_paths(where_paths: list[tuple[str, str]]) -> None:
    """Raise naming both places when a path is listed twice (``where_paths``: (where, path))."""
    # The packer identifies videos by path (journal, resume), so a duplicate would be packed
    # twice or confuse resuming; it is almost always a mistake in the list.
    first: dict[str, str] = {}
    for where, path in where_paths:
        if path in first:
            raise ValueError(f"{where}: duplicate video {path} (also listed at {first[path]})")
        first[path] = where
