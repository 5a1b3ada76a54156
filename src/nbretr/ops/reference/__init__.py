"""The pure-PyTorch path of every operator: the fallback without the extension, the
oracle for tests and the baseline for bench/. Same signatures and semantics as the
public functions in :mod:`nbretr.ops`."""
from nbretr.ops.reference.ring import ring_push, ring_view, cat_slice_push
from nbretr.ops.reference.sinkhorn import sinkhorn_log
from nbretr.ops.reference.topk import dot_tile_fn, select_topk, topk_centrality_dot, topk_centrality_tiled
from nbretr.ops.reference.wti import wti_similarity

__all__ = ["ring_push", "ring_view", "cat_slice_push", "sinkhorn_log", "dot_tile_fn", "select_topk",
           "topk_centrality_dot", "topk_centrality_tiled", "wti_similarity"]
