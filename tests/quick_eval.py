"""Spec overrides for sweep tests that check orchestration (faults, resume, placement, tracking),
not what the scores say: each evaluation samples 3 images instead of the demo suite's 44, and the
toy world's held-out oracle (88 more images per evaluation) is off. About 1 s per evaluation on
these 2 cores instead of about 10 s."""

QUICK_SUITE = ("{name: quick, seeds: [0], natural: ['a {trigger} circle'], no_concept: ['a red circle'],"
               " trigger_test: ['a {trigger} circle']}")
QUICK_EVAL = ["eval.oracle=null", f"eval.suite={QUICK_SUITE}"]
