# jax_vaecf on NVIDIA GPUs: JAX's CUDA 12 wheels on a CUDA base image.
#   docker build -t jax_vaecf .
#   docker run --gpus all jax_vaecf
# The default command trains the shipped demo (MovieLens latest-small, inside the package):
# no network, no data volume. The paper's ML-20M preset, downloading MovieLens-20M into
# /data on first use and resuming from /runs/ml20m when rerun:
#   docker run --gpus all -v $PWD/data:/data -v $PWD/runs:/runs jax_vaecf \
#       python -m experiments.train --config=ml20m --data_dir=/data/ml-20m \
#       --cache_dir=/data/cache --download --workdir=/runs/ml20m --number_of_devices=0
# Serving an exported artefact over HTTP from the same image:
#   docker run --gpus all -p 8000:8000 -v $PWD/runs:/runs jax_vaecf \
#       python -m experiments.serve --artifact /runs/artefact --host 0.0.0.0
FROM nvidia/cuda:12.8.1-base-ubuntu24.04

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
 && useradd --create-home --uid 1000 vaecf \
 && mkdir -p /data /runs \
 && chown vaecf:vaecf /data /runs
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.9

WORKDIR /opt/jax_vaecf
# Dependencies first, from the project's metadata alone: a change to the source does not
# reinstall them.
COPY pyproject.toml setup.cfg README.md ./
RUN mkdir -p jax_vaecf experiments \
 && touch jax_vaecf/__init__.py experiments/__init__.py \
 && pip install --no-cache-dir ".[gpu,plot,export,tune,serve]" \
 && pip uninstall -y jax_vaecf
COPY jax_vaecf ./jax_vaecf
COPY experiments ./experiments
RUN pip install --no-cache-dir --no-deps .

USER vaecf
VOLUME ["/data", "/runs"]
EXPOSE 8000
CMD ["python", "-m", "experiments.train", "--config=demo", "--workdir=/tmp/demo"]
