from model.depthflow import DepthFlow
from model.encoders import build_encoder
from model.mit import MIT_SPECS, MiTEncoder

__all__ = ["MIT_SPECS", "DepthFlow", "MiTEncoder", "build_encoder"]
