"""The CPU demo: the synthetic shapes task, its drawings and the tiny random-weight base models.

`synthetic.generate_synthetic` writes a prepared data folder (images, train/eval JSONL) plus tiny
base models (`tiny_models`) that load through the same code path as a user's checkpoints;
`matrix` reruns the README quick start over seeds and thread counts against the demo's goals. It
depends on `data/` (conversation records) and transformers; nothing outside the demo, the CLI's
`prepare-data synthetic`, the tests and the benchmarks depends on it.
"""
