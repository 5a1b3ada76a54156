"""ring_push / ring_view against the reference's concatenate-and-slice (docs/operators.md)."""
import random

import pytest
import torch

from nbretr import MemoryBank, ops
from nbretr.ops.reference import cat_slice_push

from helpers import FLOAT_DTYPES, require_ext

BACKENDS = ["torch", "ext"]


def _backend_ok(backend, device):
    if backend == "ext":
        require_ext(device)


def _make_bank(capacity, device, dtype):
    return [
        torch.zeros(capacity, 4, 6, dtype=dtype, device=device),      # token features [N, L, D]
        torch.zeros(capacity, 4, dtype=torch.long, device=device),      # {0,1} mask
        torch.zeros(capacity, 3, dtype=torch.bool, device=device),      # bool mask
        torch.full((capacity,), -1, dtype=torch.long, device=device),   # sample ids
        torch.zeros(capacity, 5, dtype=torch.uint8, device=device),     # odd row size (5 bytes)
    ]


def _make_items(n, device, dtype, counter, noncontig):
    feats = torch.randn(n, 6, 4, device=device).to(dtype)
    feats = feats.transpose(1, 2) if noncontig else feats.transpose(1, 2).contiguous()
    return [
        feats,
        torch.randint(0, 2, (n, 4), device=device),
        torch.rand(n, 3, device=device) > 0.5,
        torch.arange(counter, counter + n, device=device),
        torch.randint(0, 255, (n, 5), dtype=torch.uint8, device=device),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("capacity", [1, 7, 16])
def test_random_push_sequences_match_cat_slice(device, backend, dtype, capacity):
    _backend_ok(backend, device)
    rng = random.Random(capacity)
    bufs = _make_bank(capacity, device, dtype)
    ref = [b[:0].clone() for b in bufs]
    head = filled = 0
    counter = 0
    # smaller than, equal to and larger than the capacity; zero-length batches too
    sizes = [rng.choice([0, 1, 2, 3, capacity - 1, capacity, capacity + 1, 2 * capacity + 3]) for _ in range(25)]
    for step, n in enumerate(sizes):
        n = max(n, 0)
        items = _make_items(n, device, dtype, counter, noncontig=step % 2 == 0)
        counter += n
        head, filled = ops.ring_push(bufs, items, head, filled, backend=backend)
        ref = cat_slice_push(ref, items, capacity)
        got = ops.ring_view(bufs, head, filled)
        assert filled == ref[0].shape[0]
        for g, r in zip(got, ref):
            assert torch.equal(g, r), f"step {step} (n={n})"


def test_ext_matches_torch_state(device):
    require_ext(device)
    a = _make_bank(9, device, torch.float16)
    b = _make_bank(9, device, torch.float16)
    ha = fa = hb = fb = 0
    for n in [4, 4, 4, 13, 2, 9]:
        items = _make_items(n, device, torch.float16, 0, noncontig=True)
        ha, fa = ops.ring_push(a, items, ha, fa, backend="ext")
        hb, fb = ops.ring_push(b, items, hb, fb, backend="torch")
        assert (ha, fa) == (hb, fb)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_items_are_not_modified(device):
    bufs = _make_bank(5, device, torch.float32)
    items = _make_items(3, device, torch.float32, 0, noncontig=True)
    before = [i.clone() for i in items]
    ops.ring_push(bufs, items, 0, 0)
    for i, j in zip(items, before):
        assert torch.equal(i, j)


def test_ring_view_returns_copies(device):
    bufs = _make_bank(5, device, torch.float32)
    h, f = ops.ring_push(bufs, _make_items(3, device, torch.float32, 0, False), 0, 0)
    view = ops.ring_view(bufs, h, f)
    view[3].fill_(7)
    assert not (bufs[3] == 7).any()


# -- errors: same message on both backends --------------------------------------------

def _bad_cases(device):
    buf = torch.zeros(4, 3, device=device)
    ids = torch.zeros(4, dtype=torch.long, device=device)
    return [
        ("buffers must be a non-empty list", [], [], 0),
        ("items has 1 tensors but buffers has 2", [buf, ids], [torch.zeros(2, 3, device=device)], 0),
        ("items\\[1\\] has 3 rows but items\\[0\\] has 2",
         [buf, ids], [torch.zeros(2, 3, device=device), torch.zeros(3, dtype=torch.long, device=device)], 0),
        ("items\\[0\\] has dtype torch.float16 but buffers\\[0\\] has dtype torch.float32",
         [buf], [torch.zeros(2, 3, dtype=torch.float16, device=device)], 0),
        ("items\\[0\\] has shape \\[2, 5\\] but buffers\\[0\\] has rows of shape \\[3\\]",
         [buf], [torch.zeros(2, 5, device=device)], 0),
        ("items\\[0\\] has shape \\[2\\] but buffers\\[0\\] has shape \\[4, 3\\]",
         [buf], [torch.zeros(2, device=device)], 0),
        ("buffers\\[1\\] has shape \\[5\\] but buffers\\[0\\] has capacity 4",
         [buf, torch.zeros(5, device=device)], [torch.zeros(1, 3, device=device), torch.zeros(1, device=device)], 0),
        ("buffers\\[0\\] must be contiguous", [torch.zeros(3, 4, device=device).t()],
         [torch.zeros(1, 3, device=device)], 0),
        ("head must be in \\[0, capacity=4\\), got 4", [buf], [torch.zeros(1, 3, device=device)], 4),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_argument(device, backend):
    _backend_ok(backend, device)
    for pattern, bufs, items, head in _bad_cases(device):
        with pytest.raises(RuntimeError, match=pattern):
            ops.ring_push(bufs, items, head, 0, backend=backend)


def test_kernel_checks_match_python_checks():
    """The C++ op, called directly, refuses the same inputs with the same messages."""
    require_ext("cpu")
    # (an empty list cannot reach a kernel: the dispatcher has no tensor to dispatch on,
    # so that case is the Python wrapper's alone)
    for pattern, bufs, items, head in _bad_cases("cpu")[1:]:
        with pytest.raises(RuntimeError, match=pattern):
            torch.ops.nbretr.ring_push(bufs, items, head)


def test_device_mismatch_error():
    if not torch.cuda.is_available():
        # meta tensors stand in for a second device: the check is on the device, not data
        bufs = [torch.zeros(4, 3)]
        with pytest.raises(RuntimeError, match="items\\[0\\] is on meta but the buffers are on cpu"):
            ops.ring_push(bufs, [torch.zeros(2, 3, device="meta")], 0, 0)
    else:
        bufs = [torch.zeros(4, 3, device="cuda")]
        with pytest.raises(RuntimeError, match="items\\[0\\] is on cpu but the buffers are on cuda"):
            ops.ring_push(bufs, [torch.zeros(2, 3)], 0, 0)


def test_autograd_refused():
    with pytest.raises(RuntimeError, match="buffers\\[0\\] requires grad"):
        ops.ring_push([torch.zeros(4, 3, requires_grad=True)], [torch.zeros(1, 3)], 0, 0)
    with pytest.raises(RuntimeError, match="push item.detach\\(\\)"):
        ops.ring_push([torch.zeros(4, 3)], [torch.zeros(1, 3, requires_grad=True)], 0, 0)


def test_opcheck():
    require_ext("cpu")
    bufs = _make_bank(6, "cpu", torch.float32)
    items = _make_items(4, "cpu", torch.float32, 0, noncontig=False)
    torch.library.opcheck(torch.ops.nbretr.ring_push.default, (bufs, items, 3))
    bufs = _make_bank(6, "cpu", torch.bfloat16)
    items = _make_items(9, "cpu", torch.bfloat16, 0, noncontig=True)
    torch.library.opcheck(torch.ops.nbretr.ring_push.default, (bufs, items, 0))


def test_fake_tensor_mode():
    require_ext("cpu")
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        bufs = [torch.zeros(6, 3)]
        torch.ops.nbretr.ring_push(bufs, [torch.ones(2, 3)], 1)


# -- MemoryBank ---------------------------------------------------------------------

def _batch(n, start, L=3, F=2, D=4):
    return {
        "text": torch.randn(n, L, D),
        "text_mask": torch.ones(n, L, dtype=torch.long),
        "video": torch.randn(n, F, D),
        "video_mask": torch.ones(n, F, dtype=torch.long),
        "ids": torch.arange(start, start + n),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_bank_push_view_fill(backend):
    _backend_ok(backend, "cpu")
    bank = MemoryBank.for_features(10, max_words=3, max_frames=2, dim=4, backend=backend)
    assert len(bank) == 0
    ref = None
    batches = [_batch(4, 0), _batch(4, 4), _batch(4, 8)]
    bank.fill(batches)
    for b in batches:
        ref = {k: v for k, v in b.items()} if ref is None else {
            k: torch.cat((b[k], ref[k]))[:10] for k in b}
    view = bank.view()
    assert view["ids"].tolist() == [8, 9, 10, 11, 4, 5, 6, 7, 0, 1]
    for k in ref:
        assert torch.equal(view[k], ref[k])
    # full bank: fields() are the storage itself, same multiset of ids
    assert sorted(bank.fields()["ids"].tolist()) == sorted(view["ids"].tolist())
    # refill empties first
    bank.fill([_batch(2, 100)])
    assert bank.view()["ids"].tolist() == [100, 101]


def test_memory_bank_state_dict_roundtrip(tmp_path):
    bank = MemoryBank.for_features(7, 3, 2, 4)
    for i in range(3):
        bank.push(_batch(3, 10 * i))
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    other = MemoryBank.for_features(7, 3, 2, 4)
    other.load_state_dict(torch.load(tmp_path / "bank.pt", weights_only=True))
    nxt = _batch(2, 99)
    for b in (bank, other):
        b.push(nxt)
    for k, v in bank.view().items():
        assert torch.equal(v, other.view()[k])
    with pytest.raises(ValueError, match="capacity 7"):
        MemoryBank.for_features(8, 3, 2, 4).load_state_dict(bank.state_dict())


def test_memory_bank_errors_and_casts():
    bank = MemoryBank.for_features(4, 3, 2, 4, dtype=torch.float16)
    b = _batch(2, 0)
    b["text"].requires_grad_(True)
    bank.push(b)  # detached and cast to fp16
    assert bank.view()["text"].dtype == torch.float16
    bad = _batch(2, 0)
    del bad["ids"]
    with pytest.raises(KeyError, match="missing \\['ids'\\]"):
        bank.push(bad)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        MemoryBank.for_features(0, 3, 2, 4)
    assert "capacity=4" in repr(bank)
    assert bank.to("cpu").device.type == "cpu"
