from model.depthflow import DepthFlow
from model.mit import BACKBONES, MiTEncoder

__all__ = ["BACKBONES", "DepthFlow", "MiTEncoder"]
