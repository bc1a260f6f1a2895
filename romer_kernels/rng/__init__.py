"""Counter-based randomness: Philox4x32-10 streams keyed by (chip seed, layer, purpose, counter)."""
from romer_kernels.rng.streams import (
    MvmStreams,
    Purpose,
    chip_key,
    layer_key,
    mvm_counter,
    normal,
    normal_like,
    normal_rows,
    rng_backend,
    seed_from_key,
    set_rng_backend,
    stream_seed,
    uniform,
)

__all__ = [
    "MvmStreams", "Purpose", "chip_key", "layer_key", "mvm_counter", "normal", "normal_like", "normal_rows", "rng_backend", "seed_from_key", "set_rng_backend", "stream_seed", "uniform",
]
