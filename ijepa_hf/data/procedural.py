"""An embedded procedural image dataset: textured backgrounds with a few simple shapes.

No download, deterministic, fast (numpy only), and structured enough for self-supervised features to pick
something up: textures, shapes, sizes and positions vary, and each image comes with labels for probes (what
is the background texture, what is the largest shape, where is it, how many objects are there).

Every image is generated on the fly from ``(seed, index)`` with its own ``numpy.random.Generator``, so item
``i`` is the same in every process, worker and run, whatever order items are read in.

Image content:
    * background: one of ``TEXTURE_NAMES`` (solid, linear gradient, sine stripes, checkerboard, smooth
      noise) between two colours, plus mild pixel noise;
    * ``1..max_objects`` (default 3) non-overlapping objects, each a ``SHAPE_NAMES`` shape (circle, square,
      triangle, ellipse, cross) with a random rotation and a solid or striped fill. Shapes are anti-aliased.
    * The *largest* object (largest circumscribed radius) is always object 0; every other object's radius
      is 45-80 % of it, so "largest" is never ambiguous.
    * Colours (``palette``): ``"grey"`` (default) draws every image with the same grey levels
      (``GREY_LEVELS``: dark background texture, bright objects, mid-grey stripes); ``"random"`` gives the
      background and every object random colours (objects kept away from the background colour). Random
      colours dominate the mean-pooled features of a small ViT (their spread is almost all in 3 directions,
      the mean RGB), so a few CPU minutes of I-JEPA pretraining learn colour and nothing a texture or shape
      probe can see; with the grey palette the scene's structure is what varies. Both palettes draw the same
      random numbers, so item ``i`` has the same layout, shapes, texture and noise in both.
    * Shapes (``shared_shape``): by default every object draws its own shape class; with ``shared_shape=True``
      every object of an image has the largest object's class, so the class is a property of the whole scene:
      an object hidden from view can be predicted from the visible ones, which is the kind of regularity
      I-JEPA's prediction in representation space learns from (the embedded demo uses it, see
      ``ijepa_hf.data.pretraining.EMBEDDED_SCENES``). The random numbers drawn are the same either way.

Labels per image:
    * ``label`` / ``shape``: class id (into ``SHAPE_NAMES``) of the largest object;
    * ``texture``: class id (into ``TEXTURE_NAMES``) of the background texture;
    * ``count``: number of objects, in ``[1, max_objects]``;
    * ``position``: centre ``(x, y)`` of the largest object divided by the image size, in ``[0, 1]``;
    * ``size``: circumscribed radius of the largest object divided by the image size.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["SHAPE_NAMES", "TEXTURE_NAMES", "PALETTES", "GREY_LEVELS", "ShapeSpec", "ProceduralShapes", "as_hf_dataset"]

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "ellipse", "cross")
TEXTURE_NAMES: tuple[str, ...] = ("solid", "gradient", "stripes", "checker", "noise")
PALETTES: tuple[str, ...] = ("grey", "random")
# Grey levels of the "grey" palette (0-255): the background's two texture colours, the objects, their stripes.
GREY_LEVELS: dict[str, float] = {"background1": 40.0, "background2": 110.0, "object": 230.0, "stripe": 150.0}

# Triangle edge normals (an equilateral triangle pointing "up" in local coordinates): inside when
# u*cos(a) + v*sin(a) <= r/2 for the three angles (the apothem is half the circumradius).
_TRIANGLE_NORMALS = np.array([[math.cos(a), math.sin(a)] for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])


@dataclass(frozen=True)
class ShapeSpec:
    """One object of an image (pixel units)."""

    shape: int  # index into SHAPE_NAMES
    cx: float
    cy: float
    radius: float  # circumscribed radius
    angle: float  # rotation, radians
    color: tuple[float, float, float]
    stripe_color: tuple[float, float, float] | None  # None: solid fill
    stripe_period: float
    stripe_angle: float


class ProceduralShapes(torch.utils.data.Dataset):
    """Procedural shapes dataset (a map-style torch Dataset).

    Args:
        num_images: dataset length.
        image_size: side ``S`` of the square RGB images (default 64).
        seed: dataset seed; item ``i`` depends only on ``(seed, i)`` and the constructor arguments.
        max_objects: maximum objects per image (``count`` is in ``[min_objects, max_objects]``; an object
            that cannot be placed without overlap after many tries is dropped, so ``count`` is the number
            actually drawn).
        min_objects: minimum objects per image (>= 1).
        transform: optional ``PIL.Image -> Tensor`` (e.g. ``PretrainTransform``). With it, items carry
            ``"pixel_values"`` instead of ``"image"``.
        radius_range: range of the largest object's circumscribed radius, as a fraction of ``S``.
        noise_std: maximum standard deviation of the additive pixel noise (0-255 scale).
        palette: ``"grey"`` (default: the same grey levels in every image) or ``"random"`` (random colours);
            see the module docstring.
        shared_shape: give every object of an image the largest object's shape class (default ``False``:
            each object draws its own); see the module docstring.

    ``__getitem__(i)`` returns ``{"image": PIL RGB [S x S]`` (or ``"pixel_values": transform(image)``),
    ``"label": int, "shape": int, "texture": int, "count": int, "position": FloatTensor [2], "size": float}``.
    """

    shape_names = SHAPE_NAMES
    num_classes = len(SHAPE_NAMES)
    # Items are drawn once per process and kept when the whole dataset's pixels fit in this many bytes: a
    # pretraining epoch after the first then costs a crop, not a drawing (an item depends only on its seed and
    # index, so no pixel changes). `render` itself always draws afresh, so its arrays stay the caller's to change.
    RENDER_CACHE_BYTES = 256 * 2**20

    def __init__(
        self,
        num_images: int,
        image_size: int = 64,
        seed: int = 0,
        max_objects: int = 3,
        min_objects: int = 1,
        transform: Callable[[Image.Image], Any] | None = None,
        radius_range: tuple[float, float] = (0.14, 0.3),
        noise_std: float = 6.0,
        palette: str = "grey",
        shared_shape: bool = False,
    ) -> None:
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if not 0 < radius_range[0] <= radius_range[1] < 0.5:
            raise ValueError(f"radius_range must satisfy 0 < lo <= hi < 0.5, got {radius_range}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if palette not in PALETTES:
            raise ValueError(f"palette must be one of {PALETTES}, got {palette!r}")
        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.max_objects = int(max_objects)
        self.min_objects = int(min_objects)
        self.transform = transform
        self.radius_range = (float(radius_range[0]), float(radius_range[1]))
        self.noise_std = float(noise_std)
        self.palette = palette
        self.shared_shape = bool(shared_shape)
        # Pixel-centre coordinates, shared by all images of this size.
        coords = np.arange(self.image_size, dtype=np.float32) + 0.5
        self._xs = coords[None, :]
        self._ys = coords[:, None]
        fits = self.num_images * self.image_size**2 * 3 <= self.RENDER_CACHE_BYTES
        self._drawn: dict[int, tuple[np.ndarray, dict[str, Any]]] | None = {} if fits else None

    def __len__(self) -> int:
        return self.num_images

    # ------------------------------------------------------------------------------------------------
    # Layout
    # ------------------------------------------------------------------------------------------------

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        # A SeedSequence over (seed, index): independent streams per item, no order dependence.
        return np.random.default_rng([self.seed, int(index)])

    @staticmethod
    def _color_far_from(
        rng: np.random.Generator, reference: np.ndarray, min_dist: float = 110.0
    ) -> np.ndarray:
        """A random colour at least ``min_dist`` (RGB euclidean) from ``reference`` (best of 12 tries)."""
        best, best_d = None, -1.0
        for _ in range(12):
            c = rng.uniform(0, 255, size=3)
            d = float(np.linalg.norm(c - reference))
            if d >= min_dist:
                return c
            if d > best_d:
                best, best_d = c, d
        return best  # type: ignore[return-value]

    def _layout(self, rng: np.random.Generator) -> tuple[dict[str, Any], list[ShapeSpec]]:
        S = self.image_size
        # Background.
        texture = int(rng.integers(len(TEXTURE_NAMES)))
        bg1 = rng.uniform(0, 255, size=3)
        bg2 = rng.uniform(0, 255, size=3)
        background = {
            "texture": texture,
            "color1": bg1,
            "color2": bg2,
            "angle": float(rng.uniform(0, 2 * math.pi)),
            "period": float(rng.uniform(0.08, 0.3) * S),
            "noise_grid": rng.uniform(0, 1, size=(int(rng.integers(3, 7)),) * 2),
            "noise_std": float(rng.uniform(0, self.noise_std)),
        }
        bg_mean = (bg1 + bg2) / 2 if texture != 0 else bg1

        # Objects: the largest first, the others 45-80 % of its radius, placed without overlap.
        n_target = int(rng.integers(self.min_objects, self.max_objects + 1))
        r0 = float(rng.uniform(*self.radius_range) * S)
        radii = [r0] + [float(r0 * rng.uniform(0.45, 0.8)) for _ in range(n_target - 1)]
        objects: list[ShapeSpec] = []
        placed: list[tuple[float, float, float]] = []
        for k, r in enumerate(radii):
            position = None
            for _ in range(40):
                cx = float(rng.uniform(r, S - r))
                cy = float(rng.uniform(r, S - r))
                if all(math.hypot(cx - px, cy - py) > 1.05 * (r + pr) + 1.0 for px, py, pr in placed):
                    position = (cx, cy)
                    break
            if position is None:
                if k < self.min_objects:
                    # Should not happen with the default ranges; keep the image valid anyway by
                    # shrinking until it fits.
                    r = r * 0.5
                    cx, cy = float(rng.uniform(r, S - r)), float(rng.uniform(r, S - r))
                    position = (cx, cy)
                else:
                    continue
            color = self._color_far_from(rng, bg_mean)
            striped = rng.uniform() < 0.3
            stripe_color = self._color_far_from(rng, color, 80.0) if striped else None
            objects.append(
                ShapeSpec(
                    shape=int(rng.integers(len(SHAPE_NAMES))),
                    cx=position[0],
                    cy=position[1],
                    radius=r,
                    angle=float(rng.uniform(0, 2 * math.pi)),
                    color=tuple(float(c) for c in color),  # type: ignore[arg-type]
                    stripe_color=tuple(float(c) for c in stripe_color) if striped else None,  # type: ignore[arg-type]
                    stripe_period=float(rng.uniform(0.25, 0.6) * r),
                    stripe_angle=float(rng.uniform(0, math.pi)),
                )
            )
            placed.append((position[0], position[1], r))
        background["pixel_noise_seed"] = int(rng.integers(2**31))
        if self.shared_shape:
            # After every draw, so that the layout, sizes, colours and noise are those of shared_shape=False.
            objects = [dataclasses.replace(obj, shape=objects[0].shape) for obj in objects]
        if self.palette == "grey":
            # The random colours were drawn all the same, so both palettes give the same scenes (layout,
            # shapes, textures, noise) and only the colours differ.
            background["color1"] = np.full(3, GREY_LEVELS["background1"])
            background["color2"] = np.full(3, GREY_LEVELS["background2"])
            objects = [
                dataclasses.replace(
                    obj,
                    color=(GREY_LEVELS["object"],) * 3,
                    stripe_color=None if obj.stripe_color is None else (GREY_LEVELS["stripe"],) * 3,
                )
                for obj in objects
            ]
        return background, objects

    # ------------------------------------------------------------------------------------------------
    # Rendering
    # ------------------------------------------------------------------------------------------------

    def _render_background(self, bg: dict[str, Any]) -> np.ndarray:
        S = self.image_size
        xs, ys = self._xs, self._ys
        texture = TEXTURE_NAMES[bg["texture"]]
        if texture == "solid":
            return np.broadcast_to(bg["color1"].astype(np.float32), (S, S, 3)).copy()
        c, s = math.cos(bg["angle"]), math.sin(bg["angle"])
        if texture == "gradient":
            proj = xs * c + ys * s
            lo, hi = min(0.0, c * S) + min(0.0, s * S), max(0.0, c * S) + max(0.0, s * S)
            t = (proj - lo) / max(hi - lo, 1e-6)
        elif texture == "stripes":
            t = 0.5 + 0.5 * np.sin(2 * math.pi * (xs * c + ys * s) / bg["period"])
        elif texture == "checker":
            cell = max(bg["period"] / 2, 2.0)
            t = ((np.floor(xs / cell) + np.floor(ys / cell)) % 2).astype(np.float32)
        else:  # smooth noise: a coarse random grid, bilinearly upsampled
            grid = (bg["noise_grid"] * 255).astype(np.uint8)
            t = np.asarray(Image.fromarray(grid).resize((S, S), Image.Resampling.BILINEAR), np.float32) / 255.0
        t = np.broadcast_to(t, (S, S)).astype(np.float32)[..., None]
        c1 = bg["color1"].astype(np.float32)
        c2 = bg["color2"].astype(np.float32)
        return c1 * (1.0 - t) + c2 * t

    def _draw(self, canvas: np.ndarray, obj: ShapeSpec) -> None:
        """Alpha-blend one anti-aliased object into ``canvas`` (``[S, S, 3]`` float32), in place."""
        S = self.image_size
        r = obj.radius
        x0, x1 = max(0, int(obj.cx - r - 2)), min(S, int(obj.cx + r + 3))
        y0, y1 = max(0, int(obj.cy - r - 2)), min(S, int(obj.cy + r + 3))
        dx = self._xs[:, x0:x1] - obj.cx
        dy = self._ys[y0:y1, :] - obj.cy
        ca, sa = math.cos(obj.angle), math.sin(obj.angle)
        u = dx * ca + dy * sa
        v = -dx * sa + dy * ca
        # Approximate signed distance (negative inside), in pixels; alpha = clip(0.5 - d) anti-aliases.
        name = SHAPE_NAMES[obj.shape]
        if name == "circle":
            d = np.sqrt(u * u + v * v) - r
        elif name == "square":
            half = r / math.sqrt(2.0)
            d = np.maximum(np.abs(u), np.abs(v)) - half
        elif name == "triangle":
            n = _TRIANGLE_NORMALS
            d = np.maximum(np.maximum(u * n[0, 0] + v * n[0, 1], u * n[1, 0] + v * n[1, 1]), u * n[2, 0] + v * n[2, 1])
            d = d - r / 2
        elif name == "ellipse":
            a, b = r, 0.5 * r
            d = (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * b
        else:  # cross
            t = 0.3 * r
            au, av = np.abs(u), np.abs(v)
            d = np.minimum(np.maximum(au - r, av - t), np.maximum(av - r, au - t))
        alpha = np.clip(0.5 - d, 0.0, 1.0)[..., None].astype(np.float32)
        fill = np.asarray(obj.color, dtype=np.float32)
        if obj.stripe_color is not None:
            cs, ss = math.cos(obj.stripe_angle), math.sin(obj.stripe_angle)
            stripe = (np.sin(2 * math.pi * (u * cs + v * ss) / obj.stripe_period) > 0)[..., None]
            fill = np.where(stripe, fill, np.asarray(obj.stripe_color, dtype=np.float32))
        region = canvas[y0:y1, x0:x1]
        region += alpha * (fill - region)

    def render(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Item ``index`` as ``(uint8 array [S, S, 3], labels dict)``."""
        rng = self._rng(index)
        background, objects = self._layout(rng)
        canvas = self._render_background(background)
        for obj in objects:
            self._draw(canvas, obj)
        if background["noise_std"] > 0:
            noise_rng = np.random.default_rng(background["pixel_noise_seed"])
            canvas += noise_rng.standard_normal(canvas.shape, dtype=np.float32) * background["noise_std"]
        array = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
        return array, self._labels(background, objects)

    def _labels(self, background: dict[str, Any], objects: list[ShapeSpec]) -> dict[str, Any]:
        largest = objects[0]
        S = float(self.image_size)
        return {
            "label": largest.shape,
            "shape": largest.shape,
            "texture": int(background["texture"]),
            "count": len(objects),
            "position": (largest.cx / S, largest.cy / S),
            "size": largest.radius / S,
        }

    def describe(self, index: int) -> dict[str, Any]:
        """The generated layout of item ``index``: background parameters, objects and labels (for debugging)."""
        background, objects = self._layout(self._rng(index))
        return {
            "background": {**background, "texture_name": TEXTURE_NAMES[background["texture"]]},
            "objects": [{**obj.__dict__, "shape_name": SHAPE_NAMES[obj.shape]} for obj in objects],
            **self._labels(background, objects),
        }

    def labels(self, index: int) -> dict[str, Any]:
        """Labels of item ``index`` without rendering it (cheap)."""
        background, objects = self._layout(self._rng(index))
        return self._labels(background, objects)

    def _drawn_item(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """``render(index)``, from the cache where the dataset fits in it (the array is then shared: read it only)."""
        if self._drawn is None:
            return self.render(index)
        item = self._drawn.get(index)
        if item is None:
            item = self._drawn[index] = self.render(index)
        return item

    def get_image(self, index: int) -> Image.Image:
        """Item ``index`` as a PIL RGB image of size ``S x S``."""
        return Image.fromarray(self._drawn_item(index)[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.num_images
        array, labels = self._drawn_item(index)
        image = Image.fromarray(array)
        out: dict[str, Any] = (
            {"pixel_values": self.transform(image)} if self.transform is not None else {"image": image}
        )
        out.update(labels)
        out["position"] = torch.tensor(labels["position"], dtype=torch.float32)
        return out

    def to_hf_dataset(self) -> Any:
        """The whole dataset as an in-memory ``datasets.Dataset``.

        Columns: ``image`` (``datasets.Image``, PNG-encoded), ``label`` and ``shape``
        (``ClassLabel(SHAPE_NAMES)``), ``texture`` (``ClassLabel(TEXTURE_NAMES)``), ``count`` (int64),
        ``position`` (2 x float32), ``size`` (float32).
        """
        import datasets

        features = datasets.Features(
            {
                "image": datasets.Image(),
                "label": datasets.ClassLabel(names=list(SHAPE_NAMES)),
                "shape": datasets.ClassLabel(names=list(SHAPE_NAMES)),
                "texture": datasets.ClassLabel(names=list(TEXTURE_NAMES)),
                "count": datasets.Value("int64"),
                "position": datasets.List(datasets.Value("float32"), length=2),
                "size": datasets.Value("float32"),
            }
        )
        columns: dict[str, list[Any]] = {name: [] for name in features}
        for i in range(self.num_images):
            array, labels = self.render(i)
            columns["image"].append(Image.fromarray(array))
            for key in ("label", "shape", "texture", "count", "size"):
                columns[key].append(labels[key])
            columns["position"].append(list(labels["position"]))
        return datasets.Dataset.from_dict(columns, features=features)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_images={self.num_images}, image_size={self.image_size}, "
            f"seed={self.seed}, objects={self.min_objects}..{self.max_objects}, radius_range={self.radius_range}, "
            f"palette={self.palette!r}, shared_shape={self.shared_shape})"
        )


def as_hf_dataset(
    num_images: int,
    image_size: int = 64,
    seed: int = 0,
    max_objects: int = 3,
    **kwargs: Any,
) -> Any:
    """``ProceduralShapes(num_images, image_size, seed, max_objects, **kwargs).to_hf_dataset()``.

    Returns a ``datasets.Dataset`` with columns ``image`` (PIL), ``label``, ``shape``, ``texture``, ``count``,
    ``position``, ``size``.
    """
    shapes = ProceduralShapes(num_images, image_size=image_size, seed=seed, max_objects=max_objects, **kwargs)
    return shapes.to_hf_dataset()
