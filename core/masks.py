"""Seeded, nested damage masks (Vasu & Savakis §3.2): which weights a damage fraction takes.

Each targeted layer loses exactly ``k = round(D · N)`` of its ``N`` weights: one uniform random
permutation of the layer's entries is drawn from a CPU :class:`torch.Generator` seeded from the
damage seed and the layer's *name*, and its first ``k`` entries are damaged. So masks are the
same on every device and process, independent of the other targets, and nested across
fractions (5 % ⊂ 10 % ⊂ …), which makes a sweep monotone and its levels comparable.

Drawing the permutation is the whole cost, so permutations are cached (:data:`PERMUTATIONS`)
and the missing ones of several layers are drawn in parallel.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

__all__ = ["PERMUTATIONS", "damaged_count", "layer_masks", "seeded_generator"]


def damaged_count(numel: int, fraction: float) -> int:
    """``round(fraction · numel)``: how many of a layer's weights a damage fraction takes."""
    return round(fraction * numel)


def seeded_generator(seed: int, stream: str, layer: str) -> torch.Generator:
    # A stable digest, not hash(): masks must not change between processes or Python versions.
    digest = hashlib.sha256(f"camres.damage/{stream}/{seed}/{layer}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


#: (seed, layer name, numel) of a layer's permutation.
_PermKey = tuple[int, str, int]


class _PermutationCache:
    """The seeded permutations drawn most recently, bounded in bytes (least recently used out).

    The permutation is the whole cost of a mask: ``torch.randperm`` is a sequential shuffle
    (~14 ns per weight on one core), while marking its first ``k`` entries is ~3 ns. Nesting
    means every fraction of one (seed, layer) uses the same permutation, so a sweep over 19
    fractions, or a stream of damage jobs on one model, draws each permutation once.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[_PermKey, Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: _PermKey) -> Tensor | None:
        with self._lock:
            order = self._entries.get(key)
            if order is not None:
                self._entries.move_to_end(key)
            return order

    def put(self, key: _PermKey, order: Tensor) -> None:
        size = order.numel() * order.element_size()
        with self._lock:
            if key in self._entries or size > self.max_bytes:
                return
            self._entries[key] = order
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()

    def keys(self) -> list[_PermKey]:
        """The cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached permutations."""
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


#: 128 MiB holds the D1–D4 permutations of ~8 ResNet-50 seeds (4.3 M int32 entries each).
PERMUTATIONS = _PermutationCache(max_bytes=128 * 2**20)


def _draw_permutation(key: _PermKey) -> Tensor:
    seed, layer, numel = key
    # int32 halves the time of the (sequential) shuffle and gives the same permutation.
    index = torch.int32 if numel < 2**31 else torch.int64
    return torch.randperm(numel, generator=seeded_generator(seed, "mask", layer), dtype=index)


def _permutations(keys: Sequence[_PermKey]) -> list[Tensor]:
    """The permutation of each key, from the cache or drawn. Each shuffle is sequential, but
    the layers' shuffles are independent (one generator each) and ``randperm`` releases the
    GIL, so missing ones are drawn on up to ``torch.get_num_threads()`` threads at once."""
    found = {key: PERMUTATIONS.get(key) for key in keys}
    missing = [key for key, order in found.items() if order is None]
    workers = min(len(missing), torch.get_num_threads())
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="camres-mask") as pool:
            drawn = list(pool.map(_draw_permutation, missing))
    else:
        drawn = [_draw_permutation(key) for key in missing]
    for key, order in zip(missing, drawn, strict=True):
        PERMUTATIONS.put(key, order)
        found[key] = order
    return [found[key] for key in keys]  # type: ignore[misc]


def _mask_from(order: Tensor, weight: Tensor, fraction: float) -> Tensor:
    flat = torch.zeros(order.numel(), dtype=torch.bool)
    flat.index_fill_(0, order[: damaged_count(order.numel(), fraction)].long(), True)
    return flat.view(weight.shape).to(weight.device)


def layer_masks(
    model: nn.Module, names: Sequence[str], fraction: float, seed: int
) -> dict[str, Tensor]:
    """Parameter name → damage mask of each named module's weight (see the module docstring)."""
    weights = {f"{name}.weight": model.get_parameter(f"{name}.weight") for name in names}
    keys = [(seed, name, weights[f"{name}.weight"].numel()) for name in names]
    orders = _permutations(keys)
    return {
        key: _mask_from(order, weight, fraction)
        for (key, weight), order in zip(weights.items(), orders, strict=True)
    }
