"""The documents of a data config, mixtures included: `iter_documents` and mixture components.

Why apart from sources.py and mixture.py: the per-source readers (sources.py) know nothing of
mixtures, and the seqio registration (mixture.py) imports data_mixtures/, whose Tasks read
documents through sources.py. This module sits between them with neither seqio nor TensorFlow,
so the tokenizer trainer, `lm data pack` and the pack key (packed.plan_key) can all resolve a
mixture's components without an import cycle.

An experiment lists named components, each a data source with a rate:

    c.data.source = "mixture"
    c.data.mixture = dict(
        code=dict(rate=0.7, source="stdlib", include="*.py"),
        web=dict(rate=0.3, final_rate=0.5, source="curated", path="/data/web_clean"),
    )

A component's unset keys (seq_len, validation_fraction, ...) come from the `data` group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import ml_collections

from lm.data.sources import COMPONENT_KEYS, SPLITS, iter_source_documents
from lm.errors import DataError


@dataclasses.dataclass(frozen=True)
class Component:
    """One mixture component: its own data config (source != mixture) and its rates."""

    name: str
    data: ml_collections.ConfigDict
    rate: float
    final_rate: float


def component_data(data_cfg: ml_collections.ConfigDict, **values) -> ml_collections.ConfigDict:
    """A copy of `data_cfg` with `values` set and no mixture of its own (one component's data)."""
    data = ml_collections.ConfigDict(data_cfg.to_dict())
    data.mixture = ml_collections.ConfigDict()
    data.update(values)
    return data


def configured_components(data_cfg: ml_collections.ConfigDict) -> list[Component]:
    """The components of `data.mixture` (source=mixture), validated; else one component."""
    if data_cfg.source != "mixture":
        return [Component("main", data_cfg, 1.0, 1.0)]
    if not data_cfg.mixture:
        raise DataError("data.source=mixture needs components in data.mixture (see experiments/)")
    out = []
    for name, spec in data_cfg.mixture.items():
        spec = dict(spec)
        unknown = sorted(set(spec) - {"rate", "final_rate", *COMPONENT_KEYS})
        if unknown:
            raise DataError(f"data.mixture.{name}: unknown key(s) {unknown}")
        rate = float(spec.pop("rate", 1.0))
        final = float(spec.pop("final_rate", -1.0))
        final = rate if final < 0 else final
        if rate < 0 or (rate == 0 and final == 0):
            raise DataError(f"data.mixture.{name}: rates must be >= 0 and not both 0")
        if spec.get("source", data_cfg.source) == "mixture":
            raise DataError(f"data.mixture.{name}.source must be a document source, not mixture")
        out.append(Component(name, component_data(data_cfg, **spec), rate, final))
    if sum(c.rate for c in out) <= 0:
        raise DataError("data.mixture: the rates sum to 0")
    return out


def _interleave_by_rate(streams: list[tuple[float, Iterator[str]]]) -> Iterator[str]:
    """Documents from several streams, each next one from the live stream furthest behind its
    rate (taken / rate smallest), until all are exhausted."""
    live = [[0, rate, it] for rate, it in streams if rate > 0]
    while live:
        entry = min(live, key=lambda e: e[0] / e[1])
        doc = next(entry[2], None)
        if doc is None:
            live.remove(entry)
            continue
        entry[0] += 1
        yield doc


def iter_documents(
    data_cfg: ml_collections.ConfigDict, split: str, shard_index: int = 0, num_shards: int = 1
) -> Iterator[str]:
    """Yields this shard's documents of `split` in a deterministic order.

    One source: its documents (sources.iter_source_documents: host `shard_index` of
    `num_shards` gets every num_shards-th document of the split). A mixture: its components'
    documents interleaved by rate (what the tokenizer trains on). source=task has no raw text.
    """
    if not 0 <= shard_index < num_shards:
        raise DataError(f"shard_index {shard_index} out of range for {num_shards} shards")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if data_cfg.source == "task":
        raise DataError(
            "data.source=task has no raw documents to read: the seqio task "
            f"{data_cfg.task!r} is tokenized already (set --config.tokenizer.path to its model)"
        )
    if data_cfg.source == "mixture":
        streams = [
            (max(c.rate, c.final_rate), iter_documents(c.data, split, shard_index, num_shards))
            for c in configured_components(data_cfg)
        ]
        yield from _interleave_by_rate(streams)
        return
    yield from iter_source_documents(data_cfg, split, shard_index, num_shards)
