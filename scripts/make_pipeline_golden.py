"""Writes golden files for the pipeline components' parity tests (issue 15).

Needs torch, diffusers and transformers (torch's CPU wheel exists here for Python 3.11 only),
which CI does not have; the tests read the committed files:

    python3.11 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 diffusers \
        transformers safetensors numpy sentencepiece tokenizers protobuf
    /tmp/torchenv/bin/pip download --no-deps -d /tmp/oc open_clip_torch && \
        unzip -o /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    /tmp/torchenv/bin/python scripts/make_pipeline_golden.py tests/golden \
        /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz
    /tmp/torchenv/bin/python scripts/make_pipeline_golden.py tests/golden --only bert   # one writer

Per component, small random configs with every parameter perturbed (so a wrong mapping of a
norm or bias shows): <name>.safetensors holds the f32 weights in the reference's naming
(and ``vae_tiny_bfl.safetensors`` the same VAE in BFL ``ae.safetensors`` naming, checked here
against diffusers' own LDM converter); <name>_io.npz the config, inputs and outputs.
"""

import argparse
import json
import os

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file
from transformers import (BertConfig, BertModel, CLIPTextConfig, CLIPTextModel, T5Config,
                          T5EncoderModel)

VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                  layers_per_block=1, norm_num_groups=8, scaling_factor=0.3611,
                  shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def perturbed(model: torch.nn.Module, seed: int) -> dict:
  """Every parameter replaced by random values (norm weights around 1), f32, contiguous."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5)
      if "norm" in name.lower() and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(noise if p.ndim > 1 else 0.1 * torch.randn(p.shape, generator=g))
  return {k: v.contiguous() for k, v in model.state_dict().items()}


def ldm_vae_names(sd: dict, n_blocks: int) -> dict:
  """diffusers AutoencoderKL state dict -> BFL / LDM ``ae.safetensors`` names (attention
  projections as 1x1 convs)."""
  out = {}
  for k, v in sd.items():
    n = k
    for a, b in [("down_blocks.", "down."), ("mid_block.resnets.0", "mid.block_1"),
                 ("mid_block.resnets.1", "mid.block_2"), ("mid_block.attentions.0", "mid.attn_1"),
                 ("resnets.", "block."), ("downsamplers.0", "downsample"),
                 ("upsamplers.0", "upsample"), ("conv_shortcut", "nin_shortcut"),
                 ("conv_norm_out", "norm_out"), ("group_norm", "norm"), ("to_q", "q"),
                 ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]:
      n = n.replace(a, b)
    if n.startswith("decoder.up_blocks."):
      i = int(n.split(".")[2])
      n = f"decoder.up.{n_blocks - 1 - i}." + ".".join(n.split(".")[3:])
    if ".attn_1." in n and n.endswith("weight") and v.ndim == 2:
      v = v[:, :, None, None]
    out[n] = v.contiguous()
  return out


def vae(out_dir: str) -> None:
  torch.manual_seed(0)
  model = AutoencoderKL(**VAE_CONFIG).eval()
  sd = perturbed(model, seed=1)
  bfl = ldm_vae_names(sd, len(VAE_CONFIG["block_out_channels"]))
  back = convert_ldm_vae_checkpoint(bfl, dict(model.config))
  assert set(back) == set(sd), sorted(set(back) ^ set(sd))[:10]
  for k in sd:
    assert torch.equal(back[k].reshape(sd[k].shape), sd[k]), k
  g = torch.Generator().manual_seed(2)
  image = torch.rand(2, 3, 24, 32, generator=g) * 2 - 1
  latents = torch.randn(2, 4, 6, 8, generator=g)
  with torch.no_grad():
    moments = model.encoder(image)
    decoded = model.decode(latents).sample
  save_file(sd, os.path.join(out_dir, "vae_tiny.safetensors"))
  save_file(bfl, os.path.join(out_dir, "vae_tiny_bfl.safetensors"))
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  np.savez(os.path.join(out_dir, "vae_tiny_io.npz"), config=json.dumps(VAE_CONFIG),
           image=nhwc(image), moments=nhwc(moments), latents=nhwc(latents),
           decoded=nhwc(decoded))


# Two CLIP poolings: eos_token_id 2 (original CLIP configs, FLUX's: the largest id is the end
# of text) and an explicit id (its first occurrence).
CLIP_CONFIGS = {
    "clip_tiny": dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=77, eos_token_id=2, bos_token_id=0, pad_token_id=1,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "clip_tiny_eos": dict(vocab_size=99, hidden_size=32, intermediate_size=37,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                          eos_token_id=97, bos_token_id=0, pad_token_id=1, hidden_act="quick_gelu", layer_norm_eps=1e-5),
}
T5_CONFIG = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                 dropout_rate=0.0)


def clip(out_dir: str) -> None:
  for i, (name, config) in enumerate(CLIP_CONFIGS.items()):
    torch.manual_seed(10 + i)
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    sd = perturbed(model, seed=11 + i)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    g = torch.Generator().manual_seed(12 + i)
    ids = torch.randint(3, 90, (3, 77), generator=g)
    eos = 98 if config["eos_token_id"] == 2 else config["eos_token_id"]
    for row, end in enumerate((5, 40, 76)):   # end of text, then padding with it
      ids[row, end:] = eos
    ids[2, 10] = eos   # a second end-of-text early in row 2
    with torch.no_grad():
      out = model(input_ids=ids)
    save_file(sd, os.path.join(out_dir, f"{name}.safetensors"))
    np.savez(os.path.join(out_dir, f"{name}_io.npz"), config=json.dumps(config),
             ids=ids.numpy(), hidden=out.last_hidden_state.numpy(),
             pooled=out.pooler_output.numpy())


def t5(out_dir: str) -> None:
  torch.manual_seed(20)
  model = T5EncoderModel(T5Config(**T5_CONFIG)).eval()
  sd = perturbed(model, seed=21)
  # as save_pretrained writes it: the tied copy of the embedding is not stored
  sd = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
  g = torch.Generator().manual_seed(22)
  ids = torch.randint(0, 99, (2, 160), generator=g)   # past max_distance: every bucket
  mask = torch.ones(2, 160, dtype=torch.long)
  mask[1, 100:] = 0
  with torch.no_grad():
    hidden = model(input_ids=ids).last_hidden_state
    masked = model(input_ids=ids, attention_mask=mask).last_hidden_state
  save_file(sd, os.path.join(out_dir, "t5_tiny.safetensors"))
  np.savez(os.path.join(out_dir, "t5_tiny_io.npz"), config=json.dumps(T5_CONFIG),
           ids=ids.numpy(), mask=mask.numpy(), hidden=hidden.numpy(), masked=masked.numpy())


PROMPTS = ["", "a photo of a cat", "  leading   and trailing  spaces  ",
           "ÜNÎCÖDÉ café naïve façade", "日本語のテキスト 🎨🐱 emoji", "tabs\tand\nnew\r\nlines",
           "text <|endoftext|> in the middle </s> too", "It's John's dog, isn't it? 12345 $%^&*()",
           "MiXeD CaSe WORDS", "a red circle above a blue square " * 40]


def clip_tokenizer(out_dir: str, bpe_gz: str, n_merges: int = 4000) -> None:
  """CLIP's own BPE merges (open_clip's bpe_simple_vocab_16e6.txt.gz), the first
  ``n_merges`` of them, as vocab.json + merges.txt (vocabulary built as CLIP builds it:
  bytes, bytes + </w>, merges, then the two specials); ids from transformers' CLIPTokenizer
  as FluxPipeline calls it (padding to 77, truncation)."""
  import gzip
  from transformers import CLIPTokenizer
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:n_merges + 1]
  chars = list(bytes_to_unicode().values())
  vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  folder = os.path.join(out_dir, "clip_tokenizer")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  tok = CLIPTokenizer(vocab=os.path.join(folder, "vocab.json"),
                      merges=os.path.join(folder, "merges.txt"))
  ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
  np.savez(os.path.join(out_dir, "clip_tokenizer_ids.npz"), prompts=np.array(PROMPTS),
           ids=np.array(ids, np.int32))


def t5_tokenizer(out_dir: str) -> None:
  """A small SentencePiece unigram model trained here (T5's special ids: pad 0, </s> 1,
  unk 2), the tokenizer.json transformers builds from it, and the ids of transformers'
  T5Tokenizer as FluxPipeline calls it (padding to max_length, truncation)."""
  import io
  import sentencepiece as spm
  from transformers import T5Tokenizer
  rng = np.random.default_rng(0)
  words = ("a red green blue circle square triangle above below left of right on the gray "
           "white black background photo cat dog painting style bright dark small large "
           "city river mountain at night under sky").split()
  letters = list("abcdefghijklmnopqrstuvwxyzéü0123456789,.'")
  words += ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(300)]
  corpus = [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(3000)] + PROMPTS
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model,
                                 vocab_size=200, hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1,
                                 unk_id=2, bos_id=-1, character_coverage=1.0)
  folder = os.path.join(out_dir, "t5_tokenizer")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "spiece.model"), "wb") as f:
    f.write(model.getvalue())
  tok = T5Tokenizer.from_pretrained(folder)
  tok.save_pretrained(folder)
  for extra in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
    if os.path.exists(os.path.join(folder, extra)):
      os.remove(os.path.join(folder, extra))
  ids = tok(PROMPTS, padding="max_length", max_length=64, truncation=True).input_ids
  np.savez(os.path.join(out_dir, "t5_tokenizer_ids.npz"), prompts=np.array(PROMPTS),
           ids=np.array(ids, np.int32))


def lora_kohya(out_dir: str) -> None:
  """A rank-2 kohya LoRA at FLUX.1's real widths (fused qkv, single-block linear1 with its
  q/k/v/MLP parts, a plain layer, alphas) and diffusers' own conversion of it to PEFT naming
  (``_convert_kohya_flux_lora_to_diffusers``): the test loads both and checks they add the
  same deltas, i.e. our diffusers part offsets agree with diffusers' reading of BFL's layers."""
  from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
  h, mlp = 3072, 12288
  g = torch.Generator().manual_seed(30)

  def pair(name, r, k, n, alpha):
    return {f"{name}.lora_down.weight": torch.randn(r, k, generator=g) * 0.1,
            f"{name}.lora_up.weight": torch.randn(n, r, generator=g) * 0.1,
            f"{name}.alpha": torch.tensor(float(alpha))}

  sd = (pair("lora_unet_double_blocks_0_img_attn_qkv", 3, h, 3 * h, 1.5)
        | pair("lora_unet_single_blocks_0_linear1", 4, h, 3 * h + mlp, 8)
        | pair("lora_unet_double_blocks_0_txt_attn_proj", 2, h, h, 2))
  save_file({k: v.contiguous() for k, v in sd.items()},
            os.path.join(out_dir, "lora_kohya.safetensors"))
  converted = _convert_kohya_flux_lora_to_diffusers(dict(sd))
  save_file({k: v.clone().contiguous() for k, v in converted.items()},  # splits share
            os.path.join(out_dir, "lora_kohya_as_diffusers.safetensors"))


BERT_CONFIG = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=40, type_vocab_size=2,
                   layer_norm_eps=1e-12, hidden_act="gelu")


def bert(out_dir: str) -> None:
  """BERT's encoder (the real-model quality benchmark's architecture, all-MiniLM-L6-v2's),
  with a padding mask: rows of 24, 11 and 3 real tokens."""
  torch.manual_seed(30)
  model = BertModel(BertConfig(**BERT_CONFIG), add_pooling_layer=False).eval()
  sd = perturbed(model, seed=31)
  sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
  g = torch.Generator().manual_seed(32)
  ids = torch.randint(1, 120, (3, 24), generator=g)
  mask = torch.zeros(3, 24, dtype=torch.long)
  for row, n in enumerate((24, 11, 3)):
    mask[row, :n] = 1
  ids = ids * mask   # padding id 0
  with torch.no_grad():
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
  save_file(sd, os.path.join(out_dir, "bert_tiny.safetensors"))
  np.savez(os.path.join(out_dir, "bert_tiny_io.npz"), config=json.dumps(BERT_CONFIG),
           ids=ids.numpy(), mask=mask.numpy(), hidden=hidden.numpy())


WRITERS = dict(vae=vae, clip=clip, t5=t5, t5_tokenizer=t5_tokenizer, lora_kohya=lora_kohya,
               bert=bert)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("out_dir")
  ap.add_argument("bpe_gz", nargs="?", help="open_clip's CLIP BPE merges (the CLIP tokenizer)")
  ap.add_argument("--only", default=None, help=f"comma-separated writers of {list(WRITERS)}")
  args = ap.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  for name in args.only.split(",") if args.only else WRITERS:
    WRITERS[name](args.out_dir)
  if args.bpe_gz and not args.only:
    clip_tokenizer(args.out_dir, args.bpe_gz)


if __name__ == "__main__":
  main()
