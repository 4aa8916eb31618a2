"""RecVAE: loss and gradients against float64 numpy, both input paths, devices, phases,
precision, a stopped run's resume, serving and export."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_vaecf.training import engine as loop
from jax_vaecf import model as model_lib
from jax_vaecf.training import parallel
from jax_vaecf.models import recvae
from jax_vaecf.core import sparse as sparse_lib
from jax_vaecf.training import steps as train_lib

import _runs

N_ITEMS = 12


def _tiny(dropout_rate=0.0, **kw):
  return model_lib.build_model("recvae", N_ITEMS, hidden_dims=(6,) * 5, latent_dim=3,
                               dropout_rate=dropout_rate, **kw)


def _batch(seed=0, n_users=5, padding_rows=1):
  """Binary rows of various lengths as a SparseBatch; the last rows are padding."""
  rng = np.random.default_rng(seed)
  dense = (rng.random((n_users, N_ITEMS)) < rng.uniform(0.15, 0.7, (n_users, 1)))
  dense[:, 0] = True  # no empty user
  dense = dense.astype(np.float32)
  rows, cols = np.nonzero(dense)
  b = n_users + padding_rows
  mask = np.r_[np.ones(n_users), np.zeros(padding_rows)].astype(np.float32)
  pad = n_users * N_ITEMS + 4 - len(rows)  # one nnz for every batch: one compilation
  return sparse_lib.SparseBatch(
      np.r_[rows, np.zeros(pad)].astype(np.int32), np.r_[cols, np.zeros(pad)].astype(np.int32),
      np.r_[np.ones(len(rows)), np.zeros(pad)].astype(np.float32), mask), dense, b


# ------------------------------------------------------------- float64 numpy reference


def _np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _ln(y, p):
  mean = y.mean(-1, keepdims=True)
  var = ((y - mean) ** 2).mean(-1, keepdims=True)
  return (y - mean) / np.sqrt(var + 0.1) * p["scale"] + p["bias"]


def _swish(y):
  return y / (1.0 + np.exp(-y))


def _encoder(p, x):
  x = x / np.sqrt(np.maximum((x * x).sum(-1, keepdims=True), 1e-12))
  h = _ln(_swish(x @ p["input"]["kernel"] + p["input"]["bias"]), p["norms_0"])
  previous = [h]
  k = 1
  while f"hidden_{k - 1}" in p:
    layer = p[f"hidden_{k - 1}"]
    h = _ln(_swish(h @ layer["kernel"] + layer["bias"] + sum(previous)), p[f"norms_{k}"])
    previous.append(h)
    k += 1
  return h @ p["mu"]["kernel"] + p["mu"]["bias"], h @ p["logvar"]["kernel"] + p["logvar"]["bias"]


def _log_normal(x, mu, logvar):
  return -0.5 * (logvar + np.log(2 * np.pi) + (x - mu) ** 2 / np.exp(logvar))


def _reference_loss(params, prior, x, eps, mask, gamma, beta):
  """The objective of the paper and the authors' code, written out in float64."""
  mu, logvar = _encoder(params["encoder"], x)
  z = mu + eps * np.exp(0.5 * logvar)
  logits = z @ params["decoder"]["kernel"] + params["decoder"]["bias"]
  top = logits.max(-1, keepdims=True)
  log_softmax = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll = -(log_softmax * x).sum(-1)
  pmu, plogvar = _encoder(prior, x)
  comps = np.stack([_log_normal(z, 0.0, 0.0) + np.log(3 / 20),
                    _log_normal(z, pmu, plogvar) + np.log(3 / 4),
                    _log_normal(z, 0.0, 10.0) + np.log(1 / 10)], -1)
  cmax = comps.max(-1, keepdims=True)
  log_p = (cmax + np.log(np.exp(comps - cmax).sum(-1, keepdims=True)))[..., 0]
  kl = (_log_normal(z, mu, logvar) - log_p).sum(-1)
  weight = gamma * x.sum(-1) if gamma > 0 else beta
  return ((nll + weight * kl) * mask).sum() / mask.sum()


def _fd_grad(f, tree, h=1e-6):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  grads = []
  for i, leaf in enumerate(leaves):
    g = np.zeros_like(leaf)
    for idx in np.ndindex(leaf.shape):
      for sign in (1, -1):
        moved = [l.copy() for l in leaves]
        moved[i][idx] += sign * h
        g[idx] += sign * f(jax.tree_util.tree_unflatten(treedef, moved)) / (2 * h)
    grads.append(g)
  return jax.tree_util.tree_unflatten(treedef, grads)


def _eps_of_step(model, state, batch, phase):
  """The posterior noise the step draws (same key derivation as train.make_train_step)."""
  key = jax.random.fold_in(state.key, state.step)
  dropout_key, noise_key = jax.random.split(key)
  out = model.apply({"params": state.params}, batch, train=True, method="features",
                    rngs={"dropout": dropout_key, "noise": noise_key},
                    dropout=model.phases[phase].dropout, frozen=state.frozen, kl=False)
  return (np.asarray(out.logits, np.float64) - np.asarray(out.mu, np.float64)) / np.exp(
      0.5 * np.asarray(out.logvar, np.float64))


@pytest.mark.parametrize("gamma", [0.2, 0.0])
def test_step_gradients_match_a_float64_numpy_computation(gamma):
  model = _tiny()
  batch, dense, _ = _batch()
  # SGD with rate 1: the update is minus the gradient the step computed.
  options = train_lib.StepOptions(beta_schedule=lambda s: jnp.float32(0.3), kl_gamma=gamma)
  state = train_lib.create_train_state(model, optax.sgd(1.0), jax.random.PRNGKey(0), options)
  x = np.zeros((batch.row_mask.shape[0], N_ITEMS))
  x[: dense.shape[0]] = dense
  mask = np.asarray(batch.row_mask, np.float64)
  params, prior = _np(state.params), _np(state.frozen["prior"])
  for phase, group in ((0, "encoder"), (1, "decoder")):
    eps = _eps_of_step(model, state, batch, phase)
    new, metrics = jax.jit(train_lib.make_train_step(model, options, phase=phase))(state, batch)
    got = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b),
                                 state.params[group], new.params[group])

    def loss_of(part):
      full = {**params, group: part}
      return _reference_loss(full, prior, x, eps, mask, gamma, 0.3)

    want = _fd_grad(loss_of, params[group])
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                            jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-5, err_msg=f"{group} {path}")
    other = "decoder" if group == "encoder" else "encoder"
    jax.tree_util.tree_map(np.testing.assert_array_equal, new.params[other],
                           state.params[other])
    if phase == 0:
      np.testing.assert_allclose(float(metrics["loss"]), loss_of(params[group]), rtol=1e-5)


def test_composite_kl_is_the_written_out_estimate():
  rng = np.random.default_rng(1)
  z, mu, lv, pmu, plv = (rng.normal(size=(4, 3)) for _ in range(5))
  got = recvae.composite_kl(*(jnp.asarray(a, jnp.float32) for a in (z, mu, lv, pmu, plv)))
  comps = np.stack([_log_normal(z, 0, 0) + np.log(0.15), _log_normal(z, pmu, plv) +
                    np.log(0.75), _log_normal(z, 0, 10) + np.log(0.1)], -1)
  want = (_log_normal(z, mu, lv) - np.log(np.exp(comps).sum(-1))).sum(-1)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


# ------------------------------------------------------------------- the step's contract


def _run_round(model, options, batches, steps_of_phase, refresh):
  state = train_lib.create_train_state(model, train_lib.make_optimizer(5e-3),
                                       jax.random.PRNGKey(2), options)
  for i, phase in enumerate(model.phases):
    if phase.refresh_frozen:
      state = refresh(state)
    for b in batches:
      state, _ = steps_of_phase[i](state, b)
  return state


def _close(a, b, **kw):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), **kw), a, b)


def test_sparse_and_dense_paths_train_alike():
  model = _tiny(dropout_rate=0.5)
  batches = [_batch(seed)[0] for seed in range(3)]
  got = {}
  for fmt in ("sparse", "dense"):
    options = train_lib.StepOptions(kl_gamma=0.01, input_format=fmt, output_chunk_size=4)
    steps = [jax.jit(train_lib.make_train_step(model, options, phase=i)) for i in (0, 1)]
    got[fmt] = _run_round(model, options, batches, steps,
                          jax.jit(lambda s: train_lib.refresh_frozen(model, s)))
  _close(got["sparse"].params, got["dense"].params, rtol=2e-4, atol=2e-6)
  _close(got["sparse"].frozen, got["dense"].frozen, rtol=2e-4, atol=2e-6)


def test_phases_update_only_their_groups_and_the_prior_follows_the_encoder():
  model = _tiny(dropout_rate=0.5)
  options = train_lib.StepOptions(kl_gamma=0.01)
  state = train_lib.create_train_state(model, train_lib.make_optimizer(), jax.random.PRNGKey(0),
                                       options)
  assert [p.name for p in model.phases] == ["encoder", "decoder"]
  assert len(state.opt_state) == 2
  # The first round's prior is an encoder initialised on its own (the authors' code).
  assert not np.allclose(state.frozen["prior"]["input"]["kernel"],
                         state.params["encoder"]["input"]["kernel"])
  batch = _batch()[0]
  enc = jax.jit(train_lib.make_train_step(model, options, phase=0))
  after, _ = enc(state, batch)
  _close(after.params["decoder"], state.params["decoder"], rtol=0, atol=0)
  _close(after.opt_state[1], state.opt_state[1], rtol=0, atol=0)
  assert not np.allclose(after.params["encoder"]["input"]["kernel"],
                         state.params["encoder"]["input"]["kernel"])
  refreshed = train_lib.refresh_frozen(model, after)
  _close(refreshed.frozen["prior"], after.params["encoder"], rtol=0, atol=0)


# Two trainings each (four devices and one; sparse and dense input); the float64
# gradient checks keep RecVAE in the fast tier.
SLOW_TESTS = ["test_four_devices_give_the_one_device_round",
              "test_sparse_and_dense_paths_train_alike"]


@pytest.mark.parametrize("mode", ["sharded", "pmap"])
def test_four_devices_give_the_one_device_round(mode):
  model = _tiny(dropout_rate=0.5)
  options = train_lib.StepOptions(kl_gamma=0.01, ema_decay=0.9)
  batches = [_batch(seed, n_users=7)[0] for seed in range(2)]
  one = parallel.make_parallel_steps(model, options, devices=jax.devices()[:1], ks=(5,))
  four = parallel.make_parallel_steps(model, options, mode=mode, devices=jax.devices()[:4],
                                      ks=(5,))
  results = []
  for ps in (one, four):
    put = lambda b, ps=ps: ps.put_batch(parallel.pad_and_shard(b, ps.num_shards))
    state = ps.init_state(train_lib.create_train_state(
        model, train_lib.make_optimizer(5e-3), jax.random.PRNGKey(2), options))
    for i, phase in enumerate(model.phases):
      if phase.refresh_frozen:
        state = ps.refresh_frozen(state)
      for b in batches:
        state, _ = ps.train_steps[i](state, put(b))
    results.append(ps.to_host(state))
  _close(results[0].params, results[1].params, rtol=1e-4, atol=1e-6)
  _close(results[0].ema_params, results[1].ema_params, rtol=1e-4, atol=1e-6)
  _close(results[0].frozen, results[1].frozen, rtol=1e-4, atol=1e-6)


def test_settings_recvae_does_not_take_are_refused():
  with pytest.raises(ValueError, match="one width"):
    model_lib.build_model("recvae", 10, hidden_dims=(8, 6))
  with pytest.raises(ValueError, match="has no setting encoder_epochs"):
    model_lib.build_model("multvae", 10, encoder_epochs=2)
  from jax_vaecf.training import configs
  cfg = configs.get_config("ml20m_recvae")
  configs.validate(cfg)
  with pytest.raises(ValueError, match="bad setting: RecVAE.*one width"):
    configs.validate(cfg.replace(hidden_dims=(600, 300)))
  with pytest.raises(ValueError, match="encoder_epochs is a setting of --model=recvae"):
    configs.validate(cfg.replace(model="multvae", hidden_dims=(), encoder_epochs=2))
  model = _tiny()
  with pytest.raises(ValueError, match="prior encoder"):
    model.apply({"params": train_lib.init_params(model, jax.random.PRNGKey(0))},
                jnp.ones((2, N_ITEMS)), train=True, rngs={"noise": jax.random.PRNGKey(1)})


# ------------------------------------------------------------------------ whole runs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return _runs.movielens_dir(tmp_path_factory, "recvae")


def _cfg(data_dir, tmp_path, **kw):
  return _runs.small_config(data_dir, **{
      "cache_dir": str(tmp_path / "cache"), "model": "recvae", "hidden_dims": (16,) * 3,
      "latent_dim": 8, "kl_gamma": 0.005, "lr": 5e-3, "encoder_epochs": 2, **kw})


def test_bf16_run_ranks_within_0_005_ndcg_of_fp32(data_dir, tmp_path):
  cfg = _cfg(data_dir, tmp_path, number_of_epochs=5)
  fp32 = loop.run(cfg, str(tmp_path / "fp32"))
  with pytest.warns(Warning, match="bf16"):
    bf16 = loop.run(cfg.replace(precision="bf16"), str(tmp_path / "bf16"))
  assert fp32["test"]["ndcg@100"] > 0.3  # it learned something to compare
  assert abs(bf16["test"]["ndcg@100"] - fp32["test"]["ndcg@100"]) <= 0.005
  log = _runs.records(str(tmp_path / "fp32"))
  train = [r for r in log if r["split"] == "train"]
  assert {"encoder_loss", "decoder_loss"} <= set(train[0])


def test_a_run_stopped_inside_a_phase_resumes_to_the_uninterrupted_result(
    data_dir, tmp_path, monkeypatch):
  # As a SIGKILL would, the run stops at an arbitrary point inside a phase; what it
  # left on disk is all a restart sees (tests/test_experiments.py kills a real process).
  cfg = _cfg(data_dir, tmp_path, number_of_epochs=3)
  full = loop.run(cfg, str(tmp_path / "full"))
  build, calls = loop.build, []

  def build_dying(cfg, n_items, n_train_users=None):
    # The decoder phase's step raises on its 2nd call of epoch 2 (4 steps a pass): the
    # run stops with the encoder phase of that round done and the prior refreshed.
    built = build(cfg, n_items, n_train_users)
    decoder_step = built.steps.train_steps[1]

    def step(state, batch):
      calls.append(1)
      if len(calls) == 4 + 2:
        raise KeyboardInterrupt
      return decoder_step(state, batch)

    steps = dataclasses.replace(built.steps,
                                train_steps=(built.steps.train_steps[0], step))
    return dataclasses.replace(built, steps=steps)

  monkeypatch.setattr(loop, "build", build_dying)
  with pytest.raises(KeyboardInterrupt):
    loop.run(cfg, str(tmp_path / "stopped"))
  monkeypatch.undo()
  assert [r["epoch"] for r in _runs.records(str(tmp_path / "stopped"))
          if r["split"] == "train"] == [1]
  again = loop.run(cfg, str(tmp_path / "stopped"))
  assert again["test"] == full["test"]


def test_a_recvae_run_is_served_and_exported_like_any_model(tmp_path_factory, tmp_path):
  from jax_vaecf.serving import recommender as recommend
  from jax_vaecf.serving import artefact as serve
  from jax_vaecf.serving import export as export_lib
  workdir = _runs.trained_workdir(tmp_path_factory, "recvae_serve", model="recvae",
                                  hidden_dims=(16,) * 3, latent_dim=8, kl_gamma=0.005,
                                  lr=5e-3, encoder_epochs=2)
  rec = recommend.Recommender.from_workdir(workdir)
  assert isinstance(rec.model, recvae.RecVAE)
  out = str(tmp_path / "artefact")
  export_lib.write_artifact(out, rec.model, rec.params, rec.item_ids, 10,
                            model_info={"model": "recvae"})
  ids = [str(i) for i in rec.item_ids.tolist()]
  rng = np.random.default_rng(0)
  histories = [[ids[j] for j in rng.choice(len(ids), rng.integers(0, 30), replace=False)]
               for _ in range(50)]
  want = rec.recommend(histories, k=10)
  got = serve.load(out).recommend(histories, k=10)
  for g, items, history in zip(got, want.items, histories):
    assert [str(i) for i in g["items"].tolist()] == [str(i) for i in items.tolist()]
    assert not set(str(i) for i in items.tolist()) & set(history)
  # Weights only: no optimiser state and no prior encoder travel with the artefact.
  weights = np.load(os.path.join(out, "params.npz"))
  assert any(k.startswith("encoder/") for k in weights.files)
  assert not [k for k in weights.files if "prior" in k]


# The float64 check with dropout (11 s); the case without dropout stays in the fast tier.
SLOW_TESTS += ['test_step_gradients_match_a_float64_numpy_computation[0.2]']
