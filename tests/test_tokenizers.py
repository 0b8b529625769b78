"""FLUX's tokenizers against transformers' on awkward prompts (golden ids from
scripts/make_pipeline_golden.py: CLIP's own BPE merges, truncated; a small SentencePiece
model in T5's layout)."""

import pathlib
import shutil

import numpy as np
import pytest

from svdq_jax.models.tokenizers import clip_tokenizer, t5_tokenizer

GOLDEN = pathlib.Path(__file__).parent / "golden"


def _golden(name):
  d = np.load(GOLDEN / f"{name}_ids.npz")
  return [str(p) for p in d["prompts"]], d["ids"]


def test_clip_tokenizer_matches_transformers():
  prompts, want = _golden("clip_tokenizer")
  tok = clip_tokenizer(GOLDEN / "clip_tokenizer")
  np.testing.assert_array_equal(tok(prompts), want)
  assert tok("").shape == (1, 77) and tok.vocab_size == 4514


def test_t5_tokenizer_json_matches_transformers(tmp_path):
  prompts, want = _golden("t5_tokenizer")
  pipe = tmp_path / "pipe" / "tokenizer_2"
  shutil.copytree(GOLDEN / "t5_tokenizer", pipe)
  tok = t5_tokenizer(tmp_path / "pipe", max_length=want.shape[1])
  np.testing.assert_array_equal(tok(prompts), want)


def test_t5_sentencepiece_fallback(tmp_path):
  """Without tokenizer.json, spiece.model through sentencepiece: the same ids, except for
  text spelling a special token ('</s>'), which transformers maps to its id and SentencePiece
  spells out (the documented difference of the fallback)."""
  prompts, want = _golden("t5_tokenizer")
  shutil.copy(GOLDEN / "t5_tokenizer" / "spiece.model", tmp_path)
  got = t5_tokenizer(tmp_path, max_length=want.shape[1])(prompts)
  special = np.array(["</s>" in p for p in prompts])
  assert special.sum() == 1
  np.testing.assert_array_equal(got[~special], want[~special])
  assert (got[special] != want[special]).any()


def test_tokenizer_folders_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
    clip_tokenizer(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    clip_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="spiece.model"):
    t5_tokenizer(tmp_path)
