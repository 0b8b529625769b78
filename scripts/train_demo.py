"""Trains the built-in demo model (svdq_jax/demo) and writes its weights and loss log.

The committed weights came from this run on an H100 (2026-11-22, 438.5 s, docs/demo/README.md):
  python3 scripts/train_demo.py --out demo_flux.safetensors --steps 60000 --max-minutes 7.3
which stopped at the time limit after 18100 steps; to redo it without the time limit:
  python3 scripts/train_demo.py --out svdq_jax/demo/weights/demo_flux.safetensors --steps 18100
(about 8 minutes on an H100; days on a 2-core CPU).

With --lora, trains the demo's sepia style LoRA on the frozen built-in model instead
(svdq_jax/demo/lora.py); the committed one came from (2-core CPU, 2026-12-01):
  python3 scripts/train_demo.py --lora --out svdq_jax/demo/weights/demo_lora_sepia.safetensors \
      --steps 300 --batch 16 --lr 2e-3
"""

import argparse

from svdq_jax.demo.lora import train_lora
from svdq_jax.demo.train import train

if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", required=True, help="weights file (.safetensors); the loss log goes "
                 "to OUT.json")
  p.add_argument("--steps", type=int, default=20_000)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--lr", type=float, default=3e-4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max-minutes", type=float, default=None,
                 help="stop early after this long (the log records the steps done)")
  p.add_argument("--quiet", action="store_true")
  p.add_argument("--lora", action="store_true", help="train the sepia LoRA (rank --rank)")
  p.add_argument("--rank", type=int, default=8)
  a = p.parse_args()
  if a.lora:
    log = train_lora(a.out, steps=a.steps, rank=a.rank, batch=a.batch, lr=a.lr, seed=a.seed,
                     progress=not a.quiet)
    print(f"trained the LoRA {a.steps} steps in {log['seconds'][-1]} s: loss "
          f"{log['loss'][0]:.4f} -> {log['loss'][-1]:.4f}; wrote {a.out}")
    raise SystemExit(0)
  log = train(a.out, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed,
              max_minutes=a.max_minutes, progress=not a.quiet)
  print(f"trained {log['steps_done']} steps in {log['seconds'][-1]} s on {log['device']}: "
        f"final loss {log['loss'][-1]:.4f}; wrote {a.out}")
