"""``petals``: the embedded, procedurally generated flower data set.

Every image shows one main flower on a background, rendered from a few dozen random parameters:

* background: a plain colour, a linear two-colour gradient, or "leaves" (a dark gradient with up
  to five pointed, shaded, possibly out-of-focus green leaves at random angles); background
  colours are mostly greens, earth browns, dark tones or sky blues;
* optionally a second, smaller flower partly in frame (half the time of the same species as the
  main one) and a curved green stem below the main flower;
* the main flower: 4 to 16 petals of a rounded, pointed or heart-like (notched) shape with a
  random width, rotation and radial colour gradient, darker towards the petal sides; sometimes a
  second, inner ring of petals; a centre disk of a contrasting colour, shaded towards its rim and
  sometimes ringed with dots (stamens); random position (mostly central) and scale.

Shapes are described by signed distances in a resolution-independent frame ([-1, 1]² across
the image) and anti-aliased with a smoothstep edge one pixel wide, so a 64×64 image is the same
flower as the 32×32 one, rendered finer. Pixels are values in [-1, 1] (colour c ∈ [0, 1] as
2c − 1).

Determinism: parameter ``name`` of image ``index`` in ``split`` is a splitmix64 hash of (split
id, CRC-32 of the name, index), a counter-based draw that does not depend on the batch, on its
order or on any global random state; the splits hash with different ids, so they are disjoint.
The per-image arithmetic (float64 in numpy) and the per-pixel arithmetic (float32 in torch) use
only operations that IEEE 754 rounds exactly (+, −, ×, ÷, √, comparisons, floor, clamp): the
polar angle comes from a polynomial arctangent and directions from a rational parametrisation,
never from library transcendentals whose last bits differ between SIMD paths, batch sizes,
thread counts or machines. An image is therefore bit-identical in any batch and on any machine.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from deftcli.errors import DeftError

__all__ = ["SPLIT_SIZES", "PetalsDataset", "render_petals"]

SPLIT_SIZES: dict[str, int] = {"train": 60000, "val": 1020, "test": 1020}
_SPLIT_IDS: dict[str, int] = {"train": 1, "val": 2, "test": 3}
_MIN_SIZE = 8

_MASK64 = (1 << 64) - 1
_Record = TypeVar("_Record")

# (weight, hue range, saturation range, value range); hues in turns, may wrap around 1.
_Palette = Sequence[tuple[float, tuple[float, float], tuple[float, float], tuple[float, float]]]
_PETAL_PALETTE: _Palette = (
    (0.14, (-0.03, 0.02), (0.75, 1.00), (0.60, 0.95)),  # red
    (0.13, (0.90, 0.98), (0.30, 0.70), (0.80, 1.00)),  # pink
    (0.09, (0.82, 0.90), (0.60, 0.95), (0.55, 0.95)),  # magenta
    (0.11, (0.72, 0.80), (0.45, 0.85), (0.45, 0.90)),  # purple
    (0.06, (0.70, 0.78), (0.20, 0.45), (0.80, 1.00)),  # lilac
    (0.08, (0.57, 0.66), (0.50, 0.90), (0.60, 0.95)),  # blue
    (0.15, (0.12, 0.17), (0.70, 1.00), (0.85, 1.00)),  # yellow
    (0.11, (0.04, 0.10), (0.80, 1.00), (0.85, 1.00)),  # orange
    (0.13, (0.00, 1.00), (0.00, 0.12), (0.85, 1.00)),  # white
)
_YELLOWISH_PETALS = (6, 7)  # palette rows whose centre should not be yellow
_CENTRE_PALETTE: _Palette = (
    (0.35, (0.11, 0.16), (0.75, 1.00), (0.75, 1.00)),  # yellow
    (0.15, (0.05, 0.09), (0.80, 1.00), (0.70, 0.95)),  # orange
    (0.25, (0.05, 0.10), (0.55, 0.90), (0.20, 0.45)),  # brown
    (0.15, (0.00, 1.00), (0.20, 0.60), (0.04, 0.18)),  # dark
    (0.10, (0.18, 0.26), (0.50, 0.85), (0.45, 0.75)),  # yellow-green
)
_CENTRE_BROWN = 2
_BACKGROUND_PALETTE: _Palette = (
    (0.42, (0.20, 0.40), (0.35, 0.80), (0.18, 0.65)),  # foliage green
    (0.18, (0.04, 0.12), (0.30, 0.65), (0.12, 0.45)),  # earth brown
    (0.20, (0.00, 1.00), (0.00, 0.50), (0.02, 0.15)),  # dark
    (0.12, (0.52, 0.62), (0.20, 0.60), (0.65, 0.95)),  # sky
    (0.08, (0.00, 1.00), (0.00, 0.10), (0.30, 0.80)),  # grey
)
_LEAF_PALETTE: _Palette = ((1.0, (0.20, 0.38), (0.40, 0.85), (0.12, 0.70)),)
_STEM_PALETTE: _Palette = ((1.0, (0.22, 0.36), (0.45, 0.80), (0.25, 0.60)),)

# Petal counts and their weights.
_PETAL_COUNTS = (4, 5, 6, 7, 8, 9, 10, 12, 16)
_PETAL_COUNT_WEIGHTS = (0.06, 0.24, 0.17, 0.05, 0.15, 0.04, 0.09, 0.12, 0.08)
# Petal shapes: rounded, pointed, heart-like (notched tip).
_SHAPE_WEIGHTS = (0.45, 0.30, 0.25)
_NOTCH_WIDTH = 0.35  # of the petal half-width
_MAX_LEAVES = 5

# Minimax arctangent on [0, 1] (in powers of a²; |error| < 1e-5 rad).
_ATAN_COEFFS = (0.99997726, -0.33262347, 0.19354346, -0.11643287, 0.05265332, -0.01172120)


# ----------------------------------------------------------------------------- random parameters


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 output function of uint64 array ``x`` (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class _Draws:
    """Counter-based random parameters of a batch of images: one independent stream per name."""

    def __init__(self, split_id: int, indices: np.ndarray) -> None:
        self.split_id = split_id
        self.indices = indices
        self._keys = _splitmix64(indices.astype(np.uint64))

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, mask: np.ndarray) -> _Draws:
        return _Draws(self.split_id, self.indices[mask])

    def uniform(self, name: str, low: float = 0.0, high: float = 1.0) -> np.ndarray:
        stream = ((self.split_id << 32) | zlib.crc32(name.encode())) & _MASK64
        bits = _splitmix64(self._keys ^ _splitmix64(np.array([stream], dtype=np.uint64)))
        unit = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return low + (high - low) * unit

    def chance(self, name: str, probability: float) -> np.ndarray:
        return self.uniform(name) < probability

    def category(self, name: str, weights: Sequence[float]) -> np.ndarray:
        edges = np.cumsum(np.asarray(weights, dtype=np.float64))
        return np.searchsorted(edges / edges[-1], self.uniform(name), side="right")

    def direction(self, name: str, full_turn: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """A unit vector (cos φ, sin φ) from φ = 2 atan(t), t uniform in [-1, 1] (|φ| ≤ 90°),
        turned by 180° with probability ½ when ``full_turn``; rational, hence exact."""
        t = self.uniform(name, -1.0, 1.0)
        cos, sin = (1.0 - t * t) / (1.0 + t * t), 2.0 * t / (1.0 + t * t)
        if full_turn:
            flip = np.where(self.chance(name + ".flip", 0.5), -1.0, 1.0)
            cos, sin = cos * flip, sin * flip
        return cos, sin

    def colour(self, name: str, palette: _Palette) -> tuple[np.ndarray, np.ndarray]:
        """RGB colours in [0, 1], shape (B, 3), from ``palette``, and the palette row of each."""
        kind = self.category(name + ".kind", [row[0] for row in palette])
        table = np.asarray([row[1] + row[2] + row[3] for row in palette], dtype=np.float64)[kind]
        hsv = [
            table[:, 2 * c] + (table[:, 2 * c + 1] - table[:, 2 * c]) * self.uniform(f"{name}.{c}") for c in range(3)
        ]
        return _hsv_to_rgb(*hsv), kind


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """(B,) hue (turns), saturation, value -> (B, 3) RGB, with exact arithmetic only."""
    offsets = np.array([0.0, 2.0 / 3.0, 1.0 / 3.0])
    h = hue[:, None] + offsets
    ramp = np.clip(np.abs((h - np.floor(h)) * 6.0 - 3.0) - 1.0, 0.0, 1.0)
    return value[:, None] * (1.0 + saturation[:, None] * (ramp - 1.0))


def _scalar(x: np.ndarray) -> Tensor:
    """Per-image numbers (B,) as a float32 tensor (B, 1, 1) that broadcasts over pixels."""
    return torch.from_numpy(np.asarray(x, dtype=np.float32)).view(-1, 1, 1)


def _select(record: _Record, mask: np.ndarray) -> _Record:
    """The images of a dataclass of per-image arrays selected by ``mask``."""
    return type(record)(**{name: values[mask] for name, values in vars(record).items()})


def _rgb(rgb: np.ndarray) -> Tensor:
    """(B, 3) colours as a float32 tensor (B, 3, 1, 1)."""
    return torch.from_numpy(rgb.astype(np.float32)).view(-1, 3, 1, 1)


# ----------------------------------------------------------------------------- pixel primitives


@dataclass(frozen=True)
class _Grid:
    """Pixel-centre coordinates in [-1, 1] (x: (1, 1, W), y: (1, H, 1)) and the pixel width."""

    x: Tensor
    y: Tensor
    pixel: float

    @staticmethod
    def of_size(size: int) -> _Grid:
        centres = (torch.arange(size, dtype=torch.float32) * 2.0 + 1.0) / size - 1.0
        return _Grid(centres.view(1, 1, size), centres.view(1, size, 1), 2.0 / size)


@dataclass(frozen=True)
class _Polar:
    """Offsets from a centre, radius and polar angle (in turns) of every pixel, (b, H, W)."""

    dx: Tensor
    dy: Tensor
    r: Tensor
    turns: Tensor

    @staticmethod
    def around(grid: _Grid, cx: Tensor, cy: Tensor) -> _Polar:
        dx, dy = grid.x - cx, grid.y - cy
        return _Polar(dx, dy, (dx * dx + dy * dy).sqrt(), _turns(dx, dy))

    def select(self, mask: Tensor) -> _Polar:
        return _Polar(self.dx[mask], self.dy[mask], self.r[mask], self.turns[mask])


def _turns(dx: Tensor, dy: Tensor) -> Tensor:
    """atan2(dy, dx) / 2π from a polynomial arctangent and octant folding (exact arithmetic)."""
    ax, ay = dx.abs(), dy.abs()
    ratio = torch.minimum(ax, ay) / torch.maximum(ax, ay).clamp_min(1e-12)
    square = ratio * ratio
    poly = square * _ATAN_COEFFS[-1] + _ATAN_COEFFS[-2]
    for coefficient in reversed(_ATAN_COEFFS[:-2]):
        poly = poly * square + coefficient
    angle = poly * ratio
    angle = torch.where(ay > ax, math.pi / 2 - angle, angle)
    angle = torch.where(dx < 0, math.pi - angle, angle)
    angle = torch.where(dy < 0, -angle, angle)
    return angle * (1.0 / (2.0 * math.pi))


def _coverage(distance: Tensor, softness: Tensor | float) -> Tensor:
    """Smoothstep edge: 1 where the signed ``distance`` (> 0 inside) exceeds softness/2, 0 below
    −softness/2."""
    x = (distance / softness + 0.5).clamp_(0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _composite(canvas: Tensor, colour: Tensor, alpha: Tensor) -> None:
    """Paints ``colour`` ((b, 3, 1, 1) or (b, 3, H, W)) over ``canvas`` (b, 3, H, W) in place with
    coverage ``alpha`` (b, H, W)."""
    canvas += alpha.unsqueeze(1) * (colour - canvas)


def _on_subset(canvas: Tensor, mask: np.ndarray) -> tuple[Tensor, Tensor]:
    """The images of ``canvas`` selected by ``mask`` (a copy) and the torch mask to write back."""
    selected = torch.from_numpy(mask)
    return canvas[selected], selected


# ----------------------------------------------------------------------------- background


def _paint_background(canvas: Tensor, grid: _Grid, draws: _Draws) -> None:
    """Fills ``canvas``: a plain colour, a linear gradient, or a darker gradient under leaves."""
    first, _ = draws.colour("background", _BACKGROUND_PALETTE)
    style = draws.category("background.style", (0.3, 0.3, 0.4))  # plain, gradient, leaves
    second = _gradient_partner(draws, first)
    leafy = style == 2
    first = np.where(leafy[:, None], first * draws.uniform("background.leafy", 0.35, 0.8)[:, None], first)
    second = np.where(leafy[:, None], second * 0.5, second)
    second = np.where((style == 0)[:, None], first, second)

    cos, sin = draws.direction("background.direction")
    position = grid.x * _scalar(cos) + grid.y * _scalar(sin)
    mix = (position * 0.5 + 0.5).clamp_(0.0, 1.0)
    start, end = _rgb(first), _rgb(second)
    canvas.copy_(start + (end - start) * mix.unsqueeze(1))
    if leafy.any():
        sub, selected = _on_subset(canvas, leafy)
        _paint_leaves(sub, grid, draws.subset(leafy))
        canvas[selected] = sub


def _gradient_partner(draws: _Draws, rgb: np.ndarray) -> np.ndarray:
    """The second colour of a gradient: ``rgb`` brightened or darkened and slightly tinted."""
    gain = draws.uniform("background.gain", 0.35, 1.6)[:, None]
    tint = 1.0 + np.stack([draws.uniform(f"background.tint{c}", -0.15, 0.15) for c in range(3)], 1)
    return np.clip(rgb * gain * tint, 0.0, 1.0)


def _paint_leaves(canvas: Tensor, grid: _Grid, draws: _Draws) -> None:
    """Two to five pointed leaves (lens shapes) at random places and angles, some out of focus."""
    leaves = draws.uniform("leaves.count", 2.0, _MAX_LEAVES + 1.0).astype(np.int64)
    for k in range(_MAX_LEAVES):
        name = f"leaf{k}"
        cx = _scalar(draws.uniform(name + ".x", -1.1, 1.1))
        cy = _scalar(draws.uniform(name + ".y", -1.1, 1.1))
        length = draws.uniform(name + ".length", 0.35, 0.95)
        half_width = length * draws.uniform(name + ".width", 0.15, 0.35)
        cos, sin = draws.direction(name + ".angle", full_turn=False)
        cos_t, sin_t = _scalar(cos), _scalar(sin)
        dx, dy = grid.x - cx, grid.y - cy
        along = (dx * cos_t + dy * sin_t) / _scalar(length)
        across = dx * sin_t - dy * cos_t
        b = _scalar(half_width)
        distance = b * (1.0 - along * along) - across.abs()
        blur = _scalar(draws.uniform(name + ".blur", 1.0, 4.0)) * grid.pixel
        alpha = _coverage(distance, blur)
        fold = _scalar(draws.uniform(name + ".fold", -0.3, 0.3))
        shade = 1.0 + fold * (across / b).clamp(-1.0, 1.0)
        colour, _ = draws.colour(name, _LEAF_PALETTE)
        _composite(canvas, _rgb(colour) * shade.unsqueeze(1), alpha * _scalar(k < leaves))


# ----------------------------------------------------------------------------- flowers


@dataclass(frozen=True)
class _Species:
    """What a flower looks like, independent of where it is: per-image numpy arrays."""

    petals: np.ndarray
    shape_roundness: np.ndarray
    notch: np.ndarray
    width: np.ndarray
    centre_fraction: np.ndarray
    petal_tip: np.ndarray
    petal_base: np.ndarray
    side_shading: np.ndarray
    centre: np.ndarray
    inner_ring: np.ndarray
    inner_fraction: np.ndarray
    inner_colour: np.ndarray
    dots: np.ndarray
    dot_colour: np.ndarray

    @staticmethod
    def draw(draws: _Draws, name: str) -> _Species:
        petals = np.asarray(_PETAL_COUNTS, dtype=np.float64)[draws.category(name + ".petals", _PETAL_COUNT_WEIGHTS)]
        shape = draws.category(name + ".shape", _SHAPE_WEIGHTS)
        roundness = np.select(
            [shape == 0, shape == 1],
            [draws.uniform(name + ".round", 0.75, 1.0), draws.uniform(name + ".round", 0.0, 0.35)],
            1.0,
        )
        notch = np.where(shape == 2, draws.uniform(name + ".notch", 0.12, 0.3), 0.0)
        width = np.select(
            [petals >= 12, shape == 1],
            [draws.uniform(name + ".width", 0.45, 0.8), draws.uniform(name + ".width", 0.55, 1.0)],
            draws.uniform(name + ".width", 0.75, 1.25),
        )
        tip, kind = draws.colour(name + ".petal", _PETAL_PALETTE)
        base = _petal_base(draws, name, tip)
        centre, centre_kind = draws.colour(name + ".centre", _CENTRE_PALETTE)
        clash = np.isin(kind, _YELLOWISH_PETALS) & (centre_kind <= 1)
        brown, _ = draws.colour(name + ".brown", (_CENTRE_PALETTE[_CENTRE_BROWN],))
        centre = np.where(clash[:, None], brown, centre)
        inner_gain = draws.uniform(name + ".inner.gain", 0.7, 1.25)[:, None]
        dots, _ = draws.colour(name + ".dots", _CENTRE_PALETTE)
        return _Species(
            petals=petals,
            shape_roundness=roundness,
            notch=notch,
            width=width,
            centre_fraction=draws.uniform(name + ".centre.size", 0.14, 0.4),
            petal_tip=tip,
            petal_base=base,
            side_shading=draws.uniform(name + ".shading", 0.1, 0.5),
            centre=centre,
            inner_ring=draws.chance(name + ".inner", 0.35),
            inner_fraction=draws.uniform(name + ".inner.size", 0.5, 0.75),
            inner_colour=np.clip(base * inner_gain, 0.0, 1.0),
            dots=draws.chance(name + ".dotted", 0.5),
            dot_colour=dots,
        )


def _petal_base(draws: _Draws, name: str, tip: np.ndarray) -> np.ndarray:
    """The colour at the inner end of the petals: darker, paler, or a contrasting 'eye'."""
    kind = draws.category(name + ".base.kind", (0.45, 0.25, 0.3))  # darker, paler, eye
    darker = tip * draws.uniform(name + ".base.dark", 0.45, 0.85)[:, None]
    paler = tip + (1.0 - tip) * draws.uniform(name + ".base.pale", 0.3, 0.8)[:, None]
    eye, _ = draws.colour(name + ".base.eye", _PETAL_PALETTE)
    return np.select([kind[:, None] == 0, kind[:, None] == 1], [darker, paler], eye)


@dataclass(frozen=True)
class _Placement:
    """Where a flower is: centre (cx, cy), petal-tip radius and petal rotation (in petals),
    per-image arrays."""

    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray
    rotation: np.ndarray

    @staticmethod
    def main(draws: _Draws) -> _Placement:
        spread = np.where(draws.chance("main.off_centre", 0.3), 0.6, 0.18)
        close_up = draws.chance("main.close_up", 0.15)
        return _Placement(
            cx=draws.uniform("main.x", -1.0, 1.0) * spread,
            cy=draws.uniform("main.y", -1.0, 1.0) * spread,
            radius=np.where(close_up, draws.uniform("main.radius", 0.9, 1.25), draws.uniform("main.radius", 0.42, 0.9)),
            rotation=draws.uniform("main.rotation"),
        )

    @staticmethod
    def second(draws: _Draws) -> _Placement:
        """Near an edge or corner of the frame, partly outside it."""
        edge = draws.uniform("second.edge", 0.65, 1.05) * np.where(draws.chance("second.side", 0.5), 1.0, -1.0)
        along = draws.uniform("second.along", -1.0, 1.0)
        vertical = draws.chance("second.vertical", 0.5)
        return _Placement(
            cx=np.where(vertical, along, edge),
            cy=np.where(vertical, edge, along),
            radius=draws.uniform("second.radius", 0.25, 0.5),
            rotation=draws.uniform("second.rotation"),
        )


def _petal_ring(
    polar: _Polar,
    petals: Tensor,
    rotation: Tensor,
    width: Tensor,
    roundness: Tensor,
    notch: Tensor,
    base_radius: Tensor,
    tip_radius: Tensor,
) -> tuple[Tensor, Tensor]:
    """Signed distance (> 0 inside) to a ring of petals and the angular position within a petal
    (0 on its axis, 1 at its side).

    In polar coordinates a petal's edge lies at radius base + (tip − base)·g(t), t the angle from
    the petal axis as a fraction of the petal's half-width: g = m√(1 − t²) + (1 − m)(1 − t) blends
    a rounded (m = 1) and a pointed (m = 0) tip; a notch at t = 0 makes it heart-like. The radial
    distance is divided by the edge's gradient norm so the anti-aliasing stays one pixel wide
    along the petals' sides too.
    """
    phase = polar.turns * petals + rotation
    t = ((phase - phase.floor()) * 2.0 - 1.0).abs() / width
    side = t.clamp(max=1.0)
    root = (1.0 - side * side).clamp_min(1e-4).sqrt()
    notched = (1.0 - t * (1.0 / _NOTCH_WIDTH)).clamp_min(0.0)
    profile = roundness * root + (1.0 - roundness) * (1.0 - side) - notch * notched * notched
    slope = roundness * side / root + (1.0 - roundness) - notch * notched * (2.0 / _NOTCH_WIDTH)
    length = tip_radius - base_radius
    steepness = (slope.abs() * (t < 1.0) * length * petals / (math.pi * width) / polar.r.clamp_min(1e-3)).clamp_(
        max=50.0
    )
    distance = (base_radius + length * profile - polar.r) / (1.0 + steepness * steepness).sqrt()
    return distance, side


def _paint_petals(
    canvas: Tensor,
    polar: _Polar,
    species: _Species,
    placement: _Placement,
    grid: _Grid,
    fraction: np.ndarray,
    rotation_offset: float,
    base: np.ndarray,
    tip: np.ndarray,
) -> None:
    """One ring of petals reaching ``fraction`` of the flower's radius, coloured from ``base``
    (inner end) to ``tip``, darker towards each petal's sides."""
    centre_radius = placement.radius * species.centre_fraction
    base_radius = _scalar(centre_radius * 0.85)
    tip_radius = _scalar(placement.radius * fraction)
    distance, side = _petal_ring(
        polar,
        petals=_scalar(species.petals),
        rotation=_scalar(placement.rotation + rotation_offset),
        width=_scalar(species.width),
        roundness=_scalar(species.shape_roundness),
        notch=_scalar(species.notch),
        base_radius=base_radius,
        tip_radius=tip_radius,
    )
    along = ((polar.r - base_radius) / (tip_radius - base_radius)).clamp_(0.0, 1.0)
    shade = 1.0 - _scalar(species.side_shading) * side * side
    start, end = _rgb(base), _rgb(tip)
    colour = (start + (end - start) * along.unsqueeze(1)) * shade.unsqueeze(1)
    _composite(canvas, colour, _coverage(distance, grid.pixel))


def _paint_centre(
    canvas: Tensor, polar: _Polar, species: _Species, placement: _Placement, grid: _Grid, draws: _Draws, name: str
) -> None:
    """The centre disk, darker towards its rim, sometimes with a ring of dots (stamens)."""
    radius = placement.radius * species.centre_fraction
    rc = _scalar(radius)
    relative = polar.r / rc
    shade = 1.0 - _scalar(draws.uniform(name + ".centre.rim", 0.1, 0.5)) * (relative * relative).clamp_(max=1.0)
    _composite(canvas, _rgb(species.centre) * shade.unsqueeze(1), _coverage(rc - polar.r, grid.pixel))

    dots = draws.uniform(name + ".dots.count", 10.0, 24.0).astype(np.int64).astype(np.float64)
    ring = radius * draws.uniform(name + ".dots.ring", 0.55, 0.85)
    dot_radius = np.minimum(ring * math.pi / dots * 0.55, 0.06)
    phase = polar.turns * _scalar(dots) + _scalar(draws.uniform(name + ".dots.rotation"))
    arc = (phase - phase.floor() - 0.5) * polar.r * _scalar(2.0 * math.pi / dots)
    radial = polar.r - _scalar(ring)
    distance = _scalar(dot_radius) - (arc * arc + radial * radial).sqrt()
    alpha = _coverage(distance, grid.pixel) * _scalar(species.dots)
    _composite(canvas, _rgb(species.dot_colour), alpha)


def _paint_stem(canvas: Tensor, grid: _Grid, placement: _Placement, draws: _Draws) -> None:
    """A curved green stem from the flower's centre downwards, shaded across its width."""
    tilt = draws.uniform("stem.tilt", -0.45, 0.45)
    norm = np.sqrt(1.0 + tilt * tilt)
    down_x, down_y = _scalar(tilt / norm), _scalar(1.0 / norm)
    dx, dy = grid.x - _scalar(placement.cx), grid.y - _scalar(placement.cy)
    along = dx * down_x + dy * down_y
    across = dx * down_y - dy * down_x - _scalar(draws.uniform("stem.bend", -0.35, 0.35)) * along * along
    half_width = _scalar(draws.uniform("stem.width", 0.025, 0.06) * np.minimum(placement.radius, 1.0))
    alpha = _coverage(half_width - across.abs(), grid.pixel) * _coverage(along, grid.pixel)
    shade = 1.0 - 0.35 * (across / half_width).clamp(-1.0, 1.0)
    colour, _ = draws.colour("stem", _STEM_PALETTE)
    _composite(canvas, _rgb(colour) * shade.unsqueeze(1), alpha)


def _paint_flower(
    canvas: Tensor, grid: _Grid, draws: _Draws, species: _Species, placement: _Placement, name: str
) -> None:
    """Petals (outer ring, then the inner ring where the species has one) and the centre."""
    count = len(draws)
    polar = _Polar.around(grid, _scalar(placement.cx), _scalar(placement.cy))
    _paint_petals(canvas, polar, species, placement, grid, np.ones(count), 0.0, species.petal_base, species.petal_tip)
    inner = species.inner_ring
    if inner.any():
        sub, selected = _on_subset(canvas, inner)
        _paint_petals(
            sub,
            polar.select(selected),
            _select(species, inner),
            _select(placement, inner),
            grid,
            species.inner_fraction[inner],
            0.5,
            species.petal_base[inner],
            species.inner_colour[inner],
        )
        canvas[selected] = sub
    _paint_centre(canvas, polar, species, placement, grid, draws, name)


def _paint_second_flower(canvas: Tensor, grid: _Grid, draws: _Draws) -> None:
    """A smaller flower near the frame's edge, half the time of the main flower's species."""
    same = draws.chance("second.same_species", 0.5)
    for species_name, mask in (("main", same), ("second", ~same)):
        if mask.any():
            sub, selected = _on_subset(canvas, mask)
            subset = draws.subset(mask)
            _paint_flower(sub, grid, subset, _Species.draw(subset, species_name), _Placement.second(subset), "second")
            canvas[selected] = sub


def _render(split_id: int, indices: np.ndarray, size: int) -> Tensor:
    """Composites background, second flower, stem and main flower; returns values in [-1, 1]."""
    draws = _Draws(split_id, indices)
    grid = _Grid.of_size(size)
    canvas = torch.empty(len(indices), 3, size, size, dtype=torch.float32)
    _paint_background(canvas, grid, draws)
    second = draws.chance("second", 0.3)
    if second.any():
        sub, selected = _on_subset(canvas, second)
        _paint_second_flower(sub, grid, draws.subset(second))
        canvas[selected] = sub
    placement = _Placement.main(draws)
    stem = draws.chance("stem", 0.4)
    if stem.any():
        sub, selected = _on_subset(canvas, stem)
        _paint_stem(sub, grid, _select(placement, stem), draws.subset(stem))
        canvas[selected] = sub
    _paint_flower(canvas, grid, draws, _Species.draw(draws, "main"), placement, "main")
    return canvas.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)


# ----------------------------------------------------------------------------- public API


def _check_indices(split: str, indices: Tensor | Sequence[int] | np.ndarray) -> np.ndarray:
    if split not in SPLIT_SIZES:
        raise DeftError(f"unknown petals split {split!r}; the splits are {', '.join(SPLIT_SIZES)}")
    if isinstance(indices, Tensor):
        indices = indices.detach().cpu().numpy()
    array = np.asarray(indices)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DeftError(f"petals indices must be a 1-D sequence of integers, got shape {array.shape} {array.dtype}")
    bad = (array < 0) | (array >= SPLIT_SIZES[split])
    if bad.any():
        raise DeftError(
            f"petals index {int(array[bad][0])} is out of range for split {split!r} (0 to {SPLIT_SIZES[split] - 1})"
        )
    return array.astype(np.int64)


def render_petals(split: str, indices: Tensor | Sequence[int], size: int = 32) -> Tensor:
    """Renders images ``indices`` of ``split`` as a float32 tensor (B, 3, size, size) in [-1, 1].

    Each image depends only on (split, index): it is identical in any batch, in any order, on any
    machine and whatever the global random state. ``size`` changes the resolution, not the flower.
    Raises :class:`DeftError` for an unknown split, an index out of range or a size below 8.
    """
    array = _check_indices(split, indices)
    if int(size) != size or size < _MIN_SIZE:
        raise DeftError(f"petals image size must be an integer of at least {_MIN_SIZE}, got {size}")
    return _render(_SPLIT_IDS[split], array, int(size))


class PetalsDataset(Dataset):
    """The ``petals`` split ``split`` at ``size``×``size``: items are (3, size, size) in [-1, 1].

    ``dataset[i]`` raises ``IndexError`` past the end (so iteration stops); :meth:`batch`
    renders many images at once and raises :class:`DeftError` for bad indices.
    """

    def __init__(self, split: str = "train", size: int = 32) -> None:
        if split not in SPLIT_SIZES:
            raise DeftError(f"unknown petals split {split!r}; the splits are {', '.join(SPLIT_SIZES)}")
        if int(size) != size or size < _MIN_SIZE:
            raise DeftError(f"petals image size must be an integer of at least {_MIN_SIZE}, got {size}")
        self.split = split
        self.size = int(size)

    def __len__(self) -> int:
        return SPLIT_SIZES[self.split]

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"petals index {index} is out of range for split {self.split!r} (0 to {len(self) - 1})")
        return render_petals(self.split, [int(index)], self.size)[0]

    def batch(self, indices: Tensor | Sequence[int]) -> Tensor:
        """Renders many images at once: ``render_petals(split, indices, size)``."""
        return render_petals(self.split, indices, self.size)
