"""Weighted mixtures of data sources: which source each window of a global batch comes from.

``--data-mix web=0.7,code=0.3`` trains on sub-folders ``web/`` and ``code/`` of the data
directory in those proportions. The proportions hold for every optimizer step, not only on
average: each global batch of G windows gives every source ``floor(w * G)`` windows, and the
few left over go to the sources furthest behind their share so far (a multi-source
Bresenham). So a source's count per batch is always within one window of ``w * G``, and its
running total within a window or two of ``w`` times all windows drawn.

Each source walks its own seeded order epoch by epoch (a source that runs out starts its next
epoch on its own, as a single source does: the windows that do not fill a share are left for
the next epoch's order), so the state to resume is each source's (epoch, offset, windows
taken): :class:`MixturePosition`. Everything is a function of the seed, the weights and that
state, so a resume is exact, also with another number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import DataError, json_object

Order = Callable[[int], np.ndarray]  # epoch -> that epoch's order of a source's windows


def parse_mix(spec: str) -> dict[str, float]:
    """``"web=0.7,code=0.3"`` or a JSON file ``{"web": 0.7, ...}`` -> weights summing to 1.

    Weights are relative (``web=7,code=3`` is the same mix); names are sub-folders, so they
    must be plain folder names. Each weight must be a finite positive number; they are
    normalised in exact rational arithmetic, so ``web=1e308,code=1e308`` is 0.5 each (a float
    sum would overflow to inf and make every weight 0) and no share rounds away unnoticed.
    """
    raw = _read_mix_file(spec) if spec.endswith(".json") else _split_mix(spec)
    if not raw:
        raise DataError(f"--data-mix {spec!r} names no source; use NAME=WEIGHT,NAME=WEIGHT")
    for name, weight in raw.items():
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise DataError(f"--data-mix: {name!r} is not a folder name; name sub-folders of "
                            f"--data-dir (e.g. web=0.7,code=0.3)")
        if not _finite_positive(weight):
            raise DataError(f"--data-mix: source {name!r} has weight {weight!r}; weights must "
                            f"be positive finite numbers")
    exact = {name: Fraction(weight) for name, weight in raw.items()}
    total = sum(exact.values())
    weights = {name: float(weight / total) for name, weight in exact.items()}
    for name, weight in weights.items():
        if not weight > 0:  # below float's smallest share: the source would never be drawn
            raise DataError(f"--data-mix: source {name!r} has weight {raw[name]!r}, a share "
                            f"of the mix too small to ever be drawn; raise it or drop it")
    return weights


def _finite_positive(weight: object) -> bool:
    """A real weight above 0: not a bool, nan or inf (a JSON integer may have any size)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        return False
    return weight > 0 and (isinstance(weight, int) or math.isfinite(weight))


def source_weights(spec: str) -> dict[str, float]:
    """The sources a run reads (sub-folder names) and their weights: ``--data-mix`` parsed,
    or, without one, the data folder itself (``""``) alone."""
    return parse_mix(spec) if spec else {"": 1.0}


def _split_mix(spec: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, eq, value = item.partition("=")
        try:
            weight = float(value) if eq else None
        except ValueError:
            weight = None
        if weight is None:
            raise DataError(f"--data-mix: {item!r} is not NAME=WEIGHT (e.g. web=0.7,code=0.3, "
                            f"or a .json file of {{name: weight}})")
        if name.strip() in out:
            raise DataError(f"--data-mix names source {name.strip()!r} twice")
        out[name.strip()] = weight
    return out


def _read_mix_file(path: str) -> dict[str, float]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise DataError(f"--data-mix {path}: cannot read the mixture file ({e}); give a JSON "
                        f"object of {{name: weight}}") from e
    return json_object(text, f"--data-mix {path}", "give a JSON object of {name: weight}")


def split_count(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` items shared by weight (largest remainders), e.g. held-out windows per source."""
    exact = [total * w for w in weights]
    counts = [math.floor(x + 1e-9) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[:total - sum(counts)]:
        counts[i] += 1
    return counts


def allocate(weights: np.ndarray, taken: np.ndarray, batch: int) -> np.ndarray:
    """Windows per source for the next global batch of ``batch`` windows.

    Every source gets ``floor(w * batch)``; the remainder goes, one each, to the sources whose
    running total ``taken`` is furthest below their share of all windows after this batch.
    """
    counts = np.floor(weights * batch + 1e-9).astype(np.int64)
    deficit = weights * (taken.sum() + batch) - taken - counts
    counts[np.argsort(-deficit, kind="stable")[:batch - int(counts.sum())]] += 1
    return counts


@dataclass(frozen=True)
class SourcePosition:
    """One source's place: its epoch, windows of that epoch used, windows used in all."""

    epoch: int = 0
    offset: int = 0
    taken: int = 0


@dataclass(frozen=True)
class MixturePosition:
    """Where a mixture is: every source's position, by name (saved in checkpoints)."""

    sources: tuple[tuple[str, SourcePosition], ...]

    @property
    def epoch(self) -> int:
        """Epochs every source has completed (checkpoint names and logs show it)."""
        return min(p.epoch for _, p in self.sources)

    def taken(self) -> dict[str, int]:
        return {name: p.taken for name, p in self.sources}

    def to_dict(self) -> dict[str, Any]:
        return {"sources": {name: {"epoch": p.epoch, "offset": p.offset, "taken": p.taken}
                            for name, p in self.sources}}

    @classmethod
    def from_dict(cls, d: Any) -> MixturePosition:
        sources = d.get("sources") if isinstance(d, dict) else None
        ok = isinstance(sources, dict) and sources and all(
            isinstance(p, dict) and all(
                isinstance(p.get(k), int) and not isinstance(p.get(k), bool) and p[k] >= 0
                for k in ("epoch", "offset", "taken"))
            for p in sources.values())
        if not ok:
            raise DataError(f"bad mixture position {d!r}: expected {{'sources': {{name: "
                            f"{{'epoch', 'offset', 'taken'}}}}}}; the checkpoint's data state "
                            f"is corrupt")
        return cls(tuple((name, SourcePosition(**p)) for name, p in sources.items()))

    @classmethod
    def start(cls, names: Sequence[str]) -> MixturePosition:
        return cls(tuple((name, SourcePosition()) for name in names))


@dataclass(frozen=True)
class Source:
    """A source as the sampler sees it: its name, weight, and its windows' global ids."""

    name: str
    weight: float
    indices: np.ndarray

    def order(self, seed: int, index: int) -> Order:
        """Each epoch a fresh seeded permutation, its stream distinct for every source."""
        return lambda epoch: np.random.default_rng([seed, epoch, 1000 + index]).permutation(
            self.indices)


def _take(order: Order, size: int, pos: SourcePosition, n: int,
          cache: dict[int, np.ndarray]) -> tuple[np.ndarray, SourcePosition]:
    """``n`` windows of a source from ``pos`` on; a short rest of the epoch is skipped."""
    epoch, offset = pos.epoch, pos.offset
    if offset + n > size:
        epoch, offset = epoch + 1, 0
    if epoch not in cache:
        cache.clear()
        cache[epoch] = order(epoch)
    return cache[epoch][offset:offset + n], SourcePosition(epoch, offset + n, pos.taken + n)


class MixtureBatchSampler:
    """:class:`~utils.data.sampler.WindowBatchSampler`'s contract over weighted sources.

    Global batch = every source's share (:func:`allocate`) of its own order, shuffled
    together with a seed of the windows drawn so far (so each rank gets a mix), then rank
    ``r`` takes slice ``[r*B:(r+1)*B]``. ``position`` follows the batches handed over;
    ``batches_from`` reads ahead without moving it (the torch DataLoader's workers).
    """

    def __init__(self, sources: Sequence[Source], per_device_batch: int, rank: int,
                 world: int, seed: int, position: MixturePosition | None = None,
                 orders: Sequence[Order] | None = None) -> None:
        self.names = [s.name for s in sources]
        self.weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.sizes = [len(s.indices) for s in sources]
        self.orders = list(orders) if orders is not None else [
            s.order(seed, i) for i, s in enumerate(sources)]
        self.per_device_batch, self.rank, self.seed = per_device_batch, rank, seed
        self.global_batch = per_device_batch * world
        self._check_sizes()
        self._position = self._checked(position or MixturePosition.start(self.names))
        self._ahead = self._global_batches(self._position)  # advance() walks it

    def _check_sizes(self) -> None:
        most = np.ceil(self.weights * self.global_batch).astype(int)
        for name, size, need in zip(self.names, self.sizes, most, strict=True):
            if size < need:
                raise DataError(f"data source {name!r} has {size} training windows, fewer than "
                                f"its {need} per global batch; add data to it, lower its "
                                f"weight, or lower the batch size or seq_len")

    def _checked(self, position: MixturePosition) -> MixturePosition:
        saved = [name for name, _ in position.sources]
        if sorted(saved) != sorted(self.names):
            raise DataError(f"the checkpoint's data mix has sources {', '.join(saved)}; this "
                            f"run has {', '.join(self.names)}: resume with the same --data-mix "
                            f"sources (weights may change), or start a new --run-name")
        by_name = dict(position.sources)
        for name, size in zip(self.names, self.sizes, strict=True):
            if by_name[name].offset > size:
                raise DataError(f"data source {name!r}: saved offset {by_name[name].offset} is "
                                f"beyond its {size} training windows; the data or seq_len "
                                f"changed since the checkpoint")
        return MixturePosition(tuple((name, by_name[name]) for name in self.names))

    @property
    def position(self) -> MixturePosition:
        return self._position

    def taken_by_source(self) -> dict[str, int]:
        """Windows drawn from each source so far (all ranks together)."""
        return self._position.taken()

    def advance(self, n_batches: int = 1) -> None:
        """Count ``n_batches`` more global batches as consumed by the training loop."""
        for _ in range(n_batches):
            _, self._position = next(self._ahead)

    def _global_batches(self, position: MixturePosition
                        ) -> Iterator[tuple[np.ndarray, MixturePosition]]:
        """(global batch, position after it), forever."""
        positions = [p for _, p in position.sources]
        caches: list[dict[int, np.ndarray]] = [{} for _ in self.names]
        while True:
            taken = np.array([p.taken for p in positions], dtype=np.float64)
            counts = allocate(self.weights, taken, self.global_batch)
            parts = []
            for i, n in enumerate(counts):
                part, positions[i] = _take(self.orders[i], self.sizes[i], positions[i],
                                           int(n), caches[i])
                parts.append(part)
            mixed = np.random.default_rng([self.seed, int(taken.sum()), 3]).permutation(
                np.concatenate(parts))
            yield mixed, MixturePosition(tuple(zip(self.names, positions, strict=True)))

    def batches_from(self, position: MixturePosition) -> Iterator[list[int]]:
        b = self.per_device_batch
        for batch, _ in self._global_batches(position):
            yield batch[self.rank * b:(self.rank + 1) * b].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches_from(self._position):
            self.advance(1)
            yield batch


class ConcatWindows:
    """Several sources' windows as one map-style dataset: source k's window j is global id
    ``starts[k] + j``; the samplers hand out global ids."""

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = list(parts)
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])])
        self.num_tokens = sum(p.num_tokens for p in self.parts)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        if not 0 <= k < len(self.parts):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        return self.parts[k][int(i) - int(self.starts[k])]

    def check_vocab(self, vocab_size: int) -> None:
        for part in self.parts:
            part.check_vocab(vocab_size)
