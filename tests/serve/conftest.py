import socket
import threading
import time

import pytest

from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline


@pytest.fixture(scope="module")
def served_pipe(_encoder, world, mllm_dir, clip_dir):
    """Prefilter → generative rerank on the tiny world's test split (images and captions indexed)."""
    import copy

    stages = ({"type": "prefilter", "k": 8}, {"type": "rerank", "name": "rerank", "model": str(mllm_dir), "k": 5})
    pipe = RetrievalPipeline(PipelineConfig(name="tiny", encoder=EncoderConfig(model=str(clip_dir)), stages=stages),
                             encoder=copy.copy(_encoder))
    pipe.index(world.split("test"), progress=False)
    return pipe


class Server:
    """A real uvicorn server on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("uvicorn did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def loopback():
    """Server(app) as a context manager: a real uvicorn on a free loopback port."""
    return Server
