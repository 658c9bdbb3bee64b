"""absl-flag launchers: train, generate (and later sweep, benchmark)."""
