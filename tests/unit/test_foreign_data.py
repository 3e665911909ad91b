"""Shards other tools wrote, without a manifest: the tar reader against tarfile and webdataset, the shard index
(counts against the tar listing, the cache and its invalidation, other tools' counts), labels refused with shard
and sample named, and planning 10,000 shards without opening one."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data.index import INDEX_NAME, index_shards
from pipeline.data.plan import DataError, plan_data
from pipeline.data.tarscan import iter_samples, scan_shard, split_key, walk_members
from pipeline.rundir import RunsRoot
from tests.conftest import ROOT, run_cli
from tests.foreign import add, tar_listing, truncate, write_foreign

# ----------------------------------------------------------------------------------------------------
# Which files get opened (a real audit hook, not a patch): planning must not open shards it has an index for

_OPENED: list[str] = []
_WATCH: list[str] = []


def _audit(event: str, args) -> None:
    if event == "open" and _WATCH and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if any(path.startswith(w) for w in _WATCH):
            _OPENED.append(path)


sys.addaudithook(_audit)


class opened_under:
    """Records the files opened under a folder while active."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def __enter__(self) -> list[str]:
        _OPENED.clear()
        _WATCH.append(self.folder)
        return _OPENED

    def __exit__(self, *exc) -> None:
        _WATCH.remove(self.folder)


def config_for(train: str, val: str | None = None, *extra: str):
    return load_config(
        None,
        [f"data.train_shards={train}", f"data.val_shards={val or 'null'}", "data.batch_size=8", *extra],
    )


# ----------------------------------------------------------------------------------------------------
# The tar reader


@pytest.mark.parametrize(
    "name",
    [
        "train0003/000017.JPEG",
        "a.b/c.d.e",
        "x",
        "__key__",
        "__meta__/x.jpg",
        "dir/__meta__/x.jpg",
        "./a/b.jpg",
        "a/.hidden.jpg",
        "img.0001.jpg",
        "UPPER/Key.Cls",
    ],
)
def test_sample_keys_follow_webdatasets_rules(name):
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    key, suffix = base_plus_ext(name)
    skipped_by_wds = not list(tar_file_iterator(_one_member_tar(name)))
    expected = None if key is None or skipped_by_wds else (key, suffix.lower())  # group_by_keys: lcase=True
    assert split_key(name) == expected


def _one_member_tar(name: str) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add(tar, name, b"x")
    buf.seek(0)
    return buf


LONG = ["x" * 150 + "/k1.jpg", "x" * 150 + "/k1.cls", "d/" + "é" * 60 + ".png", "p" * 90 + "/" + "q" * 90 + ".jpg"]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_the_header_walk_lists_what_tarfile_lists(tmp_path, fmt, mode):
    """Long names (pax and GNU headers, ustar prefixes), directories and gzip: the same members as tarfile."""
    names = ["short.jpg", "short.cls", "dir/k2.webp"] + (LONG if fmt != tarfile.USTAR_FORMAT else LONG[3:])
    path = tmp_path / "a.tar"
    with tarfile.open(path, mode, format=fmt) as tar:
        folder = tarfile.TarInfo("somedir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name in names:
            add(tar, name, b"3" if name.endswith(".cls") else os.urandom(700))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.size) for m in tar if m.isreg()]
    with open(path, "rb") as f:
        walked = [(m.name, m.size) for m in walk_members(f, lambda n: False, size=path.stat().st_size)]
    assert walked == expected
    with open(path, "rb") as f:
        scan = scan_shard(f, size=path.stat().st_size)
    assert scan.members == len(expected) and scan.samples == len(tar_listing(str(path))[1]) and scan.error is None


def test_garbage_is_not_a_tar(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"<html>not found</html>" * 100)
    with open(path, "rb") as f:
        scan = scan_shard(f, size=path.stat().st_size)
    assert scan.samples == 0 and "not a tar header at byte 0" in scan.error


def test_a_cut_tar_delivers_every_complete_sample_then_fails(tmp_path):
    shards = write_foreign(tmp_path, "t", 1, 12)
    kept = truncate(shards.shards[0])
    delivered = []
    with open(shards.shards[0], "rb") as f, pytest.raises(ValueError, match="ends inside"):
        for sample, _next in iter_samples(f, shards.shards[0], size=os.path.getsize(shards.shards[0])):
            delivered.append(sample["__key__"])
    assert delivered == kept and len(kept) >= 5
    with open(shards.shards[0], "rb") as f:
        assert scan_shard(f, size=os.path.getsize(shards.shards[0])).samples == len(kept)  # the index agrees


# ----------------------------------------------------------------------------------------------------
# Indexing shards without a manifest


@pytest.fixture
def foreign(tmp_path):
    """8 train shards (dir-prefixed keys, .JPEG/.jpg/.png/.webp, captions, a corrupt image, a caption-only sample,
    one tar cut short) and 2 val shards, no manifest."""
    train = write_foreign(tmp_path / "x", "train", 8, 12, corrupt=((7, 3),), caption_only=((2, 5),))
    complete = truncate(train.shards[5])
    val = write_foreign(tmp_path / "x", "val", 2, 10, corrupt=((1, 4),), seed=100)
    return tmp_path, train, val, complete


def test_without_a_manifest_the_plan_indexes_the_shards_once(foreign):
    tmp_path, train, val, complete = foreign
    config = config_for(f"{tmp_path}/x/train-{{0000..0007}}.tar", f"{tmp_path}/x/val-{{0000..0001}}.tar")
    plan = plan_data(config, 1)
    # keys with an image, as the tar lists them (the cut one: its complete samples)
    expected = [len(tar_listing(s)[1]) if i != 5 else len(complete) for i, s in enumerate(train.shards)]
    assert list(plan.train_counts) == expected and plan.train_samples == sum(expected)
    assert plan.val_samples == 20 and plan.num_classes == 10
    assert (tmp_path / "x" / INDEX_NAME).is_file()
    (note,) = plan.notes
    assert note.startswith(f"indexed 10 shard(s) ({sum(expected) + 20:,} samples, 10 classes) in ")
    assert f"cached in {tmp_path}/x/{INDEX_NAME}" in note and "train-0005.tar" in note and "without an image" in note
    entry = json.loads((tmp_path / "x" / INDEX_NAME).read_text())["shards"]["train-0000.tar"]
    assert entry["members"] == tar_listing(train.shards[0])[0] and set(entry["images"]) == {
        "jpeg",
        "jpg",
        "png",
        "webp",
    }

    with opened_under(tmp_path / "x") as opened:  # the second plan reads the cache, and no shard
        again = plan_data(config, 1)
    assert opened == [str(tmp_path / "x" / INDEX_NAME)]
    assert again.train_counts == plan.train_counts and again.notes[0].startswith("shard index: 10 shard(s)")
    assert again.datasets[0]["digest"] == plan.datasets[0]["digest"]


def test_a_changed_shard_is_indexed_again(foreign):
    tmp_path, train, _val, _ = foreign
    pattern = f"{tmp_path}/x/train-{{0000..0003}}.tar"
    first = plan_data(config_for(pattern), 1)
    write_foreign(tmp_path / "x", "train", 1, 5)  # train-0000.tar rewritten with 5 samples
    with opened_under(tmp_path / "x") as opened:
        second = plan_data(config_for(pattern), 1)
    assert second.train_counts[0] == 5 and second.train_counts[1:] == first.train_counts[1:]
    assert sorted(p for p in set(opened) if p.endswith(".tar")) == [train.shards[0]], "only the changed one"
    assert second.datasets[0]["digest"] != first.datasets[0]["digest"]


def test_a_read_only_shard_folder_keeps_its_index_in_the_runs_folder(foreign):
    tmp_path, _train, _val, _ = foreign
    folder = tmp_path / "x"
    os.chmod(folder, 0o555)
    if os.access(folder, os.W_OK):  # root writes anywhere: block the cache file's name instead
        (folder / INDEX_NAME).mkdir()
    try:
        config = config_for(f"{folder}/train-{{0000..0001}}.tar", None, f"run.root={tmp_path}/runs")
        plan = plan_data(config, 1)
        cached = list(RunsRoot(tmp_path / "runs").shard_index.glob("local-*.json"))
        assert len(cached) == 1 and f"cached in {cached[0]}" in plan.notes[0]
        with opened_under(folder) as opened:
            assert plan_data(config, 1).train_counts == plan.train_counts
        assert not [p for p in opened if p.endswith(".tar")], "the second plan reads the index from the runs folder"
    finally:
        os.chmod(folder, 0o755)


def test_classes_json_names_the_classes_and_bounds_the_labels(foreign):
    tmp_path, train, _val, _ = foreign
    (tmp_path / "x" / "classes.json").write_text(json.dumps({f"class{i}": i for i in range(12)}))
    plan = plan_data(config_for(f"{tmp_path}/x/train-{{0000..0001}}.tar"), 1)
    assert plan.num_classes == 12 and plan.classes[:2] == ["class0", "class1"]
    (tmp_path / "x" / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    with pytest.raises(
        DataError,
        match=r"data\.train_shards: shard .*train-000\d\.tar, sample train000\d/0000\d\d: "
        r"class index \d is out of range; integers 0\.\.2 \(the 3 classes of .*classes\.json\)",
    ):
        plan_data(config_for(f"{tmp_path}/x/train-{{0000..0001}}.tar"), 1)


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("12", r"sample bad0001/000004: class index 12 is out of range; integers 0\.\.9 \(model\.num_classes=10\)"),
        ("-1", r"sample bad0001/000004: class index -1; integers 0\.\.9"),
        ("dog", r"sample bad0001/000004: \.cls 'dog' is not a class index; integers 0\.\.9"),
    ],
)
def test_a_label_outside_the_classes_is_refused_naming_shard_and_sample(tmp_path, label, message):
    write_foreign(tmp_path, "bad", 2, 6, label_of=lambda s, i: label if (s, i) == (1, 4) else str(i))
    config = config_for(f"{tmp_path}/bad-{{0000..0001}}.tar", None, "model.num_classes=10")
    with pytest.raises(DataError, match=r"data\.train_shards: shard .*bad-0001\.tar, " + message):
        plan_data(config, 1)


def test_the_cli_refuses_a_bad_label_in_one_line(tmp_path):
    write_foreign(tmp_path, "bad", 2, 4, label_of=lambda s, i: "7" if (s, i) != (0, 2) else "1.5")
    result = run_cli("pretrain", f"data.train_shards={tmp_path}/bad-{{0000..0001}}.tar", "data.val_shards=null",
                     "data.batch_size=4", f"run.root={tmp_path}/runs", cwd=ROOT)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: data.train_shards: shard {tmp_path}/bad-0000.tar, sample bad0000/000002: .cls '1.5' is not a "
        "class index; integers >= 0"
    )


def test_img2dataset_stats_and_wids_indexes_count_without_reading_the_tars(tmp_path):
    shards = write_foreign(tmp_path, "part", 4, 6)
    for path in shards.shards[:2]:  # img2dataset: <stem>_stats.json with "successes"
        Path(path[: -len(".tar")] + "_stats.json").write_text(json.dumps({"count": 9, "successes": 6, "failed": 3}))
    wids = {"wids_version": 1, "shardlist": [{"url": Path(p).name, "nsamples": 6} for p in shards.shards[2:]]}
    (tmp_path / "dataset.json").write_text(json.dumps(wids))
    config = config_for(f"{tmp_path}/part-{{0000..0003}}.tar", None, "model.num_classes=10")
    with opened_under(tmp_path) as opened:
        plan = plan_data(config, 1)
    assert plan.train_samples == 24 and not [p for p in opened if p.endswith(".tar")]
    assert "; 4 counted from img2dataset/wids files;" in plan.notes[0]
    unlabeled = config_for(f"{tmp_path}/part-{{0000..0003}}.tar")  # num_classes unknown: the .cls must be read
    walked = plan_data(unlabeled, 1)
    assert walked.num_classes == 10 and walked.notes[0].startswith("indexed 4 shard(s) (24 samples, 10 classes) in")


# ----------------------------------------------------------------------------------------------------
# Thousands of shards


def _tiny_tar() -> bytes:
    """A 1-sample shard with no end padding beyond the two zero blocks (1.5 KiB instead of 10 KiB)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add(tar, "k/000000.jpg", b"x" * 100)
        add(tar, "k/000000.cls", b"1")
    return buf.getvalue()[: 4 * 512] + bytes(1024)


def test_ten_thousand_shards_plan_and_deal_without_opening_one(tmp_path):
    """With a manifest, or once indexed, planning and building the loaders opens no shard (an audit hook
    records every open); the existence check is one directory listing."""
    from pipeline.data.loader import RankData
    from pipeline.data.manifest import write_manifest

    n = 10_000
    folder = tmp_path / "many"
    folder.mkdir()
    raw = _tiny_tar()
    names = [f"s-{i:05d}.tar" for i in range(n)]
    for name in names:
        (folder / name).write_bytes(raw)
    pattern = f"{folder}/s-{{00000..09999}}.tar"
    first = plan_data(config_for(pattern, None, "launch.nproc=4"), 4)  # indexes them all, once
    assert first.train_samples == n and first.num_classes == 2 and first.steps_per_epoch == n // 8
    with opened_under(folder) as opened:
        plan = plan_data(config_for(pattern, None, "launch.nproc=4"), 4)
        data = RankData(config_for(pattern, None, "launch.nproc=4", "data.num_workers=2"), plan, 3, 4, 32, False)
        spec = data.train_spec(start_step=0)
    assert opened == [str(folder / INDEX_NAME)] and spec.workers == 2 and plan.streams == 8
    assert len(spec.shards) == n and spec.shard_counts == (1,) * n

    ours = tmp_path / "ours"  # our own manifest: not even the index is read
    ours.mkdir()
    for name in names:
        (ours / name).write_bytes(b"garbage, never read")
    write_manifest(ours, classes=["a", "b"], image_format="jpg", source="test", settings={},
                   splits={"train": {"shards": names, "counts": [3] * n, "num_samples": 3 * n}})  # fmt: skip
    with opened_under(ours) as opened:
        plan = plan_data(config_for(f"{ours}/s-{{00000..09999}}.tar", None, "launch.nproc=4"), 4)
    assert plan.train_samples == 3 * n and opened == [str(ours / "manifest.json")]


def test_remote_shards_index_into_the_runs_folder(tmp_path):
    from tests.shardserver import ShardServer

    shards = write_foreign(tmp_path / "web", "train", 3, 8)
    with ShardServer(tmp_path / "web") as server:
        urls = [server.url(Path(p).name) for p in shards.shards]
        result = index_shards(urls, runs_root=str(tmp_path / "runs"))
        assert [e["samples"] for e in result.entries.values()] == [8, 8, 8]
        assert result.cache_files[0].startswith(str(RunsRoot(tmp_path / "runs").shard_index))
        again = index_shards(urls, runs_root=str(tmp_path / "runs"))
        assert again.scanned == 0 and sum(len(v) for v in server.requests.values()) == 3, "cached: no request"


def test_indexing_and_planning_import_nothing_heavy(foreign):
    """The CLI indexes before torch, timm, webdataset or mlflow load: a data error is reported in a second."""
    import subprocess

    tmp_path = foreign[0]
    code = (
        "import sys; from pipeline.config import load_config; from pipeline.data.plan import plan_data; "
        f"c = load_config(None, ['data.train_shards={tmp_path}/x/train-{{0000..0007}}.tar', 'data.val_shards=null', 'data.batch_size=8']); "
        "p = plan_data(c, 1); "
        "print(p.train_samples, sorted(m for m in ('torch', 'timm', 'deepspeed', 'webdataset', 'mlflow', 'PIL', "
        "'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith(" []"), out.stdout + out.stderr


def test_the_loader_serves_every_readable_image_and_counts_the_rest(foreign):
    """Directory-prefixed keys, .JPEG/.jpg/.png/.webp, captions and metadata ignored; the corrupt image, the sample
    with only a caption and the tar cut short are skipped and counted (the cut one named)."""
    import torch

    from pipeline.data.stream import StreamSpec, make_loader

    tmp_path, train, _val, complete = foreign
    plan = plan_data(config_for(f"{tmp_path}/x/train-{{0000..0007}}.tar"), 1)
    spec = StreamSpec(
        tuple(plan.train_shards),
        seed=0,
        rank=0,
        world=1,
        workers=0,
        training=False,
        batch_size=8,
        num_classes=10,
        shard_counts=plan.train_counts,
    )
    labels, skipped, errors = [], 0, []
    for batch in make_loader(spec, lambda im: torch.zeros(3, 2, 2, dtype=torch.uint8)):
        labels += batch.labels.tolist()
        skipped, errors = skipped + batch.skipped, errors + [batch.error]
    readable = [c for i, s in enumerate(train.shards) for k, c in train.readable(s) if i != 5 or k in complete]
    assert sorted(labels) == sorted(readable) and len(labels) == plan.train_samples - 1  # the corrupt image
    assert skipped == 3  # the corrupt image, the caption-only sample, the cut tar (its undelivered tail: none)
    assert any("train-0005.tar given up at sample" in e for e in errors)
    assert any("train0002/000005" in e and "has no image" in e for e in errors)
