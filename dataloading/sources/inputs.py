"""Reading the list of input videos for `tsn pack`: a labels CSV, UCF101 / HMDB51 split files,
Kinetics annotation CSVs (`dataloading.sources.kinetics`), Something-Something v2 label files
(`dataloading.sources.ssv2`) or a folder-per-class tree (`dataloading.sources.folder_tree`).

Every reader returns ``(items, classes)``: `VideoItem` s in input-file order and the class names
in label order (``classes[item.label] == item.class_name``). Paths are made absolute; the CSV,
UCF101 and HMDB51 readers do not check them: a missing video is rejected by the packer like any
other unusable video, instead of aborting the whole run. Kinetics and Something-Something
lists name clips that users download themselves and often only partly: their readers look
the clips up, leave the missing ones out and report them (`MissingVideo`; read_inputs'
``missing`` list). Problems with the list files themselves raise ``FileNotFoundError`` /
``ValueError`` naming the file and line (or entry).

Split names are ``train``, ``val`` and ``test``. UCF101 and HMDB51 only define train and test
lists; their official *test* lists are returned as split ``val`` (the split used for
validation during training), so the standard protocol "train on trainlist, report on
testlist" maps to train/val.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from dataloading.sources import folder_tree, kinetics, ssv2
from dataloading.sources.items import (CLASSES_FILENAME, SPLITS, MissingVideo, VideoItem, check_unique_paths,
                                       read_classes, read_csv_rows, read_lines, stratified_val_split)
from dataloading.store.files import resolved


def read_inputs(
    *,
    csv_path: str | os.PathLike | None = None,
    ucf101_dir: str | os.PathLike | None = None,
    hmdb51_dir: str | os.PathLike | None = None,
    video_root: str | os.PathLike | None = None,
    split_id: int = 1,
    classes_path: str | os.PathLike | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    kinetics_csvs: Sequence[str | os.PathLike] | None = None,
    ssv2_dir: str | os.PathLike | None = None,
    folder_root: str | os.PathLike | None = None,
    missing: list[MissingVideo] | None = None,
) -> tuple[list[VideoItem], list[str]]:
    """Read the input videos from exactly one source.

    * ``csv_path``: a labels CSV (`read_labels_csv`; ``classes_path``, ``val_fraction``,
      ``seed`` apply).
    * ``ucf101_dir`` + ``video_root`` + ``split_id``: UCF101 split files (`read_ucf101`).
    * ``hmdb51_dir`` + ``video_root`` + ``split_id``: HMDB51 split files (`read_hmdb51`).
    * ``kinetics_csvs`` + ``video_root``: Kinetics annotation CSVs (`kinetics.read_kinetics`).
    * ``ssv2_dir`` + ``video_root``: Something-Something v2 label files (`ssv2.read_ssv2`).
    * ``folder_root``: ``ROOT/<class>/<video>`` (or ``ROOT/<split>/<class>/<video>``)
      (`folder_tree.read_folder_tree`; ``classes_path``, ``val_fraction``, ``seed`` apply).

    ``missing``: if a list, the clips a Kinetics / Something-Something list names but that are
    not under ``video_root`` are appended to it (they are left out of the items either way).
    """
    sources = (("csv", csv_path), ("ucf101", ucf101_dir), ("hmdb51", hmdb51_dir), ("kinetics", kinetics_csvs),
               ("ssv2", ssv2_dir), ("folders", folder_root))
    given = [name for name, v in sources if v is not None]
    if len(given) != 1:
        raise ValueError(
            "give exactly one input source (a labels CSV, UCF101 or HMDB51 split files, Kinetics CSVs, "
            f"Something-Something v2 labels or a class-folder tree), got {given or 'none'}"
        )
    missing = missing if missing is not None else []
    if csv_path is not None or folder_root is not None:
        if video_root is not None:
            raise ValueError(
                "video_root applies to UCF101/HMDB51/Kinetics/Something-Something lists; CSV paths are relative "
                "to the CSV's directory, a folder tree holds its videos"
            )
        if csv_path is not None:
            return read_labels_csv(csv_path, classes_path=classes_path, val_fraction=val_fraction, seed=seed)
        return folder_tree.read_folder_tree(folder_root, classes_path=classes_path, val_fraction=val_fraction,
                                               seed=seed)
    if classes_path is not None or val_fraction:
        raise ValueError(
            "classes_path and val_fraction apply only to a labels CSV or a class-folder tree; "
            "UCF101/HMDB51/Kinetics/Something-Something define their own classes and splits"
        )
    if video_root is None:
        raise ValueError(
            f"video_root is required with {given[0]} lists (the directory holding the videos)"
        )
    if ucf101_dir is not None:
        return read_ucf101(ucf101_dir, video_root, split_id)
    if hmdb51_dir is not None:
        return read_hmdb51(hmdb51_dir, video_root, split_id)
    if kinetics_csvs is not None:
        return kinetics.read_kinetics(kinetics_csvs, video_root, missing=missing)
    return ssv2.read_ssv2(ssv2_dir, video_root, missing=missing)


# ---------------------------------------------------------------------------------------------
# labels CSV


def read_labels_csv(
    csv_path: str | os.PathLike,
    *,
    classes_path: str | os.PathLike | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[list[VideoItem], list[str]]:
    """Read a labels CSV with header ``path,label`` or ``path,label,split``.

    * ``path``: relative to the CSV's directory, or absolute.
    * ``label``: a class name; with a classes file (``classes_path``, else ``classes.txt``
      beside the CSV) it may also be a 0-based integer index into it. A value that is a
      class name always means that class.
    * class order: the classes file if there is one, else the sorted unique label names.
    * ``split``: ``train`` / ``val`` / ``test``. Without a split column every video is
      ``train``, unless ``0 < val_fraction < 1``: then, per class, ``round(val_fraction * n)``
      videos (at least 1 when the class has >= 2 videos, at most n - 1) go to ``val``, chosen by
      a shuffle seeded with (``seed``, class name) -- reproducible, and independent of the
      CSV's row order and of the other classes.
    """
    csv_path = Path(csv_path)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    base_dir = resolved(csv_path, "the labels CSV").parent
    if classes_path is None and (base_dir / CLASSES_FILENAME).is_file():
        classes_path = base_dir / CLASSES_FILENAME
    known_classes = read_classes(classes_path) if classes_path is not None else None

    rows = read_csv_rows(csv_path)
    header = [h.strip().lower() for h in rows[0][1]] if rows else []
    if header not in (["path", "label"], ["path", "label", "split"]):
        raise ValueError(
            f"{csv_path}:1: bad header {','.join(header) or '(empty file)'!r}; "
            "expected 'path,label' or 'path,label,split'"
        )
    has_split = len(header) == 3
    if has_split and val_fraction:
        raise ValueError(f"{csv_path}: has a split column; val_fraction applies only to a CSV without one")

    records: list[tuple[int, str, str, str]] = []  # (line, abs path, class name, split)
    for lineno, row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) != len(header):
            raise ValueError(
                f"{csv_path}:{lineno}: expected {len(header)} columns ({','.join(header)}), got {len(row)}"
            )
        rel, label, split = (cell.strip() for cell in (row + [""])[:3])
        if not rel:
            raise ValueError(f"{csv_path}:{lineno}: empty path")
        if not label:
            raise ValueError(f"{csv_path}:{lineno}: empty label")
        if known_classes is not None:
            label = _resolve_label(label, known_classes, f"{csv_path}:{lineno}", classes_path)
        split = split.lower() if has_split else "train"
        if split not in SPLITS:
            raise ValueError(f"{csv_path}:{lineno}: bad split value {split!r}; expected one of {', '.join(SPLITS)}")
        records.append((lineno, os.path.normpath(base_dir / rel), label, split))
    if not records:
        raise ValueError(f"{csv_path}: no videos listed")

    classes = known_classes if known_classes is not None else sorted({r[2] for r in records})
    index = {name: i for i, name in enumerate(classes)}
    check_unique_paths([(f"{csv_path}:{line}", path) for line, path, _, _ in records])
    items = [VideoItem(path, index[name], name, split) for _, path, name, split in records]
    if val_fraction > 0:
        items = stratified_val_split(items, val_fraction, seed)
    return items, classes


def _resolve_label(label: str, classes: list[str], where: str, classes_path) -> str:
    if label in classes:
        return label
    if re.fullmatch(r"[0-9]+", label):
        i = int(label)
        if i < len(classes):
            return classes[i]
        raise ValueError(f"{where}: label index {i} out of range: {classes_path} has {len(classes)} classes (0-based)")
    raise ValueError(f"{where}: unknown class {label!r} (not in {classes_path})")


# ---------------------------------------------------------------------------------------------
# UCF101


def read_ucf101(
    split_dir: str | os.PathLike, video_root: str | os.PathLike, split_id: int = 1
) -> tuple[list[VideoItem], list[str]]:
    """UCF101 ``ucfTrainTestlist`` files: ``classInd.txt``, ``trainlist0N.txt``, ``testlist0N.txt``.

    ``classInd.txt`` lines are ``<1-based index> <ClassName>``; train lines
    ``<Class>/<video>.avi <1-based index>``; test lines ``<Class>/<video>.avi`` (class taken
    from the directory; UCF101's directory names match classInd case-insensitively, e.g.
    ``HandstandPushups`` vs ``v_HandStandPushups_*``). Videos are at ``video_root/<line path>``.
    trainlist -> split ``train``, testlist -> split ``val`` (UCF101 has no separate val set).
    """
    split_dir, root = Path(split_dir), resolved(video_root, "--video-root")
    class_file = split_dir / "classInd.txt"
    classes: list[str] = []
    for lineno, line in read_lines(class_file):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"{class_file}:{lineno}: expected '<index> <ClassName>', got {line.strip()!r}")
        if int(parts[0]) != len(classes) + 1:
            raise ValueError(
                f"{class_file}:{lineno}: class index {parts[0]}, expected {len(classes) + 1} (1-based, in order)"
            )
        classes.append(parts[1])
    if not classes:
        raise ValueError(f"{class_file}: no classes")
    lower = {c.lower(): i for i, c in enumerate(classes)}

    items: list[VideoItem] = []
    where_items: list[tuple[str, str]] = []
    for kind, split in (("train", "train"), ("test", "val")):
        list_file = split_dir / f"{kind}list{split_id:02d}.txt"
        for lineno, line in read_lines(list_file):
            parts = line.split()
            if not parts:
                continue
            where = f"{list_file}:{lineno}"
            rel = parts[0]
            dir_name = rel.replace("\\", "/").split("/")[0] if "/" in rel.replace("\\", "/") else None
            dir_label = lower.get(dir_name.lower()) if dir_name else None
            if kind == "train":
                if len(parts) != 2 or not parts[1].isdigit():
                    raise ValueError(f"{where}: expected '<Class>/<video> <1-based label>', got {line.strip()!r}")
                label = int(parts[1]) - 1
                if not 0 <= label < len(classes):
                    raise ValueError(f"{where}: label {parts[1]} out of range 1..{len(classes)} of {class_file}")
                if dir_label is not None and dir_label != label:
                    raise ValueError(
                        f"{where}: directory {dir_name!r} disagrees with label {parts[1]} ({classes[label]})"
                    )
            else:
                if len(parts) != 1 and not (len(parts) == 2 and parts[1].isdigit()):
                    raise ValueError(f"{where}: expected '<Class>/<video>', got {line.strip()!r}")
                if dir_name is None:
                    raise ValueError(f"{where}: path {rel!r} has no <Class>/ directory to take the class from")
                if dir_label is None:
                    raise ValueError(f"{where}: unknown class {dir_name!r} (not in {class_file})")
                label = dir_label
            path = os.path.normpath(root / rel)
            items.append(VideoItem(path, label, classes[label], split))
            where_items.append((where, path))
    if not items:
        raise ValueError(f"{split_dir}: split {split_id} lists no videos")
    check_unique_paths(where_items)
    return items, classes


# ---------------------------------------------------------------------------------------------
# HMDB51

_HMDB_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<id>[0-9]+)\.txt$")
HMDB_UNUSED, HMDB_TRAIN, HMDB_TEST = "0", "1", "2"


def read_hmdb51(
    split_dir: str | os.PathLike, video_root: str | os.PathLike, split_id: int = 1
) -> tuple[list[VideoItem], list[str]]:
    """HMDB51 ``testTrainMulti_7030_splits`` files: ``<class>_test_split<N>.txt``.

    Each line is ``<video_name.avi> <0|1|2>``: 1 = train, 2 = test (-> split ``val``; HMDB51
    has no separate val set), 0 = not used in this split (skipped). Videos are at
    ``video_root/<class>/<video_name>``; class order = sorted class names.
    """
    split_dir, root = Path(split_dir), resolved(video_root, "--video-root")
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: HMDB51 split directory not found")
    files = {}
    for entry in split_dir.iterdir():
        m = _HMDB_FILE.match(entry.name)
        if m and int(m["id"]) == split_id:
            files[m["cls"]] = entry
    if not files:
        raise FileNotFoundError(f"{split_dir}: no HMDB51 split files '<class>_test_split{split_id}.txt'")
    classes = sorted(files)
    items: list[VideoItem] = []
    where_items: list[tuple[str, str]] = []
    for label, name in enumerate(classes):
        for lineno, line in read_lines(files[name]):
            parts = line.split()
            if not parts:
                continue
            where = f"{files[name]}:{lineno}"
            if len(parts) != 2:
                raise ValueError(f"{where}: expected '<video_name> <0|1|2>', got {line.strip()!r}")
            video, flag = parts
            if flag == HMDB_UNUSED:
                continue
            if flag not in (HMDB_TRAIN, HMDB_TEST):
                raise ValueError(f"{where}: bad split value {flag!r}; expected 0 (unused), 1 (train) or 2 (test)")
            path = os.path.normpath(root / name / video)
            items.append(VideoItem(path, label, name, "train" if flag == HMDB_TRAIN else "val"))
            where_items.append((where, path))
    if not items:
        raise ValueError(f"{split_dir}: split {split_id} lists no train or test videos")
    check_unique_paths(where_items)
    return items, classes
