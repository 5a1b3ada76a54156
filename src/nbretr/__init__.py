"""nbretr: NeighborRetr text-video retrieval on CLIP, with fused C++/CUDA operators."""
from nbretr._ext import build_info
from nbretr import ops
from nbretr.memory_bank import MemoryBank

__version__ = "0.1.0"
__all__ = ["build_info", "ops", "MemoryBank", "__version__"]
