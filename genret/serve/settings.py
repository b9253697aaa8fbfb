"""The settings of ``genret serve`` (importable without the serve extra), and where its API key comes from."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Mapping

from genret.config import above, at_least, between, check_fields

logger = logging.getLogger(__name__)
KEY_ENV = "GENRET_API_KEY"
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                       r"[A-Za-z0-9])?)*\.?$")
_KEY = re.compile(r"^[\x21-\x7e]+$")  # what an Authorization header carries: visible ASCII, no spaces


@dataclass
class ServeConfig:
    """Settings of ``genret serve``; each number's range is declared in its metadata (``"range"``), checked here and
    by the command line's parser alike (:mod:`genret.config`).

    Example:
        >>> ServeConfig(port=70000)
        Traceback (most recent call last):
        ...
        genret.config.ConfigError: port: must be at least 1 and at most 65535, got 70000
    """

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0 exposes it to the network; "
                                                             "then an API key is required)"})
    port: int = field(default=8000, metadata={"help": "port", "range": between(1, 65535)})
    api_key: str = field(default="", repr=False, metadata={
        "help": "bearer key every route but /health and the page requires (command line: from $GENRET_API_KEY or "
                "--api-key-file, never a value on the command line)", "cli": False})
    max_body_bytes: int = field(default=16 << 20, metadata={"help": "largest request body in bytes, counted as it "
                                                                    "arrives (base64 images included)",
                                                            "range": at_least(1)})
    max_image_pixels: int = field(default=4096 * 4096, metadata={"help": "largest image, width × height",
                                                                 "range": at_least(1)})
    max_text_chars: int = field(default=4096, metadata={"help": "longest text in a request, in characters (each is "
                                                                "also checked in tokens against the models' context)",
                                                        "range": at_least(1)})
    max_k: int = field(default=100, metadata={"help": "largest k a search may ask for", "range": at_least(1)})
    max_documents: int = field(default=256, metadata={"help": "most documents of one /v1/rerank request, pairs of "
                                                              "one /score request, inputs of one /v1/embeddings "
                                                              "request", "range": at_least(1)})
    max_batch: int = field(default=16, metadata={"help": "most requests in one model call", "range": at_least(1)})
    max_wait_ms: float = field(default=5.0, metadata={"help": "how long a call waits for more requests",
                                                      "range": at_least(0)})
    max_queue: int = field(default=256, metadata={"help": "most requests waiting; beyond it 503", "range": at_least(1)})
    timeout_s: float = field(default=60.0, metadata={"help": "seconds a request may wait for its result; then 504",
                                                     "range": above(0)})

    def __post_init__(self) -> None:
        check_fields(self)
        check_host(self.host)
        if self.api_key and not _KEY.match(self.api_key):
            raise ValueError("the API key must be visible ASCII characters without spaces (it travels in an "
                             "'Authorization: Bearer KEY' header)")


def check_host(host: str) -> None:
    """Raise ValueError unless ``host`` is an IP address or a hostname."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        raise ValueError(f"host must be an IP address or a hostname (127.0.0.1, 0.0.0.0, ::1, localhost), got {host!r}")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the service on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(key_file: str | None = None, env: Mapping[str, str] | None = None, env_name: str = KEY_ENV,
                 env_required: bool = False) -> str:
    """The API key: the contents of ``key_file`` or the environment variable ``env_name`` (one of the two), or ""
    when neither is given (no key).

    Raises:
        ValueError: naming the file or variable when it is unreadable, empty, or both are given.
    """
    env = os.environ if env is None else env
    from_env = env.get(env_name)
    if key_file:
        if from_env is not None:
            raise ValueError(f"give the API key one way: {env_name} is set and --api-key-file names {key_file}")
        try:
            with open(key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err.__class__.__name__
            raise ValueError(f"--api-key-file {key_file}: cannot read it ({reason})") from None
        if not key:
            raise ValueError(f"--api-key-file {key_file}: the file is empty; write the key into it")
        if os.stat(key_file).st_mode & 0o077:
            logger.warning("--api-key-file %s: other users of this machine may read it; chmod 600 %s", key_file,
                           key_file)
        return key
    if from_env is None:
        if env_required:
            raise ValueError(f"--api-key-env {env_name}: that environment variable is not set")
        return ""
    if not from_env.strip():
        raise ValueError(f"{env_name} is set but empty: set it to the key, or unset it to serve without one")
    return from_env.strip()
