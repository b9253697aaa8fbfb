"""`genret serve` keeps serving through faults: a corrupt image, clients that leave mid-request, a request past its
timeout (a real uvicorn on loopback, raw sockets for the clients that leave)."""

import base64
import json
import socket
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
from genret.serve.app import ServeConfig, create_app  # noqa: E402


def post(url, body, timeout=60):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def raw(port, data: bytes, read: bool = False):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        if read:
            return s.recv(65536)


def test_the_server_keeps_serving_through_faults(served_pipe, world, loopback):
    caption = world.split("test").records[0].captions[0]
    config = ServeConfig(timeout_s=60)
    with loopback(create_app(served_pipe, config)) as server:
        status, good = post(f"{server.url}/v1/search", {"text": caption, "k": 3})
        assert status == 200
        ids = [r["id"] for r in good["results"]]

        status, body = post(f"{server.url}/v1/search", {"image": base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode()})
        assert status == 400 and "not a readable image" in body["error"]["message"]

        # A client that sends half its body and leaves, and one that sends a whole search and leaves before the answer.
        payload = json.dumps({"text": caption, "k": 3}).encode()
        head = (f"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        raw(server.port, head + payload[:10])
        for _ in range(5):
            raw(server.port, head + payload)
        raw(server.port, b"GARBAGE NOT HTTP\r\n\r\n")

        config.timeout_s = 1e-4  # a request past its timeout: a 504 that says so
        status, body = post(f"{server.url}/v1/search", {"text": caption, "k": 3})
        assert status == 504 and "longer than" in body["error"]["message"]
        config.timeout_s = 60

        time.sleep(0.5)  # the abandoned searches finish in the worker; their answers go nowhere
        status, again = post(f"{server.url}/v1/search", {"text": caption, "k": 3})
        assert status == 200 and [r["id"] for r in again["results"]] == ids
        with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
            assert json.loads(r.read())["status"] == "ok"
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'status="400"' in metrics and 'status="504"' in metrics
