"""How the sparse placement reads a prompt's FFN rows (`ffn.FlashFFN._prefill`):
the union of its tokens' neurons or the whole layer, whichever the reads measured
so far say is faster (`ReadCosts`), in chunks of the scratch, each read while the
last computes where half the scratch is large enough (`prompt_chunks`). The cost
model (`plan/prompt_costs.py`) follows the same rules.
"""

from __future__ import annotations

# A prompt's chunks are read while the last computes where half the scratch holds
# this much: OPT-6.7B q4 at 50% (halves of 12 MB), 128 tokens, 13.7-14.6 -> 12.0-12.5
# s; the default model at 60% (halves of 250 KB: more, smaller products) 0.61 ->
# 0.78-0.87 s on NumPy, the same on MLX (Intel Xeon 2 vCPU)
PREFILL_AHEAD_BYTES = 4 << 20


class ReadCosts:
    """Seconds per neuron of the two ways a prompt reads a layer, as measured on
    this disk so far: streaming it whole (large sequential reads) or reading a
    sparse set (smaller reads, fewer bytes). Until both are measured, a sparse
    neuron is assumed to cost 2.5x a streamed one (disk probe here: 18 KiB reads
    0.82 GB/s, 1 MiB reads 1.34 GB/s, 16 threads; decode's reads of scattered
    neurons reach 60-75% of the probe)."""

    PRIOR = 2.5

    def __init__(self):
        self.seconds = {True: 0.0, False: 0.0}  # streaming -> seconds
        self.neurons = {True: 0, False: 0}

    def record(self, streaming: bool, neurons: int, seconds: float) -> None:
        self.seconds[streaming] += seconds
        self.neurons[streaming] += neurons

    def sparse_is_faster(self, wanted: int, neurons: int) -> bool:
        if all(self.neurons.values()):
            ratio = (self.seconds[False] / self.neurons[False]) / (
                self.seconds[True] / self.neurons[True]
            )
        else:
            ratio = self.PRIOR
        return wanted * ratio < neurons


def prompt_chunks(
    wanted: int, scratch_rows: int, bundle_bytes: int, *, in_place: bool = True
):
    """(rows a chunk, read ahead or not) for a prompt's `wanted` rows of a layer:
    where reads land in the scratch (`in_place`), half of it (or half the rows,
    if fewer) where that holds PREFILL_AHEAD_BYTES, each chunk read while the
    last computes; else a scratch-full, read then computed."""
    half = min(scratch_rows // 2, -(-wanted // 2))
    if in_place and wanted > 1 and half * bundle_bytes >= PREFILL_AHEAD_BYTES:
        return half, True
    return scratch_rows, False
