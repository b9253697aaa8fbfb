import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")


def test_genret_serve_command_serves_a_saved_pipeline(served_pipe, tmp_path, world):
    served_pipe.save(tmp_path / "pipe")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "genret.cli", "-q", "serve", str(tmp_path / "pipe"), "--port",
                             str(port), "--max-k", "3"], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read())
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(proc.stderr.read())
                time.sleep(0.1)
        else:
            pytest.fail("genret serve did not answer in 30 s")
        assert health["status"] == "ok" and health["galleries"]["image"] == len(world.split("test"))
        body = json.dumps({"text": world.split("test").records[0].captions[0], "k": 5}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/search", data=body,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:  # --max-k 3
            urllib.request.urlopen(request, timeout=30)
        assert err.value.code == 400 and "at most 3" in json.loads(err.value.read())["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_genret_serve_errors(tmp_path):
    from genret.cli import main

    assert main(["-q", "serve", str(tmp_path / "missing.toml")]) != 0
