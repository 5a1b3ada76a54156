"""The fine-tuning of the pretrained stand-in stays healthy under both losses: a few dozen
steps of the embedded default (NeighborRetr with the reference's loss settings) and of the
InfoNCE baseline lower the loss and leave the features spread out. From a random CLIP, the
reference's settings once collapsed every global token onto one direction (R@1 at chance);
this test is the alarm if that returns from the pretrained start.

It builds the default dataset and the default stand-in (about 2 minutes on 2 cores), hence
``slow``."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow

STEPS = 40


def spread(x: torch.Tensor) -> float:
    """1 - |mean of the L2-normalised rows|^2: 0 when every row points the same way, near 1
    for directions spread over the sphere."""
    x = F.normalize(x.float(), dim=-1)
    return float(1 - x.mean(0).pow(2).sum())


def test_spread_measure():
    assert spread(torch.ones(8, 4)) == pytest.approx(0.0, abs=1e-6)
    assert spread(torch.eye(4)) == pytest.approx(0.75)
    assert spread(torch.randn(4096, 64)) > 0.95


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("health")
    old = os.environ.get("NBRETR_DATA")
    os.environ["NBRETR_DATA"] = str(root / "data")
    yield root
    if old is None:
        os.environ.pop("NBRETR_DATA", None)
    else:
        os.environ["NBRETR_DATA"] = old


def _features(model, batch) -> dict[str, float]:
    """Spreads of the caption and video features (mean-pooled tokens) and, for NeighborRetr,
    of the global tokens its losses use."""
    with torch.no_grad():
        T, tm = model.encode_text(batch["text_ids"], batch["text_mask"])
        V, vm = model.encode_video(batch["video"], batch["video_mask"])
        out = {"text": spread((T * tm[..., None]).sum(1) / tm.sum(1, keepdim=True)), "video": spread(V.mean(1))}
        if not model.config.baseline:
            out["global_text"] = spread(model.global_tokens_text(T, tm))
            out["global_video"] = spread(model.global_tokens_video(V, vm))
    return out


@pytest.mark.parametrize("loss", ["neighborretr", "infonce"])
def test_fine_tuning_lowers_the_loss_without_collapse(env, loss):
    from nbretr import builders
    from nbretr.config import build_parser, resolve_config
    from nbretr.data import collate
    from nbretr.export import export_run
    from nbretr.models import NeighborRetr
    from nbretr.train import main as train

    extra = ["--baseline"] if loss == "infonce" else []
    args = ["--max-steps", str(STEPS), "--do-eval", "false", "--seed", "0", "--num-workers", "0",
            "--report-to", "none", "--log-every", "1", *extra]
    cfg = resolve_config(build_parser("t").parse_args(args))
    assert cfg.clip == "tiny-pretrained" and not cfg.detach_centrality and cfg.w_opt == 1.0
    torch.manual_seed(0)
    start = builders.build_model(cfg, None).eval()       # the stand-in and fresh modules, step 0
    test = builders.build_split(cfg, "test", builders.build_tokenizer(cfg, None))
    batch = collate([test[i] for i in range(128)])
    before = _features(start, batch)

    run = env / loss
    assert train([*args, "--output-dir", str(run)]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) >= STEPS // 2
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses   # the loss falls

    after = _features(NeighborRetr.from_pretrained(export_run(run, env / f"{loss}-model")), batch)
    for name, s0 in before.items():  # no feature family collapses onto one direction
        assert after[name] > max(0.05, 0.5 * s0), (name, before, after)
