"""CLIP's text model and T5's encoder against transformers (golden files from
scripts/make_pipeline_golden.py), and their converters' checks."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from svdq_jax.convert.components import load_bert, load_clip, load_t5
from svdq_jax.models.bert import mean_pooled
from svdq_jax.models.clip import CLIPTextConfig
from svdq_jax.models.t5 import T5Config, relative_position_buckets

GOLDEN = pathlib.Path(__file__).parent / "golden"


def _rel(a, b):
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def _folder(tmp_path, name, io, file="model.safetensors"):
  """A transformers-style model folder: weights + the golden config as config.json."""
  tmp_path.mkdir(parents=True, exist_ok=True)
  shutil.copy(GOLDEN / f"{name}.safetensors", tmp_path / file)
  (tmp_path / "config.json").write_text(str(io["config"]))
  return tmp_path


@pytest.mark.parametrize("name,prefixed", [("clip_tiny", False), ("clip_tiny_eos", False),
                                           ("clip_tiny", True)])
def test_clip_matches_transformers(name, prefixed, tmp_path):
  """Golden weights as transformers 5 writes them; prefixed: renamed to text_model.* as
  transformers 4 wrote FLUX's text_encoder/, with its position_ids buffer."""
  io = np.load(GOLDEN / f"{name}_io.npz")
  folder = _folder(tmp_path, name, io)
  if prefixed:
    sd = {f"text_model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    sd["text_model.embeddings.position_ids"] = np.arange(77)[None]
    save_file(sd, folder / "model.safetensors")
  model = load_clip(folder)
  assert model.cfg.eos_token_id == json.loads(str(io["config"]))["eos_token_id"]
  hidden, pooled = jax.jit(lambda ids: model(ids))(jnp.asarray(io["ids"]))
  assert _rel(hidden, io["hidden"]) < 1e-4
  assert _rel(pooled, io["pooled"]) < 1e-4


def test_t5_matches_transformers(tmp_path):
  io = np.load(GOLDEN / "t5_tiny_io.npz")
  model = load_t5(_folder(tmp_path / "pipe" / "text_encoder_2", "t5_tiny", io))
  ids = jnp.asarray(io["ids"])
  assert _rel(model(ids), io["hidden"]) < 1e-4
  assert _rel(model(ids, jnp.asarray(io["mask"]) > 0), io["masked"]) < 1e-4


def test_t5_buckets_cover_every_distance_class():
  b = relative_position_buckets(300, 32, 128)
  # every bucket but 16 (a positive distance of 0 does not exist)
  assert set(np.unique(b)) == set(range(32)) - {16}
  assert b[0, 1] == 17 and b[1, 0] == 1 and b[0, 0] == 0   # sign halves, exact near 0
  assert b[0, 200] == 31 and b[200, 0] == 15                # clamped beyond max_distance


def test_t5_embedding_stored_only_as_its_tied_copy(tmp_path):
  io = np.load(GOLDEN / "t5_tiny_io.npz")
  sd = load_file(GOLDEN / "t5_tiny.safetensors")
  sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")
  save_file(sd, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(str(io["config"]))
  assert _rel(load_t5(tmp_path)(jnp.asarray(io["ids"])), io["hidden"]) < 1e-4


def test_text_encoder_checks_name_the_problem(tmp_path):
  io = np.load(GOLDEN / "t5_tiny_io.npz")
  sd = load_file(GOLDEN / "t5_tiny.safetensors")
  del sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
  save_file(sd, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(str(io["config"]))
  with pytest.raises(ValueError, match=r"missing 1 tensors \['encoder.block.1.layer.1."
                                       r"DenseReluDense.wo.weight'\]"):
    load_t5(tmp_path)
  raw = json.loads(str(io["config"]))
  (tmp_path / "config.json").write_text(json.dumps({**raw, "feed_forward_proj": "relu"}))
  with pytest.raises(ValueError, match="gated-gelu"):
    load_t5(tmp_path)
  with pytest.raises(ValueError, match="does not match the model"):
    load_clip(GOLDEN / "clip_tiny.safetensors")   # ViT-L/14's config, tiny weights
  with pytest.raises(FileNotFoundError):
    load_clip(tmp_path / "nowhere.safetensors")
  model = load_clip(GOLDEN / "clip_tiny.safetensors",
                    cfg=CLIPTextConfig(**{k: v for k, v in json.loads(str(np.load(
                        GOLDEN / "clip_tiny_io.npz")["config"])).items()
                        if k not in ("bos_token_id", "pad_token_id")}))
  with pytest.raises(ValueError, match=r"L <= 77"):
    model(jnp.zeros((1, 78), jnp.int32))


@pytest.mark.parametrize("name", ["clip_tiny", "t5_tiny"])
def test_bf16_checkpoint_runs_and_returns_bf16(name, tmp_path):
  """A bf16 checkpoint's activations stay bf16 (as in transformers): FLUX's sampling loop
  takes the T5 embeddings' dtype, and f32 ones ran its whole step in f32 (2.7x slower on an
  H200, 2026-12-02)."""
  io = np.load(GOLDEN / f"{name}_io.npz")
  model = (load_clip if name.startswith("clip") else load_t5)(_folder(tmp_path, name, io))
  graph, state = nnx.split(model)
  model = nnx.merge(graph, jax.tree.map(lambda a: a.astype(jnp.bfloat16), state))
  out = model(jnp.asarray(io["ids"]))
  hidden, pooled = out if name.startswith("clip") else (out, None)
  assert hidden.dtype == jnp.bfloat16
  assert pooled is None or pooled.dtype == jnp.bfloat16
  assert _rel(hidden.astype(jnp.float32), io["hidden"]) < 5e-2   # bf16 rounding, not garbage


def test_bert_matches_transformers(tmp_path):
  """BERT's encoder (the real-model quality benchmark's architecture), padding mask included:
  the real tokens' hidden states against transformers' BertModel."""
  io = np.load(GOLDEN / "bert_tiny_io.npz")
  model = load_bert(_folder(tmp_path, "bert_tiny", io))
  mask = jnp.asarray(io["mask"]) > 0
  hidden = np.asarray(model(jnp.asarray(io["ids"]), mask))
  real = np.asarray(mask)
  assert _rel(hidden[real], io["hidden"][real]) < 1e-4
  pooled = np.asarray(mean_pooled(jnp.asarray(hidden), mask))
  want = (io["hidden"] * real[..., None]).sum(1) / real.sum(1, keepdims=True)
  np.testing.assert_allclose(pooled, want / np.linalg.norm(want, axis=1, keepdims=True),
                             atol=1e-5)
  with pytest.raises(ValueError, match=r"\[B, L\]"):
    model(jnp.asarray(io["ids"]), mask[:, :5])
