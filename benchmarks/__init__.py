"""asv benchmarks of precision: runtime (``time_``) and drift (``track_``) per commit. See docs/tracking.md."""
