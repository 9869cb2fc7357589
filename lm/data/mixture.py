"""Data mixtures as a registered seqio Mixture (used by `lm data pack` only: seqio + TF).

The components themselves (`data.mixture`, validated) come from lm/data/documents.py, which
needs no seqio. Every component is registered as a seqio Task (data_mixtures/text.py) and all
of them as one seqio Mixture with those rates; `data.source=task` with
`data.task=<a registered seqio Mixture>` takes the same road. Packing reads the rates back from
the seqio Mixture into plan.json and builds each component's packed rows separately; training
draws every row of a batch from component i with probability rate_i(step) (rates move to
`final_rate` over `data.curriculum.mixture_steps`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import ml_collections
import seqio

from data_mixtures import load_registrations
from data_mixtures.text import register_text_task
from lm.data.documents import Component, component_data, configured_components
from lm.errors import DataError


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
                component_data(data_cfg, task=t.name),
                float(mixture.get_rate(t)),
                float(mixture.get_rate(t)),
            )
            for t in mixture.tasks
        ]
    return [Component("main", data_cfg, 1.0, 1.0)]
