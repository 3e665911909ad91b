"""A stream of samples from a list of shards, each shard retried when its stream fails part-way.

A remote shard (``http(s)://``, ``pipe:``) whose stream breaks (connection reset or cut short, timeout, a command
that exits non-zero) is opened again up to ``data.shard_retries`` times with a short backoff, and continues after
the last sample it delivered: at that sample's byte offset where the server allows ranges, otherwise by skipping
as many samples. A shard that still fails is given up, and the samples it did not deliver are reported (the
trainer counts them as skipped and names the shard); a run never crashes or hangs on one. A local file is not
retried: reading it again gives the same bytes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Optional

from pipeline.data.remote import is_remote, local_path, open_shard
from pipeline.data.tarscan import iter_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadPolicy:
    """How hard to try a shard: retries after the first attempt, the per-read timeout, the first backoff."""

    retries: int = 2
    timeout_s: float = 60.0
    backoff_s: float = 1.0


def shard_samples(
    urls: Iterable[str],
    on_lost: Callable[[str, str, int], None],
    policy: ReadPolicy = ReadPolicy(),
    expected: Optional[Mapping[str, int]] = None,
) -> Iterator[dict]:
    """Samples of each shard in turn. ``on_lost(url, why, samples_lost)`` is called for a shard given up;
    ``expected`` (samples per shard, from the manifest or index) sizes that loss, else it counts as 1."""
    for url in urls:
        yield from _one_shard(url, on_lost, policy, (expected or {}).get(url))


def _one_shard(url: str, on_lost, policy: ReadPolicy, expected: Optional[int]) -> Iterator[dict]:
    delivered, resume_at = 0, 0
    attempts = policy.retries + 1 if is_remote(url) else 1
    why = ""
    for attempt in range(attempts):
        try:
            stream, start = open_shard(url, policy.timeout_s, resume_at)
            skip = delivered if start != resume_at or resume_at == 0 else 0
            size = None if is_remote(url) else os.fstat(stream.fileno()).st_size
            with stream:
                for sample, next_start in iter_samples(stream, url, size=size, base=start):
                    if skip:
                        skip -= 1
                        continue
                    delivered += 1
                    resume_at = next_start if next_start > 0 and _uncompressed(url) else 0
                    yield sample
            return
        except Exception as exc:  # noqa: BLE001 (any failure of this shard's stream: retry, then give up)
            why = f"{type(exc).__name__}: {exc}"[:300]
            if attempt + 1 < attempts:
                wait = policy.backoff_s * 2**attempt
                log.warning(
                    "shard %s failed after %d sample(s) (%s); retry %d/%d in %.1f s",
                    url,
                    delivered,
                    why,
                    attempt + 1,
                    policy.retries,
                    wait,
                )
                time.sleep(wait)
    lost = max(1, expected - delivered) if expected is not None else 1
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    message = f"shard {local_path(url)} given up{tries} at sample {delivered}: {why}"
    log.warning("%s (%d sample(s) not read)", message, lost)  # named in the log whatever the window reports last
    on_lost(url, message, lost)


def _uncompressed(url: str) -> bool:
    """Byte offsets of samples are offsets in the file only for a plain .tar (a signed URL's query aside)."""
    return url.split("?", 1)[0].endswith(".tar")
