"""A plain PyTorch Mult-VAE or RecVAE on the benchmark's data, timed beside this library's.

  python -m experiments.torch_baseline --batch_size=500 --steps=40
  python -m experiments.torch_baseline --batch_size=10000 --steps=6 --compare
  python -m experiments.torch_baseline --model=recvae --steps=20 --compare

The baseline every peer implementation resembles: an ``nn.Module`` Mult-VAE
``[n_items, 600, 200]`` (L2-normalised input, dropout 0.5, tanh, the multinomial
likelihood over a dense ``log_softmax``), dense batches made on the host from the same
synthetic CSR as ``experiments.benchmark`` (:mod:`experiments.synthetic`, ML-20M's shape by
default), Adam (lr 1e-3) and the paper's KL anneal. It is timed in float32 and under
``torch.autocast("cpu", torch.bfloat16)``: ``--steps`` steps after 3 warm-up steps,
extrapolated to an epoch. ``--compare`` also runs ``experiments.benchmark`` in both
precisions with the same shape and batch (a subprocess, so both libraries do not share
the process) and prints each epoch as a ratio of the PyTorch one. ``--reuse_host_memory``
(the default; :mod:`jax_vaecf.core.host_memory`) applies to both libraries' processes, so
``--noreuse_host_memory`` times both with glibc's default allocator.

``--model=recvae`` times a plain PyTorch RecVAE (Shenbin et al. 2020) with the
``ml20m_recvae`` preset's settings: L2-normalised input, five densely connected layers of
600 with swish and LayerNorm (epsilon 0.1), latent 200, the composite prior against a
frozen copy of the encoder, the KL term weighted by ``0.005 * |x_u|``, Adam (lr 5e-4),
one optimiser per phase. An encoder step (input dropout 0.5; the decoder frozen, so no
gradient is formed for it) and a decoder step (no dropout; the encoder and its prior
run without gradients, and the KL term, which does not depend on the decoder, is left
out) are each timed for ``--steps`` steps after 3 warm-up steps, and a round, 3 encoder
passes and 1 decoder pass, is extrapolated from them. ``--compare`` then runs
``experiments.benchmark --config=ml20m_recvae`` and compares rounds.

PyTorch is needed only to run this script (``pip install torch``); it is no dependency
of the project.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from typing import Sequence

from absl import app
from absl import flags

from experiments import cli
from experiments import synthetic
from jax_vaecf.core import host_memory

_FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags, with the data's shape (:mod:`experiments.synthetic`); defined when
  it runs, not at import (other tools have flags of the same names)."""
  fv = flag_values
  synthetic.define_shape_flags(fv)
  flags.adopt_module_key_flags(synthetic, flag_values=fv)
  flags.DEFINE_integer("batch_size", 500, "Users per step.", flag_values=fv)
  flags.DEFINE_integer("steps", 20, "Timed steps (after 3 warm-up steps), extrapolated.",
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Data and model seed.", flag_values=fv)
  flags.DEFINE_bool("compare", False, "Also time experiments.benchmark (fp32 and bf16) "
                    "with the same shape and batch and print the ratios.", flag_values=fv)
  flags.DEFINE_enum("model", "multvae", ["multvae", "recvae"],
                    "The model to time: Mult-VAE (an epoch) or RecVAE (a round of 3 "
                    "encoder and 1 decoder passes, the ml20m_recvae preset's settings).",
                    flag_values=fv)


# The ml20m_recvae preset's settings, which the PyTorch RecVAE below writes out.
RECVAE_PRESET = "ml20m_recvae"


def torch_epoch(csr, batch_size: int, steps: int, bf16: bool, seed: int) -> dict:
  """Seconds per step and per epoch of the PyTorch Mult-VAE on ``csr``'s rows."""
  import numpy as np
  import torch
  from torch import nn
  import torch.nn.functional as F

  torch.manual_seed(seed)
  torch.set_num_threads(os.cpu_count() or 1)
  n_users, n_items = csr.shape

  class MultVAE(nn.Module):
    def __init__(self):
      super().__init__()
      self.enc1, self.enc2 = nn.Linear(n_items, 600), nn.Linear(600, 400)
      self.dec1, self.dec2 = nn.Linear(200, 600), nn.Linear(600, n_items)
      self.drop = nn.Dropout(0.5)

    def forward(self, x):
      h = self.drop(F.normalize(x, dim=1))
      h = self.enc2(torch.tanh(self.enc1(h)))
      mu, logvar = h[:, :200], h[:, 200:]
      z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
      return self.dec2(torch.tanh(self.dec1(z))), mu, logvar

  model = MultVAE()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  rng = np.random.default_rng(seed)
  order = rng.permutation(n_users)

  def step(i):
    users = order[(i * batch_size) % n_users:][:batch_size]
    x = torch.from_numpy(csr[users].toarray())
    beta = min(0.2, i / 200_000)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      logits, mu, logvar = model(x)
    logits, mu, logvar = logits.float(), mu.float(), logvar.float()
    nll = -(F.log_softmax(logits, dim=1) * x).sum(1).mean()
    kl = (0.5 * (-logvar + logvar.exp() + mu * mu - 1)).sum(1).mean()
    loss = nll + beta * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())

  for i in range(3):
    step(i)
  t0 = time.perf_counter()
  for i in range(3, 3 + steps):
    loss = step(i)
  step_s = (time.perf_counter() - t0) / steps
  per_epoch = -(-n_users // batch_size)
  return {"library": "pytorch", "model": "multvae", "precision": "bf16" if bf16 else "fp32",
          "step_ms": round(step_s * 1e3, 2), "epoch_s": round(step_s * per_epoch, 2),
          "final_loss": loss, "torch": torch.__version__}


def torch_recvae_round(csr, batch_size: int, steps: int, bf16: bool, seed: int) -> dict:
  """Seconds per encoder and decoder step and per round of the PyTorch RecVAE."""
  import numpy as np
  import torch

  from jax_vaecf.training import configs

  cfg = configs.get_config(RECVAE_PRESET)
  # The preset's widths as the library builds them (its default: five layers of 600).
  dims = tuple(cfg.hidden_dims)
  torch.manual_seed(seed)
  torch.set_num_threads(os.cpu_count() or 1)
  n_users, n_items = csr.shape
  net = _TorchRecVAE(cfg, n_items, dims, bf16)
  order = np.random.default_rng(seed).permutation(n_users)

  def batch(i):
    users = order[(i * batch_size) % n_users:][:batch_size]
    return torch.from_numpy(csr[users].toarray())

  enc_s, _ = _time_steps(net.encoder_step, batch, steps, net.decoder)
  net.prior.load_state_dict(net.encoder.state_dict())
  dec_s, loss = _time_steps(net.decoder_step, batch, steps, net.encoder)
  per_pass = -(-n_users // batch_size)
  passes = cfg.encoder_epochs + cfg.decoder_epochs
  round_s = (cfg.encoder_epochs * enc_s + cfg.decoder_epochs * dec_s) * per_pass
  return {"library": "pytorch", "model": "recvae", "precision": "bf16" if bf16 else "fp32",
          "encoder_step_ms": round(enc_s * 1e3, 2), "decoder_step_ms": round(dec_s * 1e3, 2),
          "step_ms": round(round_s / (passes * per_pass) * 1e3, 2),
          "epoch_s": round(round_s, 2), "final_loss": loss, "torch": torch.__version__}


def _time_steps(step, batch, steps: int, grads_off) -> tuple[float, float]:
  """``(seconds per step, last loss)`` of ``step`` on ``batch(i)`` for ``steps`` steps
  after 3 warm-up steps, with ``grads_off`` (the module the step does not train)
  formed without gradients meanwhile."""
  grads_off.requires_grad_(False)
  for i in range(3):
    step(batch(i))
  t0 = time.perf_counter()
  for i in range(3, 3 + steps):
    loss = step(batch(i))
  grads_off.requires_grad_(True)
  return (time.perf_counter() - t0) / steps, loss


def _log_normal(x, mu, logvar):
  """The elementwise log density of ``x`` under N(mu, exp(logvar)) (torch tensors)."""
  import torch
  return -0.5 * (logvar + math.log(2 * math.pi) + (x - mu) ** 2 * torch.exp(-logvar))


def _recvae_encoder(n_items: int, dims: Sequence[int], latent: int):
  """The PyTorch RecVAE encoder (an ``nn.Module``): ``len(dims)`` densely connected
  layers of ``dims[0]`` with swish and LayerNorm, then ``(mu, logvar)`` of ``latent``
  each; ``forward(x (B, n_items), dropout)`` L2-normalises and drops out its input."""
  from torch import nn
  import torch.nn.functional as F

  from jax_vaecf.models import recvae

  width = dims[0]

  class Encoder(nn.Module):
    def __init__(self):
      super().__init__()
      self.first = nn.Linear(n_items, width)
      self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in dims[1:])
      self.norms = nn.ModuleList(nn.LayerNorm(width, eps=recvae.LAYER_NORM_EPS)
                                 for _ in dims)
      self.mu, self.logvar = nn.Linear(width, latent), nn.Linear(width, latent)

    def forward(self, x, dropout):
      x = F.dropout(F.normalize(x, dim=1), dropout, training=dropout > 0)
      h = self.norms[0](F.silu(self.first(x)))
      previous = h
      for layer, norm in zip(self.hidden, self.norms[1:]):
        h = norm(F.silu(layer(h) + previous))
        previous = previous + h
      return self.mu(h), self.logvar(h)

  return Encoder()


class _TorchRecVAE:
  """The PyTorch RecVAE being timed: its encoder, decoder (one linear layer), frozen
  prior encoder, one Adam per phase, and its encoder and decoder training steps on a
  dense float32 batch ``x (B, n_items)``, each returning the batch's loss."""

  def __init__(self, cfg, n_items: int, dims: Sequence[int], bf16: bool):
    import copy

    import torch
    from torch import nn

    self.cfg, self.bf16 = cfg, bf16
    # Built in this order from the seeded generator: the encoder, then the decoder.
    self.encoder = _recvae_encoder(n_items, dims, cfg.latent_dim)
    self.decoder = nn.Linear(cfg.latent_dim, n_items)
    self.prior = copy.deepcopy(self.encoder).requires_grad_(False)
    self.enc_opt = torch.optim.Adam(self.encoder.parameters(), lr=cfg.lr)
    self.dec_opt = torch.optim.Adam(self.decoder.parameters(), lr=cfg.lr)

  def nll(self, z, x):
    """The multinomial negative log-likelihood (B,) of ``x`` given latents ``z``."""
    import torch
    import torch.nn.functional as F
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
      logits = self.decoder(z)
    return -(F.log_softmax(logits.float(), dim=1) * x).sum(1)

  def encoder_step(self, x) -> float:
    """One Adam step of the encoder on the NLL plus the composite-prior KL term."""
    import torch
    cfg = self.cfg
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
      mu, logvar = self.encoder(x, cfg.dropout_rate)
      with torch.no_grad():
        prior_mu, prior_logvar = self.prior(x, 0.0)
    mu, logvar = mu.float(), logvar.float()
    prior_mu, prior_logvar = prior_mu.float(), prior_logvar.float()
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    log_p = torch.logsumexp(torch.stack([
        _log_normal(z, 0.0, torch.zeros_like(z)) + math.log(3 / 20),
        _log_normal(z, prior_mu, prior_logvar) + math.log(3 / 4),
        _log_normal(z, 0.0, torch.full_like(z, 10.0)) + math.log(1 / 10)]), dim=0)
    kl = (_log_normal(z, mu, logvar) - log_p).sum(1) * cfg.kl_gamma * x.sum(1)
    loss = (self.nll(z, x) + kl).mean()
    self.enc_opt.zero_grad(set_to_none=True)
    loss.backward()
    self.enc_opt.step()
    return float(loss.detach())

  def decoder_step(self, x) -> float:
    """One Adam step of the decoder on the NLL, the encoder run without gradients."""
    import torch
    with torch.no_grad():
      with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
        mu, logvar = self.encoder(x, 0.0)
      mu, logvar = mu.float(), logvar.float()
      z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    loss = self.nll(z, x).mean()
    self.dec_opt.zero_grad(set_to_none=True)
    loss.backward()
    self.dec_opt.step()
    return float(loss.detach())


def ours(precision: str) -> dict:
  """``experiments.benchmark``'s result for the same shape, batch and steps."""
  f = _FLAGS
  model_flags = ([f"--config={RECVAE_PRESET}", "--compare_multvae=false"]
                 if f.model == "recvae" else [])
  out = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark", *model_flags, f"--n_items={f.n_items}",
       f"--n_users={f.n_users}", f"--mean_per_user={f.mean_per_user}",
       f"--batch_size_train={f.batch_size}", f"--steps={f.steps}", "--eval_users=0",
       f"--precision={precision}", f"--seed={f.seed}",
       f"--reuse_host_memory={f.reuse_host_memory}"],
      capture_output=True, text=True, check=True)
  r = json.loads(out.stdout.strip().splitlines()[-1])["results"][0]
  return {"library": "jax_vaecf", "model": f.model, "precision": precision,
          "step_ms": r["step_ms"],
          "epoch_s": r["epoch_s"], "final_loss": r["final_loss"]}


def main(argv):
  del argv
  if importlib.util.find_spec("torch") is None:
    raise app.UsageError("this script needs PyTorch: pip install torch")
  from jax_vaecf.core.machine import cpu_flags

  f = _FLAGS
  csr, _ = synthetic.make_dataset(n_users=f.n_users, n_items=f.n_items, n_eval_users=1,
                                  mean_per_user=f.mean_per_user, seed=f.seed)
  timer = torch_recvae_round if f.model == "recvae" else torch_epoch
  rows = [timer(csr, f.batch_size, f.steps, bf16, f.seed) for bf16 in (False, True)]
  if f.compare:
    rows += [ours("fp32"), ours("bf16")]
  torch_bf16 = rows[1]["epoch_s"]
  info = cpu_flags()
  print(f"{info['cpu']}, {os.cpu_count()} cores, AVX512-BF16 {info['avx512_bf16']}, "
        f"AMX-BF16 {info['amx_bf16']}; {f.n_users:,} users x {f.n_items:,} items, batch "
        f"{f.batch_size}, {f.steps} steps timed and extrapolated"
        + ("; RecVAE: an epoch is a round of 4 passes" if f.model == "recvae" else ""))
  print("| library | precision | step ms | epoch s | vs PyTorch bf16 |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['library']} | {r['precision']} | {r['step_ms']} | {r['epoch_s']} | "
          f"{torch_bf16 / r['epoch_s']:.2f}x |")
  print(json.dumps({"torch_baseline": rows, **info, "model": f.model,
                    "batch_size": f.batch_size,
                    "reuse_host_memory": host_memory.applied()}))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
