"""Shared fixtures: a tiny miniature world and a tiny mini CLIP trained on it, built once per session."""

from __future__ import annotations

import copy
import os
import socket
import threading
import time
from collections.abc import Mapping

import pytest

from genret.data import load_dataset
from genret.world.synth import SynthConfig, generate_world
from genret.training.clip import CLIPTrainConfig, train_clip

# Tests never reach for a model hub: everything they load is built here.
os.environ["HF_HUB_OFFLINE"] = "1"

TINY_WORLD = SynthConfig(n_train=96, n_val=8, n_test=24, seed=7)
TINY_CLIP = CLIPTrainConfig(vision_layers=1, vision_width=32, text_layers=1, text_width=32, heads=2,
                            projection_dim=16, context_length=24, epochs=6, batch_size=16, vocab_size=300)


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, TINY_WORLD, progress=False)
    return out


@pytest.fixture(scope="session")
def world(world_dir):
    return load_dataset(world_dir)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory, world):
    out = tmp_path_factory.mktemp("clip") / "clip"
    train_clip(world.split("train"), out, TINY_CLIP, val=world.split("val"), progress=False)
    return out


@pytest.fixture(scope="session")
def _encoder(clip_dir):
    from genret.encoders.hf import HFDualEncoder

    return HFDualEncoder(str(clip_dir), device="cpu")


@pytest.fixture
def encoder(_encoder):
    """A fresh copy of the session's tiny CLIP encoder (tests may attach caches)."""
    return copy.copy(_encoder)


@pytest.fixture(scope="session")
def mllm_dir(tmp_path_factory, clip_dir, world):
    """A tiny LLaVA on the tiny CLIP's vision tower (untrained language model: tests check mechanics)."""
    import torch

    from genret.training.mini_mllm import MiniMLLMConfig, build_mini_mllm

    torch.manual_seed(0)
    texts = [c for r in world.records for c in r.captions] + ["Does the image match the text? Answer yes or no."]
    model, processor = build_mini_mllm(clip_dir, texts, MiniMLLMConfig(hidden_size=32, layers=1, heads=2,
                                                                       intermediate_size=64, vocab_size=400))
    out = tmp_path_factory.mktemp("mllm") / "mllm"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def talker_dir(tmp_path_factory, mllm_dir):
    """The tiny LLaVA with an untied random output layer: the tied one only repeats its last input token
    (a special one, so every caption decodes empty); this one says something that depends on the image."""
    import shutil

    import torch
    from transformers import AutoModelForImageTextToText

    out = tmp_path_factory.mktemp("talker") / "mllm"
    shutil.copytree(mllm_dir, out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    model.config.tie_word_embeddings = False
    model.config.text_config.tie_word_embeddings = False
    torch.manual_seed(1)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(out)
    return out


def as_legacy(folder, name="manifest.json"):
    """Make ``folder`` look saved by a genret before content manifests (no file list, owner or digest): the older
    checks must still hold."""
    import json

    path = folder / name
    manifest = json.loads(path.read_text())
    for key in ("files", "digest", "owner"):
        manifest.pop(key)
    path.write_text(json.dumps(manifest))


def make_adapter(base_dir, out, seed, mode="pointwise", **manifest):
    """A LoRA adapter with random (non-zero) weights on the base, saved with its manifest."""
    import torch
    from peft import LoraConfig, get_peft_model

    from genret.mllm import MLLM
    from genret.mllm.adapters import language_model_targets, save_adapter

    mllm = MLLM.load(str(base_dir))
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                      target_modules=language_model_targets(mllm.model, mllm.family.lora_targets))
    mllm.model = get_peft_model(mllm.model, lora).eval()
    save_adapter(out, mllm.model, {"task": "rerank", "mode": mode, "base_model": str(base_dir),
                                   "base_revision": mllm.revision, "family": mllm.family.name,
                                   "prompt": {"name": f"rerank_{mode}", "version": 1}, **manifest})
    return mllm


def scaled_copy(mllm_dir, out, factor: float):
    """A copy of the MLLM at ``mllm_dir`` with its token embeddings scaled by ``factor`` (other weights)."""
    import shutil

    import torch
    from transformers import AutoModelForImageTextToText

    shutil.copytree(mllm_dir, out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(factor)
    model.save_pretrained(out)
    return out


class LazyMap(Mapping):
    """``name -> make(name)``, each made on first use: a session builds only the checkpoints its tests ask for."""

    def __init__(self, names, make):
        self._names, self._make, self._made = list(names), make, {}

    def __getitem__(self, name):
        if name not in self._names:
            raise KeyError(name)
        if name not in self._made:
            self._made[name] = self._make(name)
        return self._made[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


@pytest.fixture(scope="session")
def real_dirs(tmp_path_factory):
    """A shrunk checkpoint of each real fixture (real tokenizer, template, processor and config values), built when
    a test first asks for it."""
    from real_checkpoints import CHECKPOINTS, build

    root = tmp_path_factory.mktemp("real")
    return LazyMap(CHECKPOINTS, lambda name: build(name, root / name))


@pytest.fixture(scope="session")
def real_mllms(real_dirs):
    from genret.mllm import MLLM

    return LazyMap(real_dirs, lambda name: MLLM.load(str(real_dirs[name])))


@pytest.fixture(scope="session")
def images(world):
    """Three gallery images and a non-square one (Qwen's grid is then 4×2 merged tokens, not 3×3)."""
    from PIL import Image

    ims = [Image.open(r.path).convert("RGB") for r in world.split("test").records[:3]]
    return ims + [ims[0].crop((0, 0, 64, 32))]


def score_query(mllm, mode, direction, images, query=None, **kwargs):
    """Scores of one query against candidates, as the rerank stage asks for them (``query``: the t2i query text in
    place of the default; ``kwargs``: pointwise and generative options such as ``shared_prefix``)."""
    from genret.mllm.scoring import generative_scores, listwise_scores, pointwise_scores
    from genret.prompts import load_prompt

    prompt = load_prompt(f"rerank_{mode}").section(direction)
    texts = ["a red circle left of a blue square", "a small green star", "two crosses", "a blue square"]
    if direction == "t2i":  # one text, the images are candidates
        texts, ims = [query or texts[0]] * len(images), list(images)
    else:  # one image, the texts are candidates
        ims = [images[-1]] * len(texts)
    if mode == "pointwise":
        return pointwise_scores(mllm, prompt["user"], texts, ims, batch_size=3, **kwargs)
    if mode == "generative":
        return generative_scores(mllm, prompt["user"], [prompt["assistant"].replace("{text}", t) for t in texts], ims,
                                 batch_size=3, **kwargs)
    if direction == "t2i":
        return listwise_scores(mllm, prompt["user"], prompt["item"], {"text": texts[0]}, ims, "image")
    return listwise_scores(mllm, prompt["user"], prompt["item"], {"image": ims[0]}, texts, "text")


# --- genret serve (tests/serve/) ---


def one_chat_round(model: str, world) -> None:
    """ChatIR with ``model`` as questioner (text only) and answerer (sees the target image): one round runs, and
    every query gets a question and an answer."""
    from genret.stages.chat import ChatConfig, ChatStage, Target, initial_query
    from genret.types import Query

    records = world.split("test").records[:2]
    stage = ChatStage(ChatConfig(rounds=1, model=model, answerer="mllm", max_new_tokens=4, answer_tokens=4), "chat")
    queries = stage.start([Query(id=r.id, text=initial_query(r.meta, r.captions, r.id, 0)) for r in records],
                          [Target(id=r.id, image=str(r.path), meta=r.meta) for r in records])
    queries = stage.next_round(queries)
    assert all(len(q.meta["turns"]) == 1 and q.meta["turns"][0]["raw_answer"] for q in queries)
    assert stage.generated["question"] == 2 and stage.generated["answer"] == 2


@pytest.fixture(scope="module")
def served_pipe(_encoder, world, mllm_dir, clip_dir):
    """Prefilter → generative rerank on the tiny world's test split (images and captions indexed)."""
    stages = ({"type": "prefilter", "k": 8}, {"type": "rerank", "name": "rerank", "model": str(mllm_dir), "k": 5})
    from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline

    pipe = RetrievalPipeline(PipelineConfig(name="tiny", encoder=EncoderConfig(model=str(clip_dir)), stages=stages),
                             encoder=copy.copy(_encoder))
    pipe.index(world.split("test"), progress=False)
    return pipe


@pytest.fixture
def make_pipe(_encoder, clip_dir, mllm_dir):
    """A pipeline on a gallery of given items: ``make_pipe(images={id: path}, texts={id: caption})``, a prefilter then
    (``rerank=True``) the tiny MLLM's generative rerank; ``cache_features=False`` makes the rerank read the gallery's
    image files at each search."""
    from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
    from genret.types import Item

    def make(images: dict, texts: dict, rerank: bool = True, cache_features: bool = True):
        stages = [{"type": "prefilter", "k": 8}]
        if rerank:
            stages.append({"type": "rerank", "name": "rerank", "model": str(mllm_dir), "k": 5,
                           "cache_features": cache_features})
        pipe = RetrievalPipeline(PipelineConfig(name="small", encoder=EncoderConfig(model=str(clip_dir)),
                                                stages=tuple(stages)), encoder=copy.copy(_encoder))
        items = {"image": [Item(i, "image", image=str(p)) for i, p in images.items()],
                 "text": [Item(i, "text", text=t) for i, t in texts.items()]}
        pipe.index_items({m: v for m, v in items.items() if v}, {"name": "small"}, progress=False)
        return pipe

    return make


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


def assert_error(response, status: int, match: str = "") -> dict:
    """``response`` is genret serve's one error shape, exactly: ``{"error": {"status": N, "message": "..."}}``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"status", "message"}, body
    assert body["error"]["status"] == status and isinstance(body["error"]["message"], str)
    assert match in body["error"]["message"], body
    return body


@pytest.fixture
def loopback():
    """Server(app) as a context manager: a real uvicorn on a free loopback port."""
    return Server


def load_script(name: str):
    """A module of ``scripts/`` (``load_script("make_emoji_scenes")``), imported by path, with ``scripts/`` on the
    import path for its helpers (``_scenes``, ``_bench``)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "scripts"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
