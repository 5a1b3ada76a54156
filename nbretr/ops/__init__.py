"""The operators' Python face: public functions with a ``backend=`` switch, their
autograd and fake (meta) registrations. Each op lives in its own module; the pure-torch
path of every op is in :mod:`nbretr.ops.reference`.

Nothing here imports from models, losses, train or eval.
"""
from nbretr.ops._backend import Backend, default_backend, use_backend
from nbretr.ops.ring import ring_push, ring_view
# TEMPORARY (model branch): stand-in until the topk branch lands.
from nbretr.ops._pending import topk_centrality
from nbretr.ops.sinkhorn import sinkhorn_log
from nbretr.ops.wti import wti_block, wti_similarity

__all__ = [
    "Backend",
    "default_backend",
    "use_backend",
    "ring_push",
    "ring_view",
    "wti_similarity",
    "topk_centrality",
    "sinkhorn_log",
    "wti_block",
]
