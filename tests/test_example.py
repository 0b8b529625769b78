"""The built-in example (the README's main job) on a reduced setting."""

import json

from svdq_jax import cli, example


def test_example_table_orders_methods(tmp_path):
  assert cli.main(["example", "--k", "256", "--n", "256", "--calib-tokens", "512",
                   "--eval-tokens", "256", "--max-samples", "256", "--quiet",
                   "--out", str(tmp_path)]) == 0
  md = (tmp_path / "layer_error.md").read_text()
  assert "SVDQuant W4A4 INT4 r32" in md and "SmoothQuant W4A4 (INT4)" in md
  rows = {r["name"]: r for r in json.loads((tmp_path / "layer_error.json").read_text())["rows"]}
  assert set(rows) == {"BF16 (reference)"} | set(example.default_methods())
  svd = rows["SVDQuant W4A4 INT4 r32"]["sqnr_db"]
  assert svd > rows["SmoothQuant W4A4 (INT4)"]["sqnr_db"] + 6.0
  assert rows["SmoothQuant W4A4 (INT4)"]["sqnr_db"] > rows["RTN W4A4 (INT4)"]["sqnr_db"]
  for fmt in ("INT4", "NVFP4"):  # a larger rank never hurts on this layer
    s = [rows[f"SVDQuant W4A4 {fmt} r{r}"]["sqnr_db"] for r in (16, 32, 64)]
    assert s[0] < s[1] < s[2]
  # 4-bit weights: about a quarter of bf16 plus scales and the low-rank branch
  assert rows["RTN W4A4 (INT4)"]["weight_bytes"] < 0.3 * rows["BF16 (reference)"]["weight_bytes"]


def test_example_bad_shape_is_a_clean_error(tmp_path, capsys):
  """A layer width off the formats' 64-groups: the command's error, no traceback, no files."""
  assert cli.main(["example", "--k", "100", "--n", "64", "--calib-tokens", "64",
                   "--eval-tokens", "64", "--max-samples", "64", "--quiet",
                   "--out", str(tmp_path / "out")]) == 2
  assert "svdq-jax example: error: layer proj: K=100 is not a multiple" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
  assert cli.main(["example", "--k", "128", "--n", "128", "--eval-tokens", "0", "--quiet",
                   "--out", str(tmp_path / "out")]) == 2
  assert "svdq-jax example: error: eval_tokens must be >= 1, got 0" in capsys.readouterr().err


def test_cli_keeps_compiled_programs_on_disk(tmp_path):
  """--compile-cache DIR turns on jax's persistent cache there, 'off' leaves it off, and a
  directory already chosen (JAX_COMPILATION_CACHE_DIR) is kept."""
  import jax

  missing = str(tmp_path / "missing")
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    assert cli.main(["--compile-cache", "off", "sample", missing, missing]) == 2
    assert jax.config.jax_compilation_cache_dir is None
    assert cli.main(["--compile-cache", str(tmp_path / "a"), "sample", missing, missing]) == 2
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "a")
    # jax's default (1 s) would keep none of the CPU's programs
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.1
    assert cli.main(["--compile-cache", str(tmp_path / "b"), "sample", missing, missing]) == 2
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "a")
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
