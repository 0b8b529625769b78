"""The ``svdq-jax`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def _example(args) -> int:
  from svdq_jax import example

  rows = example.layer_error_table(args.k, args.n, calib_tokens=args.calib_tokens,
                                   eval_tokens=args.eval_tokens, max_samples=args.max_samples,
                                   seed=args.seed, progress=not args.quiet)
  table = example.format_table(rows)
  print(table)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    setting = (f"K={args.k}, N={args.n}, calibration tokens {args.calib_tokens} (sample "
               f"{args.max_samples}), evaluation tokens {args.eval_tokens}, seed {args.seed}")
    with open(os.path.join(args.out, "layer_error.md"), "w") as f:
      f.write(f"# Output error of one linear layer\n\n{setting}\n\n{table}\n")
    with open(os.path.join(args.out, "layer_error.json"), "w") as f:
      json.dump({"setting": vars(args) | {"func": None},
                 "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1, default=str)
    print(f"wrote {args.out}/layer_error.md and layer_error.json")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="svdq-jax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  ex = sub.add_parser("example", help="quantize the built-in example layer with every method "
                      "and print the output-error table")
  ex.add_argument("--k", type=int, default=3072, help="input features (default 3072)")
  ex.add_argument("--n", type=int, default=3072, help="output features (default 3072)")
  ex.add_argument("--calib-tokens", type=int, default=1024)
  ex.add_argument("--eval-tokens", type=int, default=1024)
  ex.add_argument("--max-samples", type=int, default=512,
                  help="calibration tokens kept for the output-error searches")
  ex.add_argument("--seed", type=int, default=0)
  ex.add_argument("--out", default="out/example", help="folder for the table files ('' for none)")
  ex.add_argument("--quiet", action="store_true", help="no progress bars")
  ex.set_defaults(func=_example)
  args = parser.parse_args(argv)
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
