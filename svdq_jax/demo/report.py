"""The demo's outputs: a labelled PNG grid and the results table (markdown and JSON)."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL = 128          # pixels per image in the grid (32x32 images upscaled 4x, nearest)
LABEL_WIDTH = 240   # left column with the prompt
HEADER = 36         # top row with the method names


def grid(images: list[np.ndarray], columns: list[str], rows: list[str]) -> Image.Image:
  """images: one uint8 [B, H, W, 3] per column; rows: B row labels. -> RGB image."""
  font = ImageFont.load_default(size=13)
  b = len(rows)
  canvas = Image.new("RGB", (LABEL_WIDTH + CELL * len(columns), HEADER + CELL * b), "white")
  draw = ImageDraw.Draw(canvas)
  for j, name in enumerate(columns):
    draw.text((LABEL_WIDTH + j * CELL + CELL // 2, HEADER // 2), name, fill="black", font=font,
              anchor="mm")
    for i in range(b):
      tile = Image.fromarray(images[j][i]).resize((CELL, CELL), Image.NEAREST)
      canvas.paste(tile, (LABEL_WIDTH + j * CELL, HEADER + i * CELL))
  for i, text in enumerate(rows):
    draw.multiline_text((8, HEADER + i * CELL + CELL // 2), "\n".join(textwrap.wrap(text, 30)),
                        fill="black", font=font, anchor="lm")
  return canvas


def table(results) -> str:
  """Markdown table of Result rows."""
  lines = ["| method | PSNR vs 16-bit (dB) | SSIM vs 16-bit | velocity error vs 16-bit (%) | "
           "transformer weights (MB) | quantize (s) | sample (s, incl. jit) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    psnr = "identical" if r.key == "bf16" else f"{r.psnr_db:.2f}"
    ssim = "1" if r.key == "bf16" else f"{r.ssim:.4f}"
    if r.reference:   # compared with another row than the 16-bit one
      psnr += f" (vs {results[r.reference].label})"
    lines.append(f"| {r.label} | {psnr} | {ssim} | {100 * r.velocity_error:.2f} | "
                 f"{r.weight_bytes / 1e6:.2f} | {r.quantize_seconds:.1f} | "
                 f"{r.sample_seconds:.1f} |")
  return "\n".join(lines)


def outlier_summary(rows) -> str:
  """Markdown summary of (layer, max/median absmax ratio, max |x|) rows."""
  if not rows:
    return ""
  ratios = np.array([r[1] for r in rows])
  worst = sorted(rows, key=lambda r: -r[1])[:5]
  lines = [f"Input-channel outliers over {len(rows)} calibrated linears (max / median of the "
           f"per-channel absmax): median {np.median(ratios):.1f}, max {ratios.max():.1f}. "
           "Largest:", "", "| layer | max/median | max abs |", "|---|---:|---:|"]
  lines += [f"| {p} | {r:.1f} | {m:.1f} |" for p, r, m in worst]
  return "\n".join(lines)


def write(out: str, results, outliers, rows: list[str], setting: dict) -> list[str]:
  """Writes grid.png, diff.png (|image - 16-bit| x 4), results.md and results.json into
  ``out`` (created); returns the paths. Each file is written to a temporary name first and
  renamed, so a failure leaves no half-written file."""
  os.makedirs(out, exist_ok=True)
  names = ("grid.png", "diff.png", "results.md", "results.json")
  paths = {name: os.path.join(out, name) for name in names}
  labels = [r.label for r in results]
  img = grid([r.images for r in results], labels, rows)
  diff = grid([np.clip(4 * np.abs(r.images.astype(np.int16) -
                                 results[r.reference].images), 0, 255).astype(np.uint8)
               for r in results], labels, rows)
  md = (f"# svdq-jax demo\n\nSetting: {json.dumps(setting)}\n\n{table(results)}\n\n"
        f"{outlier_summary(outliers)}\n\n![grid](grid.png)\n\n"
        "Absolute difference to the 16-bit image (LoRA rows: to 16-bit + LoRA), x4:\n\n"
        "![difference](diff.png)\n")
  data = {"setting": setting,
          "results": [{k: v for k, v in vars(r).items() if k != "images"} for r in results],
          "outliers": [{"layer": p, "max_over_median": r, "max_abs": m} for p, r, m in outliers]}
  for name, write_fn in (("grid.png", lambda f: img.save(f, format="PNG")),
                         ("diff.png", lambda f: diff.save(f, format="PNG")),
                         ("results.md", lambda f: f.write(md.encode())),
                         ("results.json", lambda f: f.write(json.dumps(data, indent=1).encode()))):
    tmp = paths[name] + ".tmp"
    with open(tmp, "wb") as f:
      write_fn(f)
    os.replace(tmp, paths[name])
  return list(paths.values())
