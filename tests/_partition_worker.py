"""One process of a multi-process run on partitioned data, for tests/test_partition.py.

Run as ``python tests/_partition_worker.py --process_id=i --num_processes=N --port=P
--devices=D --data=PARTS --out=DIR [--model_shards=M]``: joins the run through 127.0.0.1:P, opens only its
part of ``PARTS`` (``jax_vaecf.data.open_part``), trains a small Mult-VAE for
:data:`EPOCHS` epochs in ``mode='sharded'`` on the part's block batches with the loop's
own ``train_epoch``, evaluates its validation users with ``loop.evaluate``, and writes
``DIR/process_<i>.npz``: the final parameters, the losses, the validation metrics and
the part's training nnz.
"""

import os
import sys

import _distributed_worker

BATCH, EVAL_BATCH, SEED, EPOCHS = 8, 8, 3, 2


def train(batcher, validation, n_items, model_shards=1):
  """Trains on ``batcher`` and evaluates ``validation`` on all devices of the run
  (``model_shards > 1``: a (data, model) mesh with the items split over ``model``).

  Returns host ``(params, per-step losses, validation metrics)``.
  """
  import jax
  import numpy as np
  from jax_vaecf.training import engine as loop
  from jax_vaecf import model as model_lib
  from jax_vaecf.training import parallel
  from jax_vaecf.core import schedules
  from jax_vaecf.training import steps as train_lib

  m = model_lib.build_model("multvae", n_items, hidden_dims=(16,), latent_dim=8)
  options = train_lib.StepOptions(beta_schedule=schedules.linear_schedule(0.2, 10))
  state = train_lib.create_train_state(m, train_lib.make_optimizer(1e-2),
                                       jax.random.PRNGKey(7), options)
  ps = parallel.make_parallel_steps(m, options, mode="sharded",
                                    devices=parallel.resolve_devices(0), ks=(10,),
                                    model_shards=model_shards)
  st = ps.init_state(state)
  losses = []
  for epoch in range(EPOCHS):
    st, metrics, _ = loop.train_epoch(ps, st, batcher, epoch, prefetch=1)
    losses += [m["loss"] for m in metrics]
  result = loop.evaluate(ps, st, validation, EVAL_BATCH)
  return ps.to_host(st.params), np.asarray(losses), result


def main():
  p = _distributed_worker.worker_parser()
  p.add_argument("--data", required=True)
  a = p.parse_args()
  info = _distributed_worker.join(a)
  import numpy as np
  from jax_vaecf import data
  from jax_vaecf.core import distributed

  part = data.open_part(a.data, info.process_index, info.process_count)
  assert isinstance(part.train.indices, np.memmap), type(part.train.indices)
  batcher = part.train_batcher(BATCH, SEED,
                               num_shards=info.device_count // a.model_shards)
  params, losses, result = train(batcher, part.validation, part.n_items, a.model_shards)
  np.savez(os.path.join(a.out, f"process_{a.process_id}.npz"), losses=losses,
           train_nnz=part.train.nnz, train_users=part.train.shape[0],
           **{"metric:" + k: v for k, v in result.items()},
           **{"param:" + k: v for k, v in _distributed_worker.flat(params).items()})
  distributed.shutdown()
  print(f"process {a.process_id}: done", file=sys.stderr)


if __name__ == "__main__":
  main()
