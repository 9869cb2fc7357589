"""Data mixtures: several sources sampled at configured rates, as a registered seqio Mixture.

An experiment lists named components, each a data source with a rate:

    c.data.source = "mixture"
    c.data.mixture = dict(
        code=dict(rate=0.7, source="stdlib", include="*.py"),
        web=dict(rate=0.3, final_rate=0.5, source="curated", path="/data/web_clean"),
    )

Every component is registered as a seqio Task (data_mixtures/text.py) and all of them as one
seqio Mixture with those rates; `data.source=task` with `data.task=<a registered seqio Mixture>`
takes the same road. Training reads the rates back from the seqio Mixture, builds each
component's packed rows separately, and draws every row of a batch from component i with
probability rate_i(step) (rates move to `final_rate` over `data.curriculum.mixture_steps`).
A component's unset keys (seq_len, validation_fraction, ...) come from the `data` group.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import ml_collections
import numpy as np
import seqio

from data_mixtures import load_registrations
from data_mixtures.text import register_text_task
from lm.data.sources import COMPONENT_KEYS
from lm.errors import DataError


@dataclasses.dataclass(frozen=True)
class Component:
    """One mixture component: its own data config (source != mixture) and its rates."""

    name: str
    data: ml_collections.ConfigDict
    rate: float
    final_rate: float


def _component_data(data_cfg: ml_collections.ConfigDict, **values) -> ml_collections.ConfigDict:
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
        out.append(Component(name, _component_data(data_cfg, **spec), rate, final))
    if sum(c.rate for c in out) <= 0:
        raise DataError("data.mixture: the rates sum to 0")
    return out


def register_mixture(components: list[Component], vocab_path: str) -> tuple[str, list[str]]:
    """Registers a seqio Task per component and one seqio Mixture of them.

    Returns (mixture name, each component's task name).
    """
    tasks = []
    for c in components:
        task = c.data.task if c.data.source == "task" else register_text_task(c.data, vocab_path)
        if task in tasks:
            other = components[tasks.index(task)].name
            raise DataError(f"data.mixture.{c.name} reads the same documents as {other}")
        tasks.append(task)
    key = json.dumps([[t, c.rate] for t, c in zip(tasks, components)])
    name = f"lm_mixture_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if name not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(name, [(t, c.rate) for t, c in zip(tasks, components)])
    return name, tasks


def components_for_training(
    data_cfg: ml_collections.ConfigDict, vocab_path: str
) -> list[Component]:
    """The components training samples from, with rates read from the seqio Mixture.

    source=mixture: registers the configured components and their Mixture, then reads it back.
    source=task naming a seqio Mixture: its Tasks at its rates. Anything else: one component.
    """
    if data_cfg.source == "mixture":
        configured = configured_components(data_cfg)
        name, task_names = register_mixture(configured, vocab_path)
        mixture = seqio.get_mixture_or_task(name)
        by_task = dict(zip(task_names, configured))
        return [
            dataclasses.replace(by_task[t.name], rate=float(mixture.get_rate(t)))
            for t in mixture.tasks
        ]
    if data_cfg.source != "task":
        return [Component("main", data_cfg, 1.0, 1.0)]
    load_registrations()  # modules in data_mixtures/ register Tasks and Mixtures by name
    if data_cfg.task in seqio.MixtureRegistry.names():
        mixture = seqio.get_mixture_or_task(data_cfg.task)
        return [
            Component(
                t.name,
                _component_data(data_cfg, task=t.name),
                float(mixture.get_rate(t)),
                float(mixture.get_rate(t)),
            )
            for t in mixture.tasks
        ]
    return [Component("main", data_cfg, 1.0, 1.0)]


def rates_at(components: list[Component], progress: float) -> np.ndarray:
    """Normalized sampling rates [n_components] at schedule progress in [0, 1]."""
    rates = np.array([c.rate + progress * (c.final_rate - c.rate) for c in components])
    return rates / rates.sum()
