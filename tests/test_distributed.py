"""Two CPU processes with gloo give the loss and the gradients of one process on the same
global batch (features all-gathered with gradient before the losses, bank shared)."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nbretr import MemoryBank

pytestmark = pytest.mark.slow  # two gloo ranks in subprocesses

GLOBAL_BATCH = 8


def _tiny_model(reduce: bool = True, grad_world_size: int | None = None):
    from nbretr.models import NeighborRetr, NeighborRetrConfig
    torch.manual_seed(0)
    return NeighborRetr(NeighborRetrConfig(max_words=8, max_frames=4, num_neighbors=3, temporal_layers=1,
                                           grad_world_size=grad_world_size,
                                           vocab_size=50, image_size=16, patch_size=8,
                                           gather_reduce_grads=reduce))


def _inputs():
    g = torch.Generator().manual_seed(1)
    n = GLOBAL_BATCH
    text_mask = torch.ones(n, 8, dtype=torch.long)
    text_mask[::2, 5:] = 0
    video_mask = torch.ones(n, 4, dtype=torch.long)
    video_mask[1::3, 3:] = 0
    batch = {"text_ids": torch.randint(1, 50, (n, 8), generator=g) * text_mask, "text_mask": text_mask,
             "video": torch.randn(n, 4, 3, 16, 16, generator=g), "video_mask": video_mask,
             "index": torch.arange(n)}
    return batch


def _bank(model):
    bank = MemoryBank.for_features(12, 8, 4, model.dim)
    g = torch.Generator().manual_seed(2)
    bank.push({"text": torch.randn(12, 8, model.dim, generator=g), "text_mask": torch.ones(12, 8, dtype=torch.long),
               "video": torch.randn(12, 4, model.dim, generator=g), "video_mask": torch.ones(12, 4, dtype=torch.long),
               "ids": torch.arange(12)})
    return bank


def _worker(rank, world, init_file, out_file, reduce=True):
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _tiny_model(reduce)
        bank = _bank(model)
        per = GLOBAL_BATCH // world
        batch = {k: v[rank * per:(rank + 1) * per] for k, v in _inputs().items()}
        ddp = DDP(model, find_unused_parameters=True)
        out = ddp(batch, bank=bank)
        out["loss"].backward()
        if rank == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            torch.save({"loss": out["loss"].detach(), "grads": grads}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_gloo_ranks_equal_one_process(tmp_path):
    model = _tiny_model()
    out = model(_inputs(), bank=_bank(model))
    out["loss"].backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2,
                       join=True, start_method="spawn")
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(got["loss"], out["loss"].detach(), rtol=1e-5, atol=1e-6)
    assert set(got["grads"]) == set(ref)
    for n, g in ref.items():
        # float sums over the batch run in another order on two ranks: tolerance relative to
        # the tensor's scale (a wrong reduction, e.g. the reference's 1/W, is off by 50%)
        atol = 1e-5 * float(g.abs().max()) + 1e-8   # (+ floor: k_proj biases have zero true gradient)
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=atol,
                                   msg=lambda m, n=n: f"gradient of {n}: {m}")


# parameters that act before the all-gather (the encoders); the rest act on gathered features
ENCODERS = ("clip.text_model.", "clip.vision_model.", "clip.text_projection.", "clip.visual_projection.",
            "temporal.")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_reference_gather_gives_the_encoders_one_over_w_and_one_process_can_emulate_it(tmp_path):
    """--gather-reduce-grads false (the released AllGather): on two gloo ranks the encoders
    get half the one-process gradient, the layers after the gather all of it; one process
    with grad_world_size=2 reproduces the two ranks' gradients."""
    model = _tiny_model()
    model(_inputs(), bank=_bank(model))["loss"].backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt"), False), nprocs=2,
                       join=True, start_method="spawn")
    two = torch.load(tmp_path / "out.pt", weights_only=True)["grads"]

    emu = _tiny_model(reduce=False, grad_world_size=2)
    emu(_inputs(), bank=_bank(emu))["loss"].backward()
    one = {n: p.grad.clone() for n, p in emu.named_parameters() if p.grad is not None}
    assert set(two) == set(full) == set(one)
    encoders = [n for n in full if n.startswith(ENCODERS)]
    assert len(encoders) > 10 and len(encoders) < len(full)
    for n, g in full.items():
        scale = 0.5 if n.startswith(ENCODERS) else 1.0
        atol = 1e-5 * float(g.abs().max()) + 1e-8
        torch.testing.assert_close(two[n], g * scale, rtol=1e-4, atol=atol, msg=lambda m, n=n: f"{n}: {m}")
        torch.testing.assert_close(one[n], g * scale, rtol=1e-4, atol=atol, msg=lambda m, n=n: f"{n}: {m}")
