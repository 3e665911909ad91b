"""What a run's data is, decided before any process starts: the shard list, sample counts, classes, steps.

Light on purpose (no torch, no webdataset): the CLI plans the data right after the config is read, so a
missing shard or an impossible batch is one error line within a second or two.
"""

from __future__ import annotations

import json
import os
import random
import zlib
from dataclasses import dataclass, field
from typing import Optional

import braceexpand

from pipeline.data.index import IndexResult, index_shards, is_lost
from pipeline.data.lineage import dataset_record
from pipeline.data.manifest import counts_in_manifest, find_classes, find_manifest, is_wids_index
from pipeline.data.reader import ReadPolicy
from pipeline.data.remote import is_remote, local_path


class DataError(ValueError):
    """The data cannot serve this job as configured; the message says what to change."""


def expand_urls(pattern: str) -> list[str]:
    """``::``-joined brace patterns -> URLs (webdataset's pattern language, without its WDS_ variables)."""
    return [url for part in pattern.split("::") for url in braceexpand.braceexpand(part)]


def expand_shards(pattern: str, key: str = "data.train_shards") -> list[str]:
    """Brace/``::`` pattern -> shard URLs; local files must exist (remote ``pipe:``/URLs pass through).
    Existence is checked with one directory listing per folder, not a stat per shard (10,000 shards on NFS)."""
    urls = expand_urls(pattern)
    if not urls:
        raise DataError(f"{key}={pattern!r} matches no shards")
    listings: dict[str, set[str]] = {}
    missing = []
    for url in urls:
        if is_remote(url):
            continue
        folder, name = os.path.split(local_path(url))
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder or "."))
            except OSError:
                listings[folder] = set()
        if name not in listings[folder]:
            missing.append(url)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(
            f"{key}: shard {missing[0]} not found{more}; build shards with 'make shards' "
            f"or point {key} at existing .tar files"
        )
    return urls


# ----------------------------------------------------------------------------------------------------
# Deterministic randomness


def derive_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (Python's hash() is salted per process, so not that)."""
    return zlib.crc32(json.dumps(parts).encode()) & 0x7FFFFFFF


def deal_shards(
    shards: list[str], *, seed: int, epoch: int, rank: int, world: int, shuffle: bool = True, cycle: int = 0
) -> list[str]:
    """This rank's shards for one pass: shuffled by (seed, epoch, cycle), then every world-th."""
    order = list(shards)
    if shuffle:
        random.Random(derive_seed(seed, epoch, cycle)).shuffle(order)
    return order[rank::world]


def usable_workers(num_workers: int, shards: int, world: int) -> int:
    """Workers that each get at least one shard (eval) or stream (training) on every rank: an empty one would
    spin or hang."""
    return max(1, min(num_workers, shards // world)) if num_workers > 0 else 0


MAX_DEFAULT_STREAMS = 64


def resolve_streams(requested: Optional[int], shards: int, batch_size: int, world: int, resampled: bool) -> int:
    """The number of canonical sample streams (pipeline/data/stream.py): fixed for a run whatever its world size,
    so each global batch is the same set of samples on any number of ranks and workers. Default: as many as
    there are shards, at most 64, reduced until it divides the global batch."""
    if requested is None:
        streams = min(MAX_DEFAULT_STREAMS, batch_size, shards if not resampled else MAX_DEFAULT_STREAMS)
        while batch_size % streams:
            streams -= 1
    else:
        streams = requested
    hint = f"set data.streams to a multiple of the {world} ranks that divides data.batch_size={batch_size}" + (
        ""
        if resampled
        else f" and is at most the {shards} shard(s) (write more, smaller shards with "
        f"make shards SHARDS_ARGS='--samples-per-shard N', or data.resampled=true)"
    )
    if batch_size % streams:
        raise DataError(f"data.streams={streams} does not divide data.batch_size={batch_size}; {hint}")
    if not resampled and streams > shards:
        raise DataError(f"data.streams={streams} needs at least that many train shards, there are {shards}; {hint}")
    if streams % world:
        which = "" if requested is not None else " (the default)"
        raise DataError(
            f"data.streams={streams}{which} cannot be split evenly over {world} ranks: every rank takes "
            f"the same number of streams; {hint}"
        )
    return streams


# ----------------------------------------------------------------------------------------------------
# What the trainer uses


@dataclass
class DataPlan:
    """The resolved facts about the data for a run: shards, counts, classes, steps per epoch."""

    train_shards: list[str]
    val_shards: list[str]
    train_samples: int
    val_samples: Optional[int]
    classes: Optional[list[str]]
    steps_per_epoch: int
    num_classes: Optional[int] = None  # model.num_classes, or what the manifest / classes.json / labels say
    train_counts: tuple[int, ...] = ()  # samples per shard, where known (a lost shard's cost)
    val_counts: tuple[int, ...] = ()
    datasets: list[dict] = field(default_factory=list)  # lineage records (pipeline/data/lineage.py)
    notes: list[str] = field(default_factory=list)  # what the CLI tells the user (indexing)
    streams: int = 1  # canonical sample streams of the training data (resolve_streams)
    subset: Optional[frozenset] = None  # data.train_subset: the keys trained on (pipeline/data/subset.py)


def plan_data(config, world_size: int, *, build_index: bool = True) -> DataPlan:
    """Check the shards against the job before it starts (missing files, too few shards, counts, labels).
    ``build_index=False`` (a training rank): use a cached shard index but never walk the shards."""
    d = config.data
    train = expand_shards(d.train_shards, "data.train_shards")
    val = expand_shards(d.val_shards, "data.val_shards") if d.val_shards else []
    streams = resolve_streams(d.streams, len(train), d.batch_size, world_size, d.resampled)  # cheap: before indexing
    facts = describe_shards(config, train, val, build_index)
    if facts.unlabeled and config.objective.name == "supervised":
        raise DataError(
            "data.train_shards hold no labels (no .cls; the shards were written unlabelled): a supervised "
            "run needs them. Pretrain with objective.name=mae or simmim, or point data.train_shards at "
            "labelled shards"
        )
    train_samples = d.train_samples or (sum(facts.train_counts) if facts.train_counts is not None else None)
    subset = _subset(config, train, facts)
    if subset is not None:
        train_samples = len(subset)
    if not train_samples and not d.samples_per_epoch:
        raise DataError(
            "data.train_samples is unknown: no manifest.json lists these shards; set "
            "data.train_samples (samples in one pass) or data.resampled=true with data.samples_per_epoch"
        )
    per_epoch = d.samples_per_epoch or train_samples
    steps = per_epoch // d.batch_size
    if steps < 1:
        raise DataError(f"data.batch_size={d.batch_size} is larger than an epoch ({per_epoch} samples)")
    val_samples = sum(facts.val_counts) if val and facts.val_counts is not None else None
    datasets = [
        dataset_record("train", d.train_shards, train, facts.train_counts, train_samples, *facts.lineage_args("train"))
    ]
    if val:
        datasets.append(
            dataset_record("val", d.val_shards, val, facts.val_counts, val_samples, *facts.lineage_args("val"))
        )
    return DataPlan(
        train, val, int(train_samples or per_epoch), val_samples, facts.classes, steps, facts.num_classes,
        tuple(facts.train_counts or ()), tuple(facts.val_counts or ()), datasets, facts.notes, streams, subset,
    )  # fmt: skip


def _subset(config, train: list[str], facts) -> Optional[frozenset]:
    """data.train_subset's keys (chosen once, cached), or None; refused for unlabelled shards."""
    if not config.data.train_subset:
        return None
    from pipeline.data.subset import SubsetError, maybe_subset

    try:
        return maybe_subset(config, train)
    except SubsetError as exc:
        raise DataError(str(exc)) from None


# ----------------------------------------------------------------------------------------------------
# What the shards hold: the manifest, else the shard index


def read_policy(data_config) -> ReadPolicy:
    return ReadPolicy(retries=data_config.shard_retries, timeout_s=data_config.read_timeout_s)


@dataclass
class ShardFacts:
    """Counts and classes of the train and val shards, and where they came from."""

    train_counts: Optional[list[int]]
    val_counts: Optional[list[int]]
    classes: Optional[list[str]]
    num_classes: Optional[int]
    counted_by: dict[str, str]
    entries: dict[str, dict] = field(default_factory=dict)  # shard index entries, where used
    notes: list[str] = field(default_factory=list)
    unlabeled: bool = False  # the train shards carry no .cls (a manifest's labeled: false, or the index saw none)

    def lineage_args(self, split: str) -> tuple:
        return self.counted_by[split], self.entries, self.classes or self.num_classes


def describe_shards(config, train: list[str], val: list[str], build_index: bool = True) -> ShardFacts:
    """Counts and classes from a manifest listing the shards; otherwise from the shard index, built (once) only
    when something is unknown: data.train_samples, or model.num_classes (then the labels are checked too)."""
    d = config.data
    manifest, wids = _manifest(train, d.manifest)
    train_counts = counts_in_manifest(manifest, train) if manifest else None
    val_counts = (counts_in_manifest(manifest, val) if manifest else None) if val else []
    classes, classes_from = _classes(manifest, train)
    num_classes = config.model.num_classes or (len(classes) if classes else None)
    by = {"train": "manifest" if train_counts else "config", "val": "manifest" if val_counts else "none"}
    facts = ShardFacts(train_counts, val_counts, classes, num_classes, by)
    facts.unlabeled = bool(manifest) and manifest.get("labeled") is False
    to_index = (train if train_counts is None else []) + (val if val_counts is None else [])
    if not to_index:
        return facts
    need_labels = num_classes is None
    build = build_index and (need_labels or (train_counts is None and not d.train_samples and not d.samples_per_epoch))
    result = index_shards(
        to_index, runs_root=config.run.root, need_labels=need_labels and build, policy=read_policy(d),
        wids=wids, build=build,
    )  # fmt: skip
    _refuse_all_lost({"data.train_shards": train, "data.val_shards": val}, result.entries)
    _use_index(facts, result, train, val)
    scanned = [result.entries[u] for u in train if (result.entries.get(u) or {}).get("source") == "tar"]
    lost = sum(is_lost(result.entries.get(u)) for u in train)
    facts.unlabeled = facts.unlabeled or (
        bool(scanned) and len(scanned) == len(train) - lost and not any(e.get("labeled") for e in scanned)
    )
    where = f"model.num_classes={config.model.num_classes}" if config.model.num_classes else classes_from
    _check_labels({"data.train_shards": train, "data.val_shards": val}, result.entries, facts.num_classes, where)
    if result.entries:
        facts.notes.append(index_note(result, facts.num_classes))
    return facts


def _manifest(train: list[str], explicit: Optional[str]) -> tuple[Optional[dict], Optional[str]]:
    """(our manifest, a wids shard index path): ``data.manifest`` may name either; beside the shards only a
    manifest of ours counts (another tool's manifest.json is ignored)."""
    if explicit and is_wids_index(explicit):
        return None, explicit
    try:
        return find_manifest(train, explicit), None
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from None
    except ValueError as exc:
        if explicit:
            raise DataError(f"data.manifest: {exc}") from None
        return None, None


def _classes(manifest: Optional[dict], train: list[str]) -> tuple[Optional[list[str]], Optional[str]]:
    if manifest and manifest.get("classes"):
        return list(manifest["classes"]), f"the {len(manifest['classes'])} classes of manifest.json"
    try:
        found = find_classes(train)
    except ValueError as exc:
        raise DataError(f"data.train_shards: {exc}") from None
    return (found[0], f"the {len(found[0])} classes of {found[1]}") if found else (None, None)


def _use_index(facts: ShardFacts, result: IndexResult, train: list[str], val: list[str]) -> None:
    entries = facts.entries = result.entries
    if facts.train_counts is None and all(u in entries for u in train):
        facts.train_counts, facts.counted_by["train"] = [entries[u]["samples"] for u in train], "index"
    if val and facts.val_counts is None and all(u in entries for u in val):
        facts.val_counts, facts.counted_by["val"] = [entries[u]["samples"] for u in val], "index"
    if facts.num_classes is None:
        tops = [e["cls_max"] for e in entries.values() if e.get("source") == "tar" and e.get("cls_max") is not None]
        facts.num_classes = max(tops) + 1 if tops and max(tops) >= 0 else None


def _refuse_all_lost(splits: dict[str, list[str]], entries: dict[str, dict]) -> None:
    """A split none of whose shards could be read (each retried): nothing to train or evaluate on, one error."""
    for key, urls in splits.items():
        if urls and all(is_lost(entries.get(u)) for u in urls):
            hint = "fix the path, URL or command" + (", or leave it out (data.val_shards=null)" if "val" in key else "")
            raise DataError(
                f"{key}: none of its {len(urls)} shard(s) could be read to index it ({urls[0]}: "
                f"{entries[urls[0]]['lost']}); {hint}"
            )


def _check_labels(splits: dict[str, list[str]], entries: dict[str, dict], num_classes, where) -> None:
    """Every .cls the index saw must be a class index of this run: DataError naming the shard and sample."""
    # a class count derived from the labels themselves bounds nothing: only negatives and non-integers are wrong
    allowed = f"integers 0..{num_classes - 1} ({where})" if num_classes and where else "integers >= 0"
    for key, urls in splits.items():
        for url in urls:
            entry = entries.get(url) or {}
            if entry.get("source") != "tar":
                continue
            if entry.get("bad_label"):
                sample, text = entry["bad_label"]
                raise DataError(f"{key}: shard {url}, sample {sample}: .cls {text!r} is not a class index; {allowed}")
            low, high = entry.get("cls_min"), entry.get("cls_max")
            if low is not None and low < 0:
                raise DataError(f"{key}: shard {url}, sample {entry['cls_min_key']}: class index {low}; {allowed}")
            if num_classes and high is not None and high >= num_classes:
                raise DataError(
                    f"{key}: shard {url}, sample {entry['cls_max_key']}: class index {high} is out of range; {allowed}"
                )


def index_note(result: IndexResult, num_classes: Optional[int]) -> str:
    """One line for the user, e.g. 'indexed 8 shards (1,497 samples, 10 classes) in 0.4 s; cached in ...'."""
    entries = result.entries
    new = result.scanned + result.counted
    samples = sum(e.get("samples", 0) for e in entries.values())
    what = f"{samples:,} samples" + (f", {num_classes} classes" if num_classes else "")
    where = ", ".join(_short(p) for p in dict.fromkeys(result.cache_files))
    if not new:
        line = f"shard index: {len(entries)} shard(s) ({what}) from {where or 'the cache'}"
    else:
        took = f"{result.seconds:.2f}" if result.seconds < 1 else f"{result.seconds:.1f}"
        how = f"; {result.counted} counted from img2dataset/wids files" if result.counted else ""
        if len(entries) > new:
            line = f"indexed {new} shard(s) in {took} s, {len(entries) - new} more from the cache ({what} in all)"
        else:
            line = f"indexed {new} shard(s) ({what}) in {took} s"
        line += how + (f"; cached in {where}" if where else "; not cached")
    return line + _index_problems(entries)


def _index_problems(entries: dict[str, dict]) -> str:
    text = ""
    lost = [(u, e["lost"]) for u, e in entries.items() if is_lost(e)]
    if lost:
        (first, why), others = lost[0], [_short(u) for u, _ in lost[1:4]] + (["..."] if len(lost) > 4 else [])
        text += f"; {len(lost)} shard(s) could not be read, counted as 0 samples, not cached as good: {_short(first)}"
        text += f" ({why})" + "".join(f", {name}" for name in others)
    broken = [(u, e["error"]) for u, e in entries.items() if e.get("error")]
    if broken:
        first, why = broken[0]
        text += f"; {len(broken)} shard(s) cut short, read up to the break ({_short(first)}: {why})"
    no_image = sum(e.get("no_image", 0) for e in entries.values())
    unlabeled = sum(e["samples"] - e.get("labeled", 0) for e in entries.values() if e.get("source") == "tar")
    if no_image:
        text += f"; {no_image:,} sample(s) without an image (skipped)"
    if unlabeled:
        text += f"; {unlabeled:,} without .cls (skipped in training)"
    return text


def _short(path: str) -> str:
    """A path relative to the working directory when under it (what the user typed, usually)."""
    if is_remote(path):
        return path
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def index_pattern(pattern: str, *, runs_root: str = "runs", refresh: bool = False) -> tuple[IndexResult, str]:
    """``make shards SHARDS_ARGS="--index '<pattern>'"``: index (or re-index) shards, check their labels;
    (result, the one-line report). DataError for missing shards, bad labels, or when no shard could be read."""
    urls = expand_shards(pattern, "--index")
    result = index_shards(urls, runs_root=runs_root, need_labels=True, refresh=refresh)
    _refuse_all_lost({"--index": urls}, result.entries)
    try:
        found = find_classes(urls)
    except ValueError as exc:
        raise DataError(f"--index: {exc}") from None
    facts = ShardFacts(None, [], found[0] if found else None, len(found[0]) if found else None, {"train": "index"})
    _use_index(facts, result, urls, [])
    _check_labels({"--index": urls}, result.entries, facts.num_classes, found[1] if found else None)
    return result, index_note(result, facts.num_classes)
