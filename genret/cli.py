"""The ``genret`` command: data, training, indexing, search, evaluation and the demo.

Every command that reads a dataset accepts a Karpathy ``dataset_*.json``, a ``.jsonl`` file, or a
folder holding one. Errors print one line naming the file, line or argument, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from genret import __version__
from genret.config import (POSITIVE_INT, ConfigError, Range, add_arguments, merge_arguments,
                           number_arg)

logger = logging.getLogger("genret")

USER_ERRORS = (ValueError, FileNotFoundError, LookupError, ConfigError, NotADirectoryError)


def to_json(obj: Any) -> str:
    """``obj`` as the indented JSON every ``--json`` prints: strict JSON, so a NaN or infinity (a broken score) is an
    error that says where it is, never a bare ``NaN`` that JSON parsers refuse."""
    try:
        return json.dumps(obj, indent=2, allow_nan=False)
    except ValueError:
        where, value = _non_finite(obj, "")
        raise ValueError(f"the result holds {value} at {where or 'the top'}, which JSON cannot carry: a score came out "
                         "as NaN or infinity; check the pipeline's weights (fusion_weight) and the model's dtype "
                         "(float16 can overflow: try dtype = \"float32\")") from None


def _non_finite(obj: Any, where: str) -> tuple[str, Any]:
    if isinstance(obj, float) and not math.isfinite(obj):
        return where, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]")
        if found[0]:
            return found
    return "", None


def _add_data_args(p: argparse.ArgumentParser, split: str | None = None) -> None:
    p.add_argument("--data", required=True, help="dataset_*.json, a .jsonl file, or a folder holding one")
    p.add_argument("--image-root", default=None, help="image folder (default: beside the annotation file)")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="on a bad entry or unreadable image: stop (raise) or leave it out with a warning (skip)")
    if split is not None:
        p.add_argument("--split", default=split, help=f"which split (default: {split})")


@dataclass(frozen=True)
class TrainCommand:
    """One ``genret train`` subcommand: its inputs and switches (its settings come from its config dataclass; every
    one takes ``--resume``, as every trainer runs on the engine)."""

    name: str
    help: str
    config: str  # "module:ConfigClass", its settings
    run: Callable[[argparse.Namespace, Any], dict]  # calls the trainer with the parsed inputs and settings
    inputs: tuple[tuple[str, dict], ...]  # (flag, add_argument keywords), beside the common data arguments
    out: str = "adapter folder to write"
    data: bool = True  # --data / --image-root / --on-error
    json: bool = True
    overwrite: bool = True  # grace-add has its own --overwrite setting (may replace its parent)
    formats: tuple[str, ...] = ("genret.rerank_adapter", "genret.train_run")  # what --out may already hold

    def config_class(self) -> type:
        """The settings dataclass (imported when asked for)."""
        from importlib import import_module

        module, name = self.config.split(":")
        return getattr(import_module(module), name)


def _val(dataset):
    return dataset.split("val") if any(r.split == "val" for r in dataset.records) else None


def _held_out(dataset):
    """The records of every split no trainer learns from (val, test): what a trainer drawing images must not draw."""
    from dataclasses import replace

    from genret.data.dataset import TRAIN_SPLITS

    return replace(dataset, records=tuple(r for r in dataset.records if r.split not in TRAIN_SPLITS))


def _run_clip(args, config) -> dict:
    from genret.training.clip import train_clip

    data = _load_data(args)
    return train_clip(data.split("train"), args.out, config, val=_val(data), progress=not args.quiet, resume=args.resume,
                      held_out=_held_out(data))


def _run_clip_dialog(args, config) -> dict:
    from genret.training.dialog_clip import train_dialog_clip

    data = _load_data(args)
    return train_dialog_clip(args.clip, data.split("train"), args.out, config, val=_val(data),
                             progress=not args.quiet, resume=args.resume)


def _run_mllm(args, config) -> dict:
    from genret.training.mini_mllm import MiniMLLMConfig
    from genret.training.pretrain_mllm import pretrain_mllm

    data = _load_data(args)
    held_out = _held_out(data)
    given = {k: getattr(args, k) for k in ("hidden_size", "layers", "heads", "intermediate_size", "image_features",
                                    "vision_layer", "interface")
             if getattr(args, k) is not None}
    # --init: the checkpoint's architecture (options given are checked against it); else the defaults and these.
    from genret.training.pretrain_mllm import saved_arch

    arch = MiniMLLMConfig(**{**(saved_arch(config.init) if config.init else {}), **given})
    return pretrain_mllm(args.clip, data.split("train"), args.out, config, arch, val=_val(data),
                         progress=not args.quiet, resume=args.resume, held_out=held_out)


def _run_rerank(args, config) -> dict:
    from genret.training.rerank import train_rerank

    data = _load_data(args)
    return train_rerank(args.base, data.split("train"), args.out, config, prefilter=args.clip, val=_val(data),
                        resume=args.resume, progress=not args.quiet, held_out=_held_out(data))


def _run_rewriter(args, config) -> dict:
    from genret.data import load_dataset
    from genret.data.cir import load_cir
    from genret.training.rewriter import train_rewriter

    held_out = None
    if config.task == "cirevl":
        train = load_cir(args.data, args.split, image_root=args.image_root)
        val = load_cir(args.data, args.val_split, image_root=args.image_root) if args.val_split else None
        if config.scene_edits:  # every split but the one trained on: their scenes are never learnt as targets
            held_out = [load_cir(args.data, s, image_root=args.image_root) for s in ("val", "test") if s != args.split]
    else:
        train = load_dataset(args.data, image_root=args.image_root)
        val = train if args.val_split else None
    return train_rewriter(args.base, train, args.out, config, val=val, prefilter=args.clip, resume=args.resume,
                          progress=not args.quiet, held_out=held_out)


def _run_grace(args, config) -> dict:
    from genret.training.grace import train_grace

    return train_grace(args.base, _load_data(args), args.out, config, prefilter=args.clip, resume=args.resume,
                       progress=not args.quiet)


def _run_grace_add(args, config) -> dict:
    from genret.training.grace_add import add_images

    return add_images(args.adapter, _load_data(args), args.out, config, prefilter=args.clip, resume=args.resume,
                      progress=not args.quiet)


_BASE = ("--base", {"required": True, "help": "the MLLM to adapt: a local directory or Hugging Face id"})
TRAIN_COMMANDS = (
    TrainCommand("clip", "train a mini CLIP contrastively", "genret.training.clip:CLIPTrainConfig", _run_clip, (), out="checkpoint folder to write",
                 formats=("genret.clip", "genret.train_run")),
    TrainCommand("clip-dialog", "fine-tune a CLIP's text tower on the simulated users' dialogs about the training "
                 "images (ChatIR's dialog-trained retriever; the image side and its index stay as they are)",
                 "genret.training.dialog_clip:DialogCLIPConfig", _run_clip_dialog,
                 (("--clip", {"required": True, "help": "the CLIP checkpoint whose text tower is fine-tuned"}),),
                 out="checkpoint folder to write", formats=("genret.clip", "genret.train_run")),
    TrainCommand("mllm", "build and pretrain the mini MLLM (LLaVA or Qwen2-VL on a mini CLIP's vision tower)",
                 "genret.training.pretrain_mllm:PretrainConfig", _run_mllm,
                 (("--clip", {"required": True, "help": "the mini CLIP checkpoint whose vision tower it uses"}),
                  ("--interface", {"choices": ("llava", "qwen2_vl"), "default": None,
                                   "help": "how the language model reads the image: llava (LLaVA-1.5, the default: "
                                           "projected patch tokens in raster order, 1-D positions) or qwen2_vl "
                                           "(Qwen2-VL: 2 x 2 merged patches, multimodal RoPE gives each its row and "
                                           "column; the tower starts from the CLIP's blocks, without their absolute positions, and trains at "
                                           "--vision-lr-scale, best at the default 0.1 in docs/benchmarks.md)"}),
                  ("--image-features", {"choices": ("default", "full"), "default": None,
                                        "help": "what of the vision tower the language model reads: default, the "
                                                "patch tokens (LLaVA-1.5); full, the class token too"}),
                  ("--vision-layer", {"type": int, "default": None,
                                      "help": "the tower's hidden state the projector reads (default -1, the last; "
                                              "LLaVA-1.5 reads -2)"}),
                  ("--hidden-size", {"type": int, "default": None, "help": "the language model's width (default 128)"}),
                  ("--layers", {"type": int, "default": None, "help": "the language model's layers (default 4)"}),
                  ("--heads", {"type": int, "default": None, "help": "attention heads (default 4)"}),
                  ("--intermediate-size", {"type": int, "default": None, "help": "MLP width (default 512)"})),
                 out="checkpoint folder to write", formats=("genret.mini_mllm", "genret.train_run")),
    TrainCommand("rerank", "LoRA/QLoRA fine-tune an MLLM reranker on the prefilter's hard negatives",
                 "genret.training.rerank:RerankTrainConfig", _run_rerank,
                 (_BASE, ("--clip", {"required": True, "help": "the prefilter's dual encoder (checkpoint directory or "
                                                               "id) that mines hard negatives"})),
                 out="adapter folder to write (checkpoints go under OUT/checkpoints)"),
    TrainCommand("rewriter", "text LoRAs of the rewrite stages: cirevl (caption + modification -> target), chat "
                 "(dialog -> next question), eiirwqr (query + marked captions -> target)",
                 "genret.training.rewriter:RewriterTrainConfig", _run_rewriter,
                 (("--data", {"required": True, "help": "cirevl: CIRR/CIRCO folder (or the miniature world's); chat, "
                                                        "eiirwqr: the miniature world (images with scenes)"}),
                  ("--clip", {"default": None, "help": "eiirwqr: the prefilter that retrieves the shown results"}),
                  ("--split", {"default": "train", "help": "training split (default: train)"}),
                  ("--val-split", {"default": "val", "help": "split for the exact-match check ('' : none)"}),
                  ("--image-root", {"default": None, "help": "image folder, when not where the layout puts it"}),
                  ("--base", {"required": True, "help": "the MLLM to adapt (it also captions the references)"})),
                 data=False),
    TrainCommand("grace", "GRACE: teach an MLLM a gallery's image identifiers (memorise + retrieve)",
                 "genret.training.grace:GraceTrainConfig", _run_grace,
                 (_BASE, ("--clip", {"default": None, "help": "the prefilter's dual encoder: structured ids, new-row "
                                                              "initialisation"}))),
    TrainCommand("grace-add", "add images to a trained GRACE adapter (short pass with replay; reports what the old "
                 "images lose)", "genret.training.grace_add:GraceAddConfig", _run_grace_add,
                 (("--adapter", {"required": True, "help": "the GRACE adapter to grow (only read)"}),
                  ("--clip", {"default": None, "help": "the prefilter's dual encoder: new rows, structured placement"})),
                 out="adapter folder to write (the grown adapter)", overwrite=False,
                 formats=("genret.rerank_adapter", "genret.train_run")),
)


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="write into an output folder that holds other files (they are kept) or another kind of "
                        "genret artefact (its files are replaced)")


# What each command writes to its output folder: the genret artefacts it may replace there.
OUT_FORMATS = {**{("train", c.name): c.formats for c in TRAIN_COMMANDS}, ("index", "build"): ("genret.pipeline",),
               ("data", "synth"): ("genret.world",), ("eval", None): ("genret.eval_report",)}
def _check_out(args: argparse.Namespace, key: tuple) -> None:
    """Before any work: refuse an output folder that writing would damage (a file, ``.``, an input, user files)."""
    from genret._inputs import command_inputs
    from genret._swap import check_output_dir, overwrite_allowed

    if key not in OUT_FORMATS or not getattr(args, "out", None):
        return
    inputs = command_inputs(args)
    if not args.overwrite:
        check_output_dir(args.out, OUT_FORMATS[key], inputs=inputs)
        return
    if getattr(args, "adapter", None):  # grace-add --overwrite: the grown adapter may replace its parent
        inputs = [i for i in inputs if i != Path(args.adapter).resolve()]
    with overwrite_allowed(args.out):
        check_output_dir(args.out, OUT_FORMATS[key], inputs=inputs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from genret.world.synth import SynthConfig

    parser = argparse.ArgumentParser(prog="genret", description="Image-text retrieval with multimodal LLMs.")
    parser.add_argument("--version", action="version", version=f"genret {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="generate the miniature world (Karpathy format, and CIR triplets in cirr/)")
    synth.add_argument("out", help="output folder")
    _add_overwrite(synth)
    add_arguments(synth, SynthConfig)

    train = sub.add_parser("train", help="training").add_subparsers(dest="train_command", required=True)
    for command in TRAIN_COMMANDS:
        p = train.add_parser(command.name, help=command.help)
        if command.data:
            _add_data_args(p)
        for flag, kwargs in command.inputs:
            p.add_argument(flag, **kwargs)
        p.add_argument("--out", required=True, help=command.out)
        if command.overwrite:
            _add_overwrite(p)
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
        config = command.config_class()
        p.add_argument("--config", default=None, help=f"TOML/YAML file of {config.__name__} settings")
        if command.json:
            p.add_argument("--json", action="store_true", help="print the manifest (config, history, metrics) as JSON")
        add_arguments(p, config)

    index = sub.add_parser("index", help="indexes").add_subparsers(dest="index_command", required=True)
    build = index.add_parser("build", help="embed a dataset split and save a searchable pipeline")
    build.add_argument("pipeline", help="pipeline file (TOML/YAML) or an encoder model directory/id")
    _add_data_args(build, split="test")
    build.add_argument("--out", required=True, help="pipeline folder to write")
    _add_overwrite(build)
    build.add_argument("--factory", default=None, help="faiss factory string (overrides the pipeline file)")
    build.add_argument("--build-params", default=None,
                       help="faiss parameters set before adding, e.g. efConstruction=200 for HNSW (a better graph: "
                            "a lower efSearch reaches the same recall; the build takes longer)")
    build.add_argument("--shards", type=POSITIVE_INT, default=None,
                       help="split the index between this many faiss files")
    build.add_argument("--chunk-size", type=POSITIVE_INT, default=None,
                       help="items embedded and added at a time (default 65536; an IVF/PQ index trains on the first)")

    tune = index.add_parser("tune", help="choose an approximate index's efSearch / nprobe for a recall target")
    tune.add_argument("pipeline", help="a folder written by `genret index build` (its index manifests are updated)")
    tune.add_argument("--recall", type=number_arg(float, Range(0, 1, lo_open=True)), default=0.95,
                      help="recall@k to reach (default: 0.95)")
    tune.add_argument("-k", "--k", type=POSITIVE_INT, default=10, help="the k of recall@k (default: 10)")
    tune.add_argument("--confidence", type=number_arg(float, Range(0.5, 1, hi_open=True)), default=0.95,
                      help="reach the target with this one-sided confidence over the sample of queries (default: "
                           "0.95; 0.5 judges by the sample's mean alone)")
    tune.add_argument("--queries", type=POSITIVE_INT, default=1000, help="queries to tune on (default: 1000)")
    tune.add_argument("--modality", choices=("image", "text", "both"), default="both", help="which index (default: both)")
    tune.add_argument("--dry-run", action="store_true", help="measure and report, change nothing")
    tune.add_argument("--json", action="store_true", help="print the measurements as JSON")

    search = sub.add_parser("search", help="search a saved pipeline")
    search.add_argument("pipeline", help="a folder written by `genret index build`")
    search.add_argument("text", nargs="?", help="the text query (searches images)")
    search.add_argument("--image", default=None, help="an image query (searches captions)")
    search.add_argument("-k", "--k", type=POSITIVE_INT, default=10, help="results to show (default: 10)")
    search.add_argument("--instruction", default=None,
                        help="the task instruction of a pointwise reranker checkpoint's prompt (Qwen3-VL-Reranker's "
                             "<Instruct>); default: the rerank stage's")
    search.add_argument("--json", action="store_true", help="print JSON")

    ev = sub.add_parser("eval", help="evaluate a pipeline on a dataset split")
    ev.add_argument("pipeline", help="saved pipeline folder, pipeline file, or encoder model directory/id")
    _add_data_args(ev, split="test")
    ev.add_argument("--directions", default="t2i,i2t", help="t2i, i2t or both (default: t2i,i2t)")
    ev.add_argument("--task", choices=("retrieval", "cir", "dialog"), default="retrieval",
                    help="retrieval (Karpathy/JSONL data); cir: composed retrieval on a CIRR/CIRCO folder (or the "
                         "miniature world's cirr/); dialog: rounds of a chat or eiirwqr stage, each image a target")
    ev.add_argument("--limit", type=POSITIVE_INT, default=None, help="cir/dialog: evaluate only the first N queries")
    ev.add_argument("--rounds", type=POSITIVE_INT, default=None,
                    help="dialog: rounds after round 0 (default: the stage's)")
    ev.add_argument("--hits-k", type=POSITIVE_INT, default=10, help="dialog: K of the cumulative Hits@K (default: 10)")
    ev.add_argument("--out", default=None, help="folder for report.json, report.md and recall.png (checked before "
                    "the evaluation starts)")
    _add_overwrite(ev)
    ev.add_argument("--json", action="store_true", help="print the report as JSON")

    ver = sub.add_parser("verify", help="check saved artefacts fully: every file their manifests list, by its whole "
                         "content's SHA-256")
    ver.add_argument("path", help="an artefact folder (pipeline, index, adapter, model, world, report) or a folder "
                     "holding some")
    ver.add_argument("--json", action="store_true", help="print one record per artefact as JSON")

    serve = sub.add_parser("serve", help="serve a saved pipeline over HTTP: /v1/search, /v1/rerank, /score, /v1/embeddings, "
                           "a results page at / (needs the serve extra: pip install 'genret[serve]')")
    serve.add_argument("pipeline", help="a saved pipeline folder (genret index build), or a pipeline file")
    _serve_options(serve)

    demo = sub.add_parser("demo", help="the miniature world end to end: data, prefilter, zero-shot and LoRA rerank, evaluation")
    demo.add_argument("--out", default="demo-out", help="working folder (default: demo-out)")
    demo.add_argument("--fresh", action="store_true", help="redo every step instead of reusing earlier outputs")
    demo.add_argument("--train-clip", action="store_true", help="train the mini CLIP here (5 min) instead of using the shipped one")
    demo.add_argument("--no-rerank", action="store_true", help="the prefilter alone (trains the mini CLIP; no MLLM)")
    demo.add_argument("--no-rewrite", action="store_true", help="skip the query-rewriting part (composed and "
                      "interactive retrieval, a few minutes)")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _serve_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`genret.serve.settings.ServeConfig` field (its default, help and bounds, checked as the
    command line is read); the API key only from the environment or a file."""
    import dataclasses

    from genret.serve.settings import KEY_ENV, ServeConfig

    for f in dataclasses.fields(ServeConfig):
        if f.metadata.get("cli", True):
            parser.add_argument("--" + f.name.replace("_", "-"), type=_serve_value(f), default=f.default,
                                help=f"{f.metadata['help']} (default: {f.default!r})")
    parser.add_argument("--api-key-file", default=None, metavar="FILE",
                        help=f"read the API key from FILE (default: ${KEY_ENV} when set; without either, no key)")
    parser.add_argument("--api-key-env", default=None, metavar="NAME",
                        help=f"read the API key from this environment variable instead of ${KEY_ENV}")
    parser.add_argument("--api-key", action=_RefuseKey, help=argparse.SUPPRESS)


class _RefuseKey(argparse.Action):
    """``--api-key VALUE`` is refused: a key on the command line is visible to every user of the machine (ps)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("--api-key: a key on the command line is visible to every user of this machine (ps); set "
                     "GENRET_API_KEY or use --api-key-file FILE")


def _serve_value(f):
    """An argparse type for one ServeConfig field: a number of its declared range, or a host."""
    from genret.config import number_arg
    from genret.serve.settings import check_host

    if f.name != "host":
        return number_arg(type(f.default), f.metadata.get("range"))

    def host(text: str) -> str:
        try:
            check_host(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    return host


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from genret.serve.settings import KEY_ENV, ServeConfig, is_loopback, read_api_key

    try:
        import uvicorn

        from genret.serve.app import create_app
    except ImportError as err:
        raise RuntimeError(f"genret serve needs its extra ({err.name} is missing): pip install 'genret[serve]'") from None
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig) if f.metadata.get("cli", True)}
    values["api_key"] = read_api_key(args.api_key_file, env_name=args.api_key_env or KEY_ENV,
                                     env_required=bool(args.api_key_env))
    config = ServeConfig(**values)
    if not config.api_key and not is_loopback(config.host):
        raise ValueError(f"--host {config.host} exposes the service to the network: set {KEY_ENV} or --api-key-file "
                         "FILE, or bind 127.0.0.1")
    pipe = _open_pipeline(args.pipeline)
    if not pipe.gallery.indexes:
        raise ValueError(f"{args.pipeline}: the pipeline has no index; build one first (genret index build)")
    print(f"genret serve: {pipe.config.name} on http://{config.host}:{config.port}/ "
          f"({'API key required' if config.api_key else 'no API key'}; schema at /openapi.json)", file=sys.stderr)
    uvicorn.run(create_app(pipe, config), host=config.host, port=config.port, log_level="warning" if args.quiet else "info")
    return 0


def _load_data(args: argparse.Namespace):
    from genret.data import load_dataset

    return load_dataset(args.data, image_root=args.image_root, on_error=args.on_error)


def _open_pipeline(ref: str):
    """A saved pipeline folder, a pipeline file, or an encoder model (prefilter-only pipeline)."""
    from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline

    path = Path(ref)
    if (path / "manifest.json").is_file() and (path / "pipeline.toml").is_file():
        return RetrievalPipeline.load(path)
    if path.is_file():
        return RetrievalPipeline.from_config(path)
    if not path.exists() and path.suffix in (".toml", ".yaml", ".yml"):
        raise FileNotFoundError(f"pipeline file not found: {ref}")
    return RetrievalPipeline.from_config(PipelineConfig(name=path.name, encoder=EncoderConfig(model=ref)))


def cmd_data_synth(args: argparse.Namespace) -> int:
    from genret.world.synth import SynthConfig, generate_world

    config = merge_arguments(SynthConfig, args)
    path = generate_world(args.out, config, progress=not args.quiet)
    print(f"wrote {path}")
    if (path.parent / "cirr").is_dir():
        print(f"wrote {path.parent / 'cirr'} (composed-retrieval triplets, CIRR layout)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Every ``genret train`` subcommand: its row of :data:`TRAIN_COMMANDS`, then the one summary renderer."""
    from genret.training.summary import TrainSummary

    command = next(c for c in TRAIN_COMMANDS if c.name == args.train_command)
    config = merge_arguments(command.config_class(), args, args.config)
    try:
        summary = command.run(args, config)
    except ImportError as err:  # an optional package the settings need (bitsandbytes for --load-in-4bit)
        raise ValueError(str(err)) from None
    if not _handled(args, summary):
        print(TrainSummary.from_manifest(summary).render(args.out))
    return 0


def _handled(args: argparse.Namespace, summary: dict) -> bool:
    """Nothing more to print: another training process (only the main one reports), or ``--json`` (printed here)."""
    if _other_process():
        return True
    if getattr(args, "json", False):
        print(to_json(summary))
        return True
    return False


def _other_process() -> bool:
    """Under torchrun / accelerate launch: a process other than the main one (it trains, prints nothing)."""
    return int(os.environ.get("RANK", "0")) != 0


def cmd_index_build(args: argparse.Namespace) -> int:
    """Under torchrun / accelerate launch every process embeds its share; the main one merges, builds and saves."""
    import tempfile

    from genret._io import TMP_MARK
    from genret.index.build import WORK_MARK, Share, clear

    share, state = Share(), None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        # Joins the process group (gloo on CPU: accelerate only goes multi-process on a CPU when told cpu=True);
        # on a GPU machine each process takes its own device.
        state = PartialState(cpu=not torch.cuda.is_available())
        out = Path(args.out).resolve()
        run = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT", "0")  # the same in every process
        work = out.with_name(f".{out.name}.genret-parts-{run}")  # genret's own marked name, never a user's folder
        if state.is_main_process:
            clear(work)  # a killed build's leftovers (only a folder genret marked as its work folder)
            made = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}", dir=out.parent))
            (made / WORK_MARK).write_text("genret index build: parts of a build split between processes\n")
            os.rename(made, work)  # marked before it takes the shared name: a kill leaves no unmarked work folder
        state.wait_for_everyone()
        share = Share(state.process_index, state.num_processes, state.wait_for_everyone, work)
    pipe = _open_pipeline(args.pipeline)
    for key in ("factory", "build_params", "shards", "chunk_size"):
        if getattr(args, key) is not None:
            setattr(pipe.config.index, key, getattr(args, key))
    pipe.config.index.__post_init__()
    data = _load_data(args).split(args.split)
    start = time.perf_counter()
    pipe.index(data, on_error=args.on_error, progress=not args.quiet and share.main, share=share)
    if share.main:
        pipe.save(args.out)
        sizes = ", ".join(f"{len(ix)} {m}s" for m, ix in pipe.gallery.indexes.items())
        cfg = pipe.config.index
        where = cfg.factory if cfg.backend == "faiss" else f"qdrant at {cfg.url or 'local memory'}"
        print(f"saved {args.out}: {sizes} ({where}; {share.world} process(es), "
              f"{time.perf_counter() - start:.1f} s)")
        if share.work is not None:
            clear(share.work)
    if state is not None:
        state.wait_for_everyone()  # the others leave once the index is saved
    return 0


def cmd_index_tune(args: argparse.Namespace) -> int:
    """Queries: a sample of the other modality's gallery vectors (the queries that index answers)."""
    import numpy as np

    from genret.index.gallery import FOLDERS, Gallery
    from genret.index.tune import record, tunable, tune

    from genret._io import read_manifest
    from genret._swap import atomic_update
    from genret.pipeline import FORMAT, VERSION

    folder = Path(args.pipeline) / "gallery"
    if not (folder / "gallery.json").is_file():
        raise FileNotFoundError(f"{args.pipeline}: no gallery/gallery.json; build the index first (genret index build)")
    read_manifest(args.pipeline, FORMAT, VERSION, "pipeline")  # its files as saved
    gallery = Gallery.load(folder)
    if args.queries < 1 or args.k < 1:
        raise ValueError(f"--queries and -k must be at least 1, got {args.queries} and {args.k}")
    modalities = sorted(gallery.indexes) if args.modality == "both" else [args.modality]
    report, chosen = [], {}
    for modality in modalities:
        index = gallery.index(modality)
        if index.factory == "qdrant":
            report.append({"modality": modality, "factory": index.factory, "note": "a Qdrant collection: its HNSW "
                           "is tuned on the server; set search_params = \"hnsw_ef=N\" in the pipeline file"})
            continue
        if tunable(index) is None:
            report.append({"modality": modality, "factory": index.factory, "note": "exact index: nothing to tune"})
            continue
        other = "text" if modality == "image" else "image"
        source = gallery.indexes.get(other, index)
        pick = np.random.default_rng(0).choice(len(source), min(args.queries, len(source)), replace=False)
        queries = source.reconstruct([source.ids[i] for i in sorted(pick)])
        what = f"{len(queries)} {source.modality or other} vectors" + ("" if source is not index else
                                                                       " of the index itself (optimistic)")
        bar = None if args.quiet or args.json else (lambda p, v, r, ms: print(f"  {modality}: {p}={v} recall@{args.k} "
                                                                               f"{r:.3f} {ms:.2f} ms/query", file=sys.stderr))
        result = tune(index, queries, k=args.k, target=args.recall, progress=bar, confidence=args.confidence)
        chosen[modality] = (result, what)
        report.append({"modality": modality, "factory": index.factory, "queries": what, "search_params":
                       result.search_params, "recall": round(result.recall, 4), "target": args.recall,
                       "lower_bound": round(result.lower, 4), "confidence": args.confidence,
                       "reached": result.lower >= args.recall, "tried": result.rows})
    if chosen and not args.dry_run:  # the pipeline changes as a whole: its manifest lists the new index manifests
        with atomic_update(args.pipeline, (FORMAT,)) as tmp:
            for modality, (result, what) in chosen.items():
                record(tmp / "gallery" / FOLDERS[modality], result, what)
    if args.json:
        print(to_json(report))
        return 0
    for r in report:
        if "note" in r:
            print(f"{r['modality']} index ({r['factory']}): {r['note']}")
            continue
        verdict = "reaches" if r["reached"] else "does NOT reach"
        print(f"{r['modality']} index ({r['factory']}): {r['search_params']} {verdict} recall@{args.k} {args.recall} "
              f"with confidence {r['confidence']} ({r['recall']:.3f}, lower bound {r['lower_bound']:.3f}, "
              f"{r['queries']}){'' if args.dry_run else '; saved in its manifest'}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from genret.data.images import load_image
    from genret.types import Query

    if (args.text is None) == (args.image is None):
        raise ValueError("give either a text query or --image PATH (not both)")
    if args.image is not None:
        load_image(args.image)  # a clear error before any model work
        query = Query(id="query", image=args.image, instruction=args.instruction)
    else:
        if not args.text.strip():
            raise ValueError("the text query is empty")
        query = Query(id="query", text=args.text, instruction=args.instruction)
    pipe = _open_pipeline(args.pipeline)
    if args.k < 1:
        raise ValueError(f"--k must be at least 1, got {args.k}")
    result = pipe.answer(query, k=args.k)
    if result.note:
        print(f"genret: note: {result.note}", file=sys.stderr)
    print(to_json(result.to_dict()) if args.json else result.render())
    return 0


def _print_report(report: dict, as_json: bool) -> None:
    from genret.eval.report import render_text

    print(to_json(report) if as_json else render_text(report))


def cmd_eval(args: argparse.Namespace) -> int:
    from genret.eval.evaluator import evaluate
    from genret.eval.report import write_report

    pipe = _open_pipeline(args.pipeline)
    if args.task == "cir":
        from genret.data.cir import load_cir
        from genret.eval.composed import evaluate_composed

        cir = load_cir(args.data, args.split, image_root=args.image_root, on_error=args.on_error)
        report = evaluate_composed(pipe, cir, progress=not args.quiet, limit=args.limit)
    elif args.task == "dialog":
        from genret.eval.interactive import evaluate_dialog

        report = evaluate_dialog(pipe, _load_data(args), split=args.split, rounds=args.rounds, k=args.hits_k,
                                 limit=args.limit, progress=not args.quiet)
    else:
        directions = [d.strip() for d in args.directions.split(",") if d.strip()]
        report = evaluate(pipe, _load_data(args), split=args.split, directions=directions, progress=not args.quiet)
    if args.out:
        write_report(report, args.out)
        logger.info("wrote %s/report.json and report.md", args.out)
    _print_report(report, args.json)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit status 0 when every artefact found checks out, 1 when one does not, 2 when none is found."""
    from genret._io import verify

    if not Path(args.path).is_dir():
        raise FileNotFoundError(f"{args.path}: no such folder")
    records = verify(args.path)
    if not records:
        raise FileNotFoundError(f"{args.path}: no genret artefact here (no manifest.json, genret.json or "
                                "trainer_state.json with a format)")
    if args.json:
        print(to_json(records))
    else:
        for r in records:
            state = f"ok     {r['files']} files" if r["error"] is None else f"FAILED {r['error']}"
            print(f"{r['folder']}  [{r['format']}]  {state}")
    bad = sum(r["error"] is not None for r in records)
    if not args.json:
        print(f"{len(records)} artefacts, {bad} failed" if bad else f"{len(records)} artefacts, all as saved")
    return 1 if bad else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from genret.world.demo import run_demo

    report = run_demo(Path(args.out), fresh=args.fresh, progress=not args.quiet, train_clip_here=args.train_clip,
                      rerank=not args.no_rerank, rewrite=not args.no_rewrite)
    _print_report(report, args.json)
    if not args.json:
        print(f"\nreport: {Path(args.out) / 'report' / 'report.md'}")
    return 0


COMMANDS = {
    ("data", "synth"): cmd_data_synth, **{("train", c.name): cmd_train for c in TRAIN_COMMANDS}, ("index", "build"): cmd_index_build,
    ("index", "tune"): cmd_index_tune,
    ("search", None): cmd_search, ("eval", None): cmd_eval, ("demo", None): cmd_demo,
    ("serve", None): cmd_serve, ("verify", None): cmd_verify,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``genret`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        force=True)
    for noisy in ("sentence_transformers", "accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. the note that torchvision is absent: PIL processors are used
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sub = getattr(args, f"{args.command}_command", None)
    from genret.data.images import ImageLoadError

    from contextlib import nullcontext

    from genret._swap import overwrite_allowed

    try:
        _check_out(args, (args.command, sub))
        with overwrite_allowed(args.out) if getattr(args, "overwrite", False) else nullcontext():
            return COMMANDS[(args.command, sub)](args)
    except (*USER_ERRORS, ImageLoadError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"genret: error: {msg}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system said no (permissions, a full disk, another device): say which file
        where = f"{err.filename}: " if err.filename else ""
        print(f"genret: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: no traceback; what was saved stays (every write is atomic)
        print("genret: interrupted; nothing half-written was kept (a training run resumes with --resume)",
              file=sys.stderr)
        return 130
    finally:
        from genret.training.distributed import close_process_group

        close_process_group()


if __name__ == "__main__":
    sys.exit(main())
