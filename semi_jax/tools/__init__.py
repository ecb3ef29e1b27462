"""Commands around the training library, not part of it: benchmarks, the comparison with the PyTorch reference
(and its torch-side worker), and the check that a config lowers for TPU and GPU.

  python -m semi_jax.tools.bench              speed of the step, bank, eval step, training loop, input pipeline
  python -m semi_jax.tools.bench_augment      input-pipeline throughput alone
  python -m semi_jax.tools.bench_host_memory  peak host memory of the input pipeline, 1 and 2 processes
  python -m semi_jax.tools.bench_reference    semi_jax's step and the PyTorch reference's, step by step
  python -m semi_jax.tools.export_check       the train and eval steps lowered for TPU and GPU
"""
