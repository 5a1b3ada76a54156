"""NeighborRetr's model: CLIP backbone (transformers), temporal transformer, WTI head,
token clustering, and the model that composes the losses of :mod:`nbretr.losses`."""
from nbretr.models.neighborretr import NeighborRetr, NeighborRetrConfig
from nbretr.models.clip import load_clip, tiny_clip_config
from nbretr.models.distributed import all_gather_with_grad

__all__ = ["NeighborRetr", "NeighborRetrConfig", "load_clip", "tiny_clip_config", "all_gather_with_grad"]
