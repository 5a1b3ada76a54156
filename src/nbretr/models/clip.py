"""The CLIP backbone (docs/method.md, "Encoders") on transformers' ``CLIPModel``.

- :func:`encode_text_tokens`: every token's final hidden state (``last_hidden_state`` already
  has ``final_layer_norm``) through ``text_projection`` → ``[B, L, D]``.
- :func:`encode_frames`: each frame's CLS (``pooler_output`` = ``post_layernorm(CLS)``)
  through ``visual_projection`` → ``[N, D]``.
- :func:`load_clip`: a local Hugging Face CLIP directory (``config.json`` + ``model.safetensors``
  or ``pytorch_model.bin``) or one of OpenAI's original ``.pt`` archives (TorchScript or a plain
  state dict; ViT-B/32, ViT-B/16, any ViT CLIP) converted with :func:`openai_to_hf`.
  Nothing is ever downloaded.
- :func:`tiny_clip_config`: a small random configuration for tests and the embedded default.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

log = logging.getLogger("nbretr")

ACCEPTED_FORMATS = (
    "a Hugging Face CLIP directory (config.json + model.safetensors or pytorch_model.bin), or "
    "an OpenAI CLIP .pt archive (TorchScript, e.g. ViT-B-32.pt / ViT-B-16.pt, or a plain state dict "
    "with keys visual.conv1.weight, transformer.resblocks.N..., text_projection)"
)


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the models extra is installed in CI
        raise ImportError("nbretr.models needs transformers: pip install 'nbretr[models]'") from e
    return transformers


def tiny_clip_config(vocab_size: int, image_size: int = 32, *, width: int = 64, layers: int = 2,
                     heads: int = 2, patch_size: int = 16, context_length: int = 77,
                     projection_dim: int | None = None, vision_width: int | None = None,
                     vision_layers: int | None = None, vision_heads: int | None = None):
    """A small random CLIP configuration (quick_gelu like OpenAI CLIP). Token ids: pad 0,
    start 1, end 2 (the word tokenizer's convention)."""
    tr = _transformers()
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    vw = vision_width or width
    text = dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                num_hidden_layers=layers, num_attention_heads=heads,
                max_position_embeddings=context_length, hidden_act="quick_gelu",
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vision_layers or layers,
                  num_attention_heads=vision_heads or heads, image_size=image_size,
                  patch_size=patch_size, hidden_act="quick_gelu")
    return tr.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim or width)


def build_clip(config) -> "torch.nn.Module":
    """A randomly initialised ``CLIPModel`` from a ``CLIPConfig``."""
    return _transformers().CLIPModel(config)


# --- encoders -------------------------------------------------------------------------------
def encode_text_tokens(clip, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Projected per-token text features ``[B, L, D]`` (``ln_final`` then ``text_projection``)."""
    out = clip.text_model(input_ids=text_ids, attention_mask=text_mask)
    return clip.text_projection(out.last_hidden_state)


def encode_frames(clip, images: torch.Tensor) -> torch.Tensor:
    """Projected CLS features ``[N, D]`` of images ``[N, 3, H, W]`` (``ln_post`` then ``proj``)."""
    out = clip.vision_model(pixel_values=images)
    return clip.visual_projection(out.pooler_output)


# --- OpenAI <-> transformers state dicts ------------------------------------------------------
# per-block renames (OpenAI suffix -> HF suffix); attn.in_proj_* is split into q/k/v.
_BLOCK = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP = {  # OpenAI -> HF, plain copies
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_TOWERS = (("transformer.resblocks.", "text_model.encoder.layers."),
           ("visual.transformer.resblocks.", "vision_model.encoder.layers."))
_IGNORED = {"input_resolution", "context_length", "vocab_size"}  # buffers in OpenAI's archives


def _openai_config(sd: Mapping[str, torch.Tensor], text_heads: int | None, vision_heads: int | None):
    tr = _transformers()
    try:
        vw = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        embed = sd["text_projection"].shape[1]
        ctx = sd["positional_embedding"].shape[0]
        vocab = sd["token_embedding.weight"].shape[0]
        tw = sd["ln_final.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an OpenAI ViT CLIP state dict: key {e} missing (a ResNet CLIP is not "
                         f"supported); accepted: {ACCEPTED_FORMATS}") from None
    t_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    v_layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    t_mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    v_mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    text = dict(vocab_size=vocab, hidden_size=tw, intermediate_size=t_mlp, num_hidden_layers=t_layers,
                num_attention_heads=text_heads or max(1, tw // 64), max_position_embeddings=ctx,
                hidden_act="quick_gelu", layer_norm_eps=1e-5)
    if vocab == 49408:  # OpenAI's BPE vocabulary: <|startoftext|> 49406, <|endoftext|> 49407
        text.update(bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    else:
        text.update(bos_token_id=min(1, vocab - 1), eos_token_id=min(2, vocab - 1), pad_token_id=0)
    vision = dict(hidden_size=vw, intermediate_size=v_mlp, num_hidden_layers=v_layers,
                  num_attention_heads=vision_heads or max(1, vw // 64), image_size=patch * grid,
                  patch_size=patch, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return tr.CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed)


def openai_to_hf(state_dict: Mapping[str, torch.Tensor], *, text_heads: int | None = None,
                 vision_heads: int | None = None):
    """Convert an OpenAI CLIP (ViT) state dict to ``(CLIPConfig, transformers state dict)``.

    The config is inferred from the shapes (heads = width // 64 as in OpenAI's
    ``build_model`` unless given). Raises ``ValueError`` on keys it does not know."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    config = _openai_config(sd, text_heads, vision_heads)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, val in sd.items():
        if key in _IGNORED:
            continue
        if key in _TOP:
            out[_TOP[key]] = val
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = val.t().contiguous()
            continue
        for src, dst in reversed(_TOWERS):  # the visual prefix first (it contains the text one)
            m = re.match(re.escape(src) + r"(\d+)\.(.+)$", key)
            if not m:
                continue
            n, rest = m.groups()
            base = f"{dst}{n}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, chunk in zip(("q", "k", "v"), val.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = chunk.contiguous()
            elif rest in _BLOCK:
                out[base + _BLOCK[rest]] = val
            else:
                unknown.append(key)
            break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"openai_to_hf: unknown OpenAI CLIP keys {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''}")
    return config, out


def hf_to_openai(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`openai_to_hf` (for tests and for exporting)."""
    top = {v: k for k, v in _TOP.items()}
    trans = {v: k for k, v in _TRANSPOSED.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, val in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key in top:
            out[top[key]] = val
        elif key in trans:
            out[trans[key]] = val.t().contiguous()
        else:
            for src, dst in _TOWERS:
                m = re.match(re.escape(dst) + r"(\d+)\.(.+)$", key)
                if not m:
                    continue
                n, rest = m.groups()
                qm = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
                if qm:
                    qkv.setdefault((f"{src}{n}.attn.in_proj_{qm.group(2)}", ""), {})[qm.group(1)] = val
                elif rest in block:
                    out[f"{src}{n}.{block[rest]}"] = val
                else:
                    raise ValueError(f"hf_to_openai: unknown key {key}")
                break
            else:
                raise ValueError(f"hf_to_openai: unknown key {key}")
    for (name, _), parts in qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# --- loading ---------------------------------------------------------------------------------
def read_openai_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an OpenAI ``.pt`` archive: TorchScript first, then ``torch.load``."""
    path = str(path)
    try:
        return {k: v for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}
    except (RuntimeError, ValueError):
        pass
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (pickle, zip, EOF, key errors: all mean "not a checkpoint")
        raise ValueError(f"{path} is not a CLIP checkpoint that nbretr can read (torch.load: "
                         f"{type(err).__name__}); accepted: {ACCEPTED_FORMATS}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a TorchScript CLIP or a state dict, got {type(obj).__name__}; "
                         f"accepted: {ACCEPTED_FORMATS}")
    return dict(obj)


def load_clip(path: str | os.PathLike, *, text_heads: int | None = None,
              vision_heads: int | None = None, dtype: torch.dtype = torch.float32):
    """Load a CLIP checkpoint from a local path into a transformers ``CLIPModel`` (float32).

    ``path``: a Hugging Face directory or an OpenAI ``.pt`` file (see module docstring).
    No download is ever attempted: a missing path raises ``FileNotFoundError`` naming it."""
    tr = _transformers()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"CLIP checkpoint not found: looked for {str(p)!r}. Accepted: "
                                f"{ACCEPTED_FORMATS}. nbretr never downloads weights.")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{str(p)!r} is a directory without config.json; accepted: {ACCEPTED_FORMATS}")
        weights = [f for f in ("model.safetensors", "pytorch_model.bin") if (p / f).is_file()]
        if not weights and not list(p.glob("*.safetensors.index.json")) + list(p.glob("*.bin.index.json")):
            raise FileNotFoundError(f"{str(p)!r} has config.json but no model.safetensors or pytorch_model.bin; "
                                    f"accepted: {ACCEPTED_FORMATS}")
        model = tr.CLIPModel.from_pretrained(str(p), local_files_only=True, dtype=dtype)
        log.info("loaded Hugging Face CLIP from %s", p)
        return model
    sd = read_openai_state_dict(p)
    config, hf_sd = openai_to_hf(sd, text_heads=text_heads, vision_heads=vision_heads)
    model = tr.CLIPModel(config)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in hf_sd.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{p}: converted OpenAI CLIP does not fit CLIPModel (missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]})")
    log.info("loaded OpenAI CLIP from %s (converted to the transformers layout)", p)
    return model.to(dtype)


# --- the released code's CLIP precision and frozen patch embedding ---------------------------
def _cast_input_to_weight(module: nn.Module, args):
    x = args[0]
    w = module.weight
    return (x.to(w.dtype), *args[1:]) if torch.is_tensor(x) and x.dtype != w.dtype else args


class _Fp32LayerNorm:
    """Forward hooks that run a float32 LayerNorm on lower-precision input and hand the
    result back in the input's dtype (as the released CLIP's LayerNorm subclass does)."""

    @staticmethod
    def pre(module: nn.Module, args):
        x = args[0]
        module._nbretr_in_dtype = x.dtype
        return (x.float(), *args[1:]) if x.dtype != torch.float32 else args

    @staticmethod
    def post(module: nn.Module, args, out):
        dt = getattr(module, "_nbretr_in_dtype", out.dtype)
        return out.to(dt) if out.dtype != dt else out


def clip_weights_to_fp16(clip: nn.Module) -> int:
    """The released code's CLIP precision on CUDA: the weights and biases of every Linear
    and Conv2d (attention and MLP projections, the output projections, the patch embedding)
    become float16 parameters that the optimiser updates in place; embeddings, LayerNorms
    and the logit scale stay float32. Hooks cast each such layer's input to its weight's
    dtype and run LayerNorms in float32, and the two output projections hand float32 back to
    the rest of the model. Returns the number of converted modules."""
    n = 0
    for name, module in clip.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.half()
            module.register_forward_pre_hook(_cast_input_to_weight)
            n += 1
        elif isinstance(module, nn.LayerNorm):
            module.register_forward_pre_hook(_Fp32LayerNorm.pre)
            module.register_forward_hook(_Fp32LayerNorm.post)
    for proj in ("text_projection", "visual_projection"):
        layer = getattr(clip, proj, None)
        if isinstance(layer, nn.Module):
            layer.register_forward_hook(lambda m, a, out: out.float())
    return n


def freeze_patch_embedding(clip: nn.Module) -> None:
    """Freeze the vision tower's patch-embedding convolution (the released code sets its
    ``requires_grad`` to False)."""
    clip.vision_model.embeddings.patch_embedding.requires_grad_(False)


# --- memory options: gradient checkpointing, frozen layers -------------------------------------
def set_grad_checkpointing(clip: nn.Module, enabled: bool = True) -> None:
    """Recompute each transformer block of both towers in the backward pass (transformers'
    gradient checkpointing, non-reentrant: the same gradients, also with frozen embeddings)."""
    kwargs = {"use_reentrant": False}
    if hasattr(clip, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
        if enabled:
            clip.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            clip.activation_checkpointing_disable()
    elif enabled:
        clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        clip.gradient_checkpointing_disable()


def freeze_clip_layers(clip: nn.Module, n: int) -> list[str]:
    """Freeze CLIP's embeddings and the first ``n`` transformer blocks of both towers (as
    CLIP4Clip's ``--freeze_layer_num``: ``n = 0`` freezes the embeddings alone): the text
    token and position embeddings, the vision patch, class and position embeddings and the
    pre-LayerNorm, and blocks ``0 .. n-1`` of each encoder. The final LayerNorms, the two
    projections and the logit scale stay trainable. ``n < 0`` freezes nothing. Returns the
    names of the parameters frozen."""
    if n < 0:
        return []
    towers = (clip.text_model, clip.vision_model)
    for tower in towers:
        layers = len(tower.encoder.layers)
        if n > layers:
            raise ValueError(f"--freeze-clip-layers {n}: the CLIP towers have {layers} blocks")
    frozen = []
    prefixes = ("text_model.embeddings.", "vision_model.embeddings.", "vision_model.pre_layrnorm.")
    blocks = tuple(f"{t}.encoder.layers.{i}." for t in ("text_model", "vision_model") for i in range(n))
    for name, p in clip.named_parameters():
        if name.startswith(prefixes) or name.startswith(blocks):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen
