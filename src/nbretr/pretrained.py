"""Portable weights: a trained model as a folder of weights-only safetensors, its
configuration and its tokenizer, readable without the run that trained it.

A model folder (``python -m nbretr.export``) holds:

- ``model.safetensors``: the model's state dict (float32 tensors, nothing pickled);
- ``config.json``: ``format`` ("nbretr-model"), ``version``, ``model`` (every field of
  :class:`~nbretr.models.NeighborRetrConfig`), ``clip_config`` (the transformers
  ``CLIPConfig`` the CLIP tower is built from, so no CLIP checkpoint is needed to load it),
  ``data`` (what the inputs must look like: ``max_words``, ``max_frames``,
  ``video_framerate``, ``frame_sampling``, ``image_size``), ``tokenizer`` (its kind and
  file), ``train_config`` (the run's resolved options, for ``nbretr.eval --init-model``),
  ``fingerprint`` (SHA-256 of ``model.safetensors``) and ``source`` (what it was exported
  from);
- the tokenizer: ``tokenizer.json`` (the tiny model's word tokenizer) or ``tokenizer/``
  (a CLIP BPE tokenizer in the transformers layout).

:func:`load_model` (and ``NeighborRetr.from_pretrained``) reads such a folder; it also
accepts a checkpoint of the released NeighborRetr code (its ``pytorch_model.bin``: the
model's ``state_dict()`` with OpenAI-style CLIP names), converted by
:func:`convert_released_state_dict`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from nbretr.checkpoint import file_sha256

log = logging.getLogger("nbretr")

FORMAT = "nbretr-model"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DATA_FIELDS = ("max_words", "max_frames", "video_framerate", "frame_sampling", "image_size")
# fields of NeighborRetrConfig that change the model's parameters or its outputs: taken from the
# model folder when training or evaluation starts from it (--init-model)
ARCH_FIELDS = ("temporal_layers", "text_cluster_ratio", "video_cluster_ratio", "cluster_k", "cluster_heads",
               "cluster_mlp", "baseline", "vocab_size", "image_size", "clip_width", "clip_layers", "clip_heads",
               "patch_size", "max_logit_scale")


class PretrainedError(ValueError):
    """A model folder or released checkpoint that cannot be read; the message names the file."""


# -- reading ---------------------------------------------------------------------------------

def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file() and (p / WEIGHTS).is_file()


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model folder, checked; errors name the file."""
    d = Path(model_dir)
    if not d.exists():
        raise FileNotFoundError(f"model folder {d} does not exist")
    if not d.is_dir():
        raise PretrainedError(f"{d} is a file, not a model folder (python -m nbretr.export writes one; "
                              "a released pytorch_model.bin is converted with --from-released)")
    cfg_path = d / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"model folder {d} has no {CONFIG}: not an nbretr model folder "
                                "(python -m nbretr.export writes one)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PretrainedError(f"{cfg_path} is not valid JSON ({err})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise PretrainedError(f"{cfg_path} is not an nbretr model config (format {cfg.get('format')!r} "
                              f"if a dict, expected {FORMAT!r})")
    if int(cfg.get("version", 0)) > VERSION:
        raise PretrainedError(f"{cfg_path} has version {cfg['version']}; this nbretr reads up to {VERSION}")
    for key in ("model", "data", "tokenizer"):
        if key not in cfg:
            raise PretrainedError(f"{cfg_path} lacks the key {key!r}")
    if not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"model folder {d} has no {WEIGHTS}")
    return cfg


def fingerprint(model_dir: str | os.PathLike) -> str:
    """SHA-256 of the folder's ``model.safetensors`` (what an index records)."""
    return file_sha256(Path(model_dir) / WEIGHTS)


def _model_config(values: Mapping[str, Any], **overrides):
    from nbretr.models import NeighborRetrConfig
    import dataclasses
    known = {f.name for f in dataclasses.fields(NeighborRetrConfig)}
    dropped = sorted(set(values) - known)
    if dropped:
        log.warning("model config: ignoring field(s) this version of nbretr does not have: %s", dropped)
    kw = {k: v for k, v in values.items() if k in known}
    kw.update(overrides)
    kw["clip_path"] = None
    return NeighborRetrConfig(**kw)


def build_model(config: Mapping[str, Any], clip_config: Mapping[str, Any] | None = None, **overrides):
    """A NeighborRetr with random weights of the architecture ``config`` (a
    NeighborRetrConfig dict) on a CLIP built from ``clip_config`` (None: the tiny CLIP of
    ``config``)."""
    from nbretr.models import NeighborRetr
    from nbretr.models import clip as clip_mod
    mc = _model_config(config, **overrides)
    clip_model = None
    if clip_config is not None:
        tr = clip_mod._transformers()
        clip_model = tr.CLIPModel(tr.CLIPConfig.from_dict(dict(clip_config)))
    return NeighborRetr(mc, clip_model=clip_model)


def _load_weights(model, path: Path) -> None:
    from safetensors.torch import load_file
    try:
        sd = load_file(str(path))
    except Exception as err:  # noqa: BLE001  (header, size and dtype errors all mean "unreadable")
        raise PretrainedError(f"{path} is unreadable (truncated or not safetensors): {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise PretrainedError(f"{path} does not fit the model of its config.json: missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}")


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", tokenizer_path=None,
               **overrides):
    """``(model, tokenizer, config)`` from a model folder, or from a released NeighborRetr
    ``pytorch_model.bin`` (then ``tokenizer_path`` names CLIP's tokenizer: a Hugging Face
    CLIP folder or ``bpe_simple_vocab_16e6.txt.gz``). The model is in eval mode on
    ``device``. ``overrides`` replace runtime fields of the model config (``backend`` ...)."""
    p = Path(path)
    if p.is_file():
        model, meta = load_released(p, **overrides)
        from nbretr.data.tokenizers import load_clip_tokenizer
        tok = load_clip_tokenizer(tokenizer_path) if tokenizer_path is not None else None
        return model.to(device).eval(), tok, meta
    cfg = read_config(p)
    model = build_model(cfg["model"], cfg.get("clip_config"), **overrides)
    _load_weights(model, p / WEIGHTS)
    return model.to(device).eval(), load_tokenizer(p, cfg), cfg


def load_tokenizer(model_dir: str | os.PathLike, cfg: Mapping[str, Any] | None = None):
    from nbretr.data import tokenizers
    d = Path(model_dir)
    cfg = cfg or read_config(d)
    t = cfg["tokenizer"]
    f = d / t["file"]
    if not f.exists():
        raise FileNotFoundError(f"model folder {d}: its tokenizer {f} is missing")
    if t["kind"] == "word":
        return tokenizers.WordTokenizer.load(f)
    if t["kind"] == "clip":
        return tokenizers.load_clip_tokenizer(f)
    raise PretrainedError(f"{d / CONFIG}: unknown tokenizer kind {t['kind']!r}")


# -- writing ---------------------------------------------------------------------------------

def save_pretrained(model, tokenizer, out_dir: str | os.PathLike, *, data: Mapping[str, Any],
                    train_config: Mapping[str, Any] | None = None, source: str = "") -> Path:
    """Write ``model`` (weights only), its config and ``tokenizer`` into the new folder
    ``out_dir``. The folder is assembled beside it and renamed into place, so an interrupted
    export leaves nothing half written; an existing model folder is never overwritten."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"export: {out} already exists and is not empty; choose a new folder "
                              "(an existing model is never overwritten)")
    missing_data = [k for k in DATA_FIELDS if k not in data]
    if missing_data:
        raise ValueError(f"export: data config lacks {missing_data}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        sd = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
              for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if hasattr(tokenizer, "hf"):
            tokenizer.save(tmp / "tokenizer")
            tok = {"kind": "clip", "file": "tokenizer"}
        else:
            tokenizer.save(tmp / "tokenizer.json")
            tok = {"kind": "word", "file": "tokenizer.json"}
        mc = model.config.to_dict()
        mc["clip_path"] = None
        mc["backend"] = None
        cfg = {"format": FORMAT, "version": VERSION, "model": mc, "clip_config": model.clip.config.to_dict(),
               "data": dict(data), "tokenizer": tok, "train_config": dict(train_config or {}),
               "fingerprint": file_sha256(tmp / WEIGHTS), "source": source}
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- the released NeighborRetr code's checkpoints -------------------------------------------------
# Its pytorch_model.bin is ``model.state_dict()`` of its NeighborRetr module: ``clip.*`` (OpenAI CLIP
# names), ``text_weight_fc`` / ``video_weight_fc`` (the WTI token-weight MLPs; the ``*_fc0``,
# ``*_fc1`` and ``*_intra`` MLPs it also builds do not change retrieval: fc1 weighs a single global
# token, whose softmax is 1), ``frame_position_embeddings``, ``transformerClip.resblocks.N`` (the
# temporal transformer, OpenAI block names), ``{text,video}_ctm{0,1}`` and ``{text,video}_block{0,1}``
# (the two clustering rounds; TCBlock has no MLP).

_RELEASED_UNUSED = re.compile(r"^(text|video)_weight_(fc0|fc1|intra)\.")
_RELEASED_CLUSTER = {
    "conv.conv.weight": "merge{r}.conv.weight",
    "norm.weight": "merge{r}.norm.weight", "norm.bias": "merge{r}.norm.bias",
    "score.weight": "merge{r}.score.weight", "score.bias": "merge{r}.score.bias",
}
_RELEASED_BLOCK = {
    "norm1.weight": "block{r}.norm1.weight", "norm1.bias": "block{r}.norm1.bias",
    "attn.q.weight": "block{r}.q.weight", "attn.q.bias": "block{r}.q.bias",
    "attn.kv.weight": "block{r}.kv.weight", "attn.kv.bias": "block{r}.kv.bias",
    "attn.proj.weight": "block{r}.proj.weight", "attn.proj.bias": "block{r}.proj.bias",
}


def read_released(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a released NeighborRetr checkpoint (``torch.load``, weights only)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"released checkpoint {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise PretrainedError(f"{p} is unreadable as a released NeighborRetr checkpoint (torch.load: "
                              f"{type(err).__name__})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise PretrainedError(f"{p}: expected a state dict of tensors, got {type(obj).__name__}")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    if not any(k.startswith("clip.") for k in sd) or "transformerClip.resblocks.0.attn.in_proj_weight" not in sd:
        raise PretrainedError(f"{p} is not a released NeighborRetr checkpoint: it lacks clip.* and "
                              "transformerClip.resblocks.* (an nbretr run is exported from its folder instead)")
    return sd


def convert_released_state_dict(sd: Mapping[str, torch.Tensor], source: str = "the checkpoint"):
    """``(NeighborRetrConfig fields, transformers CLIPConfig, nbretr state dict)`` of a
    released NeighborRetr state dict. Every tensor is converted to float32 (the released
    code keeps CLIP's linear layers in float16 on CUDA). Unknown keys are an error."""
    from nbretr.models import clip as clip_mod
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    clip_sd = {k[len("clip."):]: v for k, v in sd.items() if k.startswith("clip.")}
    try:
        clip_config, hf = clip_mod.openai_to_hf(clip_sd)
    except ValueError as err:
        raise PretrainedError(f"{source}: its CLIP part does not convert: {err}") from None
    out = {f"clip.{k}": v for k, v in hf.items()}
    unknown = []
    layers = set()
    for key, val in sd.items():
        if key.startswith("clip.") or _RELEASED_UNUSED.match(key):
            continue
        m = re.match(r"^(text|video)_weight_fc\.(.+)$", key)
        if m:
            out[f"wti.{m.group(1)}_weight_fc.{m.group(2)}"] = val
            continue
        if key == "frame_position_embeddings.weight":
            out["temporal.frame_position_embeddings.weight"] = val
            continue
        m = re.match(r"^transformerClip\.resblocks\.(\d+)\.(.+)$", key)
        if m:
            n, rest = m.groups()
            layers.add(int(n))
            base = f"temporal.layers.{n}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, chunk in zip(("q", "k", "v"), val.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = chunk.contiguous()
            elif rest in clip_mod._BLOCK:
                out[base + clip_mod._BLOCK[rest]] = val
            else:
                unknown.append(key)
            continue
        m = re.match(r"^(text|video)_(ctm|block)([01])\.(.+)$", key)
        if m:
            side, kind, r, rest = m.groups()
            table = _RELEASED_CLUSTER if kind == "ctm" else _RELEASED_BLOCK
            if rest in table:
                out[f"{side}_cluster." + table[rest].format(r=r)] = val
            else:
                unknown.append(key)
            continue
        unknown.append(key)
    if unknown:
        raise PretrainedError(f"{source}: keys a released NeighborRetr checkpoint does not have: {unknown[:8]}"
                              f"{' ...' if len(unknown) > 8 else ''}")
    tc = clip_config.text_config
    model_fields = dict(temporal_layers=len(layers), cluster_mlp=False, vocab_size=tc.vocab_size,
                        image_size=clip_config.vision_config.image_size, baseline=False)
    return model_fields, clip_config, out


def load_released(path: str | os.PathLike, **overrides):
    """``(model, meta)``: a released NeighborRetr ``pytorch_model.bin`` as an nbretr model
    (strict: every parameter of the nbretr model must come from the file)."""
    from nbretr.models import NeighborRetr
    from nbretr.models import clip as clip_mod
    p = Path(path)
    fields_, clip_config, sd = convert_released_state_dict(read_released(p), str(p))
    mc = _model_config(fields_, **overrides)
    model = NeighborRetr(mc, clip_model=clip_mod._transformers().CLIPModel(clip_config))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise PretrainedError(f"{p}: the converted checkpoint does not fit NeighborRetr (missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]})")
    return model, {"model": mc.to_dict(), "clip_config": clip_config.to_dict(), "source": f"released {p}"}


def export_released(path: str | os.PathLike, out_dir: str | os.PathLike, tokenizer_path, *,
                    max_words: int = 24, max_frames: int = 12, video_framerate: float = 1.0,
                    frame_sampling: str = "first", dataset: str = "msrvtt") -> Path:
    """Convert a released NeighborRetr checkpoint into a model folder, with CLIP's tokenizer
    (``tokenizer_path``: a Hugging Face CLIP folder or CLIP's BPE vocabulary) and the data
    settings the released code evaluates with (MSR-VTT: 24 words, 12 frames at 1 fps, first
    frames)."""
    from nbretr.data.tokenizers import load_clip_tokenizer
    if tokenizer_path is None:
        raise ValueError("export --from-released needs --tokenizer: a Hugging Face CLIP folder or CLIP's BPE "
                         "vocabulary bpe_simple_vocab_16e6.txt.gz (the checkpoint carries no tokenizer)")
    model, _ = load_released(path, max_words=max_words, max_frames=max_frames)
    tok = load_clip_tokenizer(tokenizer_path)
    data = {"max_words": max_words, "max_frames": max_frames, "video_framerate": video_framerate,
            "frame_sampling": frame_sampling, "image_size": model.config.image_size}
    tc = {"dataset": dataset, "recipe": "reference", "max_words": max_words,
          "max_frames": max_frames, "video_framerate": video_framerate, "frame_sampling": frame_sampling,
          "image_size": model.config.image_size, "cluster_mlp": False}
    return save_pretrained(model, tok, out_dir, data=data, train_config=tc, source=f"released NeighborRetr {path}")
