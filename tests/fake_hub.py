"""A stand-in for the Hugging Face hub on 127.0.0.1, for the data scripts' tests and their timings.

It serves dataset repos from a local folder (ROOT/OWNER/NAME/<path in the repo>) at the hub's resolve URLs,
/datasets/OWNER/NAME/resolve/REVISION/PATH, the way the hub client expects them: HEAD and GET with X-Repo-Commit,
an ETag (git blob sha1 for small files; for large ones, as for LFS files, X-Linked-Etag = sha256 and X-Linked-Size),
Content-Length, byte ranges (206 Partial Content), and 404 with X-Error-Code EntryNotFound. Knobs: `drop[path] = k`
cuts the next GET of that file after k bytes (a dropped connection); `lie.add(path)` advertises a wrong checksum.
Every request is recorded in `requests` as (method, path, Range header).

    with FakeHub(root) as hub:   # then HF_ENDPOINT=hub.url for the client
        ...
"""

import hashlib
import http.server
import re
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_BYTES = 1 << 16  # files at least this large are served as LFS files are


def etag_of(data):
    if len(data) >= LFS_BYTES:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, root):
        self.root, self.requests, self.drop, self.lie = Path(root), [], {}, set()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def gets(self, path):
        """The Range headers of the GET requests for `path` (None: the whole file)."""
        return [r for m, p, r in self.requests if m == "GET" and p == path]

    def _serve(self, h, body):
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", unquote(urlsplit(h.path).path))
        path = m.group(3) if m else None
        self.requests.append((h.command, path, h.headers.get("Range")))
        file = self.root / m.group(1) / path if m and ".." not in path.split("/") else None
        if file is None or not file.is_file():
            h.send_response(404)
            repo_there = m is not None and (self.root / m.group(1)).is_dir()
            h.send_header("X-Error-Code", "EntryNotFound" if repo_there else "RepoNotFound")
            h.send_header("X-Repo-Commit", COMMIT)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = file.read_bytes()
        tag = etag_of(data)
        if path in self.lie:
            tag = tag[::-1]
        start = int(re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "bytes=0-").group(1))
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", COMMIT)
        if len(data) >= LFS_BYTES:
            h.send_header("X-Linked-Etag", f'"{tag}"')
            h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("ETag", f'"{tag}"')
        h.send_header("Accept-Ranges", "bytes")
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        if not body:
            return
        cut = self.drop.pop(path, None) if h.command == "GET" else None
        h.wfile.write(data[start:] if cut is None else data[start:start + cut])
        h.wfile.flush()
        h.close_connection = True
