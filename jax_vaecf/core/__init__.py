"""The floor: sparse batches, keyed randomness, loss kernels, item shards, atomic files, process shares, precision policies, schedules. Imports nothing above it."""
