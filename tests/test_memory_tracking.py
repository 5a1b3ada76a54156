"""Memory options (``--grad-checkpointing``, ``--freeze-clip-layers``) and experiment
tracking (``--report-to tensorboard,wandb``): checkpointing gives the same gradients,
freezing leaves exactly the frozen parameters unchanged by a step, the resume rules, and a
wandb offline run that holds the run's metrics (read back from its run file)."""
from __future__ import annotations

import copy
import glob
import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch

from nbretr import config as C
from nbretr.models import NeighborRetr, NeighborRetrConfig
from nbretr.models import clip as clip_mod

pytest.importorskip("transformers")


def tiny_model(**kw) -> NeighborRetr:
    torch.manual_seed(0)
    cfg = NeighborRetrConfig(vocab_size=50, max_words=8, max_frames=4, image_size=32, patch_size=16,
                             clip_layers=3, temporal_layers=2, num_neighbors=3, **kw)
    return NeighborRetr(cfg)


def tiny_batch(b: int = 6) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 50, (b, 8), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(b, 8, dtype=torch.long)
    mask[:, 6:] = 0
    ids[:, 5] = 2
    vmask = torch.ones(b, 4, dtype=torch.long)
    vmask[0, 3] = 0
    return {"text_ids": ids * mask, "text_mask": mask, "video": torch.randn(b, 4, 3, 32, 32, generator=g),
            "video_mask": vmask}


def grads(model: NeighborRetr, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(batch)["loss"]
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_bytes(model, run) -> int:
    """Bytes of the tensors autograd saves for the backward pass of ``run(model)`` (those
    inside checkpointed blocks are not saved: they are recomputed)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(model)
    return total[0]


def test_grad_checkpointing_gives_the_same_gradients():
    plain = tiny_model()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    batch = tiny_batch()
    # checkpointing is active in each tower and the temporal transformer: far fewer bytes
    # are saved for the backward pass outside the checkpointed blocks
    for m in (plain, ckpt):
        m.train()
    frames = torch.randn(6, 4, plain.dim, requires_grad=True)
    for name, run in (("text", lambda m: m.encode_text(batch["text_ids"], batch["text_mask"])[0]),
                      ("vision", lambda m: m.clip.vision_model(pixel_values=batch["video"].flatten(0, 1)).pooler_output),
                      ("temporal", lambda m: m.temporal(frames, batch["video_mask"]))):
        kept_plain, kept_ckpt = saved_bytes(plain, run), saved_bytes(ckpt, run)
        assert kept_ckpt < 0.4 * kept_plain, (name, kept_ckpt, kept_plain)
    loss_c, g_c = grads(ckpt, batch)
    loss_p, g_p = grads(plain, batch)
    assert loss_c == pytest.approx(loss_p, rel=1e-6)
    assert g_c.keys() == g_p.keys() and len(g_p) > 20
    for name in g_p:
        torch.testing.assert_close(g_c[name], g_p[name], rtol=1e-5, atol=1e-6, msg=name)
    # and with frozen embeddings and blocks (nothing upstream needs a gradient)
    for m in (plain, ckpt):
        clip_mod.freeze_clip_layers(m.clip, 1)
    _, g_c = grads(ckpt, batch)
    _, g_p = grads(plain, batch)
    assert g_c.keys() == g_p.keys()
    for name in g_p:
        torch.testing.assert_close(g_c[name], g_p[name], rtol=1e-5, atol=1e-6, msg=name)
    # evaluation (no grad) does not recompute anything
    ckpt.eval()
    with torch.no_grad():
        ckpt.encode_video(batch["video"], batch["video_mask"])


def test_freeze_clip_layers_leaves_those_parameters_unchanged():
    from nbretr.optim import build_optimizer
    model = tiny_model()
    frozen = set(clip_mod.freeze_clip_layers(model.clip, 2))
    names = dict(model.clip.named_parameters())
    expect = {n for n in names if n.startswith(("text_model.embeddings.", "vision_model.embeddings.",
                                                 "vision_model.pre_layrnorm."))
              or any(n.startswith(f"{t}.encoder.layers.{i}.") for t in ("text_model", "vision_model")
                     for i in (0, 1))}
    assert frozen == expect
    assert "text_model.embeddings.token_embedding.weight" in frozen
    assert "vision_model.embeddings.patch_embedding.weight" in frozen
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the training run's optimiser (frozen parameters are left out of its groups), at lr 1e-2
    opt, _ = build_optimizer(model, 1e-2, 1.0, 0.2, 10, 0.0, "bertadam", decay_exempt="1d")
    for group in opt.param_groups:
        group["lr"] = 1e-2
    model(tiny_batch())["loss"].backward()
    opt.step()
    after = dict(model.named_parameters())
    for n, p in after.items():
        clip_name = n[len("clip."):] if n.startswith("clip.") else None
        if clip_name in frozen:
            assert not p.requires_grad and torch.equal(p, before[n]), n
    changed = {n for n, p in after.items() if not torch.equal(p, before[n])}
    # the unfrozen block 2 of both towers, the final LayerNorms, projections, temporal transformer train
    for n in ("clip.text_model.encoder.layers.2.mlp.fc1.weight", "clip.vision_model.encoder.layers.2.mlp.fc1.weight",
              "clip.text_projection.weight", "clip.visual_projection.weight",
              "clip.vision_model.post_layernorm.weight", "temporal.layers.0.mlp.fc1.weight"):
        assert n in changed, n
    assert not changed & {"clip." + n for n in frozen}
    # 0: the embeddings alone; -1: nothing; more blocks than the towers have: an error naming the option
    m0 = tiny_model()
    assert all(".layers." not in n for n in clip_mod.freeze_clip_layers(m0.clip, 0))
    assert clip_mod.freeze_clip_layers(tiny_model().clip, -1) == []
    with pytest.raises(ValueError, match="--freeze-clip-layers 4: the CLIP towers have 3 blocks"):
        clip_mod.freeze_clip_layers(tiny_model().clip, 4)


def test_memory_options_are_config_options_and_their_resume_rules():
    parser = C.build_parser("t")
    cfg = C.resolve_config(parser.parse_args(["--grad-checkpointing", "--freeze-clip-layers", "6"]))
    assert cfg.grad_checkpointing is True and cfg.freeze_clip_layers == 6
    assert cfg.model_config().grad_checkpointing is True
    ref = C.resolve_config(parser.parse_args(["--dataset", "msrvtt", "--clip", "ViT-B/32", "--clip-path", "x.pt"]))
    assert ref.grad_checkpointing is False and ref.freeze_clip_layers == -1  # the reference trains every layer
    with pytest.raises(ValueError, match="--freeze-clip-layers must be -1"):
        C.resolve_config(parser.parse_args(["--freeze-clip-layers", "-2"]))
    saved = cfg.to_dict()
    # checkpointing and the decoder may change on resume (same gradients, same frames) ...
    again = C.resolve_config(parser.parse_args(["--grad-checkpointing", "false", "--decoder", "pyav",
                                                "--report-to", "none"]), saved, "run")
    assert again.grad_checkpointing is False and again.decoder == "pyav" and again.freeze_clip_layers == 6
    # ... which layers train may not
    with pytest.raises(ValueError, match="--freeze-clip-layers 2 \\(the run has 6\\)"):
        C.resolve_config(parser.parse_args(["--freeze-clip-layers", "2"]), saved, "run")
    with pytest.raises(ValueError, match="--report-to: unknown mlflow"):
        C.resolve_config(parser.parse_args(["--report-to", "tensorboard,mlflow"]))
    assert C.report_targets("tensorboard, wandb") == ["tensorboard", "wandb"] and C.report_targets("none") == []


# ------------------------------------------------------------------ tracking

def read_wandb_records(run_file: str) -> list:
    """The protobuf records of a wandb run file (LevelDB log format: 7-byte file header,
    32 KiB blocks, records of a 7-byte header (crc, length, type) and data, split across
    blocks as FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb
    raw = Path(run_file).read_bytes()
    assert raw[:4] == b":W&B", run_file
    block, pos, part, out = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(data)
        elif kind == 2:
            part = data
        elif kind == 3:
            part += data
        elif kind == 4:
            out.append(part + data)
    records = []
    for data in out:
        r = pb.Record()
        r.ParseFromString(data)
        records.append(r)
    return records


@pytest.fixture
def data_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NBRETR_DATA", str(tmp_path / "data"))
    return tmp_path


SMALL = ["--synthetic-size", "small", "--batch-size", "12", "--num-workers", "0", "--mb-batch", "1",
         "--num-neighbors", "4", "--temporal-layers", "1", "--epochs", "1"]


def test_wandb_offline_run_logs_the_runs_metrics(data_env, monkeypatch):
    pytest.importorskip("wandb")
    from nbretr import train
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = data_env / "run"
    assert train.main(SMALL + ["--output-dir", str(run), "--report-to", "tensorboard,wandb", "--log-every", "1",
                               "--grad-checkpointing"]) == 0
    files = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, "no offline run (offline mode without a WANDB_API_KEY)"
    assert (run / "tb").is_dir() and (run / "wandb_id.txt").read_text().strip() in files[0]
    records = read_wandb_records(files[0])
    history, summary, config = {}, {}, {}

    def items(entries):  # a key is either plain or nested ("train/loss" comes as nested_key)
        return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in entries}

    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = items(r.history.item)
            history[row["_step"]] = row
        elif kind == "summary":
            summary.update(items(r.summary.update))
        elif kind == "run":
            config.update(items(r.run.config.update))
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3  # 40 training videos / 12
    for rec in steps:  # every training step's loss parts and learning rate, as in metrics.jsonl
        row = history[rec["step"]]
        for k in ("loss", "wti", "nbi", "opt", "kl"):
            assert row[f"train/{k}"] == pytest.approx(rec[k], rel=1e-6), (rec["step"], k)
        assert row["train/lr"] == pytest.approx(rec["lr"], rel=1e-9)
    metrics = json.loads((run / "metrics.json").read_text())
    for d in ("t2v", "v2t"):
        for k in ("R1", "R5", "Rsum", "MdR"):
            assert summary[f"test/{d}_{k}"] == pytest.approx(metrics[d][k]), (d, k)
            assert history[3][f"test/{d}_{k}"] == pytest.approx(metrics[d][k]), (d, k)
    value = {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in config.items()}
    assert value["batch_size"] == 12 and value["grad_checkpointing"] is True  # the resolved options


def test_wandb_missing_is_an_error_only_when_asked_for(data_env, monkeypatch, capsys):
    from nbretr import train
    from nbretr.runtime import run_cli
    from nbretr.tracking import wandb_mode
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    run = data_env / "run"
    code = run_cli(train.main, "python -m nbretr.train",
                   SMALL + ["--output-dir", str(run), "--report-to", "wandb", "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--report-to wandb: the wandb package is not installed (pip install wandb)" in err
    assert not run.exists()  # a run that failed before training leaves nothing
    assert train.main(SMALL + ["--output-dir", str(run), "--max-steps", "1", "--do-eval", "false"]) == 0
    assert (run / "tb").is_dir() and not (run / "wandb").exists()
    assert wandb_mode(None, {}) == "offline" and wandb_mode(None, {"WANDB_API_KEY": "k"}) == "online"
    assert wandb_mode(None, {"WANDB_MODE": "offline", "WANDB_API_KEY": "k"}) == "offline"
    assert wandb_mode("online", {}) == "online"
