"""Data layer of jax_vaecf: readers, the paper's splits, caching, download, batching.

Typical use::

  split = data.load_split("ml-20m", "/data/ml-20m", cache_dir="/data/cache")
  batcher = data.TrainBatcher(split.train, batch_size=500, seed=0)
  for batch in data.prefetch(batcher.epoch_batches(epoch)):
    ...

Each data set is one entry in :mod:`jax_vaecf.data.registry` (``data.register`` adds
one).
"""

from jax_vaecf.data.batcher import (BlockBatcher, TrainBatcher, block_eval_batches,
                                    bucket_ladder, eval_batches, make_batch, prefetch)
from jax_vaecf.data.cache import cache_key, cached, file_identity
from jax_vaecf.data.download import fetch, fetch_movielens, safe_extract
from jax_vaecf.data.load import DATASETS, load_split, split_function, split_options
from jax_vaecf.data.partition import (PartEvalSplit, PartSplit, open_part,
                                      write_partitions)
from jax_vaecf.data.paper_files import read_vaecf_dir, write_user_lines, write_vaecf_dir
from jax_vaecf.data.preprocess import (PAPER_SEED, binarize, collapse_duplicates,
                                       filter_triplets, split_from_files,
                                       split_heldout_users, split_nvidia_alt,
                                       split_per_user)
from jax_vaecf.data.readers import (Interactions, from_columns, read_delimited, read_lastfm,
                                    read_ml100k,
                                    read_ml1m, read_movielens_csv, read_msd, read_netflix,
                                    read_pinterest, read_user_lines, unify_ids)
from jax_vaecf.data.registry import DataSet, Download, register
from jax_vaecf.data.split import EvalSplit, Split, format_stats, hold_out_validation

# The package's public names: everything above is re-exported on purpose.
__all__ = [
    "BlockBatcher",
    "TrainBatcher",
    "block_eval_batches",
    "bucket_ladder",
    "eval_batches",
    "make_batch",
    "prefetch",
    "cache_key",
    "cached",
    "file_identity",
    "fetch",
    "fetch_movielens",
    "safe_extract",
    "DATASETS",
    "load_split",
    "split_function",
    "split_options",
    "PartEvalSplit",
    "PartSplit",
    "open_part",
    "write_partitions",
    "read_vaecf_dir",
    "write_user_lines",
    "write_vaecf_dir",
    "PAPER_SEED",
    "binarize",
    "collapse_duplicates",
    "filter_triplets",
    "split_from_files",
    "split_heldout_users",
    "split_nvidia_alt",
    "split_per_user",
    "Interactions",
    "from_columns",
    "read_delimited",
    "read_lastfm",
    "read_ml100k",
    "read_ml1m",
    "read_movielens_csv",
    "read_msd",
    "read_netflix",
    "read_pinterest",
    "read_user_lines",
    "unify_ids",
    "DataSet",
    "Download",
    "register",
    "EvalSplit",
    "Split",
    "format_stats",
    "hold_out_validation",
]
