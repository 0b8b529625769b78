"""Trains the built-in demo model (svdq_jax/demo) and writes its weights and loss log.

The committed weights came from (on the H100 device machine, see docs/demo/training.md):
  python3 scripts/train_demo.py --out svdq_jax/demo/weights/demo_flux.safetensors
"""

import argparse

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
  a = p.parse_args()
  log = train(a.out, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed,
              max_minutes=a.max_minutes, progress=not a.quiet)
  print(f"trained {log['steps_done']} steps in {log['seconds'][-1]} s on {log['device']}: "
        f"final loss {log['loss'][-1]:.4f}; wrote {a.out}")
