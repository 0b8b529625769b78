"""Writes golden files for the FLUX parity tests with diffusers.FluxTransformer2DModel.

Needs torch and diffusers (torch's CPU wheel exists here for Python 3.11 only), which CI
does not have; the tests read the committed files:

    python3.11 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 diffusers safetensors numpy
    /tmp/torchenv/bin/python scripts/make_flux_golden.py tests/golden

For each of a dev-style (guidance) and a schnell-style config: <name>.safetensors holds the
random f32 weights in diffusers naming; <name>_io.npz the inputs, the config and the output.
"""

import json
import os
import sys

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

CONFIGS = {
    "flux_dev_tiny": dict(in_channels=16, num_layers=2, num_single_layers=2,
                          attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                          pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(8, 12, 12)),
    "flux_schnell_tiny": dict(in_channels=16, num_layers=1, num_single_layers=2,
                              attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                              pooled_projection_dim=24, guidance_embeds=False,
                              axes_dims_rope=(8, 12, 12)),
}


def image_ids(h, w):
  ids = np.zeros((h, w, 3), np.float32)
  ids[..., 1] = np.arange(h)[:, None]
  ids[..., 2] = np.arange(w)[None, :]
  return ids.reshape(-1, 3)


def main(out_dir):
  os.makedirs(out_dir, exist_ok=True)
  for seed, (name, cfg) in enumerate(CONFIGS.items()):
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**cfg).eval()
    with torch.no_grad():
      for p in model.parameters():
        p.copy_(torch.randn_like(p) * 0.2)
    rng = np.random.default_rng(seed)
    b, hh, ww, lt = 2, 3, 4, 5
    inputs = dict(
        img=rng.standard_normal((b, hh * ww, cfg["in_channels"])).astype(np.float32),
        img_ids=image_ids(hh, ww),
        txt=rng.standard_normal((b, lt, cfg["joint_attention_dim"])).astype(np.float32),
        txt_ids=np.zeros((lt, 3), np.float32),
        timesteps=np.array([0.9, 0.3], np.float32),
        y=rng.standard_normal((b, cfg["pooled_projection_dim"])).astype(np.float32),
    )
    if cfg["guidance_embeds"]:
      inputs["guidance"] = np.array([3.5, 2.0], np.float32)
    with torch.no_grad():
      out = model(hidden_states=torch.from_numpy(inputs["img"]),
                  encoder_hidden_states=torch.from_numpy(inputs["txt"]),
                  pooled_projections=torch.from_numpy(inputs["y"]),
                  timestep=torch.from_numpy(inputs["timesteps"]),
                  img_ids=torch.from_numpy(inputs["img_ids"]),
                  txt_ids=torch.from_numpy(inputs["txt_ids"]),
                  guidance=torch.from_numpy(inputs["guidance"]) if "guidance" in inputs else None,
                  return_dict=False)[0]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(out_dir, f"{name}.safetensors"))
    np.savez(os.path.join(out_dir, f"{name}_io.npz"), out=out.numpy(),
             config=json.dumps(cfg), **inputs)
    print(name, out.shape, float(out.abs().mean()))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "tests/golden")
