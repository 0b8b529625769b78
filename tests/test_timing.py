"""The profile timeline's arithmetic (``timing.launch_gaps``, ``timing.busy_span``); the
trace itself needs a GPU."""

from svdq_jax import timing


def test_launch_gaps_count_short_gaps_only():
  """Kernels given out of order: gaps up to LAUNCH_GAP_NS count, a longer one (the host's
  time between calls) and an overlap do not."""
  spans = [(12_000, 15_000), (0, 10_000), (1_020_000, 1_030_000), (1_025_000, 1_040_000),
           (17_000, 1_005_000)]
  n, idle = timing.launch_gaps(spans)
  assert n == 5
  # sorted: (0,10k) (12k,15k) (17k,1005k) (1020k,1030k) (1025k,1040k): gaps 2k, 2k, 15k, -5k
  assert idle == 2_000 + 2_000 + 15_000
  assert timing.launch_gaps([(0, 1), (timing.LAUNCH_GAP_NS + 2, timing.LAUNCH_GAP_NS + 3)]) \
      == (2, 0)
  assert timing.launch_gaps([]) == (0, 0)


def test_busy_span_unions_streams():
  """Two streams overlapping, one kernel inside another, a gap: busy is the union's length."""
  spans = [(50, 60), (0, 10), (5, 20), (30, 40), (32, 35)]
  assert timing.busy_span(spans) == (20 + 10 + 10, 60)
  assert timing.busy_span([(0, 10), (10, 20)]) == (20, 20)
  assert timing.busy_span([]) == (0, 0)
