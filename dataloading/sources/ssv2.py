"""Something-Something v2 label files -> `VideoItem` s (`dataloading.sources.inputs.read_inputs`).

The label directory holds (names of the current download, or of the first release):

* ``labels.json`` (``something-something-v2-labels.json``): ``{template: "<class id>"}``, the
  174 class templates with their 0-based ids, e.g. ``"Putting something on a surface": "142"``;
* ``train.json`` / ``validation.json`` (``something-something-v2-train.json`` / ``-validation.json``):
  lists of ``{"id": "78687", "label": "holding potato next to ...", "template": "Holding
  [something] next to [something]", "placeholders": [...]}``.

Videos are ``<video_root>/<id>.webm`` (VP9). An entry's class is its template with the
placeholder brackets removed (``"[something]"`` -> ``"something"``), the form the labels file
uses; classes are ordered by id. train -> split ``train``, validation -> ``val`` (the test list
has no labels and is not read). Videos not on disk are left out and reported as `MissingVideo`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from dataloading.sources.items import MissingVideo, VideoItem, check_unique_paths, read_text
from dataloading.store.files import resolved

LABEL_FILES = ("labels.json", "something-something-v2-labels.json")
SPLIT_FILES = (("train", ("train.json", "something-something-v2-train.json")),
               ("val", ("validation.json", "something-something-v2-validation.json")))
VIDEO_EXTENSION = ".webm"
_PLACEHOLDER = re.compile(r"\[([^\]]*)\]")


def normalize_template(template: str) -> str:
    """A template as a class name: placeholders unbracketed, whitespace collapsed:
    ``"Pushing [something] from left to right"`` -> ``"Pushing something from left to right"``."""
    return " ".join(_PLACEHOLDER.sub(r"\1", template).split())


def _first_existing(label_dir: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (label_dir / name).is_file():
            return label_dir / name
    raise FileNotFoundError(f"{label_dir}: no {' or '.join(names)} (Something-Something v2 label files)")


def _read_json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_classes(path: Path) -> list[str]:
    """The labels file -> class names by id (ids must be exactly 0..C-1)."""
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a JSON object {{template: id}}")
    by_id: dict[int, str] = {}
    for template, raw_id in data.items():
        if not re.fullmatch(r"[0-9]+", str(raw_id).strip()):
            raise ValueError(f"{path}: class {template!r} has id {raw_id!r}, expected a 0-based integer")
        i, name = int(str(raw_id).strip()), normalize_template(template)
        if i in by_id:
            raise ValueError(f"{path}: id {i} given to both {by_id[i]!r} and {name!r}")
        by_id[i] = name
    if sorted(by_id) != list(range(len(by_id))):
        gaps = sorted(set(range(max(by_id) + 1)) - set(by_id))[:5]
        raise ValueError(f"{path}: class ids are not 0..{len(by_id) - 1} (missing {gaps})")
    classes = [by_id[i] for i in range(len(by_id))]
    if len(set(classes)) != len(classes):
        raise ValueError(f"{path}: two ids have the same template")
    return classes


def read_ssv2(label_dir: str | os.PathLike, video_root: str | os.PathLike, *,
              missing: list[MissingVideo] | None = None) -> tuple[list[VideoItem], list[str]]:
    """Items of the train and validation lists whose ``<id>.webm`` exists under ``video_root``
    (train first, list order) and the class names by id; absent videos go to ``missing``.

    Raises FileNotFoundError (label files, root) or ValueError naming the file and entry (bad
    JSON, an entry without id / template, a template not in the labels file, an id listed
    twice) and when no listed video is found.
    """
    label_dir, root = Path(label_dir), resolved(video_root, "--video-root")
    if not label_dir.is_dir():
        raise FileNotFoundError(f"{label_dir}: Something-Something v2 label directory not found")
    if not root.is_dir():
        raise FileNotFoundError(f"{video_root}: Something-Something v2 video directory not found")
    labels_path = _first_existing(label_dir, LABEL_FILES)
    classes = read_classes(labels_path)
    label_of = {name: i for i, name in enumerate(classes)}

    items: list[VideoItem] = []
    where_items: list[tuple[str, str]] = []
    listed = 0
    for split, names in SPLIT_FILES:
        path = _first_existing(label_dir, names)
        entries = _read_json(path)
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a JSON list of {{id, template, ...}} entries")
        for n, entry in enumerate(entries):
            where = f"{path}: entry {n}"
            if not isinstance(entry, dict) or not str(entry.get("id", "")).strip():
                raise ValueError(f"{where}: expected an object with an 'id'")
            video_id = str(entry["id"]).strip()
            where = f"{where} (id {video_id})"
            if "template" not in entry:
                raise ValueError(f"{where}: no 'template' (the class)")
            name = normalize_template(str(entry["template"]))
            if name not in label_of:
                raise ValueError(f"{where}: template {name!r} is not a class of {labels_path}")
            listed += 1
            video = os.path.normpath(root / f"{video_id}{VIDEO_EXTENSION}")
            if not os.path.isfile(video):
                if missing is not None:
                    missing.append(MissingVideo(where, video))
                continue
            items.append(VideoItem(video, label_of[name], name, split))
            where_items.append((where, video))
    if not items:
        raise ValueError(f"none of the {listed} videos listed in {label_dir} is in {root} "
                         f"(expected <id>{VIDEO_EXTENSION} files)")
    check_unique_paths(where_items)
    return items, classes
