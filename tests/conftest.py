import atexit
import os
import shutil
import tempfile

# The Mosaic GPU interpreter runs each warpgroup of a kernel as its own XLA computation on a
# host thread, and their host callbacks block on each other's barriers inside XLA's CPU
# thread pool. A pool smaller than the warpgroups (jax sizes it to the cores: 2 on CI)
# deadlocks, so give it room before jax creates its CPU client. The callbacks also dispatch
# jax ops of their own: eager work dispatched while an interpreted kernel is still in flight
# can take the last threads and deadlock too (seen with 8 threads, 2026-12-03; with 32, the
# whole suite hung at one test in two of three runs, 2026-12-06): the kernels called eagerly
# wait for their outputs (``w4a4_hopper.settles_when_interpreted``), and the tests dispatch
# CPU computations synchronously (below), so a jitted program holding a kernel finishes
# before anything else starts.
os.environ.setdefault("PJRT_NPROC", str(max(32, os.cpu_count() or 1)))
# the CLI keeps compiled programs under $XDG_CACHE_HOME (svdq-jax --compile-cache): not the
# user's cache for test runs
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="svdq_jax_test_cache_")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

import jax

# one computation at a time: nothing else dispatched while an interpreted kernel runs (see
# above), whatever a test does between calls. The suite's time stays within its spread
# (1063 and 1230 s against 1198 and 1198 with async dispatch; 2 cores, 2026-12-06).
jax.config.update("jax_cpu_enable_async_dispatch", False)

# CPU tests compare against float64 references; keep jax's default f32 but make every
# matmul exact f32 (the CPU default already is; this guards against backend changes).
jax.config.update("jax_default_matmul_precision", "highest")


import gc

import pytest
from jax._src import compilation_cache


@pytest.fixture(autouse=True, scope="module")
def _compiled_programs_released_per_module():
  """Every compiled XLA CPU program holds memory mappings of its own, and the interpreted
  kernels compile one per warpgroup thread: one pytest process over the whole suite reached
  Linux's default limit of 65530 mappings (vm.max_map_count) near its end, where a compile's
  mmap failed and XLA segfaulted (2026-12-04: 59019 mappings at ~80% of the suite). Dropping
  jax's caches after each test module releases them."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(autouse=True)
def _persistent_cache_stays_with_its_test():
  """A test that runs the CLI turns jax's persistent compilation cache on for the process
  (``cli._use_compile_cache``); turned off again after it: a cache for the whole run took
  1128 s against 1137 without (2026-12-05, 2 cores; 5-10% off some modules, not the
  suite), not worth every program written to disk."""
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  yield
  if jax.config.jax_compilation_cache_dir != before[0]:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    compilation_cache.reset_cache()
