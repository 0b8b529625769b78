"""FLUX's text tokenizers, read from a checkpoint folder's own files.

CLIP (``tokenizer/``): byte-level BPE from ``vocab.json`` + ``merges.txt`` (or a
``tokenizer.json``), set up in the ``tokenizers`` library as transformers' ``CLIPTokenizer``
sets it up: NFC, whitespace runs to one space, lowercase, CLIP's split pattern, ``</w>`` word
ends, ``<|startoftext|> ... <|endoftext|>``, padded with ``<|endoftext|>`` to 77.
T5 (``tokenizer_2/``): ``tokenizer.json`` through ``tokenizers`` (transformers' T5 tokenizer),
or, lacking it, ``spiece.model`` through ``sentencepiece`` (the same ids, except that text
spelling a special token such as ``</s>`` is spelled out, not mapped to its id); ``</s>``
appended, ``<pad>`` padding to 512 (dev) or 256 (schnell). Both truncate: FLUX pipelines encode fixed lengths.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
              r"""|[^\s\p{L}\p{N}]+""")


class Tokenizer:
  """prompts -> int32 ids [B, max_length] (truncated, then padded)."""

  def __init__(self, encode_batch, vocab_size: int, max_length: int, name: str):
    self._encode_batch = encode_batch
    self.vocab_size = vocab_size
    self.max_length = max_length
    self.name = name

  def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
    if isinstance(prompts, str):
      prompts = [prompts]
    return np.asarray(self._encode_batch(list(prompts)), np.int32).reshape(len(prompts),
                                                                             self.max_length)


def _folder(path, sub: str) -> pathlib.Path:
  path = pathlib.Path(path)
  if (path / sub).is_dir():
    path = path / sub
  if not path.is_dir():
    raise FileNotFoundError(f"tokenizer folder not found: {path}")
  return path


def _fixed_length(tok, max_length: int, pad_token: str, name: str) -> Tokenizer:
  pad_id = tok.token_to_id(pad_token)
  if pad_id is None:
    raise ValueError(f"{name}: the vocabulary has no padding token {pad_token!r}")
  tok.enable_truncation(max_length)
  tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
  return Tokenizer(lambda ps: [e.ids for e in tok.encode_batch(ps)],
                   tok.get_vocab_size(with_added_tokens=True), max_length, name)


def clip_tokenizer(path, max_length: int = 77) -> Tokenizer:
  """CLIP's tokenizer from a folder (or a pipeline folder's ``tokenizer/``)."""
  from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
  from tokenizers import Tokenizer as Backend
  from tokenizers.models import BPE
  folder = _folder(path, "tokenizer")
  bos, eos = "<|startoftext|>", "<|endoftext|>"
  if (folder / "tokenizer.json").exists():
    tok = Backend.from_file(str(folder / "tokenizer.json"))
  else:
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.exists() and merges.exists()):
      raise FileNotFoundError(f"{folder}: a CLIP tokenizer needs tokenizer.json or vocab.json "
                              "+ merges.txt")
    tok = Backend(BPE.from_file(str(vocab), str(merges), continuing_subword_prefix="",
                                end_of_word_suffix="</w>", fuse_unk=False, unk_token=eos))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(bos, special=True), AddedToken(eos, special=True)])
    ids = [tok.token_to_id(t) for t in (bos, eos)]
    if None in ids:
      raise ValueError(f"{folder}/vocab.json lacks CLIP's {bos} / {eos} tokens")
    tok.post_processor = processors.RobertaProcessing((eos, ids[1]), (bos, ids[0]),
                                                      trim_offsets=False,
                                                      add_prefix_space=False)
  return _fixed_length(tok, max_length, eos, f"CLIP tokenizer ({folder})")


def t5_tokenizer(path, max_length: int = 512) -> Tokenizer:
  """T5's tokenizer from a folder (or a pipeline folder's ``tokenizer_2/``)."""
  folder = _folder(path, "tokenizer_2")
  name = f"T5 tokenizer ({folder})"
  if (folder / "tokenizer.json").exists():
    from tokenizers import Tokenizer as Backend
    return _fixed_length(Backend.from_file(str(folder / "tokenizer.json")), max_length,
                         "<pad>", name)
  if not (folder / "spiece.model").exists():
    raise FileNotFoundError(f"{folder}: a T5 tokenizer needs tokenizer.json or spiece.model")
  import sentencepiece
  sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
  pad, eos = sp.pad_id(), sp.eos_id()
  if pad < 0 or eos < 0:
    raise ValueError(f"{folder}/spiece.model has no pad / eos ids (pad {pad}, eos {eos})")

  def encode_batch(prompts):
    out = []
    for ids in sp.encode(prompts):
      ids = ids[:max_length - 1] + [eos]
      out.append(ids + [pad] * (max_length - len(ids)))
    return out

  # T5 checkpoints add 100 sentinel tokens after the SentencePiece vocabulary
  extra = json.loads((folder / "tokenizer_config.json").read_text()).get("extra_ids", 100) \
      if (folder / "tokenizer_config.json").exists() else 100
  return Tokenizer(encode_batch, sp.get_piece_size() + extra, max_length, name)
