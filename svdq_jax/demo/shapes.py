"""The demo's data: procedurally drawn coloured shapes with captions.

A scene is one or two shapes (circle, square, triangle) in named colours on a named
background; with two shapes the caption states where the first lies relative to the second:
"a red circle above a blue square on a gray background". Images are 32x32 RGB in [-1, 1],
channel-first [B, 3, 32, 32], drawn in jnp with 4x4 supersampling (soft edges), so a training
step can draw its own batch on the device. Captions are words from ``VOCAB``; ``tokenize``
turns text into fixed-length id rows for the text encoder.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SIZE = 32
IMAGE_TOKENS = (IMAGE_SIZE // 2) ** 2   # 2x2 patches
SUPERSAMPLE = 4
MAX_TOKENS = 12   # "a red circle left of a blue square on a gray background"

SHAPES = ("circle", "square", "triangle")
COLORS = {  # name -> RGB in [0, 1]
    "red": (0.86, 0.16, 0.16), "green": (0.16, 0.67, 0.24), "blue": (0.16, 0.31, 0.86),
    "yellow": (0.92, 0.80, 0.16), "purple": (0.59, 0.24, 0.75), "orange": (0.94, 0.55, 0.12),
    "white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.08), "gray": (0.50, 0.50, 0.50),
}
SHAPE_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
BACKGROUNDS = ("gray", "white", "black", "blue", "yellow")
RELATIONS = ("above", "below", "left of", "right of")

PAD = "<pad>"
VOCAB = (PAD, "a", "an", "on", "background", "above", "below", "left", "right", "of",
         *SHAPES, *COLORS)
_IDS = {w: i for i, w in enumerate(VOCAB)}
_COLOR_RGB = np.array(list(COLORS.values()), np.float32)
_COLOR_INDEX = {c: i for i, c in enumerate(COLORS)}


@dataclasses.dataclass(frozen=True)
class Scenes:
  """A batch of B scenes (numpy arrays, host side).

  count: int [B], 1 or 2 shapes. shape: int [B, 2] into SHAPES. color: int [B, 2] into
  COLORS. background: int [B] into COLORS. center: f32 [B, 2, 2] (x, y) in [0, 1], y down.
  size: f32 [B, 2] half-widths in [0, 1] units. relation: int [B] into RELATIONS (two
  shapes only). Slot 1 is ignored where count is 1.
  """

  count: np.ndarray
  shape: np.ndarray
  color: np.ndarray
  background: np.ndarray
  center: np.ndarray
  size: np.ndarray
  relation: np.ndarray

  def __len__(self) -> int:
    return len(self.count)


def random_scenes(rng: np.random.Generator, n: int) -> Scenes:
  """n scenes: 1 or 2 shapes (equally likely), distinct colours, a different background;
  two shapes are placed so that their stated relation holds with a clear gap."""
  count = rng.integers(1, 3, n)
  shape = rng.integers(0, len(SHAPES), (n, 2))
  background = np.array([_COLOR_INDEX[c] for c in BACKGROUNDS])[rng.integers(0, len(BACKGROUNDS), n)]
  # Two distinct shape colours, neither the background: the two smallest random keys among
  # the allowed colours.
  allowed = np.isin(np.arange(len(COLORS)), [_COLOR_INDEX[c] for c in SHAPE_COLORS])
  keys = np.where(allowed[None] & (np.arange(len(COLORS))[None] != background[:, None]),
                  rng.random((n, len(COLORS))), np.inf)
  color = np.argsort(keys, axis=1)[:, :2]
  relation = rng.integers(0, len(RELATIONS), n)
  size = rng.uniform(0.10, 0.15, (n, 2)).astype(np.float32)
  # Two shapes: along the relation's axis one centre in [0.2, 0.35], the other in [0.65,
  # 0.8] (never overlapping); across it, each anywhere in [0.25, 0.75]. One shape: anywhere
  # in [0.25, 0.75].
  near = rng.uniform(0.20, 0.35, n)
  far = rng.uniform(0.65, 0.80, n)
  across = rng.uniform(0.25, 0.75, (n, 2))
  first_low = np.isin(relation, (0, 2))           # above / left of: first has the lower coord
  along_y = relation < 2                          # above / below: the relation is vertical
  a0, a1 = np.where(first_low, near, far), np.where(first_low, far, near)
  center = np.empty((n, 2, 2), np.float32)
  center[:, 0, 1] = np.where(along_y, a0, across[:, 0])
  center[:, 1, 1] = np.where(along_y, a1, across[:, 1])
  center[:, 0, 0] = np.where(along_y, across[:, 0], a0)
  center[:, 1, 0] = np.where(along_y, across[:, 1], a1)
  single = count == 1
  center[single, 0] = rng.uniform(0.25, 0.75, (single.sum(), 2))
  return Scenes(count, shape, color, background, center, size, relation)


def caption(scenes: Scenes, i: int) -> str:
  """The caption of scene i."""
  def obj(j):
    color = list(COLORS)[scenes.color[i, j]]
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {SHAPES[scenes.shape[i, j]]}"
  text = obj(0)
  if scenes.count[i] == 2:
    text += f" {RELATIONS[scenes.relation[i]]} {obj(1)}"
  return text + f" on a {list(COLORS)[scenes.background[i]]} background"


def captions(scenes: Scenes) -> list[str]:
  """The captions of all scenes."""
  return [caption(scenes, i) for i in range(len(scenes))]


def tokenize(texts: list[str]) -> np.ndarray:
  """Captions -> int32 [B, MAX_TOKENS] ids, padded with PAD.

  Raises ValueError naming the caption and the word when a word is not in VOCAB or the
  caption has more than MAX_TOKENS words.
  """
  ids = np.zeros((len(texts), MAX_TOKENS), np.int32)
  for i, text in enumerate(texts):
    words = text.lower().replace(",", " ").split()
    unknown = [w for w in words if w not in _IDS or w == PAD]
    if unknown:
      raise ValueError(f"prompt {text!r}: unknown word {unknown[0]!r}; the demo model knows "
                       f"{', '.join(VOCAB[1:])}")
    if not words or len(words) > MAX_TOKENS:
      raise ValueError(f"prompt {text!r} has {len(words)} words; 1 to {MAX_TOKENS} are allowed")
    ids[i, :len(words)] = [_IDS[w] for w in words]
  return ids


def draw(present, shape, color_rgb, background_rgb, center, size) -> jax.Array:
  """Pure jnp drawing of B scenes, shapes painted in slot order (later slots on top).

  present: bool [B, 2]. shape: int [B, 2]. color_rgb: f32 [B, 2, 3]. background_rgb: f32
  [B, 3]. center: f32 [B, 2, 2] (x, y). size: f32 [B, 2]. Returns f32 [B, 3, 32, 32] in [-1, 1].
  """
  n = IMAGE_SIZE * SUPERSAMPLE
  coords = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n
  x, y = coords[None, None, :], coords[None, :, None]                # [1, 1, n], [1, n, 1]
  img = jnp.broadcast_to(background_rgb[:, :, None, None], (len(present), 3, n, n))
  for j in range(2):
    dx, dy = x - center[:, j, 0, None, None], y - center[:, j, 1, None, None]
    r = size[:, j, None, None]
    circle = dx * dx + dy * dy <= r * r
    square = (jnp.abs(dx) <= r) & (jnp.abs(dy) <= r)
    # Apex up: width grows from 0 at cy - r to 2r at cy + r.
    triangle = (jnp.abs(dy) <= r) & (jnp.abs(dx) <= (dy + r) / 2)
    kind = shape[:, j, None, None]
    inside = jnp.select([kind == 0, kind == 1], [circle, square], triangle)
    inside &= present[:, j, None, None]
    img = jnp.where(inside[:, None], color_rgb[:, j, :, None, None], img)
  img = img.reshape(len(present), 3, IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE)
  return img.mean((3, 5)) * 2.0 - 1.0


def draw_args(scenes: Scenes) -> tuple[np.ndarray, ...]:
  """The arguments of ``draw`` for scenes, slot 1 first so that the first shape is on top."""
  order = (1, 0)
  present = np.stack([scenes.count == 2, np.ones(len(scenes), bool)], axis=1)
  return (present, scenes.shape[:, order], _COLOR_RGB[scenes.color[:, order]],
          _COLOR_RGB[scenes.background], scenes.center[:, order], scenes.size[:, order])


_draw = jax.jit(draw)


def render(scenes: Scenes) -> jax.Array:
  """f32 [B, 3, 32, 32] images in [-1, 1]."""
  return _draw(*draw_args(scenes))
