"""fixative's benchmarks, run as modules from the repository root: ``python -m bench.run``. See bench/README.md."""
