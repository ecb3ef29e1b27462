"""Running train steps of a test run on a chosen mesh: shared by the tests that compare meshes, layers or dtypes."""
import functools

import jax

from semi_jax import input_pipeline, sharding
from semi_jax import program as program_lib
from semi_jax import train_step as steps


def view_batches(trainer, n, config=None):
  """The first `n` global batches of the trainer's stream, one key per view (numpy)."""
  ds = input_pipeline.train_views(trainer.data, config or trainer.config)
  return [b for _, b in zip(range(n), input_pipeline.as_numpy(ds))]


def packed(batch, blocks):
  """A view batch in the train step's layout for `blocks` devices."""
  rest = {k: v for k, v in batch.items() if k not in input_pipeline.VIEWS}
  return {"images": input_pipeline.pack_views([batch[k] for k in input_pipeline.VIEWS], blocks), **rest}


def program(trainer, mesh, config=None, platforms=None):
  """The trainer's run built for `mesh` (and `config`, e.g. another dtype or cpu_fast_paths)."""
  d = trainer.data.dataset
  return program_lib.build_program(config or trainer.config, mesh, num_classes=trainer.num_classes,
                             class_prior=trainer.data.class_prior, mean=d.mean, std=d.std, platforms=platforms)


def run_steps(trainer, mesh, batches, state=None, config=None):
  """`train_step` over the view batches on `mesh` from `state` (default: the trainer's initial state).

  Returns (final state, [per-step metrics]) on the host."""
  prog = program(trainer, mesh, config)
  repl = sharding.replicated(mesh)
  step = jax.jit(functools.partial(steps.train_step, ctx=prog.ctx), out_shardings=(repl, repl),
                 compiler_options=prog.compiler_options or None)
  state = jax.device_put(jax.device_get(trainer.state if state is None else state), repl)
  blocks = prog.ctx.data_blocks
  outs = []
  for b in batches:
    state, out = step(state, sharding.to_global(packed(b, blocks), mesh), trainer.step_rng)
    outs.append(out)
  return jax.device_get(state), jax.device_get(outs)
