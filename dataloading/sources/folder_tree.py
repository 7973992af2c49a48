"""A folder-per-class tree -> `VideoItem` s (`dataloading.sources.inputs.read_inputs`).

Two layouts, told apart by the root's subdirectories:

* ``ROOT/<class>/<video>``: every video in split ``train`` (``val_fraction`` moves a
  stratified, seeded share of each class to ``val``, as for a labels CSV);
* ``ROOT/<split>/<class>/<video>`` when every subdirectory of ROOT is a split name (``train``,
  ``val``, ``test``): the split is the directory's.

Videos are the files directly in a class directory whose extension is in
`inputs.VIDEO_EXTENSIONS` (other files and hidden entries are ignored), in name order. Classes:
the classes file if given (every class directory must be in it), else the sorted class
directory names (an empty class directory still defines a class, so labels do not shift when
a class has no videos yet).
"""

from __future__ import annotations

import os
from pathlib import Path

from dataloading.sources.items import SPLITS, VIDEO_EXTENSIONS, VideoItem, read_classes, stratified_val_split
from dataloading.store.files import resolved


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _videos(class_dir: Path) -> list[str]:
    # A broken or looping symlink with a video's name is listed too: the packer rejects it with
    # its reason (rejected.jsonl) instead of it vanishing from the count.
    return [os.path.normpath(p) for p in sorted(class_dir.iterdir())
            if (p.is_file() or p.is_symlink() and not p.is_dir()) and not p.name.startswith(".")
            and p.suffix.lower() in VIDEO_EXTENSIONS]


def read_folder_tree(root: str | os.PathLike, *, classes_path: str | os.PathLike | None = None,
                     val_fraction: float = 0.0, seed: int = 0) -> tuple[list[VideoItem], list[str]]:
    """Items (split by split, class by class, name order) and class names of a class-folder tree.

    Raises FileNotFoundError (no root) or ValueError (no class directories, no videos, a class
    directory not in the classes file, ``val_fraction`` with split directories or out of [0, 1)).
    """
    root = resolved(root, "the class-folder root")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: class-folder root not found")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    top = _subdirs(root)
    if not top:
        raise ValueError(f"{root}: no class directories "
                         "(expected ROOT/<class>/<video> or ROOT/<split>/<class>/<video>)")
    by_split = {d.name: d for d in top} if all(d.name in SPLITS for d in top) else None
    if by_split is not None and val_fraction:
        raise ValueError(f"{root}: has split directories ({', '.join(by_split)}); val_fraction applies only to "
                         "ROOT/<class>/<video>")
    layout = ([(s, by_split[s]) for s in SPLITS if s in by_split] if by_split is not None else [("train", root)])
    class_dirs = [(split, d) for split, base in layout for d in _subdirs(base)]

    found = sorted({d.name for _, d in class_dirs})
    if classes_path is not None:
        classes = read_classes(classes_path)
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise ValueError(f"{root}: class directories {unknown[:5]} are not in {classes_path}")
    else:
        classes = found
    if not classes:
        raise ValueError(f"{root}: no class directories under the split directories {', '.join(by_split or {})}")
    label_of = {name: i for i, name in enumerate(classes)}
    items = [VideoItem(path, label_of[d.name], d.name, split) for split, d in class_dirs for path in _videos(d)]
    if not items:
        raise ValueError(f"{root}: no video files (extensions {', '.join(sorted(VIDEO_EXTENSIONS))}) in the class "
                         "directories")
    if val_fraction > 0:
        items = stratified_val_split(items, val_fraction, seed)
    return items, classes
