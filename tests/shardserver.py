"""A real HTTP server on 127.0.0.1 serving shard files, optionally misbehaving: it can drop the connection or go
silent half-way through a shard, for a given number of requests, with or without ``Range`` support."""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ShardServer:
    """``with ShardServer(folder) as server: server.url("train-0000.tar")``. ``server.faults[name]`` is a list of
    what the next requests for that file do: "drop" (half the body, then the connection closes), "stall" (half
    the body, then silence), "ok". ``server.requests[name]`` lists each request's Range header (or None)."""

    def __init__(self, folder: Path, *, ranges: bool = True, stall_s: float = 5.0):
        self.folder, self.ranges, self.stall_s = Path(folder), ranges, stall_s
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.requests: dict[str, list] = defaultdict(list)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                path = server.folder / name
                with server.lock:
                    server.requests[name].append(self.headers.get("Range"))
                    fault = server.faults[name].pop(0) if server.faults[name] else "ok"
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                wanted = self.headers.get("Range")
                if wanted and server.ranges and wanted.startswith("bytes=") and wanted.endswith("-"):
                    start = int(wanted[len("bytes=") : -1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes" if server.ranges else "none")
                self.end_headers()
                if fault == "ok":
                    self.wfile.write(body)
                    return
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if fault == "stall":
                    time.sleep(server.stall_s)
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

        return Handler
