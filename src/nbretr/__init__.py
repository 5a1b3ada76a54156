"""nbretr: NeighborRetr text-video retrieval on CLIP, with fused C++/CUDA operators."""
from nbretr._ext import build_info
from nbretr import ops
from nbretr.memory_bank import MemoryBank

__version__ = "0.1.0"
__all__ = ["build_info", "ops", "MemoryBank", "Retriever", "__version__"]


def __getattr__(name: str):
    if name == "Retriever":  # lazy: search pulls in the models (transformers) on first use only
        from nbretr.search import Retriever
        return Retriever
    raise AttributeError(f"module 'nbretr' has no attribute {name!r}")
