"""Run configuration: defaults < YAML file (``--config``) < command line.

Option names follow the reference implementation where it has them (batch_size,
max_words, max_frames, mb_batch, centrality_scale, num_neighbors, temperature, beta, lr,
coef_lr, epochs, ...). With no arguments the run is the embedded default: the tiny model on
the synthetic dataset, sized to finish on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import logging
import os
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from nbretr.models.neighborretr import NeighborRetrConfig

log = logging.getLogger("nbretr")


@dataclass
class TrainConfig(NeighborRetrConfig):
    """A run's options: every field of the model's :class:`NeighborRetrConfig` (the method's
    losses, the architecture, the tiny CLIP; the reference's defaults, declared once there) and
    the data, optimisation and run fields below. A few model fields get run defaults here:
    ``image_size`` (None: 224 with CLIP, the synthetic frame size otherwise), ``backend``;
    ``cluster_mlp``, ``gather_reduce_grads`` and ``grad_world_size`` come from the recipe
    (:data:`RECIPES`); ``vocab_size`` is taken from the tokenizer. Fields that default to
    None here are filled by the recipe and the dataset's values (:func:`resolve_config`)."""
    # recipe: which training pipeline (docs/recipes.md); None: reference on the standard
    # datasets, nbretr (with the "embedded" preset) on the embedded dataset
    recipe: str | None = None
    preset: str | None = None              # "embedded" or "none"; None: embedded on the synthetic set
    # data
    dataset: str = "synthetic"
    data_root: str | None = None          # default: $NBRETR_DATA or data/synthetic
    synthetic_size: str = "default"
    train_split: str | None = None         # e.g. msrvtt "9k" / "7k"
    video_framerate: float = 1.0
    image_size: int | None = None          # default: the synthetic frame size for the tiny CLIP on the
                                           # synthetic set (its videos' size), else 224
    num_workers: int = 2
    strict_data: bool = False
    video_dir: str | None = None           # video folder (absolute or under data_root; searched recursively)
    allow_missing: bool = False            # go on when over 1% of a split's videos are missing
    frame_sampling: str | None = None      # first (the released code) | uniform
    didemo_window: str = "0,31"            # DiDeMo: seconds sampled, "first,last" (the released code's
                                           # 0,31) or "whole"
    augment: str | None = None             # randaugment (the released code, training videos) | none
    decoder: str = "auto"                  # video decoder: auto (fastest installed) | torchcodec | decord | pyav
    decode_device: str = "cpu"             # cpu | cuda (torchcodec's NVDEC decoding; unverified on a GPU)
    # model
    cluster_mlp: bool | None = None        # the released TCBlock has none (False)
    clip_weights: str | None = None        # auto (fp16 on CUDA, the released code) | fp16 | fp32
    freeze_patch_embed: bool | None = None # the released code freezes CLIP's patch-embedding conv
    freeze_clip_layers: int = -1           # -1: none (the reference); N >= 0: CLIP's embeddings and first N
                                           # blocks of both towers (CLIP4Clip's --freeze_layer_num)
    clip: str = "tiny"                     # tiny-pretrained (the pretrained stand-in, embedded default), tiny
                                           # (random weights), or ViT-B/32, ViT-B/16 with --clip-path
    tokenizer_path: str | None = None      # CLIP BPE vocabulary for OpenAI .pt archives
    init_model: str | None = None          # start from an exported model folder (python -m nbretr.export)
    # memory bank: batches encoded into the bank before training (the reference's mb_batch)
    mb_batch: int = 10
    # optimisation
    epochs: int = 5
    batch_size: int = 128                  # global batch (all ranks together)
    batch_size_val: int = 256
    lr: float = 1e-4
    coef_lr: float = 1e-3
    weight_decay: float = 0.2
    warmup_proportion: float = 0.1
    optimizer: str = "bertadam"
    decay_exempt: str | None = None        # bias (the released code) | 1d
    reshuffle: bool | None = None          # a new order each epoch (the released loader: never)
    sampler: str | None = None             # reference (DistributedSampler batches) | nbretr
    max_grad_norm: float = 1.0
    amp: str = "auto"                      # auto (bf16 on GPU, off on CPU), bf16, fp16, off
    max_steps: int | None = None           # stop after this many steps (tests, smoke runs)
    seed: int = 42
    # run folder, checkpoints, logging
    output_dir: str | None = None          # default: runs/<timestamp>
    save_every: int = 0                    # steps between checkpoints (0: each epoch only)
    resume: str | None = None              # checkpoint file or run folder (its last.pt)
    log_every: int = 10
    report_to: str = "tensorboard"         # comma list of tensorboard, wandb (or "none")
    wandb_project: str = "nbretr"
    wandb_mode: str | None = None          # online | offline (default: offline without a WANDB_API_KEY)
    eval_k: int = 10                       # k of the hubness report
    do_eval: bool = True
    eval_every: int | None = None          # steps between evaluations during training (0: at the end only)
    eval_protocol: str | None = None       # best-of-test (the released code) | held-out
    v2t_ranking: str | None = None         # best-caption (the released code) | per-caption
    print_config: bool = False             # print the resolved options as YAML and exit
    device: str = "auto"
    gather_reduce_grads: bool | None = None  # all-gather backward sums over ranks: DDP gradients equal
                                           # one process's (False: the reference's local slice, 1/W)
    backend: str = "auto"                  # nbretr.ops backend for the whole run (default: $NBRETR_BACKEND or auto)

    def model_config(self, **overrides: Any) -> NeighborRetrConfig:
        """The model's part of this configuration (``overrides`` replace fields)."""
        model_defaults = NeighborRetrConfig()
        values = {f.name: getattr(self, f.name) for f in fields(NeighborRetrConfig)}
        for name, v in values.items():  # a recipe field left unset: the model's own default
            if v is None and name in RECIPE_FIELDS:
                values[name] = getattr(model_defaults, name)
        values.update(overrides)
        return NeighborRetrConfig(**values)


# The embedded default run: the tiny CLIP pretrained on a generated corpus (nbretr.pretrain,
# "the pretrained stand-in") fine-tuned on the synthetic dataset on 2 CPU cores, as the
# paper's recipe fine-tunes CLIP: the reference's lr, coef_lr and weight decay and its loss
# settings (centrality weights with gradient, w_opt 1). What differs is size: the tiny
# model's shapes, a batch of 64, 5 epochs, a 4-batch bank refill, 10 neighbours, 16 words.
EMBEDDED_DEFAULTS: dict[str, Any] = dict(
    clip="tiny-pretrained", batch_size=64, epochs=5, lr=1e-4, coef_lr=1e-3, weight_decay=0.2, mb_batch=4,
    max_words=16, temporal_layers=2, num_neighbors=10, batch_size_val=128, patch_size=8,
)

TINY_CLIPS = ("tiny", "tiny-pretrained")


STANDARD_DATASETS = ("msrvtt", "msvd", "didemo", "activitynet", "coco", "flickr30k")

# The two training pipelines (docs/recipes.md has the table with the reasons). "reference"
# reproduces the released NeighborRetr code; "nbretr" is the corrected pipeline.
RECIPES: dict[str, dict[str, Any]] = {
    "reference": dict(
        frame_sampling="first", augment="none", cluster_mlp=False, clip_weights="auto",
        freeze_patch_embed=True, reshuffle=False, sampler="reference", gather_reduce_grads=False,
        decay_exempt="bias", eval_every=150, eval_protocol="best-of-test", v2t_ranking="best-caption",
        amp="off",
    ),
    "nbretr": dict(
        frame_sampling="uniform", augment="randaugment", cluster_mlp=False, clip_weights="fp32",
        freeze_patch_embed=True, reshuffle=True, sampler="nbretr", gather_reduce_grads=True,
        decay_exempt="1d", eval_every=0, eval_protocol="held-out", v2t_ranking="per-caption",
        amp="auto",
    ),
}

# Per-dataset values of the released commands (its README: MSR-VTT on 4 GPUs, ActivityNet
# on 8); other datasets have no released command and take the parser's defaults. The
# process count is the reference's: its gradient scale (recipe reference) and its batches.
# The released code augments MSR-VTT's training videos only (its other loaders never tell
# the frame extractor that they read the training split): recipe reference follows that.
REFERENCE_DATASET_VALUES: dict[str, dict[str, Any]] = {"msrvtt": dict(augment="randaugment")}
DATASET_VALUES: dict[str, dict[str, Any]] = {
    "msrvtt": dict(batch_size=128, epochs=5, mb_batch=15, max_words=24, max_frames=12),
    "activitynet": dict(batch_size=128, epochs=10, mb_batch=15, max_words=64, max_frames=64),
}
REFERENCE_PROCESSES: dict[str, int] = {"msrvtt": 4, "activitynet": 8}

# The embedded preset: the nbretr pipeline with the values above for the tiny model on 2
# CPU cores, without RandAugment (its 32-pixel clips are drawn, and their captions name
# directions); the clustering without MLP and the frozen patch embedding, as the reference.
EMBEDDED_PIPELINE: dict[str, Any] = dict(augment="none")

CHOICES: dict[str, tuple[str, ...]] = {
    "recipe": tuple(RECIPES), "preset": ("embedded", "none"), "frame_sampling": ("first", "uniform"),
    "augment": ("randaugment", "none"), "clip_weights": ("auto", "fp16", "fp32"),
    "sampler": ("reference", "nbretr"), "decay_exempt": ("bias", "1d"),
    "eval_protocol": ("best-of-test", "held-out"), "v2t_ranking": ("best-caption", "per-caption"),
    "decoder": ("auto", "torchcodec", "decord", "pyav"), "wandb_mode": ("online", "offline"),
}
REPORT_TO = ("tensorboard", "wandb")


def report_targets(text: str | None) -> list[str]:
    """``--report-to``: "tensorboard,wandb" -> ["tensorboard", "wandb"]; "none" or "" -> []."""
    items = [t.strip().lower() for t in str(text or "").split(",") if t.strip()]
    if items == ["none"]:
        return []
    bad = [t for t in items if t not in REPORT_TO]
    if bad:
        raise ValueError(f"--report-to: unknown {', '.join(bad)}; a comma list of {', '.join(REPORT_TO)}, or none")
    return list(dict.fromkeys(items))


def dataset_key(name: str) -> str:
    return str(name).lower().replace("-", "").replace("_", "")


def recipe_values(dataset: str, recipe: str | None, preset: str | None) -> tuple[str, str, dict[str, Any]]:
    """``(recipe, preset, values)`` for ``dataset``: the recipe's pipeline, then the
    dataset's released values (or the embedded preset)."""
    key = dataset_key(dataset)
    if recipe is None:
        recipe = "nbretr" if key == "synthetic" else "reference"
    if recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {tuple(RECIPES)}, got {recipe!r}")
    if preset is None:
        preset = "embedded" if key == "synthetic" else "none"
    if preset not in CHOICES["preset"]:
        raise ValueError(f"--preset must be one of {CHOICES['preset']}, got {preset!r}")
    values = dict(RECIPES[recipe])
    values.update(DATASET_VALUES.get(key, {}))
    if recipe == "reference":
        values.update(REFERENCE_DATASET_VALUES.get(key, {}))
        if key in REFERENCE_PROCESSES:
            values["grad_world_size"] = REFERENCE_PROCESSES[key]
    if preset == "embedded":
        values.update(EMBEDDED_PIPELINE)
        values.update(EMBEDDED_DEFAULTS)
    return recipe, preset, values


def _parse_bool(v: str) -> bool:
    s = str(v).lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


DERIVED = {"vocab_size"}  # set by the run (from the tokenizer), not an option
RECIPE_FIELDS = {k for v in RECIPES.values() for k in v} | {"grad_world_size", "recipe", "preset"}


def _arg_type(hint: Any):
    """int or float where the field's annotation has one (``int | None`` included), else str."""
    args = set(typing.get_args(hint)) or {hint}
    return int if int in args else float if float in args else str


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", type=str, default=None, help="YAML file of options (the command line overrides it)")
    defaults = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in DERIVED:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = "set by the recipe" if default is None and f.name in RECIPE_FIELDS else default
        if f.name in CHOICES:
            shown = f"{shown}; one of {', '.join(CHOICES[f.name])}"
        if isinstance(default, bool) or bool in typing.get_args(hints[f.name]):
            p.add_argument(flag, dest=f.name, type=_parse_bool, nargs="?", const=True, default=None,
                           help=f"(default {shown})")
        else:
            typ = _arg_type(hints[f.name])
            p.add_argument(flag, dest=f.name, type=typ, default=None, help=f"(default {shown})")
            if "_" in f.name:  # the reference's spelling too (--batch_size)
                p.add_argument("--" + f.name, dest=f.name, type=typ, default=None, help=argparse.SUPPRESS)
    return p


# Options that may differ when a run is resumed: where and how it executes, not what it
# computes. Any other option given again with --resume must equal the run's own value.
# grad_checkpointing recomputes the same activations (same gradients, less memory) and the
# decoder options choose how the same frames are read, so both may change; freeze_clip_layers
# changes which parameters train (and the optimiser's groups), so it may not.
RESUME_MUTABLE = frozenset({
    "resume", "output_dir", "data_root", "num_workers", "device", "backend", "log_every",
    "save_every", "max_steps", "do_eval", "eval_k", "batch_size_val", "grad_checkpointing",
    "decoder", "decode_device", "report_to", "wandb_project", "wandb_mode",
})


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def known_fields(values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` without keys that are not options of this version, each dropped key named
    in a warning (a checkpoint or config.yaml written by another version of nbretr)."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        log.warning("%s: ignoring option(s) this version of nbretr does not have: %s", source, unknown)
    return {k: v for k, v in values.items() if k in known}


def resolve_config(args: argparse.Namespace, resumed: dict[str, Any] | None = None,
                   resumed_from: str = "") -> TrainConfig:
    """defaults < embedded-default preset (synthetic only) < YAML < command line.

    With ``resumed`` (the resolved options saved in the checkpoint being resumed) the run's
    own options are restored instead: options given again in the YAML or on the command
    line must equal them, except those in :data:`RESUME_MUTABLE`, which replace them."""
    values: dict[str, Any] = {}
    known = {f.name for f in fields(TrainConfig)}
    yaml_values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config: no such file: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"--config {path}: not valid YAML ({err})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a mapping of option: value, got {type(loaded).__name__}")
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"--config {path}: unknown option(s) {unknown}; known: {sorted(known)}")
        yaml_values = loaded
    cli_values = {k: v for k, v in vars(args).items() if k in known and v is not None}
    given = {**yaml_values, **cli_values}
    if resumed is not None:
        values = known_fields(dict(resumed), f"--resume {resumed_from}")
        conflicts = [f"--{k.replace('_', '-')} {v!r} (the run has {values.get(k)!r})"
                     for k, v in given.items() if k not in RESUME_MUTABLE and not _same(values.get(k), v)]
        if conflicts:
            raise ValueError(
                f"--resume {resumed_from}: a resumed run keeps its own options, but "
                f"{'; '.join(conflicts)}. Options that may change on resume: "
                f"{', '.join('--' + k.replace('_', '-') for k in sorted(RESUME_MUTABLE - {'resume'}))}")
        values.update({k: v for k, v in given.items() if k in RESUME_MUTABLE})
    else:
        dataset = given.get("dataset", TrainConfig.dataset)
        recipe, preset, preset_values = recipe_values(dataset, given.get("recipe"), given.get("preset"))
        values.update(preset_values)
        values.update(given)
        values.update(recipe=recipe, preset=preset)
        if values.get("gather_reduce_grads") and "grad_world_size" not in given:
            values.pop("grad_world_size", None)  # the emulated scale belongs to the local-slice gather
    if "backend" not in given and os.environ.get("NBRETR_BACKEND"):
        values["backend"] = os.environ["NBRETR_BACKEND"]
        if values["backend"] not in ("auto", "ext", "torch"):
            raise ValueError(f"NBRETR_BACKEND={values['backend']!r} is not a backend; use auto, ext or torch")
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.batch_size >= 2, "--batch-size must be >= 2"),
        (cfg.epochs >= 1, "--epochs must be >= 1"),
        (cfg.max_words >= 1 and cfg.max_frames >= 1, "--max-words and --max-frames must be >= 1"),
        (cfg.mb_batch >= 0, "--mb-batch must be >= 0"),
        (cfg.amp in ("auto", "bf16", "fp16", "off"), f"--amp must be auto, bf16, fp16 or off, got {cfg.amp!r}"),
        (cfg.backend in ("auto", "ext", "torch"), f"--backend must be auto, ext or torch, got {cfg.backend!r}"),
        (cfg.freeze_clip_layers >= -1, f"--freeze-clip-layers must be -1 (none) or >= 0, got {cfg.freeze_clip_layers}"),
        (cfg.eval_every is None or cfg.eval_every >= 0, f"--eval-every must be >= 0, got {cfg.eval_every}"),
        (cfg.clip in TINY_CLIPS or cfg.clip_path is not None,
         f"--clip {cfg.clip} needs --clip-path (a local HF CLIP folder or OpenAI .pt archive; nothing is downloaded)"),
        (cfg.clip not in TINY_CLIPS or cfg.clip_path is None,
         f"--clip-path {cfg.clip_path} is given but --clip is {cfg.clip}, the tiny CLIP, which takes no "
         "checkpoint; pass --clip ViT-B/32 or ViT-B/16 with it"),
        (cfg.clip not in TINY_CLIPS or cfg.tokenizer_path is None,
         f"--tokenizer-path {cfg.tokenizer_path} is given but --clip is {cfg.clip}, which uses a word tokenizer"),
        (cfg.clip != "tiny-pretrained" or dataset_key(cfg.dataset) == "synthetic",
         f"--clip tiny-pretrained is pretrained on the embedded dataset's vocabulary; it works with --dataset "
         f"synthetic only, not {cfg.dataset}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    for name, allowed in CHOICES.items():
        value = getattr(cfg, name)
        if value is not None and value not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}")
    report_targets(cfg.report_to)
    if cfg.clip == "tiny-pretrained":  # the stand-in's shapes are fixed: say so rather than ignore an option
        from nbretr.pretrain import ARCH, ARCH_OPTIONS
        bad = [f"--{name.replace('_', '-')} {getattr(cfg, name)} (the stand-in has {ARCH[key]})"
               for name, key in ARCH_OPTIONS.items() if getattr(cfg, name) != ARCH[key]]
        if bad:
            raise ValueError(f"--clip tiny-pretrained is the pretrained stand-in, whose shape is fixed: "
                             f"{'; '.join(bad)}; use --clip tiny for a random tiny CLIP of another shape")
    if cfg.decoder != "auto" or cfg.decode_device != "cpu":  # asked for, and cannot work here: say so now
        from nbretr.data.decoding import resolve_decoder
        resolve_decoder(cfg.decoder, cfg.decode_device)
    if cfg.backend == "ext":
        from nbretr import _ext
        if not _ext.ext_loaded():
            raise ValueError(f"--backend ext: the C++/CUDA extension is not loaded "
                             f"({_ext.ext_unavailable_reason()}); use --backend auto or torch")


def to_yaml(cfg: TrainConfig) -> str:
    values = cfg.to_dict()
    values.pop("print_config", None)
    return yaml.safe_dump(values, sort_keys=False)


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))
