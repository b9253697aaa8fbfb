"""The settings of ``genret serve`` (importable without the serve extra)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServeConfig:
    """Settings of ``genret serve``."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0 exposes it to the network)"})
    port: int = field(default=8000, metadata={"help": "port"})
    api_key: str = field(default="", metadata={"help": "bearer key every /v1 and /metrics request must carry"})
    max_body_bytes: int = field(default=16 << 20, metadata={"help": "largest request body (base64 images included)"})
    max_image_pixels: int = field(default=4096 * 4096, metadata={"help": "largest image, width × height"})
    max_k: int = field(default=100, metadata={"help": "largest k a search may ask for"})
    max_documents: int = field(default=256, metadata={"help": "most documents of one /v1/rerank request"})
    max_batch: int = field(default=16, metadata={"help": "most requests in one model call"})
    max_wait_ms: float = field(default=5.0, metadata={"help": "how long a call waits for more requests"})
    max_queue: int = field(default=256, metadata={"help": "most requests waiting; beyond it 503"})
    timeout_s: float = field(default=60.0, metadata={"help": "seconds a request may wait for its result; then 504"})
