"""The shard index: what shards without a manifest.json hold, found once and cached.

Shards written by other tools (img2dataset, webdataset's writers, tar scripts) come without our manifest. The
planner then asks this module, which answers per shard from, cheapest first:

* the cache ``.vitpipe-index.json`` next to the shards (or, where that folder is read-only, and for remote
  shards, a file under ``<run.root>/shard-index/``), valid while the shard's size and mtime are unchanged
  (remote shards cannot be checked cheaply: their entries are kept until ``make shards SHARDS_ARGS="--index
  '<pattern>' --refresh"``);
* img2dataset's ``<shard>_stats.json`` (``successes``) and a wids shard index (``{"wids_version": 1,
  "shardlist": [{"url", "nsamples"}]}``, any ``*.json`` beside the shards or ``data.manifest``), for sample
  counts, when the labels are not needed (the class count is known otherwise);
* a walk over the tar headers (pipeline/data/tarscan.py): only the tiny ``.cls`` members are read, image bytes
  are skipped with seeks (or read past, for a stream), several shards at a time.

A shard that cannot be read (its stream keeps failing after ``data.shard_retries`` retries, a command exiting
non-zero, an unreadable file) does not stop the run: it is recorded as lost with 0 samples, named in the index
line, and trained on only if it reads by then (counted as skipped if not). Such an entry, and a remote shard cut
short, is cached only provisionally: the training ranks use what the CLI found moments before, the next run
walks the shard again.

Light on purpose (standard library only): the CLI plans the data before anything heavy is imported.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.data.reader import ReadPolicy
from pipeline.data.remote import ShardStreamError, is_remote, local_path, open_shard
from pipeline.data.tarscan import ShardScan, scan_shard
from pipeline.files import atomic_write
from pipeline.rundir import RunsRoot

INDEX_NAME = ".vitpipe-index.json"
INDEX_FORMAT, INDEX_VERSION = "vitpipe-shard-index", 1
STATS_SUFFIX = "_stats.json"  # img2dataset: <shard stem>_stats.json beside each shard
NOT_WIDS = ("manifest.json", "classes.json", INDEX_NAME)
MAX_WIDS_FILES, MAX_WIDS_BYTES = 20, 64 * 2**20


@dataclass
class IndexResult:
    """Per-shard entries (url -> dict) and what it took to get them."""

    entries: dict[str, dict] = field(default_factory=dict)
    scanned: int = 0  # shards whose headers were walked now
    counted: int = 0  # shards counted from img2dataset stats or a wids index now
    seconds: float = 0.0
    cache_files: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# Where the cache lives


def _group(url: str) -> str:
    """Shards sharing one cache file: a local folder, or a remote URL's 'folder'."""
    return _absolute(os.path.dirname(local_path(url))) if not is_remote(url) else url.rsplit("/", 1)[0]


@functools.lru_cache(maxsize=1024)
def _absolute(folder: str) -> str:
    return os.path.abspath(folder or ".")


def _entry_name(url: str) -> str:
    return url if is_remote(url) else os.path.basename(local_path(url))


def cache_files(group: str, runs_root: str, remote: bool) -> list[Path]:
    """Where a group's index may be kept: beside the shards first, then under the runs folder."""
    digest = hashlib.sha256(group.encode()).hexdigest()[:16]
    fallback = RunsRoot(runs_root).shard_index / f"{'remote' if remote else 'local'}-{digest}.json"
    return [fallback] if remote else [Path(group) / INDEX_NAME, fallback]


def _read_cache(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if doc.get("format") != INDEX_FORMAT or doc.get("version") != INDEX_VERSION:
        return {}
    return doc.get("shards") or {}


def _write_cache(group: str, entries: dict[str, dict], runs_root: str, remote: bool) -> Optional[Path]:
    """Merge the entries into the group's first writable cache file; None when none is writable."""
    for path in cache_files(group, runs_root, remote):
        merged = {**_read_cache(path), **entries}
        doc = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "folder": group, "shards": merged}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n")
            return path
        except OSError:  # a read-only shard folder: the runs folder next
            continue
    return None


# ----------------------------------------------------------------------------------------------------
# Reading what is there


def _stat(url: str) -> Optional[os.stat_result]:
    try:
        return None if is_remote(url) else os.stat(local_path(url))
    except OSError:
        return None


def _valid(entry: Optional[dict], st: Optional[os.stat_result], need_labels: bool, build: bool) -> bool:
    if not entry or (need_labels and entry.get("source") != "tar") or (build and entry.get("provisional")):
        return False
    if st is None:  # remote: trusted until refreshed
        return True
    return entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns


def _cached(urls: list[str], runs_root: str, need_labels: bool, build: bool, result: IndexResult) -> dict:
    """Fill result.entries with the valid cached entries; returns the local shards' stats (url -> stat)."""
    stats, by_group = {}, {}
    for url in urls:
        by_group.setdefault(_group(url), []).append(url)
    for group, members in by_group.items():
        remote = is_remote(members[0])
        known: dict[str, dict] = {}
        for path in reversed(cache_files(group, runs_root, remote)):  # beside the shards wins
            found = _read_cache(path)
            if found:
                known.update(found)
                result.cache_files.append(str(path))
        for url in members:
            st = stats[url] = _stat(url)
            entry = known.get(_entry_name(url))
            if _valid(entry, st, need_labels, build):
                result.entries[url] = entry
    return stats


def _stamp(entry: dict, st: Optional[os.stat_result]) -> dict:
    entry["size"], entry["mtime_ns"] = (st.st_size, st.st_mtime_ns) if st is not None else (None, None)
    return entry


def _counts_from_tools(urls: list[str], stats: dict, wids: Optional[str]) -> dict[str, dict]:
    """Sample counts other tools wrote: img2dataset's <stem>_stats.json, a wids shard index."""
    found: dict[str, dict] = {}
    folders: dict[str, set[str]] = {}
    for url in urls:
        if is_remote(url):
            continue
        folder = os.path.dirname(local_path(url)) or "."
        if folder not in folders:
            folders[folder] = set(_listdir(folder))
        stem = os.path.basename(local_path(url)).rsplit(".tar", 1)[0]
        if stem + STATS_SUFFIX in folders[folder]:
            count = _json_int(os.path.join(folder, stem + STATS_SUFFIX), "successes")
            if count is not None:
                found[url] = _stamp({"source": "img2dataset", "samples": count}, stats.get(url))
    wids_counts = _wids_counts([u for u in urls if u not in found], folders, wids)
    for url, count in wids_counts.items():
        found[url] = _stamp({"source": "wids", "samples": count}, stats.get(url))
    return found


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _json_int(path: str, key: str) -> Optional[int]:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value >= 0 else None


def _wids_counts(urls: list[str], folders: dict[str, set[str]], explicit: Optional[str]) -> dict[str, int]:
    """nsamples per shard from wids shard indexes: ``explicit`` (data.manifest) or JSON files beside the shards.
    Shards are matched by URL, or by file name within the index file's folder."""
    if not urls:
        return {}
    candidates = [explicit] if explicit else []
    for folder, names in folders.items():
        jsons = sorted(n for n in names if n.endswith(".json") and not n.endswith(STATS_SUFFIX) and n not in NOT_WIDS)
        candidates += [os.path.join(folder, n) for n in jsons[:MAX_WIDS_FILES]]
    by_name: dict[str, int] = {}
    for path in candidates:
        for url, count in _read_wids(path).items():
            by_name[url] = count
    out = {}
    for url in urls:
        absolute = os.path.abspath(local_path(url)) if not is_remote(url) else url
        count = by_name.get(url, by_name.get(absolute))
        if count is not None:
            out[url] = count
    return out


def _read_wids(path: str) -> dict[str, int]:
    """{shard url or absolute path: nsamples} of one wids shard index ({} for any other JSON)."""
    try:
        if os.path.getsize(path) > MAX_WIDS_BYTES:
            return {}
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or "wids_version" not in doc or not isinstance(doc.get("shardlist"), list):
        return {}
    base = doc.get("base") or os.path.dirname(os.path.abspath(path))
    out = {}
    for shard in doc["shardlist"]:
        url, count = (shard.get("url"), shard.get("nsamples")) if isinstance(shard, dict) else (None, None)
        if isinstance(url, str) and isinstance(count, int):
            out[url if is_remote(url) or os.path.isabs(url) else os.path.abspath(os.path.join(base, url))] = count
    return out


# ----------------------------------------------------------------------------------------------------
# Walking the tars


def _scan_one(url: str, policy: ReadPolicy, st: Optional[os.stat_result]) -> dict:
    """The header walk of one shard (retried like a training stream when remote); a shard that still cannot be
    read is an entry of source "lost" with 0 samples and the reason."""
    attempts = policy.retries + 1 if is_remote(url) else 1
    why = ""
    for attempt in range(attempts):
        try:
            stream, _ = open_shard(url, policy.timeout_s)
            with stream:
                scan: ShardScan = scan_shard(stream, size=st.st_size if st is not None else None)
            return _stamp({"source": "tar", **asdict(scan)}, st)
        except (ShardStreamError, OSError) as exc:
            why = f"{type(exc).__name__}: {exc}"[:300]
            if attempt + 1 < attempts:
                time.sleep(policy.backoff_s * 2**attempt)
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    return _stamp({"source": "lost", "samples": 0, "lost": f"cannot read it{tries}: {why}"}, st)


def is_lost(entry: Optional[dict]) -> bool:
    return bool(entry) and entry.get("source") == "lost"


def _scan(urls: list[str], policy: ReadPolicy, stats: dict) -> dict[str, dict]:
    if not urls:
        return {}
    threads = min(16 if any(is_remote(u) for u in urls) else 4, len(urls))
    with ThreadPoolExecutor(threads) as pool:
        return dict(zip(urls, pool.map(lambda u: _scan_one(u, policy, stats.get(u)), urls)))


def index_shards(
    urls: Iterable[str],
    *,
    runs_root: str = "runs",
    need_labels: bool = True,
    policy: ReadPolicy = ReadPolicy(),
    wids: Optional[str] = None,
    build: bool = True,
    refresh: bool = False,
) -> IndexResult:
    """Entries for these shards: cached, from other tools' counts, or walked now (and cached). ``build=False``
    (a training rank): only what the cache already holds, provisional entries included. A shard that cannot be
    read is an entry with ``source: "lost"`` (see is_lost)."""
    urls = list(dict.fromkeys(urls))
    start = time.perf_counter()
    result = IndexResult()
    stats = _cached(urls, runs_root, need_labels, build, result) if not refresh else {u: _stat(u) for u in urls}
    if refresh:
        result.entries.clear()
    missing = [u for u in urls if u not in result.entries]
    if build and missing:
        counted = {} if need_labels else _counts_from_tools(missing, stats, wids)
        scanned = _scan([u for u in missing if u not in counted], policy, stats)
        result.counted, result.scanned = len(counted), len(scanned)
        new = {**counted, **scanned}
        result.entries.update(new)
        result.cache_files = _save(new, runs_root) or result.cache_files
    result.entries = {u: result.entries[u] for u in urls if u in result.entries}
    result.seconds = time.perf_counter() - start
    return result


def _save(entries: dict[str, dict], runs_root: str) -> list[str]:
    by_group: dict[tuple[str, bool], dict[str, dict]] = {}
    for url, entry in entries.items():
        if is_lost(entry) or (is_remote(url) and entry.get("error")):  # may be fine next time: walked again
            entry = {**entry, "provisional": True}
        by_group.setdefault((_group(url), is_remote(url)), {})[_entry_name(url)] = entry
    written = [_write_cache(group, e, runs_root, remote) for (group, remote), e in by_group.items()]
    return [str(p) for p in written if p is not None]
