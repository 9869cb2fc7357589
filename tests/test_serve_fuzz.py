"""Schemathesis fuzzes the server from its own `/openapi.json`: no request may get a 5xx.

Why: the server's request models declare their ranges (temperature, n, logprobs, ...) so the
schema documents them; generated requests, valid and invalid, probe every path the handlers take
into the engine. A 5xx is a server bug; the failure message gives each failing request as curl.

How: schemathesis's own run engine (what `schemathesis run` drives) with only the
`not_a_server_error` check, over real HTTP against the server on 127.0.0.1 with its real engine
on the `tiny_workdir` run. Phases: the schema's examples; coverage (boundary and invalid values
of every field, wrong methods); fuzzing (Hypothesis, `MAX_EXAMPLES` per operation, valid and
invalid bodies, unshrunk). A fixed seed keeps runs reproducible. The run is bounded by
`MAX_EXAMPLES` (LM_FUZZ_MAX_EXAMPLES overrides it, for a longer run by hand) and each request by
`REQUEST_TIMEOUT_S` (schemathesis's `max-time` would instead keep fuzzing until that time is
spent). (schemathesis 4.32's pytest plugin,
`schemathesis.pytest.from_fixture`, breaks on pytest 9.2's node ids, hence the engine.)
Hypothesis keeps no example database (`database: none`); its other caches go to a temporary
directory, not the repo.

Short generations: the server validates each request as sent (max_tokens against the 128-token
context included), but the engine generates at most `MAX_GENERATED` tokens per choice. A fuzzed
`n=128` with the rest of the context as max_tokens otherwise takes ~10 s on 2 CPU cores.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import pytest
import schemathesis
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, StopReason, events, from_schema

from lm.inference.engine import Engine
from lm.serve.app import create_app
from lm.serve.runner import ServerThread

SLOTS = 2
MAX_EXAMPLES = int(os.environ.get("LM_FUZZ_MAX_EXAMPLES", "25"))
SEED = 20261206
REQUEST_TIMEOUT_S = 60
MAX_GENERATED = 8  # tokens per choice the engine generates, whatever max_tokens asks


@pytest.fixture(scope="module")
def server_url(tiny_workdir, tmp_path_factory):
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    engine = Engine.from_workdir(tiny_workdir, slots=SLOTS)
    submit = engine.submit

    def short_submit(prompt_ids, params, callback=None):
        short = dataclasses.replace(params, max_tokens=min(params.max_tokens, MAX_GENERATED))
        return submit(prompt_ids, short, callback)

    engine.submit = short_submit
    try:
        with ServerThread(create_app(engine, model_name="tiny")) as url:
            yield url
    finally:
        set_hypothesis_home_dir(None)


def _config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "checks": {"enabled": False, "not_a_server_error": {"enabled": True}},
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "mode": "all",
                "database": "none",
                "no-shrink": True,  # shrinking a 5xx re-runs generations for minutes
            },
            "phases": {"stateful": {"enabled": False}},
            # Show failing requests whole (by default values of keys like "max_tokens" are masked).
            "output": {"sanitization": {"enabled": False}},
            "request-timeout": REQUEST_TIMEOUT_S,
            "seed": SEED,
        }
    )


def test_no_server_errors(server_url):
    schema = schemathesis.openapi.from_url(server_url + "/openapi.json", config=_config())
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures: dict[tuple[str, str], str] = {}  # (operation, what failed) -> the request as curl
    errors: list[str] = []
    finished = None
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            for interaction in recorder.interactions.values():
                status = interaction.response.status_code if interaction.response else "none"
                statuses[recorder.label][status] += 1
            for checks in recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        info = check.failure_info
                        failures.setdefault((recorder.label, info.failure.title), info.code_sample)
        elif isinstance(event, events.NonFatalError | events.FatalError):
            errors.append(str(getattr(event, "value", None) or getattr(event, "exception", "")))
        elif isinstance(event, events.EngineFinished):
            finished = event

    total = sum(sum(c.values()) for c in statuses.values())
    for label, counts in sorted(statuses.items()):
        print(f"{label:28} {sum(counts.values()):4} requests  {dict(sorted(counts.items()))}")
    assert finished is not None, "schemathesis did not finish"
    print(f"{total} requests in {finished.running_time:.1f} s ({finished.stop_reason})")
    assert not errors, "schemathesis could not run: " + "; ".join(errors)
    report = "\n".join(f"{label}: {what}\n  {curl}" for (label, what), curl in failures.items())
    assert not failures, f"{len(failures)} server errors:\n{report}"
    operations = {label.split(" ", 1)[1] for label in statuses}
    assert {"/v1/chat/completions", "/v1/completions", "/tokenize"} <= operations
    assert finished.stop_reason == StopReason.COMPLETED
