"""The operators' argument checks are written once per language (src/nbretr/ops/_checks.py
for the torch path and the fake kernels, csrc/common/*_checks.h for the extension), the
ext path does not run the Python ones again, and the test-only operators stay out of the
production schema (csrc/testing.h)."""
import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import nbretr.ops.ring as ring_mod
import nbretr.ops.sinkhorn as sinkhorn_mod
import nbretr.ops.topk as topk_mod
import nbretr.ops.wti as wti_mod
from nbretr import ops
from helpers import require_ext

# the module, not the function that nbretr.ops exports under the same name
rank_mod = importlib.import_module("nbretr.ops.topk_rank")

PRODUCTION_OPS = {"ring_push", "sinkhorn_log", "sinkhorn_log_backward", "wti_similarity",
                  "wti_similarity_backward", "topk_centrality_dot", "topk_rank"}


def _message(fn):
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value).splitlines()[0]


def _wti_bad():  # v's D differs from t's
    t, v = torch.randn(2, 3, 4), torch.randn(5, 6, 7)
    return t, torch.ones(2, 3), torch.ones(2, 3), v, torch.ones(5, 6), torch.ones(5, 6)


def test_fake_kernels_share_the_torch_paths_messages():
    """Under fake tensors (torch.compile's tracing) the registered op runs the Python
    checks, with the torch path's message, which is also the C++ message."""
    require_ext("cpu")
    cases = {
        "wti": (lambda a: torch.ops.nbretr.wti_similarity(*a), lambda a: ops.wti_similarity(*a, backend="torch"),
                lambda a: ops.wti_similarity(*a, backend="ext"), _wti_bad),
        "sinkhorn": (lambda a: torch.ops.nbretr.sinkhorn_log(*a, 5, 1.0, None),
                     lambda a: ops.sinkhorn_log(*a, n_iters=5, backend="torch"),
                     lambda a: ops.sinkhorn_log(*a, n_iters=5, backend="ext"),
                     lambda: (torch.randn(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, 4))),
        "topk": (lambda a: torch.ops.nbretr.topk_centrality_dot(*a[:3], False, 0, *a[3:]),
                 lambda a: ops.topk_centrality(*a[:3], counts=a[3], sums=a[4], backend="torch"),
                 lambda a: ops.topk_centrality(*a[:3], counts=a[3], sums=a[4], backend="ext"),
                 lambda: (torch.randn(3, 4), torch.randn(6, 4), 2, torch.zeros(5, dtype=torch.long),
                          torch.zeros(6, dtype=torch.float64))),
        "ring": (lambda a: torch.ops.nbretr.ring_push(*a, 0), lambda a: ops.ring_push(*a, 0, 0, backend="torch"),
                 lambda a: ops.ring_push(*a, 0, 0, backend="ext"),
                 lambda: ([torch.zeros(4, 3)], [torch.zeros(2, 5)])),
    }
    for name, (raw, torch_path, ext_path, make) in cases.items():
        want = _message(lambda: torch_path(make()))
        assert want.startswith("nbretr."), (name, want)
        assert _message(lambda: ext_path(make())) == want, name
        with FakeTensorMode() as mode:
            fake = make()
            fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else
                    [mode.from_tensor(y) for y in x] if isinstance(x, list) else x for x in fake]
            assert _message(lambda: raw(fake)) == want, name


def test_ext_path_does_not_rerun_the_python_checks(monkeypatch):
    require_ext("cpu")

    def boom(*a, **k):
        raise AssertionError("a Python check ran on the ext path")

    for mod, name in ((wti_mod, "check_wti_args"), (sinkhorn_mod, "check_sinkhorn_args"),
                      (sinkhorn_mod, "check_sinkhorn_masks"), (topk_mod, "check_topk_dot_args"),
                      (ring_mod, "check_ring_push_args"), (rank_mod, "check_topk_rank_args"),
                      (rank_mod, "check_topk_rank_values")):
        monkeypatch.setattr(mod, name, boom)
    t, mt, wt, v, mv, wv = _wti_bad()
    v = torch.randn(5, 6, 4)
    assert ops.wti_similarity(t, mt, wt, v, mv, wv, backend="ext").shape == (2, 5)
    assert ops.sinkhorn_log(torch.randn(1, 3, 4), n_iters=3, backend="ext")[0].shape == (1, 3, 4)
    assert ops.topk_centrality(torch.randn(3, 4), torch.randn(6, 4), 2, backend="ext")[0].shape == (3, 2)
    assert ops.ring_push([torch.zeros(4, 3)], [torch.ones(2, 3)], 0, 0, backend="ext") == (2, 2)
    assert ops.topk_rank(torch.randn(3, 5), 2, targets=torch.zeros(3, 1, dtype=torch.long),
                         backend="ext")[2].shape == (3,)
    with pytest.raises(AssertionError, match="a Python check ran"):  # the torch path does run them
        ops.wti_similarity(t, mt, wt, v, mv, wv, backend="torch")
    # what C++ cannot see is still checked on the ext path
    with pytest.raises(RuntimeError, match="filled must be in"):
        ops.ring_push([torch.zeros(4, 3)], [torch.ones(2, 3)], 0, 9, backend="ext")
    with pytest.raises(RuntimeError, match="items\\[0\\] requires grad"):
        ops.ring_push([torch.zeros(4, 3)], [torch.ones(2, 3, requires_grad=True)], 0, 0, backend="ext")
    with pytest.raises(RuntimeError, match="k must be in \\[1, 1024\\], got 2.5"):
        ops.topk_centrality(torch.randn(3, 4), torch.randn(6, 4), 2.5, backend="ext")
    with pytest.raises(RuntimeError, match="counts requires grad"):
        ops.topk_rank(torch.randn(3, 5), 2, counts=torch.zeros(5, requires_grad=True), backend="ext")


def test_test_only_ops_are_not_in_the_production_schema():
    require_ext("cpu")
    names = {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("nbretr::")}
    assert names == PRODUCTION_OPS
    for hook in ("_wti_tiled", "_wti_tiled_backward", "_wti_cpu_plan", "_topk_centrality_dot_tiled"):
        assert not hasattr(torch.ops.nbretr, hook), hook
