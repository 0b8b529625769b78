"""Conversion and loading with bounded host memory, crash safety, direct safetensors loading
(issue 16). Conversions run in subprocesses where a kill or the peak RSS is the point."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from svdq_jax.convert import convert, load_flux
from svdq_jax.convert.checkpoint import atomic_directory
from svdq_jax.convert.synthetic import flux_shapes, write_checkpoint

from flux_helpers import GOLDEN

DEV = GOLDEN / "flux_dev_tiny.safetensors"
AXES = (8, 12, 12)
HIDDEN = 512  # blocks of 19 MB (double) and 8 MB (single) in bf16


def _synthetic(path, double, single, shards=1):
  return write_checkpoint(path, flux_shapes(double, single, hidden=HIDDEN, context=512,
                                            vec=128), shards=shards)


# VmHWM, not getrusage: ru_maxrss survives execve, so it would include this test process's RSS
CONVERT = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when started
from svdq_jax.convert import convert                      # from a job that ignores SIGINT
convert(sys.argv[1], sys.argv[2], progress=False)
print(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024)
"""


def _start(src, dst):
  return subprocess.Popen([sys.executable, "-c", CONVERT, str(src), str(dst)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _temps(dst: pathlib.Path):
  return sorted(dst.parent.glob(f".{dst.name}.tmp-*"))


def _wait_for_groups(dst: pathlib.Path, proc, groups: int, timeout=120.0):
  """Waits until the running conversion has written ``groups`` block checkpoints."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    for tmp in _temps(dst):
      params = tmp / "params"
      if params.exists() and len([p for p in params.iterdir() if p.is_dir()]) >= groups:
        return
    if proc.poll() is not None:
      pytest.fail(f"conversion ended before it could be interrupted: {proc.stderr.read()}")
    time.sleep(0.05)
  pytest.fail("conversion wrote no block in time")


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
  path = tmp_path_factory.mktemp("src") / "flux.safetensors"
  _synthetic(path, 12, 24)
  return path


def test_killed_conversion_leaves_no_destination_and_next_run_cleans_up(tmp_path, big_source):
  dst = tmp_path / "out"
  proc = _start(big_source, dst)
  _wait_for_groups(dst, proc, 3)
  proc.kill()  # SIGKILL: no cleanup can run, as with the OOM killer
  proc.wait()
  assert not dst.exists()
  assert len(_temps(dst)) == 1  # what the kill left
  convert(big_source, dst, progress=False)
  assert _temps(dst) == [] and (dst / "config.json").exists()


def test_ctrl_c_cleans_up_at_once(tmp_path, big_source):
  dst = tmp_path / "out"
  proc = _start(big_source, dst)
  _wait_for_groups(dst, proc, 3)
  proc.send_signal(signal.SIGINT)
  proc.wait(timeout=60)
  assert proc.returncode != 0, proc.stderr.read()[-2000:]
  assert not dst.exists() and _temps(dst) == []


def test_ctrl_c_inside_a_save_cancels_it_at_the_next_boundary(tmp_path):
  """The flaky case of the test above made certain: Ctrl-C lands where a library would
  swallow the KeyboardInterrupt (here a bare ``except``). It is deferred, and raised when the
  block ends: no destination. A second Ctrl-C raises at once."""
  dst = tmp_path / "out"
  # Python's own handler, as in a terminal (a background job may have started us ignoring it)
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _deferred_then_cancelled(dst)
  finally:
    signal.signal(signal.SIGINT, previous)


def _deferred_then_cancelled(dst):
  with pytest.raises(KeyboardInterrupt):
    with atomic_directory(dst) as tmp:
      tmp.mkdir()
      try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
      except KeyboardInterrupt:
        pass   # swallowed, had it been raised here
      (tmp / "more").write_text("the block ran on to its end")
  assert not dst.exists() and _temps(dst) == []
  with pytest.raises(KeyboardInterrupt):
    with atomic_directory(dst) as tmp:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.5)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5.0)   # the second one interrupts this
      pytest.fail("a second Ctrl-C must raise at once")
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_running_conversions_temporary_folder_is_left_alone(tmp_path):
  dst = tmp_path / "out"
  live = tmp_path / f".out.tmp-{os.getpid()}-abcdef12"   # this process is alive
  dead = tmp_path / ".out.tmp-99999999-abcdef12"         # no such process id
  live.mkdir(), dead.mkdir()
  convert(DEV, dst, axes_dim=AXES, progress=False)
  assert live.exists() and not dead.exists()


def test_peak_memory_does_not_grow_with_the_model(tmp_path):
  """Peak RSS of a conversion, 2+2 blocks vs 14+28 (8x the bytes): the growth is a small
  fraction of the extra bytes (converting the whole tree before saving it grows by all of
  them)."""
  peaks, sizes = [], []
  for double, single in ((2, 2), (14, 28)):
    src = tmp_path / f"src{double}.safetensors"
    sizes.append(_synthetic(src, double, single))
    proc = _start(src, tmp_path / f"out{double}")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    peaks.append(int(out.split()[-1]))
  extra = sizes[1] - sizes[0]
  assert peaks[1] - peaks[0] < 0.25 * extra, (peaks, sizes)


def test_load_flux_from_safetensors_equals_convert_then_load(tmp_path):
  convert(DEV, tmp_path / "ckpt", axes_dim=AXES, progress=False)
  via_orbax = nnx.to_pure_dict(nnx.state(load_flux(tmp_path / "ckpt")))
  pipe = tmp_path / "pipe" / "transformer"  # a diffusers pipeline folder
  pipe.mkdir(parents=True)
  (pipe / "diffusion_pytorch_model.safetensors").write_bytes(DEV.read_bytes())
  for src in (DEV, tmp_path / "pipe"):
    direct = nnx.to_pure_dict(nnx.state(load_flux(src, axes_dim=AXES)))
    assert jax.tree_util.tree_structure(direct) == jax.tree_util.tree_structure(via_orbax)
    for a, b in zip(jax.tree_util.tree_leaves(direct), jax.tree_util.tree_leaves(via_orbax)):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_sharded_synthetic_checkpoint_loads_directly(tmp_path):
  total = _synthetic(tmp_path / "src", 1, 1, shards=3)
  index = json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) == 3
  model = load_flux(tmp_path / "src")
  state = nnx.to_pure_dict(nnx.state(model))
  assert sum(x.nbytes for x in jax.tree_util.tree_leaves(state)) == total


def test_restore_names_missing_blocks(tmp_path):
  convert(DEV, tmp_path / "ckpt", axes_dim=AXES, progress=False)
  import shutil
  shutil.rmtree(tmp_path / "ckpt" / "params" / "single_blocks.1")
  groups = json.loads((tmp_path / "ckpt" / "params" / "groups.json").read_text())
  (tmp_path / "ckpt" / "params" / "groups.json").write_text(
      json.dumps([g for g in groups if g != "single_blocks/1"]))
  with pytest.raises(ValueError, match=r"has no \['single_blocks/1'\]"):
    load_flux(tmp_path / "ckpt")


def test_single_item_checkpoints_of_earlier_versions_still_restore(tmp_path):
  import orbax.checkpoint as ocp
  from svdq_jax.convert import restore_tree
  tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)},
          "blocks": {0: {"b": np.ones(4, np.float32)}}}
  with ocp.StandardCheckpointer() as ckpt:  # the 2026-11-22 layout: params/ is one item
    ckpt.save(tmp_path / "old" / "params", tree)
  back = restore_tree(tmp_path / "old", like=tree)
  with pytest.raises(ValueError, match="holds no structure.json .*give restore_tree a like="):
    restore_tree(tmp_path / "old")   # no structure beside it: like= is needed
  np.testing.assert_array_equal(np.asarray(back["a"]["kernel"]), tree["a"]["kernel"])
  np.testing.assert_array_equal(np.asarray(back["blocks"][0]["b"]), tree["blocks"][0]["b"])
