"""Data layer: readers, the paper's splits, caching, download and batching."""
