import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")

from genret.serve.settings import ServeConfig, read_api_key  # noqa: E402


def _get(url, headers=None, data=None):
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_genret_serve_command_serves_a_saved_pipeline_behind_its_key(served_pipe, tmp_path, world):
    served_pipe.save(tmp_path / "pipe")
    key_file = tmp_path / "key"
    key_file.write_text("file-key-0123456789\n")
    key_file.chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "GENRET_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "genret.cli", "-q", "serve", str(tmp_path / "pipe"), "--port",
                             str(port), "--max-k", "3", "--api-key-file", str(key_file)], stderr=subprocess.PIPE,
                            text=True, env=env)
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
        url = f"http://127.0.0.1:{port}/v1/search"
        body = json.dumps({"text": world.split("test").records[0].captions[0], "k": 5}).encode()
        status, answer = _get(url, data=body)
        assert status == 401 and "API key" in answer["error"]["message"]
        status, answer = _get(url, {"Authorization": "Bearer file-key-0123456789"}, body)
        assert status == 400 and "at most 3" in answer["error"]["message"]  # --max-k 3
        # The key is not on the command line, where `ps` shows it to everyone.
        assert "file-key" not in " ".join(proc.args)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("args, env, match", [
    (["--port", "70000"], {}, "argument --port: must be at least 1 and at most 65535, got 70000"),
    (["--port", "-1"], {}, "argument --port: must be at least 1 and at most 65535, got -1"),
    (["--port", "0"], {}, "argument --port: must be at least 1 and at most 65535, got 0"),
    (["--port", "http"], {}, "argument --port: expected a whole number, got 'http'"),
    (["--host", ""], {}, "argument --host: host must be an IP address or a hostname"),
    (["--host", "bad host"], {}, "argument --host: host must be an IP address or a hostname"),
    (["--host", "-x.example"], {}, "argument --host"),
    (["--max-k", "0"], {}, "argument --max-k: must be at least 1, got 0"),
    (["--max-text-chars", "-5"], {}, "argument --max-text-chars: must be at least 1, got -5"),
    (["--timeout-s", "nan"], {}, "argument --timeout-s: must be a finite number"),
    (["--max-wait-ms", "-1"], {}, "argument --max-wait-ms: must be at least 0, got -1.0"),
    (["--timeout-s", "0"], {}, "argument --timeout-s: must be above 0"),
    (["--max-body-bytes", "1.5"], {}, "argument --max-body-bytes: expected a whole number"),
    (["--api-key", "s3cret"], {}, "set GENRET_API_KEY or use --api-key-file FILE"),
    (["--api-key=s3cret"], {}, "visible to every user of this machine"),
    (["--api-key-file", "MISSING"], {}, "--api-key-file MISSING: cannot read it (No such file or directory)"),
    (["--api-key-file", "EMPTY"], {}, "--api-key-file EMPTY: the file is empty"),
    (["--api-key-file", "KEYFILE"], {"GENRET_API_KEY": "x"}, "give the API key one way"),
    ([], {"GENRET_API_KEY": "  "}, "GENRET_API_KEY is set but empty"),
    ([], {"GENRET_API_KEY": "has space"}, "visible ASCII characters without spaces"),
    (["--api-key-env", "GENRET_TEST_NOT_SET"], {}, "--api-key-env GENRET_TEST_NOT_SET: that environment variable is not set"),
    (["--host", "0.0.0.0"], {}, "--host 0.0.0.0 exposes the service to the network: set GENRET_API_KEY"),
])
def test_genret_serve_refuses_bad_settings_in_one_line(tmp_path, capsys, monkeypatch, args, env, match):
    from genret.cli import main

    (tmp_path / "EMPTY").write_text("\n")
    (tmp_path / "KEYFILE").write_text("k")
    monkeypatch.delenv("GENRET_API_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = [str(tmp_path / a) if a in ("MISSING", "EMPTY", "KEYFILE") else a for a in args]
    match = match.replace("MISSING", str(tmp_path / "MISSING")).replace("EMPTY", str(tmp_path / "EMPTY"))
    try:
        code = main(["-q", "serve", str(tmp_path / "missing-pipeline"), *args])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and match in err, err
    assert "Traceback" not in err and (not env.get("GENRET_API_KEY", "").strip() or env["GENRET_API_KEY"] not in err)


def test_genret_serve_errors(tmp_path):
    from genret.cli import main

    assert main(["-q", "serve", str(tmp_path / "missing.toml")]) != 0


@pytest.mark.parametrize("file, env, want", [
    (None, {}, ""),
    (None, {"GENRET_API_KEY": " env-key \n"}, "env-key"),
    ("key", {}, "file-key"),
])
def test_read_api_key(tmp_path, file, env, want):
    (tmp_path / "key").write_text("file-key\n")
    assert read_api_key(str(tmp_path / file) if file else None, env=env) == want


def test_a_key_file_others_may_read_is_warned_of(tmp_path, caplog):
    key = tmp_path / "key"
    key.write_text("k")
    key.chmod(0o644)
    assert read_api_key(str(key), env={}) == "k"
    assert "other users of this machine may read it; chmod 600" in caplog.text
    caplog.clear()
    key.chmod(0o600)
    read_api_key(str(key), env={})
    assert "chmod" not in caplog.text


def test_the_key_is_not_in_the_settings_repr():
    assert "s3cret" not in repr(ServeConfig(api_key="s3cret"))


@pytest.mark.parametrize("kwargs, match", [
    ({"port": 0}, "port: must be at least 1 and at most 65535"), ({"max_text_chars": 0}, "max_text_chars: must be at least 1"),
    ({"timeout_s": float("nan")}, "timeout_s: must be a finite number"), ({"host": "a b"}, "host must be an IP address"),
    ({"api_key": "two words"}, "visible ASCII"), ({"max_k": True}, "max_k: expected a whole number"),
])
def test_settings_built_in_python_are_checked_too(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServeConfig(**kwargs)
