"""Portable model folders and the importer of the released NeighborRetr checkpoints.

The released checkpoint is a tiny random model written here in the released code's
``pytorch_model.bin`` layout (``model.state_dict()`` of its NeighborRetr module: OpenAI CLIP
names under ``clip.``, ``transformerClip.resblocks.N`` OpenAI blocks, ``{text,video}_ctm{0,1}``
and ``{text,video}_block{0,1}`` clustering rounds, the WTI weight MLPs). Its temporal
transformer is recomputed here the released way (``nn.MultiheadAttention`` with the packed
in-projection, additive -1e6 key mask, QuickGELU MLP, residual over the frames) and must equal
nbretr's on the converted weights."""
import gzip
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from nbretr import pretrained

V, TW, VW, E, CTX, PATCH, IMG = 523, 64, 32, 64, 16, 8, 16   # vocab 523 = the fake BPE below


def _fake_bpe(path: Path) -> None:
    merges = ["#version: 0.2", "t h", "th e</w>", "r e", "re d</w>", "s q", "sq u", "squ a", "squa r", "squar e</w>"]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(merges) + "\n")


def _block(prefix: str, w: int, g: torch.Generator) -> dict:
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    return {f"{prefix}.attn.in_proj_weight": r(3 * w, w), f"{prefix}.attn.in_proj_bias": r(3 * w),
            f"{prefix}.attn.out_proj.weight": r(w, w), f"{prefix}.attn.out_proj.bias": r(w),
            f"{prefix}.ln_1.weight": 1 + r(w), f"{prefix}.ln_1.bias": r(w),
            f"{prefix}.mlp.c_fc.weight": r(4 * w, w), f"{prefix}.mlp.c_fc.bias": r(4 * w),
            f"{prefix}.mlp.c_proj.weight": r(w, 4 * w), f"{prefix}.mlp.c_proj.bias": r(w),
            f"{prefix}.ln_2.weight": 1 + r(w), f"{prefix}.ln_2.bias": r(w)}


def released_state_dict(seed: int = 0, fp16_clip: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """A random tiny NeighborRetr state dict with the released code's names and shapes
    (CLIP's linear weights in float16, as the released code keeps them on CUDA)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    sd: dict = {"clip.token_embedding.weight": r(V, TW), "clip.positional_embedding": r(CTX, TW),
                "clip.ln_final.weight": 1 + r(TW), "clip.ln_final.bias": r(TW), "clip.text_projection": r(TW, E),
                "clip.logit_scale": torch.tensor(4.6), "clip.visual.conv1.weight": r(VW, 3, PATCH, PATCH),
                "clip.visual.class_embedding": r(VW), "clip.visual.positional_embedding": r((IMG // PATCH) ** 2 + 1, VW),
                "clip.visual.ln_pre.weight": 1 + r(VW), "clip.visual.ln_pre.bias": r(VW),
                "clip.visual.ln_post.weight": 1 + r(VW), "clip.visual.ln_post.bias": r(VW),
                "clip.visual.proj": r(VW, E)}
    for i in range(2):
        sd.update(_block(f"clip.transformer.resblocks.{i}", TW, g))
        sd.update(_block(f"clip.visual.transformer.resblocks.{i}", VW, g))
        sd.update(_block(f"transformerClip.resblocks.{i}", TW, g))
    if fp16_clip:
        sd = {k: v.half() if k.startswith("clip.") and v.dim() == 2 and "embedding" not in k else v
              for k, v in sd.items()}
    for side in ("text", "video"):
        for name in ("weight_fc", "weight_fc0", "weight_fc1", "weight_intra"):
            sd.update({f"{side}_{name}.0.weight": r(2 * TW, TW), f"{side}_{name}.0.bias": r(2 * TW),
                       f"{side}_{name}.2.weight": r(1, 2 * TW), f"{side}_{name}.2.bias": r(1)})
        for i in range(2):
            sd.update({f"{side}_ctm{i}.conv.conv.weight": r(E, E, 3), f"{side}_ctm{i}.norm.weight": 1 + r(E),
                       f"{side}_ctm{i}.norm.bias": r(E), f"{side}_ctm{i}.score.weight": r(1, E),
                       f"{side}_ctm{i}.score.bias": r(1),
                       f"{side}_block{i}.norm1.weight": 1 + r(E), f"{side}_block{i}.norm1.bias": r(E),
                       f"{side}_block{i}.attn.q.weight": r(E, E), f"{side}_block{i}.attn.q.bias": r(E),
                       f"{side}_block{i}.attn.kv.weight": r(2 * E, E), f"{side}_block{i}.attn.kv.bias": r(2 * E),
                       f"{side}_block{i}.attn.proj.weight": r(E, E), f"{side}_block{i}.attn.proj.bias": r(E)})
    sd["frame_position_embeddings.weight"] = r(CTX, TW)
    return OrderedDict(sd)


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def released_temporal(sd: dict, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The released video aggregation, recomputed from the released tensors: frame
    positions, OpenAI residual blocks in LND layout with nn.MultiheadAttention and the
    additive (1 - mask) * -1e6 key mask, then + the input frames."""
    B, F, D = frames.shape
    x = frames + sd["frame_position_embeddings.weight"][:F][None]
    att_mask = ((1.0 - mask.float()[:, None, :]) * -1000000.0).expand(-1, F, -1)
    x = x.permute(1, 0, 2)
    for i in range(2):
        p = f"transformerClip.resblocks.{i}."
        attn = nn.MultiheadAttention(D, D // 64)
        attn.in_proj_weight.data.copy_(sd[p + "attn.in_proj_weight"])
        attn.in_proj_bias.data.copy_(sd[p + "attn.in_proj_bias"])
        attn.out_proj.weight.data.copy_(sd[p + "attn.out_proj.weight"])
        attn.out_proj.bias.data.copy_(sd[p + "attn.out_proj.bias"])
        ln1, ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        for ln, n in ((ln1, "ln_1"), (ln2, "ln_2")):
            ln.weight.data.copy_(sd[p + n + ".weight"])
            ln.bias.data.copy_(sd[p + n + ".bias"])
        fc, proj = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        fc.weight.data.copy_(sd[p + "mlp.c_fc.weight"])
        fc.bias.data.copy_(sd[p + "mlp.c_fc.bias"])
        proj.weight.data.copy_(sd[p + "mlp.c_proj.weight"])
        proj.bias.data.copy_(sd[p + "mlp.c_proj.bias"])
        h = ln1(x)
        x = x + attn(h, h, h, need_weights=False, attn_mask=att_mask.repeat_interleave(D // 64, dim=0))[0]
        x = x + proj(_QuickGELU()(fc(ln2(x))))
    return x.permute(1, 0, 2) + frames


@torch.no_grad()
def test_released_checkpoint_converts_tensor_by_tensor_and_computes_as_released(tmp_path):
    sd = released_state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model = pretrained.load_model(tmp_path / "pytorch_model.bin")[0]
    from nbretr.models import NeighborRetr
    assert isinstance(NeighborRetr.from_pretrained(tmp_path / "pytorch_model.bin"), NeighborRetr)
    c = model.config
    assert (c.temporal_layers, c.cluster_mlp, c.vocab_size, c.image_size) == (2, False, V, IMG)
    f32 = {k: v.float() for k, v in sd.items()}
    # packed in-projection split into q, k, v; OpenAI's [in, out] projections transposed
    t1 = model.temporal.layers[1].self_attn
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(getattr(t1, name).weight, f32["transformerClip.resblocks.1.attn.in_proj_weight"][j * TW:(j + 1) * TW])
    assert torch.equal(model.clip.text_projection.weight, f32["clip.text_projection"].t())
    assert torch.equal(model.clip.visual_projection.weight, f32["clip.visual.proj"].t())
    assert torch.equal(model.video_cluster.block1.kv.weight, f32["video_block1.attn.kv.weight"])
    assert torch.equal(model.text_cluster.merge0.conv.weight, f32["text_ctm0.conv.conv.weight"])
    assert torch.equal(model.text_cluster.merge1.score.bias, f32["text_ctm1.score.bias"])
    assert torch.equal(model.wti.video_weight_fc[2].weight, f32["video_weight_fc.2.weight"])
    assert model.text_cluster.block0.mlp is None                       # TCBlock has no MLP
    # the temporal transformer computes what the released aggregation computes
    frames = torch.randn(3, 5, TW)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    ref = released_temporal(f32, frames, mask)
    got = model.temporal(frames, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ref[keep], rtol=1e-4, atol=1e-5)
    # the WTI token weights are the released MLP's softmax over valid tokens
    logits = torch.relu(frames @ f32["video_weight_fc.0.weight"].t() + f32["video_weight_fc.0.bias"]) \
        @ f32["video_weight_fc.2.weight"].t() + f32["video_weight_fc.2.bias"]
    w = torch.softmax(logits.squeeze(-1).masked_fill(~keep, -9e15), dim=-1)
    torch.testing.assert_close(model.token_weights_video(frames, mask), w * keep)


def test_released_checkpoint_errors_name_the_file(tmp_path):
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(pretrained.PretrainedError, match="pytorch_model.bin is unreadable"):
        pretrained.load_model(bad)
    sd = released_state_dict()
    sd["extra_head.weight"] = torch.zeros(2)
    torch.save(sd, bad)
    with pytest.raises(pretrained.PretrainedError, match=r"extra_head\.weight"):
        pretrained.load_model(bad)
    torch.save({"visual.conv1.weight": torch.zeros(1)}, bad)           # a bare CLIP is not NeighborRetr
    with pytest.raises(pretrained.PretrainedError, match="not a released NeighborRetr checkpoint"):
        pretrained.load_model(bad)


@torch.no_grad()
def test_export_from_released_writes_a_model_folder_that_loads_the_same_model(tmp_path):
    from nbretr.export import main
    torch.save(released_state_dict(seed=3), tmp_path / "pytorch_model.bin")
    _fake_bpe(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    out = tmp_path / "released"
    assert main(["--from-released", str(tmp_path / "pytorch_model.bin"), str(out), "--tokenizer",
                 str(tmp_path / "bpe_simple_vocab_16e6.txt.gz"), "--max-words", "8", "--max-frames", "4"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"] == {"max_words": 8, "max_frames": 4, "video_framerate": 1.0, "frame_sampling": "first",
                           "image_size": IMG}
    assert cfg["fingerprint"] == pretrained.fingerprint(out)
    a = pretrained.load_model(tmp_path / "pytorch_model.bin")[0]
    b, tok, _ = pretrained.load_model(out)
    ids, m = tok(["the red square"], 8)
    video, vmask = torch.randn(1, 4, 3, IMG, IMG), torch.ones(1, 4, dtype=torch.long)
    for x, y in ((a.encode_text(ids, m)[0], b.encode_text(ids, m)[0]),
                 (a.encode_video(video, vmask)[0], b.encode_video(video, vmask)[0])):
        assert torch.equal(x, y)
    # an existing model folder is never overwritten; --tokenizer is required
    with pytest.raises(FileExistsError, match="already exists"):
        main(["--from-released", str(tmp_path / "pytorch_model.bin"), str(out), "--tokenizer",
              str(tmp_path / "bpe_simple_vocab_16e6.txt.gz")])
    with pytest.raises(ValueError, match="needs --tokenizer"):
        main(["--from-released", str(tmp_path / "pytorch_model.bin"), str(tmp_path / "other")])
    assert not (tmp_path / "other").exists()


def test_a_model_folder_with_corrupt_files_is_named(tmp_path):
    torch.save(released_state_dict(seed=1), tmp_path / "pytorch_model.bin")
    _fake_bpe(tmp_path / "bpe.txt.gz")
    out = pretrained.export_released(tmp_path / "pytorch_model.bin", tmp_path / "m", tmp_path / "bpe.txt.gz")
    w = out / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(pretrained.PretrainedError, match="model.safetensors is unreadable"):
        pretrained.load_model(out)
    (out / "config.json").write_text("{")
    with pytest.raises(pretrained.PretrainedError, match="config.json is not valid JSON"):
        pretrained.load_model(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained.load_model(tmp_path / "nowhere")
