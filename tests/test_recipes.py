"""--recipe reference reproduces the released training pipeline, item by item, and each item
switches alone: frame sampling, parameter groups and weight decay, the loader's order,
float16 CLIP weights, the evaluation protocol and video->text ranking, --print-config."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml

from nbretr import config as C

STANDARD = ["--dataset", "msrvtt", "--data-root", "/nowhere", "--clip", "ViT-B/32", "--clip-path", "x.pt"]


def resolve(*args: str) -> C.TrainConfig:
    return C.resolve_config(C.build_parser("t").parse_args(list(args)))


# -- the recipes ---------------------------------------------------------------------------

def test_reference_is_the_default_on_standard_datasets_and_each_item_switches_alone():
    ref = resolve(*STANDARD)
    assert (ref.recipe, ref.preset) == ("reference", "none")
    assert (ref.frame_sampling, ref.augment, ref.cluster_mlp, ref.clip_weights, ref.freeze_patch_embed) == \
        ("first", "randaugment", False, "auto", True)
    assert (ref.reshuffle, ref.sampler, ref.gather_reduce_grads, ref.grad_world_size) == \
        (False, "reference", False, 4)
    assert (ref.decay_exempt, ref.eval_every, ref.eval_protocol, ref.v2t_ranking, ref.amp) == \
        ("bias", 150, "best-of-test", "best-caption", "off")
    # item 9: the released MSR-VTT command's values
    assert (ref.batch_size, ref.epochs, ref.mb_batch, ref.max_words, ref.max_frames) == (128, 5, 15, 24, 12)
    anet = resolve("--dataset", "activitynet", "--data-root", "/x", "--clip", "ViT-B/32", "--clip-path", "x")
    assert (anet.epochs, anet.max_words, anet.max_frames, anet.mb_batch, anet.grad_world_size) == (10, 64, 64, 15, 8)
    assert anet.augment == "none"                      # the released code augments MSR-VTT only
    # one item changed, the rest kept
    one = resolve(*STANDARD, "--frame-sampling", "uniform")
    assert one.frame_sampling == "uniform" and one.augment == "randaugment" and one.reshuffle is False
    assert resolve(*STANDARD, "--reshuffle", "true").reshuffle is True
    assert resolve(*STANDARD, "--decay-exempt", "1d").decay_exempt == "1d"
    ours = resolve(*STANDARD, "--recipe", "nbretr")
    assert (ours.reshuffle, ours.gather_reduce_grads, ours.clip_weights, ours.grad_world_size, ours.sampler) == \
        (True, True, "fp32", None, "nbretr")
    emb = resolve()
    assert (emb.recipe, emb.preset, emb.batch_size, emb.augment, emb.cluster_mlp, emb.clip) == \
        ("nbretr", "embedded", C.EMBEDDED_DEFAULTS["batch_size"], "none", False, "tiny-pretrained")
    with pytest.raises(ValueError, match="--recipe must be one of"):
        resolve("--recipe", "paper")
    with pytest.raises(ValueError, match="--frame-sampling must be one of first, uniform, got 'middle'"):
        resolve("--frame-sampling", "middle")


def test_print_config_prints_the_resolved_options_and_exits(tmp_path, capsys, monkeypatch):
    from nbretr import train
    monkeypatch.chdir(tmp_path)
    assert train.main([*STANDARD, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["recipe"] == "reference" and printed["grad_world_size"] == 4
    assert printed["frame_sampling"] == "first" and printed["v2t_ranking"] == "best-caption"
    assert not (tmp_path / "runs").exists()              # nothing was run


# -- item 1: frame sampling ------------------------------------------------------------------

def test_first_sampling_keeps_the_first_twelve_seconds_of_a_30s_30fps_clip(tmp_path):
    pytest.importorskip("av")
    from nbretr.data.decoding import decode_frames, sample_indices
    from nbretr.data.synthetic import write_mp4
    n, fps = 900, 30
    level = (np.arange(n) * 7) % 256                     # frame i is a flat grey of level[i]
    frames = np.repeat(level[:, None, None, None], 3, axis=3).repeat(16, axis=1).repeat(16, axis=2)
    path = tmp_path / "clip.mp4"
    write_mp4(path, frames.astype(np.uint8), fps=fps)
    want = np.arange(12) * 30                            # one frame per second: 0, 30, ..., 330
    np.testing.assert_array_equal(sample_indices(n, fps, 12, 1.0, sampling="first"), want)
    got = decode_frames(path, 12, 1.0, sampling="first")
    assert got.shape[0] == 12
    np.testing.assert_allclose(got.reshape(12, -1).mean(1), level[want], atol=3)
    uniform = decode_frames(path, 12, 1.0, sampling="uniform")
    assert abs(float(uniform[-1].mean()) - level[870]) <= 3   # the whole clip: its last second
    # a 29.97 fps clip counts seconds of int(fps) frames, as OpenCV reports the rate
    np.testing.assert_array_equal(sample_indices(1199, 29.97, 4, 1.0, sampling="first"), [0, 29, 58, 87])


# -- item 7: parameter groups and weight decay ----------------------------------------------

def _tiny_model(**kw):
    from nbretr.models import NeighborRetr, NeighborRetrConfig
    torch.manual_seed(0)
    return NeighborRetr(NeighborRetrConfig(vocab_size=50, temporal_layers=1, image_size=32, patch_size=8,
                                           max_words=8, max_frames=3, **kw))


def test_parameter_groups_follow_the_decay_rule():
    from nbretr.optim import param_groups
    model = _tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    for rule in ("bias", "1d"):
        groups = {g["name"]: [names[id(p)] for p in g["params"]] for g in
                  param_groups(model, 1e-4, 1e-3, 0.2, decay_exempt=rule)}
        decayed = set(groups.get("clip_decay", []) + groups.get("new_decay", []))
        exempt = set(groups.get("clip_no_decay", []) + groups.get("new_no_decay", []))
        assert decayed | exempt == set(names.values()) and not decayed & exempt
        assert all(n.startswith("clip.") for n in groups["clip_decay"] + groups["clip_no_decay"])
        if rule == "bias":   # the released rule: a name containing "bias" and nothing else
            assert exempt == {n for n in names.values() if "bias" in n}
            assert "clip.logit_scale" in decayed
            assert "clip.vision_model.embeddings.class_embedding" in decayed
            assert "clip.text_model.final_layer_norm.weight" in decayed
        else:
            assert {"clip.logit_scale", "clip.vision_model.embeddings.class_embedding",
                    "clip.text_model.final_layer_norm.weight"} <= exempt
    groups = param_groups(model, 1e-4, 1e-3, 0.2, decay_exempt="bias")
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in groups} == {
        "clip_decay": (1e-4 * 1e-3, 0.2), "clip_no_decay": (1e-4 * 1e-3, 0.0), "new_decay": (1e-4, 0.2),
        "new_no_decay": (1e-4, 0.0)}


# -- item 4: float16 CLIP weights, frozen patch embedding --------------------------------------

@pytest.mark.slow
def test_fp16_clip_weights_stay_fp16_through_optimizer_steps():
    from nbretr.models import clip as clip_mod
    from nbretr.optim import build_optimizer
    model = _tiny_model()
    clip_mod.clip_weights_to_fp16(model.clip)
    clip_mod.freeze_patch_embedding(model.clip)
    fc = model.clip.text_model.encoder.layers[0].mlp.fc1.weight
    ln = model.clip.text_model.final_layer_norm.weight
    conv = model.clip.vision_model.embeddings.patch_embedding.weight
    assert (fc.dtype, ln.dtype, model.clip.logit_scale.dtype) == (torch.float16, torch.float32, torch.float32)
    opt, sched = build_optimizer(model, 1e-2, 1.0, 0.2, total_steps=4, warmup_proportion=0.25, decay_exempt="bias")
    before, conv_before = fc.detach().clone(), conv.detach().clone()
    g = torch.Generator().manual_seed(0)
    batch = {"text_ids": torch.randint(1, 50, (4, 8), generator=g), "text_mask": torch.ones(4, 8, dtype=torch.long),
             "video": torch.randn(4, 3, 3, 32, 32, generator=g), "video_mask": torch.ones(4, 3, dtype=torch.long)}
    for _ in range(2):
        out = model(batch)
        assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sched.step()
    assert fc.dtype == torch.float16 and fc.grad.dtype == torch.float16
    assert opt.state[fc]["next_m"].dtype == torch.float16     # updated in place, no fp32 master copy
    assert not torch.equal(fc.detach(), before)               # and it did move
    assert torch.equal(conv.detach(), conv_before) and conv.grad is None


# -- items 5 and 6: the loader's order, the reference's batches --------------------------------

def test_reference_order_repeats_across_epochs_and_matches_distributed_sampler():
    from torch.utils.data.distributed import DistributedSampler

    from nbretr.runtime import ResumableSampler
    n, batch, replicas = 50, 8, 4
    ref = ResumableSampler(n, batch, order="reference", reshuffle=False, replicas=replicas)
    first = list(ref)
    ref.set_epoch(3)
    assert list(ref) == first                              # never reshuffled
    # the released loader: DistributedSampler (seed 0) per process, batches of batch/replicas
    shares = [list(DistributedSampler(range(n), num_replicas=replicas, rank=r)) for r in range(replicas)]
    pb = batch // replicas
    want = [i for b in range(len(shares[0]) // pb) for r in range(replicas) for i in shares[r][b * pb:(b + 1) * pb]]
    assert first == want and ref.batches_per_epoch == len(shares[0]) // pb
    # on 2 processes, rank 1 takes the second half of every global batch
    r1 = ResumableSampler(n, batch, rank=1, world_size=2, order="reference", reshuffle=False, replicas=replicas)
    assert list(r1) == [i for b in range(ref.batches_per_epoch) for i in want[b * batch + 4:(b + 1) * batch]]
    ours = ResumableSampler(n, batch, seed=42)
    e0 = list(ours)
    ours.set_epoch(1)
    assert list(ours) != e0                                # the nbretr order reshuffles
    again = ResumableSampler(n, batch, seed=42, reshuffle=False)
    again.set_epoch(5)
    assert list(again) == e0


# -- item 8: evaluation protocol, video->text ranking ------------------------------------------

def test_best_caption_ranking_scores_a_video_by_its_best_caption(monkeypatch):
    from nbretr import eval as E
    # 3 videos; captions 0, 1 -> video 0, caption 2 -> video 1, captions 3, 4 -> video 2
    c2v = torch.tensor([0, 0, 1, 2, 2])
    sims = torch.tensor([[0.9, 0.1, 0.2], [0.0, 0.5, 0.8], [0.3, 0.6, 0.1], [0.2, 0.4, 0.7], [0.95, 0.2, 0.3]])
    monkeypatch.setattr(E.ops, "wti_similarity", lambda t, tm, tw, v, vm, vw: sims[t[:, 0].long()][:, v[:, 0].long()])
    texts = (torch.arange(5.0)[:, None], torch.ones(5, 1), torch.ones(5, 1))
    vids = (torch.arange(3.0)[:, None], torch.ones(3, 1), torch.ones(3, 1))
    fn = E.best_caption_score_fn(vids, texts, c2v)
    got = fn(slice(0, 3), slice(0, 3))
    want = torch.tensor([[0.9, 0.3, 0.95], [0.5, 0.6, 0.4], [0.8, 0.1, 0.7]])   # [query video, gallery video]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(fn(slice(1, 3), slice(1, 3)), want[1:, 1:])     # blocks agree


SMALL = ["--synthetic-size", "small", "--batch-size", "12", "--num-workers", "0", "--mb-batch", "1",
         "--num-neighbors", "4", "--temporal-layers", "1"]


@pytest.fixture(scope="module")
def data_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipedata")
    old = os.environ.get("NBRETR_DATA")
    os.environ["NBRETR_DATA"] = str(root)
    yield root
    if old is None:
        os.environ.pop("NBRETR_DATA", None)
    else:
        os.environ["NBRETR_DATA"] = old


@pytest.mark.slow
def test_best_of_test_is_labelled_and_held_out_keeps_the_best_checkpoint(data_env, tmp_path, capsys):
    from nbretr.train import main
    run = tmp_path / "bot"
    assert main(SMALL + ["--epochs", "2", "--eval-every", "2", "--eval-protocol", "best-of-test",
                         "--v2t-ranking", "best-caption", "--output-dir", str(run)]) == 0
    report = capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    assert m["protocol"] == "best-of-test" and m["label"] == "test split, final weights"
    best = m["best_of_test"]
    history = [json.loads(line) for line in (run / "eval_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 6]   # step 1, every 2 steps, each epoch's end
    assert best["evaluations"] == len(history) and all(h["split"] == "test" for h in history)
    assert best["t2v"]["R1"] == max(h["t2v"]["R1"] for h in history)
    assert best["v2t"]["R1"] == max(h["v2t"]["R1"] for h in history)
    assert "not a held-out result" in best["label"] and best["label"] in report
    assert m["v2t"]["ranking"] == "best-caption" and "video->text ranking: best-caption" in report
    from nbretr import eval as E
    assert E.main(["--checkpoint", str(run), "--print-config", "--qbnorm-k", "3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["eval_protocol"] == "best-of-test" and printed["v2t_ranking"] == "best-caption"
    assert printed["evaluation"]["qbnorm_k"] == 3 and printed["evaluation"]["checkpoint"] == str(run)
    assert not (run / "evals").exists()                  # printed, not run

    run = tmp_path / "held"
    assert main(SMALL + ["--epochs", "2", "--eval-every", "2", "--eval-protocol", "held-out",
                         "--output-dir", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    history = [json.loads(line) for line in (run / "eval_history.jsonl").read_text().splitlines()]
    assert all(h["split"] == "val" for h in history) and "best_of_test" not in m
    best_step = max(history, key=lambda h: h["t2v"]["Rsum"] + h["v2t"]["Rsum"])["step"]
    assert m["selected_checkpoint"]["step"] == best_step
    assert m["label"] == f"test split, checkpoint chosen on the validation Rsum (step {best_step})"
    assert torch.load(run / "checkpoints" / "best.pt", weights_only=True)["global_step"] == best_step
