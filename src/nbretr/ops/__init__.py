"""The operators' Python face: public functions with a ``backend=`` switch, their
autograd and fake (meta) registrations. Each op lives in its own module; the pure-torch
path of every op is in :mod:`nbretr.ops.reference`.

Nothing here imports from models, losses, train or eval.
"""
from nbretr.ops._backend import Backend, default_backend, use_backend
from nbretr.ops.ring import ring_push, ring_view
from nbretr.ops.settings import KernelSettings, get_kernel_settings, kernel_settings, set_kernel_settings
from nbretr.ops.sinkhorn import sinkhorn_log
from nbretr.ops.topk import TOPK_MAX_K, topk_centrality
from nbretr.ops.topk_rank import topk_rank
from nbretr.ops.wti import wti_block, wti_similarity

__all__ = [
    "Backend",
    "default_backend",
    "use_backend",
    "KernelSettings",
    "get_kernel_settings",
    "set_kernel_settings",
    "kernel_settings",
    "ring_push",
    "ring_view",
    "wti_similarity",
    "wti_block",
    "topk_centrality",
    "TOPK_MAX_K",
    "topk_rank",
    "sinkhorn_log",
]
