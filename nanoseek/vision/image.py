"""Images in: decode bytes safely, then DeepSeek-VL's preprocessing for each tower.

    img = decode_image(data, limits)           # PIL RGB image; ImageError names what is wrong
    pixels, high = ImageProcessor.for_config(cfg)([img, ...])   # [I, 3, 384, 384], [I, 3, 1024, 1024]

Preprocessing, as the reference processor does it: scale the image so its longer side is the
high-resolution size (bicubic, on 8-bit pixels; neither side below ``min_size``), pad the shorter
side evenly to a square with the mean colour (the normalisation mean times 255, truncated), then
make the low-resolution view by resizing that padded square (so both views show the same
framing); finally scale to [0, 1] and normalise each view with its tower's mean and std. Without a
high-resolution tower (deepseek_vl) the image goes straight to the low-resolution size.

PIL is imported inside the functions, so ``import nanoseek`` never pulls it in.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: PIL is imported where an image is decoded
    import PIL.Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


class ImageError(ValueError):
    """An image that cannot be used; the message says why (the server answers it with a 400)."""


@dataclass
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024     # encoded size
    max_pixels: int = 6000 * 6000         # width x height, checked from the header before decoding
    max_images: int = 4                   # per request


def decode_image(data: bytes, limits: ImageLimits | None = None, what: str = "image") -> "PIL.Image.Image":
    """Encoded PNG/JPEG/WebP/GIF bytes -> an RGB PIL image, refusing oversize, unknown or cut-short data."""
    from PIL import Image

    limits = limits or ImageLimits()
    if len(data) > limits.max_bytes:
        raise ImageError(f"{what}: {len(data)} bytes is over the {limits.max_bytes}-byte limit")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # PIL's own guard, from the header, before any decoding
        raise ImageError(f"{what}: the image is over the limit of {limits.max_pixels} pixels") from None
    except Exception:
        raise ImageError(f"{what}: not a readable image (expected one of {', '.join(FORMATS)})") from None
    if img.format not in FORMATS:
        raise ImageError(f"{what}: format {img.format} is not accepted (expected one of {', '.join(FORMATS)})")
    w, h = img.size
    if w * h > limits.max_pixels:
        raise ImageError(f"{what}: {w}x{h} pixels is over the limit of {limits.max_pixels} pixels")
    if img.format == "GIF" and getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # an animation: its first frame
    try:
        img.load()
    except Exception as e:
        raise ImageError(f"{what}: the {img.format} data is truncated or corrupt ({e})") from None
    return img.convert("RGB")


def open_image(path, limits: ImageLimits | None = None) -> "PIL.Image.Image":
    """An image file -> RGB PIL image (``decode_image``'s checks, errors naming the path)."""
    with open(path, "rb") as f:
        return decode_image(f.read(), limits, what=str(path))


@dataclass
class ImageProcessor:
    """The two views' sizes and normalisation (a DeepSeek-VL ``preprocessor_config.json``)."""
    size: int = 384
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    high_res_size: int | None = 1024                 # None: SigLIP only (deepseek_vl)
    high_res_image_mean: tuple = CLIP_MEAN
    high_res_image_std: tuple = CLIP_STD
    min_size: int = 14

    @classmethod
    def for_config(cls, cfg, **overrides) -> "ImageProcessor":
        """Sizes from a VLConfig's towers (normalisation: the reference processor's defaults)."""
        high = cfg.high_res.image_size if cfg.high_res is not None else None
        return cls(size=cfg.vision.image_size, high_res_size=high, **overrides)

    @classmethod
    def from_hf(cls, d: dict, hybrid: bool) -> "ImageProcessor":
        def side(v):
            return v if isinstance(v, int) or v is None else v.get("height", v.get("shortest_edge"))
        kw = {k: tuple(d[k]) if isinstance(d.get(k), list) else d[k] for k in
              ("image_mean", "image_std", "high_res_image_mean", "high_res_image_std", "min_size") if k in d}
        if "size" in d:
            kw["size"] = side(d["size"])
        kw["high_res_size"] = side(d.get("high_res_size", 1024)) if hybrid else None
        return cls(**kw)

    def __call__(self, images: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """PIL images -> (low-resolution views [I, 3, S, S], high-resolution views [I, 3, S_hi, S_hi] or None)."""
        lows, highs = [], []
        for img in images:
            img = img.convert("RGB")
            if self.high_res_size is None:
                lows.append(self._view(img, self.size, self.image_mean, self.image_std)[1])
                continue
            square, high = self._view(img, self.high_res_size, self.high_res_image_mean, self.high_res_image_std)
            highs.append(high)
            lows.append(self._view(square, self.size, self.image_mean, self.image_std)[1])
        low = torch.stack(lows) if lows else torch.zeros(0, 3, self.size, self.size)
        return low, torch.stack(highs) if highs else None

    def _view(self, img, size: int, mean, std):
        """-> (the padded square PIL image, its normalised pixels [3, size, size])."""
        square = pad_to_square(resize_longest(img, size, self.min_size), tuple(int(m * 255) for m in mean))
        return square, normalise(square, mean, std)


def resize_longest(img, size: int, min_size: int):
    """Bicubic resize so the longer side is `size` (Python's round; neither side below min_size)."""
    from PIL import Image

    w, h = img.size
    scale = size / max(w, h)
    return img.resize((max(round(w * scale), min_size), max(round(h * scale), min_size)), Image.BICUBIC)


def pad_to_square(img, color: tuple):
    """Centre the image on a square canvas of `color` (the extra row/column, if odd, after it)."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def normalise(img, mean, std) -> torch.Tensor:
    """8-bit RGB -> float32 [3, H, W]: x / 255, then (x - mean) / std per channel."""
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.size[1], img.size[0], 3)
    x = x.permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
