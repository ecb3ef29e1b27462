"""Commands around the training library, not part of it: benchmarks, the comparison with the PyTorch reference
(and its torch-side worker), the check that a config lowers for TPU and GPU, and data preparation.

  python -m semi_jax.tools.accelerator_report every figure an accelerator machine is lent for, in one command
  python -m semi_jax.tools.bench              speed of the step, bank, eval step, training loop, input pipeline
  python -m semi_jax.tools.bench_augment      input-pipeline throughput alone
  python -m semi_jax.tools.bench_host_memory  peak host memory of the input pipeline, 1 and 2 processes
  python -m semi_jax.tools.bench_reference    semi_jax's step and the PyTorch reference's, step by step
  python -m semi_jax.tools.bench_together     stacked runs: run-steps/s and memory per run against their number
  python -m semi_jax.tools.prepare_data       prepares a TFDS data set (and checks it) for the configs
  python -m semi_jax.tools.export_check       the train and eval steps lowered for TPU and GPU
"""
