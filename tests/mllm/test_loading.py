"""How an MLLM is loaded: defaults that suit the machine, processor options, fingerprints, early errors."""

import json
import shutil

import pytest
import torch
from PIL import Image

from genret._hub import model_fingerprint
from genret.mllm import MLLM, MLLMConfig
from genret.mllm.backend import resolve_device_map, resolve_dtype
from genret.stages.chat import ChatConfig
from genret.stages.cirevl import CIReVLConfig
from genret.stages.eiirwqr import EIIRwQRConfig
from genret.stages.generate import GenerateConfig
from genret.stages.rerank import RerankConfig, RerankStage


def _gpu(monkeypatch, bf16=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


@pytest.mark.parametrize("checkpoint, cpu, gpu, old_gpu", [
    ("bfloat16", torch.float32, torch.bfloat16, torch.float16),
    ("float16", torch.float32, torch.float16, torch.float16),
    ("float32", torch.float32, torch.bfloat16, torch.float16),
    (None, torch.float32, torch.bfloat16, torch.float16),
])
def test_auto_dtype_is_half_precision_on_a_gpu_and_float32_on_the_cpu(monkeypatch, checkpoint, cpu, gpu, old_gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto", checkpoint) == cpu
    _gpu(monkeypatch)
    assert resolve_dtype("auto", checkpoint) == gpu
    _gpu(monkeypatch, bf16=False)
    assert resolve_dtype("auto", checkpoint) == old_gpu
    assert resolve_dtype("float32", checkpoint) == torch.float32  # an explicit choice stands


FP16_UNSAFE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "gemma3")


@pytest.mark.parametrize("model_type", [*FP16_UNSAFE, "llava", "llava_onevision", "idefics3"])
@pytest.mark.parametrize("checkpoint", ["bfloat16", "float16", "float32"])
def test_auto_dtype_on_a_gpu_without_bf16_is_float32_for_families_that_overflow_fp16(model_type, checkpoint):
    """On a T4 or V100 (no bf16) ``auto`` was fp16, where Qwen2-VL's family and Gemma 3 answer garbage
    (transformers#33294, #36822): those take float32 there, as the family says; the machine is an argument."""
    from genret.mllm.backend import choose_dtype
    from genret.mllm.families import family_for_type

    family = family_for_type(model_type)
    assert family.fp16_safe is (model_type not in FP16_UNSAFE)  # a family attribute, never a branch on names
    chosen, why = choose_dtype("auto", checkpoint, bf16=False, fp16_safe=family.fp16_safe, model="m")
    assert chosen == (torch.float16 if family.fp16_safe else torch.float32)
    assert ("overflow float16" in why) is (not family.fp16_safe)
    assert choose_dtype("auto", checkpoint, bf16=None, fp16_safe=family.fp16_safe)[0] == torch.float32  # the CPU
    on_ampere = choose_dtype("auto", checkpoint, bf16=True, fp16_safe=family.fp16_safe)
    assert on_ampere == (torch.float16 if checkpoint == "float16" and family.fp16_safe else torch.bfloat16, "")
    explicit, warning = choose_dtype("float16", checkpoint, bf16=False, fp16_safe=family.fp16_safe)
    assert explicit == torch.float16 and bool(warning) is (not family.fp16_safe)  # an explicit choice stands, warned


@pytest.mark.parametrize("name,dtype", [("qwen2-vl-2b-instruct", torch.float32), ("llava-1.5-7b-hf", torch.float16)])
def test_loading_on_a_gpu_without_bf16_takes_the_familys_safe_dtype(real_dirs, monkeypatch, caplog, name, dtype):
    """The loader asks the device once (backend.gpu_bf16, stood in for here: this machine has no GPU) and a Qwen2-VL
    checkpoint loads in float32, saying why; llava-1.5 keeps its fp16."""
    import genret.mllm.backend as backend

    monkeypatch.setattr(backend, "gpu_bf16", lambda: False)  # a T4: CUDA without bf16
    with caplog.at_level("WARNING", logger="genret.mllm.backend"):
        mllm = MLLM.load(str(real_dirs[name]), device_map="cpu")
    assert mllm.model.dtype == dtype
    assert ("no bfloat16, and this model family's activations overflow float16" in caplog.text) is (dtype == torch.float32)


def test_auto_device_map_is_the_gpu_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device_map("auto") is None and resolve_device_map("") is None
    _gpu(monkeypatch)
    assert resolve_device_map("auto") == "auto" and resolve_device_map("") == "auto"
    assert resolve_device_map("cpu") == "cpu"


@pytest.mark.parametrize("cls", [MLLMConfig, RerankConfig, GenerateConfig, ChatConfig, CIReVLConfig, EIIRwQRConfig])
def test_every_mllm_stage_defaults_to_the_machines_accelerator(cls):
    kwargs = {"model": "m"} if cls is not GenerateConfig else {"adapter": "a"}
    config = cls(**kwargs)
    assert (config.dtype, config.device_map) == ("auto", "auto")


def test_loading_on_the_cpu_gives_float32(real_dirs):
    mllm = MLLM.load(str(real_dirs["llava-1.5-7b-hf"]))  # the checkpoint says float16
    assert mllm.model.dtype == torch.float32 and mllm.device.type == "cpu"


def test_max_pixels_bounds_a_phone_photo(real_dirs):
    """At Qwen2-VL's shipped max_pixels a 4032×3024 photo is 15,552 tokens; max_pixels bounds it."""
    path = str(real_dirs["qwen2-vl-2b-instruct"])
    photo = Image.new("RGB", (4032, 3024), "white")

    def tokens(mllm):
        grid = mllm.processor.image_processor(images=[photo], return_tensors="pt")["image_grid_thw"]
        return int(grid.prod()) // 4

    assert tokens(MLLM.load(path)) == 15552
    bounded = MLLM.load(path, processor_options={"max_pixels": 256 * 28 * 28})
    assert tokens(bounded) <= 256


def test_a_stage_passes_its_processor_options(real_dirs):
    stage = RerankStage(RerankConfig(model=str(real_dirs["qwen2-vl-2b-instruct"]),
                                     processor_options={"max_pixels": 128 * 28 * 28}), "rerank")
    assert stage.mllm.processor.image_processor.size["longest_edge"] == 128 * 28 * 28


def test_an_unknown_processor_option_is_refused_before_the_weights_load(real_dirs, monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_weights)
    with pytest.raises(ValueError, match=r"'max_pixel' are not qwen2_vl settings; this family takes min_pixels: .*max_pixels"):
        MLLM.load(str(real_dirs["qwen2-vl-2b-instruct"]), processor_options={"max_pixel": 1000})


def test_an_unknown_model_type_is_refused_before_the_weights_load(real_dirs, tmp_path, monkeypatch):
    import transformers

    path = tmp_path / "smolvlm2"
    shutil.copytree(real_dirs["smolvlm-256m-instruct"], path)
    (path / "genret.json").unlink()  # a checkpoint as the hub has it: no genret manifest
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "smolvlm"}))
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("weights were loaded")))
    with pytest.raises(ValueError, match="no genret model family for model_type 'smolvlm'; supported: .*llava"):
        MLLM.load(str(path))


def test_hub_models_are_fingerprinted_by_their_files(tmp_path, monkeypatch):
    """transformers 5 drops config._commit_hash; genret keys a hub model by its cached files (tests/test_hub.py):
    two hub models never share a key; one not in the cache, or whose weights are not yet (only its config was
    fetched, or a shard is missing), cannot be keyed."""
    import huggingface_hub.constants

    from genret._hub import NotDownloaded

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    snaps = {}
    for repo, commit, config in (("Qwen/Qwen2-VL-2B-Instruct", "a", "{}"), ("Qwen/Qwen2.5-VL-3B-Instruct", "b", "{ }")):
        snap = snaps[repo] = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / (commit * 40)
        snap.mkdir(parents=True)
        (snap / "config.json").write_text(config)
        (snap.parent.parent / "refs").mkdir()
        (snap.parent.parent / "refs" / "main").write_text(commit * 40)
    with pytest.raises(NotDownloaded, match="its weights are not in the Hugging Face cache"):
        model_fingerprint("Qwen/Qwen2-VL-2B-Instruct")  # only config.json fetched so far
    (snaps["Qwen/Qwen2-VL-2B-Instruct"] / "model.safetensors").write_bytes(b"weights")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (snaps["Qwen/Qwen2.5-VL-3B-Instruct"] / "model.safetensors.index.json").write_text(json.dumps(index))
    (snaps["Qwen/Qwen2.5-VL-3B-Instruct"] / "model-00001-of-00002.safetensors").write_bytes(b"half")
    with pytest.raises(NotDownloaded):
        model_fingerprint("Qwen/Qwen2.5-VL-3B-Instruct")  # a shard is still missing
    (snaps["Qwen/Qwen2.5-VL-3B-Instruct"] / "model-00002-of-00002.safetensors").write_bytes(b"other half")
    first, second = model_fingerprint("Qwen/Qwen2-VL-2B-Instruct"), model_fingerprint("Qwen/Qwen2.5-VL-3B-Instruct")
    assert first.startswith("files-v2:") and first != second
    with pytest.raises(ValueError, match="cannot fingerprint 'org/missing'"):
        model_fingerprint("org/missing")


def test_a_missing_local_path_with_one_slash_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """``runs/clip`` under an existing ``runs/`` is a typo'd local path, not a hub id (half a minute of retries)."""
    from genret._hub import check_model_ref

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"encoder model directory not found: runs/clip \(runs/ exists"):
        check_model_ref("runs/clip", "encoder model")


def test_an_unknown_hub_id_fails_at_once_when_the_hub_is_out_of_reach(monkeypatch):
    import time

    import genret._hub as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"'nope/clip' is not a local directory \(no such path here\), is not "
                                                r"in the Hugging Face cache, and the hub cannot be reached"):
        hub.check_model_ref("nope/clip", "encoder model")
    assert time.perf_counter() - start < 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"no such path here\), and Hugging Face hub downloads are off"):
        hub.check_model_ref("nope/clip", "encoder model")


def test_trainers_load_their_base_with_processor_options_on_their_own_device(real_dirs):
    """Every trainer loads its base through one loader (training.models.load_base): processor options reach it, and the model
    goes to this process's device (never device_map 'auto', which shards a model across a data-parallel run's GPUs)."""
    from genret.training.models import load_base
    from genret.training.rerank import RerankTrainConfig

    mllm = load_base(str(real_dirs["qwen2-vl-2b-instruct"]),
                      RerankTrainConfig(processor_options={"max_pixels": 64 * 28 * 28}), torch.device("cpu"))
    assert mllm.processor.image_processor.size["longest_edge"] == 64 * 28 * 28 and mllm.device.type == "cpu"


def test_processor_options_on_the_command_line_are_a_json_table(capsys):
    from genret.cli import main

    with pytest.raises(SystemExit):
        main(["train", "rerank", "--data", "d", "--base", "b", "--clip", "c", "--out", "o",
              "--processor-options", "max_pixels=5"])
    assert "--processor-options takes a JSON table" in capsys.readouterr().err
