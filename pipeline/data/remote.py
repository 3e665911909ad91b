"""Opening a shard wherever it lives: a local path (or ``file://``), ``http(s)://`` or ``pipe:<command>``.

Own openers (urllib and subprocess) rather than webdataset 1.0.2's ``gopen``: gopen runs ``curl`` without a read
timeout (a stalled server hangs the loader for good), retries each failure inside curl for up to a minute, needs
curl on every node, and sees a failed ``pipe:`` command only when its exit status happens to be polled (often at
``close``, after the truncated tar has already ended quietly). Here every read has a timeout, a stream that ends
early raises (fewer bytes than Content-Length, or a command that exits non-zero), and an HTTP stream can resume
at a byte offset (``Range``), so a retried shard need not be downloaded again from the start. Light on purpose.
"""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
from typing import BinaryIO, Optional

REMOTE_SCHEMES = ("http://", "https://", "pipe:")
BUFFER = 1 << 20


class ShardStreamError(OSError):
    """A shard's bytes stopped coming: connection lost or cut short, timeout, a command that failed."""


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_SCHEMES)


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def open_shard(url: str, timeout_s: float, offset: int = 0) -> tuple[BinaryIO, int]:
    """(binary stream, the byte offset it starts at). ``offset`` asks to start there; a source that cannot
    (a command, an HTTP server without ranges) starts at 0 and the caller skips what it already has."""
    if url.startswith(("http://", "https://")):
        return _open_http(url, timeout_s, offset)
    if url.startswith("pipe:"):
        return io.BufferedReader(_PipeBody(url[len("pipe:") :], timeout_s), BUFFER), 0
    f = open(local_path(url), "rb")  # noqa: SIM115 (the caller closes it)
    if offset:
        f.seek(offset)
    return f, offset


def _open_http(url: str, timeout_s: float, offset: int) -> tuple[BinaryIO, int]:
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)  # the timeout also bounds every read
    except urllib.error.HTTPError as exc:
        raise ShardStreamError(f"HTTP {exc.code} {exc.reason} for {url}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ShardStreamError(f"cannot connect for {url}: {reason}") from None
    start = offset if response.status == 206 else 0
    length = response.headers.get("Content-Length")
    body = _HTTPBody(response, int(length) if length and length.isdigit() else None, url, timeout_s)
    return io.BufferedReader(body, BUFFER), start


class _HTTPBody(io.RawIOBase):
    """An HTTP response body that raises when the connection ends before Content-Length bytes (http.client
    returns a short read there, which a tar reader could take for the end of the archive) or stalls."""

    def __init__(self, response, length: Optional[int], url: str, timeout_s: float):
        self.response, self.length, self.url, self.timeout_s = response, length, url, timeout_s
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:  # read1: what one socket read brings (readinto would wait to fill the buffer, then time out)
            data = self.response.read1(len(buffer))
        except TimeoutError:
            raise ShardStreamError(f"no data for {self.timeout_s:g} s from {self.url}") from None
        except OSError as exc:  # connection reset and the like
            raise ShardStreamError(f"{type(exc).__name__} reading {self.url}: {exc}") from None
        n = len(data)
        buffer[:n] = data
        self.received += n
        if n == 0 and len(buffer) and self.length is not None and self.received < self.length:
            raise ShardStreamError(f"connection closed after {self.received:,} of {self.length:,} bytes of {self.url}")
        return n

    def close(self) -> None:
        self.response.close()
        super().close()


class _PipeBody(io.RawIOBase):
    """A command's stdout; every read waits at most ``timeout_s``, and its end raises unless the command
    exited 0. Closing early ends the command (its process group)."""

    def __init__(self, command: str, timeout_s: float):
        self.command, self.timeout_s = command, timeout_s
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr, start_new_session=True
        )
        self.fd = self.proc.stdout.fileno()
        self.poll = select.poll()  # not select.select: that fails for descriptors above 1023
        self.poll.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self.poll.poll(self.timeout_s * 1000):
            raise ShardStreamError(f"no data for {self.timeout_s:g} s from pipe:{self.command}")
        data = os.read(self.fd, len(buffer))
        if not data and len(buffer):
            self._check_exit()
        buffer[: len(data)] = data
        return len(data)

    def _check_exit(self) -> None:
        try:
            code = self.proc.wait(self.timeout_s)
        except subprocess.TimeoutExpired:
            raise ShardStreamError(f"pipe:{self.command} closed its output but did not exit") from None
        if code != 0:
            self.stderr.seek(0)
            said = self.stderr.read()[-300:].decode("utf-8", "replace").strip().replace("\n", " | ")
            raise ShardStreamError(f"pipe:{self.command} exited with status {code}" + (f": {said}" if said else ""))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.stdout.close()
        self.proc.wait()
        self.stderr.close()
        super().close()
