"""`megatron-sc2 serve --portrait DIR`: the membership test over HTTP.

`POST /overlap {"document": text}` -> `{"spans": [[start, end], ...]}` is the request the
StarCoder VS Code extension sends (250 characters either side of the cursor) and underlines;
offsets are in the text it sent. `POST /query` takes the same body and answers the whole result
(`longest_chain`, `expected_chain`, `score`, `spans`, `chains`); `GET /health` the filter's
parameters. Bad requests get a 4xx with `{"error": message}`. The filter is memory-mapped once
and shared by every request thread.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Sequence

from megatron_sc2.governance.bloom import BloomFilter
from megatron_sc2.governance.portrait import filter_path, query_text
from megatron_sc2.errors import CommandLineParser

MAX_BODY = 1 << 20


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class PortraitServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], bf: BloomFilter, max_body: int = MAX_BODY, quiet: bool = True):
        self.bf, self.max_body, self.quiet = bf, max_body, quiet
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    server: PortraitServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if not self.server.quiet:
            super().log_message(format, *args)

    def _send(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        self.wfile.write(body)

    def _document(self) -> str:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, f"bad Content-Length {length!r}") from None
        if n < 0:
            raise RequestError(400, f"bad Content-Length {length!r}")
        if n > self.server.max_body:
            raise RequestError(413, f"request body of {n} bytes is over the limit of {self.server.max_body}")
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise RequestError(400, f"the body is not JSON ({e})") from None
        if not isinstance(body, dict) or "document" not in body:
            raise RequestError(400, 'expected a JSON object {"document": text}')
        if not isinstance(body["document"], str):
            raise RequestError(400, '"document" must be a string')
        return body["document"]

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        try:
            if self.path not in ("/overlap", "/query"):
                # the body is not read: close the connection rather than misread it as a request
                self.close_connection = True
                raise RequestError(404, f"no such endpoint {self.path}; POST /overlap or /query")
            res = query_text(self.server.bf, self._document())
            self._send(200, {"spans": res.spans} if self.path == "/overlap" else res.to_json())
        except RequestError as e:
            if e.status in (411, 413):
                self.close_connection = True
            self._send(e.status, {"error": str(e)})

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/health":
            bf = self.server.bf
            self._send(200, {"status": "ok", "filter": str(bf.path), **asdict(bf.params)})
        elif self.path in ("/overlap", "/query"):
            self._send(405, {"error": f"{self.path} takes POST with {{\"document\": text}}"})
        else:
            self._send(404, {"error": f"no such endpoint {self.path}"})


def make_server(portrait_dir: str, host: str = "127.0.0.1", port: int = 0, max_body: int = MAX_BODY,
                quiet: bool = True) -> PortraitServer:
    """A bound server (port 0: any free port; see `server.server_address`), not yet serving."""
    bf = BloomFilter.open(filter_path(portrait_dir))
    return PortraitServer((host, port), bf, max_body, quiet)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = CommandLineParser(prog="megatron-sc2 serve", description=__doc__.splitlines()[0])
    p.add_argument("--portrait", required=True, help="portrait directory (from `portrait build`)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-bytes", type=int, default=MAX_BODY, help="largest request body accepted")
    p.add_argument("--log-requests", action="store_true")
    args = p.parse_args(argv)
    try:
        server = make_server(args.portrait, args.host, args.port, args.max_bytes, quiet=not args.log_requests)
    except OSError as e:
        from megatron_sc2.errors import ConfigError

        raise ConfigError(f"--host {args.host} --port {args.port}: cannot listen ({e.strerror or e})") from None
    host, port = server.server_address[:2]
    print(f"serving {server.bf.path} on http://{host}:{port} (POST /overlap, POST /query, GET /health)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
