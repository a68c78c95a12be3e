"""Benchmarks. They print figures and ratios against limits measured in the same run; they are
never part of the pass/fail test run."""
