import json
import os
import sys
import threading
import time
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
    and can fail the next requests (`fail_next` HTTP 500s), cut a response short (`cut_next` bytes) or send
    slowly (`slow_s` seconds after each 64 KiB)."""

    def __init__(self):
        import http.server
        import threading
        self.files, self.requests, self.fail_next, self.cut_next, self.slow_s = {}, [], 0, None, 0.0
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
                for at in range(0, len(payload), 1 << 16):
                    self.wfile.write(payload[at:at + (1 << 16)])
                    pause(server.slow_s)

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
def only_local_network(monkeypatch):
    """The tests talk to servers they start on 127.0.0.1 and to nothing else: a name or an address elsewhere
    is refused before any packet leaves (a test that would reach the internet fails instead)."""
    import socket
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    local = {"127.0.0.1", "localhost", "::1", socket.gethostname()}

    def getaddrinfo(host, *args, **kwargs):
        if host not in local and host is not None:
            raise socket.gaierror(f"the tests do not look up {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in local:
            raise OSError(f"the tests do not connect to {address[0]}")
        return real_connect(self, address)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    """Download retries without the real back-off sleeps."""
    import qwen3
    monkeypatch.setattr(qwen3.time, "sleep", lambda s: None)


def pause(seconds):
    """A real wait (the tests' no_backoff fixture turns time.sleep into a no-op)."""
    threading.Event().wait(seconds)


class TeacherServer:
    """A local OpenAI-compatible chat-completions server on 127.0.0.1 (a random port, a thread per request),
    scripted to fail: `faults` {problem: [what to do on its 1st, 2nd... request]}, each one of "429" (with
    Retry-After: 1), "500", "502", "503", "slow" (answers after the client's timeout), "cut" (closes the
    connection mid-body), "badjson", "nochoices", "length" (finish_reason length); afterwards it answers.
    `style` {problem: where the thinking goes}: "reasoning_content", "reasoning" or "think" (a <think> block
    in the content). Answers are made from the problem and the request's seed, so a test knows the text each
    (problem, sample) must get. It stops answering after `max_requests` (503); its fixture shuts it down."""

    def __init__(self, key=None, model="teacher", delay=0.0, slow_s=1.0, max_requests=5000):
        import http.server
        self.key, self.model, self.delay, self.slow_s = key, model, delay, slow_s
        self.max_requests = max_requests
        self.faults, self.style, self.answers, self.log, self.lock = {}, {}, {}, [], threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, body, headers=()):
                payload = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                for k, v in [("Content-Type", "application/json"), *headers]:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self.reply(404, {"error": {"message": f"no route {self.path}"}})
                if server.key and self.headers.get("Authorization") != f"Bearer {server.key}":
                    return self.reply(401, {"error": {"message": "Incorrect API key provided"}})
                if body["model"] != server.model:
                    message = f"The model `{body['model']}` does not exist"
                    return self.reply(404, {"error": {"message": message}})
                prompt = body["messages"][0]["content"]
                problem = prompt.split("Question:\n", 1)[1].rsplit("\n\nAnswer:", 1)[0]
                with server.lock:
                    server.log.append((time.time(), problem, body))
                    plan = server.faults.get(problem, [])
                    fault = plan.pop(0) if plan else None
                    over = len(server.log) > server.max_requests
                pause(server.delay)
                if over or fault in ("500", "502", "503"):
                    return self.reply(int(fault or 503), {"error": {"message": "server trouble"}})
                if fault == "429":
                    return self.reply(429, {"error": {"message": "slow down"}}, [("Retry-After", "1")])
                if fault == "slow":
                    pause(server.slow_s)
                if fault == "cut":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"choices": [')
                    self.close_connection = True
                    return
                if fault == "badjson":
                    return self.reply(200, b"{not json")
                if fault == "nochoices":
                    return self.reply(200, {"choices": []})
                thinking, content = server.text(problem, body.get("seed"))
                message = {"role": "assistant", "content": content}
                style = server.style.get(problem, "reasoning_content")
                if style == "think":
                    message["content"] = f"<think>{thinking}</think>\n\n{content}"
                else:
                    message[style] = thinking
                finish = "stop"
                if fault == "length":
                    message["content"], finish = content[:5], "length"
                self.reply(200, {"id": "x", "object": "chat.completion", "model": server.model,
                                 "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                                 "usage": {"prompt_tokens": len(prompt.split()),
                                           "completion_tokens": len((thinking + content).split())}})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # a client that timed out and left: fine
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def text(self, problem, seed):
        """(thinking, final answer) this server sends for a problem and a request's seed."""
        answer = self.answers.get(problem, "?")
        return f"Thinking about {problem} with seed {seed}.", f"So it is \\boxed{{{answer}}}."

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def teacher_server():
    server = TeacherServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small teacher file of the synthetic task (sums of 3 or 4 numbers with their traces)."""
    import data
    d = tmp_path_factory.mktemp("synth")
    rows, _ = data.synth_dataset(60, 0, seed=1, min_terms=3, max_terms=4)
    (d / "train.json").write_text(json.dumps(rows))
    return d / "train.json"


def example(tok, problem, answer):
    """The training example of one teacher row (no thinking)."""
    import data
    (e,), _ = data.build_examples([{"problem": problem, "message_content": answer}], tok, False)
    return e


def varied_model(seed, dtype=None):
    """A tiny model with large random weights: its greedy answers vary from token to token (N(0, 0.02) would
    repeat one)."""
    import qwen3
    import torch
    model = qwen3.load_model("tiny", dtype=dtype or torch.float32, seed=seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model
