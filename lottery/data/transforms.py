"""The standard image-classification input policy for images of varying size.

Eval: resize the shorter side to floor(size / crop_fraction) (256 for size 224, crop_fraction
0.875) with bilinear, antialiased interpolation, then take the central size x size crop
(torchvision's `Resize(256)` + `CenterCrop(224)`; timm's `crop_pct`). Train: a random crop of
8%-100% of the image area with aspect ratio in [3/4, 4/3], resized to size x size, flipped
horizontally with probability 1/2 (torchvision's `RandomResizedCrop(size)` +
`RandomHorizontalFlip()`, the same 10 tries and central fallback).

Per-image functions take one uint8 (H, W, C) numpy array (what TFDS decodes) and work with PIL;
`random_resized_crop_flip` is the train policy for a batch of equal-size arrays on device (JAX), of
the `(key, x) -> x` shape that the training engine's augmentations have.

Reference: torchvision.transforms RandomResizedCrop, Resize, CenterCrop (v0.15).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

CROP_FRACTION = 0.875  # eval: crop size / resized shorter side (224 / 256)
SCALE = (0.08, 1.0)  # train: range of the crop's share of the image area
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # train: range of the crop's aspect ratio (width / height)


def _pil(image: np.ndarray):
    from PIL import Image  # noqa: PLC0415 - only images of varying size need PIL

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image dtype {image.dtype}: expected uint8 pixels")
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _array(pil, channels: int) -> np.ndarray:
    out = np.asarray(pil)
    return out[..., None] if out.ndim == 2 else out[..., :channels]


def as_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """`image` as (H, W, channels): grey (H, W) or (H, W, 1) repeated to 3 channels, an alpha
    channel dropped, RGB averaged to grey for 1 channel (ITU-R 601, as PIL's 'L' mode)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    c = image.shape[-1]
    if c == channels:
        return image
    if channels == 3 and c == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 3 and c == 4:
        return image[..., :3]
    if channels == 1 and c in (3, 4):
        return _array(_pil(image[..., :3]).convert("L"), 1)
    raise ValueError(f"image of {c} channels cannot be made {channels}-channel")


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, C) resized to (height, width, C), bilinear with antialiasing (PIL)."""
    from PIL import Image  # noqa: PLC0415

    image = np.asarray(image)
    if image.shape[:2] == (height, width):
        return image
    return _array(_pil(image).resize((width, height), Image.BILINEAR), image.shape[-1])


def resize_shorter(image: np.ndarray, shorter: int) -> np.ndarray:
    """Resize so the shorter side is `shorter`, keeping the aspect ratio (torchvision's
    `Resize(int)`: the longer side becomes int(shorter * long / short))."""
    h, w = np.shape(image)[:2]
    if h <= w:
        return resize(image, shorter, max(1, int(shorter * w / h)))
    return resize(image, max(1, int(shorter * h / w)), shorter)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central size x size crop (top-left at ((H - size) // 2, (W - size) // 2))."""
    h, w = np.shape(image)[:2]
    if h < size or w < size:
        raise ValueError(f"image of {h}x{w} is smaller than the crop {size}x{size}")
    i, j = (h - size) // 2, (w - size) // 2
    return np.asarray(image)[i:i + size, j:j + size]


def eval_size(size: int, crop_fraction: float = CROP_FRACTION) -> int:
    """The shorter side the eval transform resizes to: floor(size / crop_fraction)."""
    return int(math.floor(size / crop_fraction))


def eval_transform(image: np.ndarray, size: int,
                   crop_fraction: float = CROP_FRACTION) -> np.ndarray:
    """Resize the shorter side to `eval_size(size)`, then the central size x size crop."""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction={crop_fraction}: must be in (0, 1]")
    return center_crop(resize_shorter(image, eval_size(size, crop_fraction)), size)


def crop_box(rng: np.random.Generator, height: int, width: int, scale=SCALE,
             ratio=RATIO) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w) of a random crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    h, w = _fallback(height, width, ratio)
    return (height - h) // 2, (width - w) // 2, h, w


def _fallback(height: int, width: int, ratio) -> tuple[int, int]:
    """The central crop's (h, w) when 10 tries fail: the whole image, aspect clamped to `ratio`."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def train_transform(rng: np.random.Generator, image: np.ndarray, size: int, scale=SCALE,
                    ratio=RATIO) -> np.ndarray:
    """Random resized crop to size x size, then a horizontal flip with probability 1/2."""
    top, left, h, w = crop_box(rng, *np.shape(image)[:2], scale=scale, ratio=ratio)
    out = resize(np.asarray(image)[top:top + h, left:left + w], size, size)
    return out[:, ::-1] if rng.random() < 0.5 else out


def random_resized_crop_flip(key: jax.Array, x: jax.Array, scale=SCALE,
                             ratio=RATIO) -> jax.Array:
    """The train policy on a batch (N, H, W, C) on device: per example a random crop (as
    `crop_box`, 10 tries then the central fallback) resized back to H x W (bilinear,
    antialiased), then flipped horizontally with probability 1/2. Same shape out; jit-able."""
    n, height, width, _ = x.shape
    k_area, k_ratio, k_top, k_left, k_flip = jax.random.split(key, 5)
    target = height * width * jax.random.uniform(k_area, (n, 10), minval=scale[0],
                                                 maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(k_ratio, (n, 10), minval=math.log(ratio[0]),
                                        maxval=math.log(ratio[1])))
    w = jnp.round(jnp.sqrt(target * aspect))
    h = jnp.round(jnp.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(ok, axis=1)
    found = jnp.any(ok, axis=1)
    fh, fw = _fallback(height, width, ratio)
    h = jnp.where(found, jnp.take_along_axis(h, first[:, None], 1)[:, 0], fh)
    w = jnp.where(found, jnp.take_along_axis(w, first[:, None], 1)[:, 0], fw)
    top = jnp.where(found, jnp.floor(jax.random.uniform(k_top, (n,)) * (height - h + 1)),
                    (height - h) // 2)
    left = jnp.where(found, jnp.floor(jax.random.uniform(k_left, (n,)) * (width - w + 1)),
                     (width - w) // 2)

    def one(image, top, left, h, w):
        s = jnp.stack([height / h, width / w])
        return jax.image.scale_and_translate(
            image, image.shape, (0, 1), s, -jnp.stack([top, left]) * s, method="linear",
            antialias=True)

    out = jax.vmap(one)(x.astype(jnp.float32), top, left, h, w).astype(x.dtype)
    flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    return jnp.where(flip[:, None, None, None], out[:, :, ::-1], out)
