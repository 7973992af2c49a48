"""Tests of dataloading.sources.inputs: labels CSV, UCF101 and HMDB51 split files. Table-driven, tiny files."""

from __future__ import annotations

import os
from collections import Counter

import pytest

from dataloading.sources.inputs import read_hmdb51, read_inputs, read_labels_csv, read_ucf101
from dataloading.sources.items import VideoItem


def write_files(root, files: dict[str, str]):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def summary(items: list[VideoItem], root) -> list[tuple[str, int, str, str]]:
    """(path relative to root, label, class, split) for compact expectations."""
    return [(os.path.relpath(it.path, root), it.label, it.class_name, it.split) for it in items]


# ---------------------------------------------------------------------------------------------
# labels CSV

CSV_CASES = [
    pytest.param(
        {"labels.csv": "path,label\nv/b1.mp4,walk\nv/a1.mp4,run\nv/a2.mp4,run\n"},
        {},
        ["run", "walk"],
        [("v/b1.mp4", 1, "walk", "train"), ("v/a1.mp4", 0, "run", "train"), ("v/a2.mp4", 0, "run", "train")],
        id="names-sorted-classes",
    ),
    pytest.param(
        {"labels.csv": "path,label\nx.mp4,1\ny.mp4,walk\nz.mp4,0\n", "classes.txt": "walk\nrun\n"},
        {},
        ["walk", "run"],
        [("x.mp4", 1, "run", "train"), ("y.mp4", 0, "walk", "train"), ("z.mp4", 0, "walk", "train")],
        id="classes-txt-beside-csv-index-and-name",
    ),
    pytest.param(
        {"labels.csv": "path,label\nx.mp4,jump\n", "my_classes.txt": "run\njump\n"},
        {"classes_path": "my_classes.txt"},
        ["run", "jump"],
        [("x.mp4", 1, "jump", "train")],
        id="explicit-classes-file",
    ),
    pytest.param(
        {"labels.csv": "path,label,split\na.mp4,run,train\nb.mp4,run,val\nc.mp4,walk,TEST\n\n"},
        {},
        ["run", "walk"],
        [("a.mp4", 0, "run", "train"), ("b.mp4", 0, "run", "val"), ("c.mp4", 1, "walk", "test")],
        id="split-column-blank-line",
    ),
    pytest.param(
        {"labels.csv": "\ufeffPath , Label\n\"sub dir/a,1.mp4\" , run\r\n"},
        {},
        ["run"],
        [("sub dir/a,1.mp4", 0, "run", "train")],
        id="bom-crlf-quoted-spaces",
    ),
]


@pytest.mark.parametrize("files,kwargs,classes,expected", CSV_CASES)
def test_labels_csv(tmp_path, files, kwargs, classes, expected):
    write_files(tmp_path, files)
    kwargs = {k: tmp_path / v if k == "classes_path" else v for k, v in kwargs.items()}
    items, got_classes = read_labels_csv(tmp_path / "labels.csv", **kwargs)
    assert got_classes == classes
    assert summary(items, tmp_path) == expected
    assert all(os.path.isabs(it.path) for it in items)


def test_labels_csv_absolute_path(tmp_path):
    video = tmp_path / "elsewhere" / "v.mp4"
    write_files(tmp_path, {"lists/labels.csv": f"path,label\n{video},run\n"})
    items, _ = read_labels_csv(tmp_path / "lists" / "labels.csv")
    assert items[0].path == str(video)


CSV_ERRORS = [
    pytest.param({}, FileNotFoundError, r"labels\.csv: file not found", id="missing-file"),
    pytest.param({"labels.csv": ""}, ValueError, r"labels\.csv:1: bad header", id="empty-file"),
    pytest.param(
        {"labels.csv": "file,class\na.mp4,run\n"}, ValueError, r"labels\.csv:1: bad header 'file,class'", id="bad-header"
    ),
    pytest.param({"labels.csv": "path,label\n"}, ValueError, r"labels\.csv: no videos listed", id="empty-result"),
    pytest.param(
        {"labels.csv": "path,label\na.mp4,run,extra\n"}, ValueError, r"labels\.csv:2: expected 2 columns", id="column-count"
    ),
    pytest.param({"labels.csv": "path,label\n,run\n"}, ValueError, r"labels\.csv:2: empty path", id="empty-path"),
    pytest.param({"labels.csv": "path,label\na.mp4,\n"}, ValueError, r"labels\.csv:2: empty label", id="empty-label"),
    pytest.param(
        {"labels.csv": "path,label\na.mp4,run\nb.mp4,swim\n", "classes.txt": "run\nwalk\n"},
        ValueError,
        r"labels\.csv:3: unknown class 'swim'",
        id="unknown-class",
    ),
    pytest.param(
        {"labels.csv": "path,label\na.mp4,2\n", "classes.txt": "run\nwalk\n"},
        ValueError,
        r"labels\.csv:2: label index 2 out of range.*2 classes",
        id="index-out-of-range",
    ),
    pytest.param(
        {"labels.csv": "path,label,split\na.mp4,run,train\nb.mp4,run,valid\n"},
        ValueError,
        r"labels\.csv:3: bad split value 'valid'",
        id="bad-split",
    ),
    pytest.param(
        {"labels.csv": "path,label\na.mp4,run\n./a.mp4,run\n"},
        ValueError,
        r"labels\.csv:3: duplicate video .*a\.mp4 \(also listed at .*labels\.csv:2\)",
        id="duplicate-path",
    ),
    pytest.param(
        {"labels.csv": "path,label\na.mp4,run\n", "classes.txt": "run\nrun\n"},
        ValueError,
        r"classes\.txt:2: duplicate class 'run'",
        id="duplicate-class",
    ),
]


@pytest.mark.parametrize("files,exc,match", CSV_ERRORS)
def test_labels_csv_errors(tmp_path, files, exc, match):
    write_files(tmp_path, files)
    with pytest.raises(exc, match=match):
        read_labels_csv(tmp_path / "labels.csv")


def test_val_fraction_stratified_and_seeded(tmp_path):
    # class sizes 10, 5, 2, 1 -> val counts round(0.2 * n) = 2, 1, 0 -> 1 (>= 1 with >= 2 videos), 0
    sizes = {"a": 10, "b": 5, "c": 2, "d": 1}
    rows = [f"{c}/{i}.mp4,{c}" for c, n in sizes.items() for i in range(n)]
    write_files(tmp_path, {"labels.csv": "path,label\n" + "\n".join(rows) + "\n"})
    items, classes = read_labels_csv(tmp_path / "labels.csv", val_fraction=0.2, seed=3)
    assert classes == ["a", "b", "c", "d"]
    val = Counter(it.class_name for it in items if it.split == "val")
    assert val == {"a": 2, "b": 1, "c": 1}
    assert [it.split for it in items].count("train") == 18 - 4
    again, _ = read_labels_csv(tmp_path / "labels.csv", val_fraction=0.2, seed=3)
    assert again == items
    # independent of the CSV row order
    write_files(tmp_path, {"labels.csv": "path,label\n" + "\n".join(reversed(rows)) + "\n"})
    reordered, _ = read_labels_csv(tmp_path / "labels.csv", val_fraction=0.2, seed=3)
    assert {it.path for it in reordered if it.split == "val"} == {it.path for it in items if it.split == "val"}
    # another seed picks other videos (for the 10-video class, 45 possible pairs)
    val_sets = set()
    for seed in range(5):
        other, _ = read_labels_csv(tmp_path / "labels.csv", val_fraction=0.2, seed=seed)
        val_sets.add(frozenset(it.path for it in other if it.split == "val"))
    assert len(val_sets) > 1


@pytest.mark.parametrize(
    "text,kwargs,match",
    [
        ("path,label,split\na.mp4,run,train\n", {"val_fraction": 0.1}, "has a split column"),
        ("path,label\na.mp4,run\n", {"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
    ],
)
def test_val_fraction_errors(tmp_path, text, kwargs, match):
    write_files(tmp_path, {"labels.csv": text})
    with pytest.raises(ValueError, match=match):
        read_labels_csv(tmp_path / "labels.csv", **kwargs)


# ---------------------------------------------------------------------------------------------
# UCF101

UCF_CLASSIND = "1 ApplyEyeMakeup\r\n2 HandstandPushups\r\n3 YoYo\r\n"
UCF_TRAIN = (
    "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n"
    "HandstandPushups/v_HandStandPushups_g08_c01.avi 2\n"
    "YoYo/v_YoYo_g09_c01.avi 3\n"
)
UCF_TEST = "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\nHandStandPushups/v_HandStandPushups_g01_c01.avi\n"


def test_ucf101(tmp_path):
    files = {"classInd.txt": UCF_CLASSIND, "trainlist01.txt": UCF_TRAIN, "testlist01.txt": UCF_TEST}
    write_files(tmp_path, {f"splits/{k}": v for k, v in files.items()})
    items, classes = read_ucf101(tmp_path / "splits", tmp_path / "videos", 1)
    assert classes == ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]
    assert summary(items, tmp_path / "videos") == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 0, "ApplyEyeMakeup", "train"),
        ("HandstandPushups/v_HandStandPushups_g08_c01.avi", 1, "HandstandPushups", "train"),
        ("YoYo/v_YoYo_g09_c01.avi", 2, "YoYo", "train"),
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", 0, "ApplyEyeMakeup", "val"),
        # class from the directory, matched case-insensitively (UCF101's HandStand/Handstand quirk)
        ("HandStandPushups/v_HandStandPushups_g01_c01.avi", 1, "HandstandPushups", "val"),
    ]
    same, _ = read_inputs(ucf101_dir=tmp_path / "splits", video_root=tmp_path / "videos", split_id=1)
    assert same == items


UCF_ERRORS = [
    pytest.param(
        {"trainlist01.txt": UCF_TRAIN, "testlist01.txt": UCF_TEST},
        FileNotFoundError,
        r"classInd\.txt: file not found",
        id="no-classind",
    ),
    pytest.param(
        {"classInd.txt": UCF_CLASSIND, "testlist01.txt": UCF_TEST},
        FileNotFoundError,
        r"trainlist01\.txt: file not found",
        id="no-trainlist",
    ),
    pytest.param(
        {"classInd.txt": "1 A\n3 B\n", "trainlist01.txt": "", "testlist01.txt": ""},
        ValueError,
        r"classInd\.txt:2: class index 3, expected 2",
        id="classind-gap",
    ),
    pytest.param(
        {"classInd.txt": UCF_CLASSIND, "trainlist01.txt": "YoYo/v.avi 4\n", "testlist01.txt": ""},
        ValueError,
        r"trainlist01\.txt:1: label 4 out of range 1\.\.3",
        id="train-label-range",
    ),
    pytest.param(
        {"classInd.txt": UCF_CLASSIND, "trainlist01.txt": "YoYo/v.avi 1\n", "testlist01.txt": ""},
        ValueError,
        r"trainlist01\.txt:1: directory 'YoYo' disagrees with label 1",
        id="train-dir-label-mismatch",
    ),
    pytest.param(
        {
            "classInd.txt": UCF_CLASSIND,
            "trainlist01.txt": UCF_TRAIN,
            "testlist01.txt": "YoYo/a.avi\nSkiing/v_Skiing_g01.avi\n",
        },
        ValueError,
        r"testlist01\.txt:2: unknown class 'Skiing'",
        id="test-unknown-class",
    ),
    pytest.param(
        {"classInd.txt": UCF_CLASSIND, "trainlist01.txt": "\n", "testlist01.txt": ""},
        ValueError,
        r"split 1 lists no videos",
        id="empty",
    ),
]


@pytest.mark.parametrize("files,exc,match", UCF_ERRORS)
def test_ucf101_errors(tmp_path, files, exc, match):
    write_files(tmp_path, {f"splits/{k}": v for k, v in files.items()})
    (tmp_path / "splits").mkdir(exist_ok=True)
    with pytest.raises(exc, match=match):
        read_ucf101(tmp_path / "splits", tmp_path / "videos", 1)


def test_ucf101_split_id_selects_files(tmp_path):
    write_files(
        tmp_path,
        {
            "s/classInd.txt": UCF_CLASSIND,
            "s/trainlist02.txt": "YoYo/v_YoYo_g20_c01.avi 3\n",
            "s/testlist02.txt": "YoYo/v_YoYo_g01_c01.avi\n",
        },
    )
    items, _ = read_ucf101(tmp_path / "s", tmp_path, 2)
    got = [(os.path.basename(it.path), it.split) for it in items]
    assert got == [("v_YoYo_g20_c01.avi", "train"), ("v_YoYo_g01_c01.avi", "val")]
    with pytest.raises(FileNotFoundError, match=r"trainlist03\.txt"):
        read_ucf101(tmp_path / "s", tmp_path, 3)


# ---------------------------------------------------------------------------------------------
# HMDB51

HMDB_FILES = {
    "brush_hair_test_split1.txt": (
        "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \nApril_09_brush_hair_u_nm_np1_ba_goo_1.avi 2 \nx.avi 0\n"
    ),
    "cartwheel_test_split1.txt": "c1.avi 2\nc2.avi 1\n",
    "cartwheel_test_split2.txt": "c1.avi 1\nc2.avi 1\n",
    "README.txt": "not a split file\n",
}


def test_hmdb51(tmp_path):
    write_files(tmp_path, {f"splits/{k}": v for k, v in HMDB_FILES.items()})
    items, classes = read_hmdb51(tmp_path / "splits", tmp_path / "videos", 1)
    assert classes == ["brush_hair", "cartwheel"]
    assert summary(items, tmp_path / "videos") == [
        ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", 0, "brush_hair", "train"),
        ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_1.avi", 0, "brush_hair", "val"),
        ("cartwheel/c1.avi", 1, "cartwheel", "val"),
        ("cartwheel/c2.avi", 1, "cartwheel", "train"),
    ]
    items2, classes2 = read_inputs(hmdb51_dir=tmp_path / "splits", video_root=tmp_path / "videos", split_id=2)
    assert classes2 == ["cartwheel"] and [it.split for it in items2] == ["train", "train"]


HMDB_ERRORS = [
    pytest.param({}, 1, FileNotFoundError, r"no HMDB51 split files '<class>_test_split1\.txt'", id="no-files"),
    pytest.param({"run_test_split1.txt": "a.avi 3\n"}, 1, ValueError, r"split1\.txt:1: bad split value '3'", id="bad-flag"),
    pytest.param(
        {"run_test_split1.txt": "a.avi\n"}, 1, ValueError, r"split1\.txt:1: expected '<video_name> <0\|1\|2>'", id="malformed"
    ),
    pytest.param(
        {"run_test_split1.txt": "a.avi 0\nb.avi 0\n"}, 1, ValueError, r"split 1 lists no train or test videos", id="all-unused"
    ),
]


@pytest.mark.parametrize("files,split_id,exc,match", HMDB_ERRORS)
def test_hmdb51_errors(tmp_path, files, split_id, exc, match):
    (tmp_path / "splits").mkdir()
    write_files(tmp_path, {f"splits/{k}": v for k, v in files.items()})
    with pytest.raises(exc, match=match):
        read_hmdb51(tmp_path / "splits", tmp_path / "videos", split_id)


def test_hmdb51_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="HMDB51 split directory not found"):
        read_hmdb51(tmp_path / "nope", tmp_path, 1)


# ---------------------------------------------------------------------------------------------
# read_inputs dispatch


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one input source"),
        ({"csv_path": "a.csv", "ucf101_dir": "s"}, "exactly one input source"),
        ({"ucf101_dir": "s"}, "video_root is required"),
        ({"csv_path": "a.csv", "video_root": "r"}, "video_root applies to UCF101/HMDB51"),
        ({"hmdb51_dir": "s", "video_root": "r", "val_fraction": 0.2}, "apply only to a labels CSV"),
    ],
)
def test_read_inputs_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        read_inputs(**kwargs)
