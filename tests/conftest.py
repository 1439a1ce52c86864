import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def real_tokenizer_path():
    """The real Qwen3 tokenizer.json (QWEN3_TOKENIZER, or ../shared/qwen3-tokenizer); skip where absent."""
    path = Path(os.environ.get("QWEN3_TOKENIZER", SHARED / "qwen3-tokenizer" / "tokenizer.json"))
    if not path.is_file():
        pytest.skip("real Qwen3 tokenizer not available (set QWEN3_TOKENIZER)")
    return path


@pytest.fixture(scope="session")
def shared_data():
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data not available")
    return path


class FileServer:
    """A local HTTP server for download tests: serves `files` (URL path -> bytes), honours Range requests,
    and can fail the next requests (`fail_next` HTTP 500s) or cut a response short (`cut_next` bytes)."""

    def __init__(self):
        import http.server
        import threading
        self.files, self.requests, self.fail_next, self.cut_next = {}, [], 0, None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                if server.fail_next:
                    server.fail_next -= 1
                    self.send_error(500)
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if server.cut_next is not None:  # send part of the body, then drop the connection
                    payload, server.cut_next = payload[:server.cut_next], None
                    self.wfile.write(payload)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server():
    server = FileServer()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    """Download retries without the real back-off sleeps."""
    import qwen3
    monkeypatch.setattr(qwen3.time, "sleep", lambda s: None)
