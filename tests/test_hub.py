"""Hub models as the Hugging Face cache holds them: loading offline, and fingerprints of what the weights are."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from genret._hub import model_fingerprint


def _blob_name(path: Path) -> str:
    """The name the Hugging Face cache gives a file's blob: an LFS file's SHA-256 (weights), else its git blob id."""
    data = path.read_bytes()
    if path.suffix in (".safetensors", ".bin", ".model"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_cache(cache: Path, repo: str, source: Path, commit: str, readme: str = "") -> Path:
    """Lay ``source``'s files out as ``huggingface_hub`` stores a download of ``repo`` at ``commit``: each file a blob
    under ``blobs/``, linked (relative symlinks) from ``snapshots/<commit>/``, and ``refs/main`` naming the commit.
    ``readme`` adds a README.md, as the hub's repositories have. Returns the snapshot folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    files = {p.relative_to(source): p for p in sorted(source.rglob("*")) if p.is_file()}
    if readme:
        (cache / "README.md").write_text(readme)
        files[Path("README.md")] = cache / "README.md"
    for rel, file in files.items():
        blob = root / "blobs" / _blob_name(file)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, downloads off (``huggingface_hub`` reads both variables once, as it imports)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_cached_hub_model_loads_by_id_with_downloads_off(offline_cache, mllm_dir, clip_dir):
    """With HF_HUB_OFFLINE=1 transformers loads a hub id from the local cache; genret refused it before trying."""
    from genret.encoders import load_encoder
    from genret.mllm import MLLM

    hub_cache(offline_cache, "example-org/tiny-llava", mllm_dir, "1" * 40)
    hub_cache(offline_cache, "example-org/tiny-clip", clip_dir, "2" * 40)
    mllm = MLLM.load("example-org/tiny-llava")
    assert mllm.model_id == "example-org/tiny-llava" and mllm.family.name == "llava"
    assert mllm.revision == model_fingerprint(str(mllm_dir))  # the same files: the same model
    encoder = load_encoder("hf", "example-org/tiny-clip", device="cpu")
    local = load_encoder("hf", str(clip_dir), device="cpu")
    assert (encoder.encode_texts(["a red circle"]) == local.encode_texts(["a red circle"])).all()
    with pytest.raises(FileNotFoundError, match=r"'example-org/absent' is not a local directory .*downloads are off .*"
                                                r"not in the Hugging Face cache"):
        MLLM.load("example-org/absent")


def _edited_copy(source: Path, out: Path, name: str, edit) -> Path:
    """A copy of ``source`` with the file ``name`` rewritten by ``edit(bytes) -> bytes``."""
    shutil.copytree(source, out)
    (out / name).unlink()  # a copy of a snapshot holds the links' targets: write a file of its own
    (out / name).write_bytes(edit((source / name).read_bytes()))
    return out


def test_a_model_is_keyed_by_what_its_files_hold_not_by_its_commit_or_place(offline_cache, mllm_dir, tmp_path):
    """A new commit that edits only the README kept no adapter, index or feature cache (the key was the commit),
    and a local copy of the same files got another key; new weights, config or template must change it."""
    hub_cache(offline_cache, "example-org/tiny", mllm_dir, "a" * 40)
    first = model_fingerprint("example-org/tiny")
    snapshot = hub_cache(offline_cache, "example-org/tiny", mllm_dir, "b" * 40, readme="# tiny\nA new model card.\n")
    assert model_fingerprint("example-org/tiny") == first  # refs/main names the new commit: same files, same key
    copy = tmp_path / "copy"
    shutil.copytree(snapshot, copy, symlinks=False)
    (copy / ".cache" / "huggingface").mkdir(parents=True)  # what `hf download --local-dir` leaves beside the files
    (copy / ".cache" / "huggingface" / "download.lock").write_text("x")
    assert model_fingerprint(str(copy)) == first == model_fingerprint(str(mllm_dir))
    weights = _edited_copy(copy, tmp_path / "weights", "model.safetensors",
                           lambda b: b[:-4] + bytes(x ^ 1 for x in b[-4:]))  # one value's last bytes
    config = _edited_copy(copy, tmp_path / "config", "config.json", lambda b: b.replace(b"{", b'{"note": 1, ', 1))
    template = _edited_copy(copy, tmp_path / "template", "chat_template.jinja", lambda b: b + b" ")
    keys = {model_fingerprint(str(p)) for p in (weights, config, template)}
    assert len(keys) == 3 and first not in keys


def test_large_weights_are_keyed_by_a_block_every_16_mib(tmp_path):
    """A multi-GB file is never read whole, yet a change that 16 blocks spread over it would miss changes the key."""
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    with open(weights, "wb") as fh:  # 1 GiB, sparse: nothing is written but the end
        fh.truncate(1 << 30)
    before = model_fingerprint(str(folder))
    with open(weights, "r+b") as fh:  # inside the second of 64 sampled blocks (~17 MiB in), between 16 blocks' first two
        fh.seek(((1 << 30) - (1 << 16)) // 63 + 100)
        fh.write(b"\x01")
    os.utime(weights, ns=(1, 1))  # the per-process memo keys on the file's time too
    assert model_fingerprint(str(folder)) != before


def test_adapters_follow_the_files_and_old_keys_are_checked_by_the_old_rule(offline_cache, mllm_dir, tmp_path):
    """An adapter trained on a hub model loads after a README commit and on a local copy. One saved by an older
    genret (keyed ``<id>@<commit>``) loads while that commit is the cached one, and is refused, saying why, after."""
    from conftest import make_adapter
    from genret.mllm import MLLM
    from genret.mllm.adapters import AdapterMismatchError

    hub_cache(offline_cache, "example-org/tiny", mllm_dir, "a" * 40)
    make_adapter("example-org/tiny", tmp_path / "new", seed=0)
    make_adapter("example-org/tiny", tmp_path / "old", seed=1, base_revision="example-org/tiny@" + "a" * 40)  # as before
    mllm = MLLM.load("example-org/tiny")
    assert mllm.attach_adapter(tmp_path / "new") == "new" and mllm.attach_adapter(tmp_path / "old") == "old"
    hub_cache(offline_cache, "example-org/tiny", mllm_dir, "b" * 40, readme="# tiny\n")
    for base in ("example-org/tiny", str(mllm_dir)):
        assert MLLM.load(base).attach_adapter(tmp_path / "new") == "new"
    with pytest.raises(AdapterMismatchError, match=r"older genret's: it keyed a hub model by its commit"):
        MLLM.load("example-org/tiny").attach_adapter(tmp_path / "old")


def test_indexes_and_embedding_caches_follow_the_files(offline_cache, clip_dir, tmp_path):
    """An index built with a hub encoder loads with a local copy of it (and the copy reuses its cached embeddings);
    an index keyed by an old commit is refused once the cache holds another."""
    from genret._hub import fingerprints_match, legacy_fingerprint
    from genret.encoders import EmbeddingCache, load_encoder
    from genret.index.faiss_index import IndexMismatchError, check_encoder

    snapshot = hub_cache(offline_cache, "example-org/clip", clip_dir, "a" * 40)
    cache = EmbeddingCache(tmp_path / "cache")
    hub = load_encoder("hf", "example-org/clip", device="cpu", cache=cache)
    hub.encode_texts(["a red circle"])
    copy = tmp_path / "copy"
    shutil.copytree(snapshot, copy, symlinks=False)
    local = load_encoder("hf", str(copy), device="cpu", cache=cache)
    assert local.revision == hub.revision and cache.get(local.cache_namespace, [_text_key("a red circle")])
    saved = hub.describe()
    check_encoder(tmp_path, saved, local.describe())
    old = {**saved, "revision": "example-org/clip@" + "a" * 40}
    check_encoder(tmp_path, old, hub.describe())  # the commit it names is the one cached
    hub_cache(offline_cache, "example-org/clip", clip_dir, "b" * 40, readme="# clip\n")
    with pytest.raises(IndexMismatchError, match="older genret's"):
        check_encoder(tmp_path, old, hub.describe())
    # a folder's old key (config and weights' ends) still matches that folder, and only while its files are the same
    assert fingerprints_match(legacy_fingerprint(str(copy)), local.revision, str(copy))
    assert not fingerprints_match(legacy_fingerprint(str(copy)), local.revision, str(tmp_path / "elsewhere"))


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def test_a_hub_model_fetched_only_in_part_is_not_keyed_by_its_config(offline_cache, mllm_dir):
    """Online, a stage reads the config before the weights are fetched: a key of the config alone would refuse the
    right adapter at load; the early check waits for the weights (the load checks the adapter again)."""
    from genret.mllm.backend import BaseModel, MLLMConfig

    snapshot = hub_cache(offline_cache, "example-org/partial", mllm_dir, "c" * 40)
    (snapshot / "model.safetensors").unlink()
    assert BaseModel.of(MLLMConfig(model="example-org/partial")).revision == ""
