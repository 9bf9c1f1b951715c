"""The embedded "shapes" dataset: procedurally drawn images with coarse-to-fine captions.

Each image shows one to three shapes (circle, square, triangle) in four colours and two sizes,
each in its own cell of a 3x3 grid, with a little jitter. The caption names the shapes in
reading order, joined by the relation of consecutive shapes: "above" (same column), "beside"
(same row) or "and":

    "a large red circle above a small blue square"

Everything is a pure function of (seed, split, index), so no download is needed and any
example can be regenerated. The generator also knows the true coarse-to-fine chain of each
caption (first shape; all shapes; + sizes; + colours), which evaluation compares to the
model's steps.
"""

from __future__ import annotations

import operator
from typing import SupportsIndex

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
}
SIZES = {"small": 0.38, "large": 0.8}  # shape extent as a fraction of a grid cell
GRID = 3
SPLITS = {"train": 0, "eval": 1}


def _relation(first: tuple[int, int], second: tuple[int, int]) -> str:
    """How the earlier (reading-order) shape relates to the next one."""
    if first[1] == second[1]:
        return "above"
    if first[0] == second[0]:
        return "beside"
    return "and"


def _phrase(shape: dict, with_size: bool, with_color: bool) -> str:
    words = ["a"]
    if with_size:
        words.append(shape["size"])
    if with_color:
        words.append(shape["color"])
    words.append(shape["kind"])
    return " ".join(words)


def _describe(shapes: list[dict], with_size: bool, with_color: bool) -> str:
    parts = [_phrase(shapes[0], with_size, with_color)]
    for previous, shape in zip(shapes, shapes[1:], strict=False):
        parts.append(_relation(previous["cell"], shape["cell"]))
        parts.append(_phrase(shape, with_size, with_color))
    return " ".join(parts)


def _draw(shapes: list[dict], image_size: int, rng: np.random.Generator) -> np.ndarray:
    image = Image.new("RGB", (image_size, image_size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    for shape in shapes:
        row, col = shape["cell"]
        extent = SIZES[shape["size"]] * cell
        slack = (cell - extent) / 2
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        box = [cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2]
        color = COLORS[shape["color"]]
        if shape["kind"] == "circle":
            draw.ellipse(box, fill=color)
        elif shape["kind"] == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=color)
    return np.asarray(image, dtype=np.uint8)


def _layout(seed: int, split: str, index: int) -> tuple[list[dict], np.random.Generator]:
    """An example's shapes in reading order, and its generator positioned for the drawing."""
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {tuple(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    count = int(rng.integers(1, 4))
    cells = sorted(rng.choice(GRID * GRID, size=count, replace=False).tolist())
    shapes = [
        {
            "cell": divmod(c, GRID),
            "kind": KINDS[rng.integers(len(KINDS))],
            "color": list(COLORS)[rng.integers(len(COLORS))],
            "size": list(SIZES)[rng.integers(len(SIZES))],
        }
        for c in cells  # reading order: row, then column
    ]
    return shapes, rng


def caption(seed: int, split: str, index: int) -> str:
    """The caption `generate` gives the example, without drawing its image."""
    return _describe(_layout(seed, split, index)[0], True, True)


def generate(seed: int, split: str, index: int, image_size: int = 48) -> dict:
    """One example: `key`, `image` uint8 [S, S, 3], `captions` (one), and the true `chain`."""
    shapes, rng = _layout(seed, split, index)
    chain = [
        _phrase(shapes[0], False, False),
        _describe(shapes, False, False),
        _describe(shapes, True, False),
        _describe(shapes, True, True),
    ]
    return {
        "key": f"shapes-{split}-{index:07d}",
        "image": _draw(shapes, image_size, rng),
        "captions": [chain[-1]],
        "chain": chain,
    }


def longest_caption() -> str:
    """The longest caption the generator can write (three shapes, longest words)."""
    shape = {"size": "small", "color": "yellow", "kind": "triangle"}
    phrase = _phrase(shape, True, True)
    return " ".join([phrase, "beside", phrase, "beside", phrase])


class ShapesSource:
    """A grain random-access data source over `size` generated examples of one split."""

    def __init__(self, split: str, size: int, seed: int = 0, image_size: int = 48):
        if image_size < 4 * GRID:
            raise ValueError(f"shapes images need at least {4 * GRID} pixels, got {image_size}")
        self.split, self.size, self.seed, self.image_size = split, size, seed, image_size

    def __len__(self) -> int:
        return self.size

    def _checked(self, index: SupportsIndex) -> int:
        index = operator.index(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} shapes examples")
        return index

    def __getitem__(self, index: SupportsIndex) -> dict:
        return generate(self.seed, self.split, self._checked(index), self.image_size)

    def read_captions(self, index: SupportsIndex) -> tuple[list[str], list[str], str | None]:
        """An example's caption without drawing its image (tokenizer training reads many)."""
        return [caption(self.seed, self.split, self._checked(index))], [], None

    def __repr__(self) -> str:
        return f"ShapesSource(split={self.split!r}, size={self.size}, seed={self.seed})"

    def longest_caption(self) -> str:
        return longest_caption()
