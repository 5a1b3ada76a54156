"""Atomic checkpoints, weights_only loading, RNG round trip, optimiser and schedule."""
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from nbretr import checkpoint as ckpt
from nbretr.optim import BertAdam, build_optimizer, param_groups, warmup_cosine
from nbretr.runtime import ResumableSampler


def test_save_atomic_roundtrip_weights_only(tmp_path):
    obj = {"w": torch.randn(3, 4), "step": 7, "nested": {"a": [1, 2.5, "x"]}, "rng": ckpt.rng_state()}
    path = ckpt.save_atomic(obj, tmp_path / "c" / "last.pt")
    back = ckpt.load(path)
    assert torch.equal(back["w"], obj["w"]) and back["step"] == 7 and back["nested"] == obj["nested"]
    assert not list((tmp_path / "c").glob("*.partial"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*missing.pt"):
        ckpt.load(tmp_path / "missing.pt")


def test_rng_state_roundtrip(tmp_path):
    state = ckpt.rng_state()
    ckpt.save_atomic(state, tmp_path / "rng.pt")
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(ckpt.load(tmp_path / "rng.pt"))
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


_KILL_CHILD = r"""
import sys, torch
from nbretr import checkpoint as ckpt
path = sys.argv[1]
ckpt.save_atomic({"version": 1, "w": torch.ones(4)}, path)
print("first saved", flush=True)
big = {"version": 2, "w": torch.randn(64, 1024, 1024)}  # 256 MiB: the save takes a while
while True:
    ckpt.save_atomic(big, path)
"""


@pytest.mark.slow
def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    """A process killed (SIGKILL) while writing a checkpoint leaves the previous one intact."""
    path = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "first saved"
        deadline = time.time() + 60
        while not list(tmp_path.glob("*.partial")):   # wait until the second save is under way
            assert time.time() < deadline, "the second save never started"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partials = list(tmp_path.glob("*.partial"))
    state = ckpt.load(path)
    # either the save had not reached the rename (version 1) or it had fully completed (2):
    # never a torn file
    assert state["version"] in (1, 2)
    if partials:
        assert ckpt.clean_partials(tmp_path) == partials
    assert not list(tmp_path.glob("*.partial"))


def test_bertadam_matches_hand_computation():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = BertAdam([p], lr=0.1, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    grads = [torch.tensor([0.5, -1.0]), torch.tensor([-0.25, 2.0])]
    m = np.zeros(2)
    v = np.zeros(2)
    x = np.array([1.0, -2.0])
    for g in grads:
        p.grad = g.clone()
        opt.step()
        gn = g.numpy().astype(np.float64)
        m = 0.9 * m + 0.1 * gn
        v = 0.98 * v + 0.02 * gn * gn
        x = x - 0.1 * (m / (np.sqrt(v) + 1e-6) + 0.2 * x)   # no bias correction
    np.testing.assert_allclose(p.detach().numpy(), x, rtol=1e-6)


def test_warmup_cosine_and_groups():
    assert warmup_cosine(0.0, 0.1) == 0.0
    assert warmup_cosine(0.05, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(0.5, 0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    model = torch.nn.ModuleDict({"clip": torch.nn.Linear(3, 3), "head": torch.nn.Sequential(
        torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))})
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, coef_lr=1e-3, weight_decay=0.2)}
    assert groups["clip_decay"]["lr"] == pytest.approx(1e-7)
    assert groups["new_decay"]["lr"] == pytest.approx(1e-4)
    assert groups["new_no_decay"]["weight_decay"] == 0.0
    assert len(groups["new_no_decay"]["params"]) == 3   # head bias, LayerNorm weight and bias
    opt, sched = build_optimizer(model, 1e-4, 1e-3, 0.2, total_steps=10, warmup_proportion=0.2)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] > 0 and lrs[2] > lrs[1]


def test_resumable_sampler_splits_and_resumes():
    s = ResumableSampler(23, global_batch=6, rank=0, world_size=2, seed=3)
    t = ResumableSampler(23, global_batch=6, rank=1, world_size=2, seed=3)
    s.set_epoch(1)
    t.set_epoch(1)
    a, b = list(s), list(t)
    assert len(a) == len(b) == 3 * 3 and not set(a) & set(b)
    order = s.global_order()
    assert a[:3] == order[:3] and b[:3] == order[3:6]
    s.set_epoch(1, start_batch=2)
    assert list(s) == a[6:]
    with pytest.raises(ValueError, match="divisible by the world size"):
        ResumableSampler(10, global_batch=5, world_size=2)


def test_unknown_checkpoint_keys_are_named_not_dropped_silently(tmp_path, caplog):
    """A checkpoint with keys this version does not read loads with a named warning that
    lists them; one with only known keys loads without; the model weights' own keys are
    checked by load_state_dict (strict)."""
    good = {"model": {"w": torch.zeros(2)}, "config": {}, "global_step": 3, "val_rsum": 1.0}
    path = ckpt.save_atomic(good, tmp_path / "best.pt")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.load(path, required=("model",))["global_step"] == 3
    bad = ckpt.save_atomic({**good, "ema": {"w": torch.ones(2)}, "zz_extra": 1}, tmp_path / "other.pt")
    with pytest.warns(ckpt.UnknownCheckpointKeysWarning, match=r"other.pt: ignoring key\(s\) .*\['ema', 'zz_extra'\]"):
        state = ckpt.load(bad, required=("model", "config"))
    assert "ignoring key(s)" in caplog.text and "'ema'" in caplog.text
    assert state["global_step"] == 3
    with pytest.warns(ckpt.UnknownCheckpointKeysWarning, match="ema"):
        ckpt.load_with_fallback(bad, required=("model",))
    # every key the trainer writes is known
    import nbretr.train as T
    assert set(T.TRAINING_STATE_KEYS) <= ckpt.CHECKPOINT_KEYS
    assert ckpt.check_keys({"model": 1, "nbretr_version": "x", "eval_best": {}}, "x.pt") == []
