"""Vision: DeepSeek-VL's SigLIP and SAM-B towers, the hybrid fusion and aligners (``vl.py``), and
the image preprocessing that feeds them (``image.py``). PIL is imported only when an image is read."""

from .vl import IMAGE_TOKEN, VLConfig, VLModel

__all__ = ["IMAGE_TOKEN", "VLConfig", "VLModel"]
