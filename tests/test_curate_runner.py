"""Runners and logs: the pipeline on a real dask.distributed cluster (a scheduler and two worker
processes on 127.0.0.1) gives the DirectRunner's output; other runners are selected by flags;
`lm data run` is quiet unless --verbose."""

import json
import os
import re
import subprocess
import sys

import pytest

from lm.curate.cli import _runner_args, main
from lm.curate.output import read_documents, read_manifest, read_rejects
from lm.curate.synthetic import EVAL_PASSAGE, prose, write_mixed_corpus
from lm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _overrides(corpus: str, eval_file: str) -> list[str]:
    """The `web` pipeline pointed at a directory of mixed files (as in test_curate_pipeline)."""
    return [
        "--config.source.type=dir",
        f"--config.source.path={corpus}",
        "--config.source.include=*",
        "--config.source.kind=auto",
        "--config.source.max_doc_bytes=20000",
        "--config.blocklist.words=zorblax",
        "--config.c4.reject_bad_words=False",
        f"--config.decontam.eval_sets={eval_file}",
        "--config.output.num_shards=3",
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runner")
    expected = write_mixed_corpus(str(tmp / "corpus"))
    eval_file = tmp / "eval.jsonl"
    eval_file.write_text(json.dumps({"question": "q", "text": EVAL_PASSAGE}) + "\n")
    return tmp, expected, _overrides(str(tmp / "corpus"), str(eval_file))


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A scheduler and two single-threaded worker processes on 127.0.0.1. The workers inherit
    LM_CURATE_DASK_TRACE_DIR, so each records the bundles it ran under its pid."""
    distributed = pytest.importorskip("dask.distributed")
    trace = str(tmp_path_factory.mktemp("trace"))
    os.environ["LM_CURATE_DASK_TRACE_DIR"] = trace
    try:
        cluster = distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
        )
    finally:
        del os.environ["LM_CURATE_DASK_TRACE_DIR"]  # only the workers trace
    with cluster, distributed.Client(cluster) as client:
        pids = set(client.run(os.getpid).values())
        yield cluster.scheduler_address, trace, pids


def _outcomes(out: str) -> tuple[dict, dict]:
    kept = {d["id"]: d for d in read_documents(out)}
    rejected = {r["id"]: r for r in read_rejects(out)}
    return kept, rejected


@pytest.mark.slow  # ~60 s: a dask.distributed cluster; the DaskRunner is an optional extra
def test_dask_cluster_output_equals_the_direct_runner(corpus, dask_cluster, tmp_path, capsys):
    tmp, expected, overrides = corpus
    address, trace, worker_pids = dask_cluster
    direct, dask_out = str(tmp_path / "direct"), str(tmp_path / "dask")
    base = ["run", "--pipeline=web", *overrides]
    assert main([*base, f"--output={direct}", "--runner=DirectRunner"]) == 0
    assert (
        main(
            [
                *base,
                f"--output={dask_out}",
                "--runner=DaskRunner",
                f"--dask_client_address={address}",
            ]
        )  # fmt: skip
        == 0
    )
    summary = capsys.readouterr().out
    assert summary.count("(reconciled: True)") == 2

    kept_a, rej_a = _outcomes(direct)
    kept_b, rej_b = _outcomes(dask_out)
    assert kept_a == kept_b  # every field of every kept record, by id
    assert rej_a == rej_b
    # And both are right: what write_mixed_corpus says each file must become.
    names = {i.split("/", 1)[1]: i for i in [*kept_b, *rej_b]}
    assert set(names) == set(expected)
    for name, outcome in expected.items():
        doc_id = names[name]
        if outcome == "kept":
            assert doc_id in kept_b, name
        elif not outcome.startswith("kept_one_of"):
            r = rej_b[doc_id]
            assert f"{r['step']}/{r['reason']}" == outcome, name
    assert read_manifest(dask_out)["counts"] == read_manifest(direct)["counts"]

    # Both worker processes ran the per-document chain, and only they did.
    chain_docs = {}
    for pid in os.listdir(trace):
        with open(os.path.join(trace, pid)) as f:
            rows = [line.rstrip("\n").split("\t") for line in f]
        chain_docs[int(pid)] = sum(int(n) for label, n in rows if label.split("/")[0] == "Chain")
    assert set(chain_docs) == worker_pids and os.getpid() not in chain_docs
    assert all(n > 0 for n in chain_docs.values()), chain_docs
    assert sum(chain_docs.values()) == len(expected)  # each document through the chain once


def test_unreachable_dask_scheduler_is_one_line(tmp_path, capsys):
    pytest.importorskip("dask.distributed")
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text(prose(__import__("random").Random(0), 100))
    rc = main([
        "run", "--pipeline=web", f"--output={tmp_path}/out", "--config.source.type=dir",
        f"--config.source.path={corpus}", "--runner=DaskRunner",
        "--dask_client_address=127.0.0.1:1", "--dask_connection_timeout=2",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "dask scheduler" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("lm data: error:")


def test_other_runners_are_selected_by_flags(capsys):
    assert _runner_args([]) == ["--runner=DirectRunner", "--direct_running_mode=in_memory"]
    assert _runner_args(["--runner", "FlinkRunner", "--flink_master", "h:8081"]) == [
        "--runner=FlinkRunner",
        "--flink_master=h:8081",
    ]
    spark = ["--runner=SparkRunner", "--spark_master_url=spark://h:7077"]
    assert _runner_args(spark) == spark
    dataflow = ["--runner=DataflowRunner", "--project=p", "--region=r"]
    assert _runner_args([*dataflow, "--temp_location=gs://b/t"])[-1] == "--temp_location=gs://b/t"
    with pytest.raises(ConfigError, match="needs --temp_location"):
        _runner_args(dataflow)
    with pytest.raises(ConfigError, match="needs a gs:// --temp_location"):
        _runner_args([*dataflow, "--temp_location", "/tmp/t"])
    rc = main(["run", "--output=/tmp/never", "--runner=DataflowRunner", "--region=r"])
    err = capsys.readouterr().err
    assert rc == 2 and err == "lm data: error: --runner=DataflowRunner needs --project, " \
        "--temp_location\n"  # fmt: skip
    # Beam itself resolves each name to its runner class (constructing one connects nowhere).
    from apache_beam.runners.runner import create_runner

    for name in ("FlinkRunner", "SparkRunner"):
        assert type(create_runner(name)).__name__ == name


def _lm_data(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("DASK_LOGGING__DISTRIBUTED", None)
    return subprocess.run(
        [sys.executable, "-m", "lm.cli", "data", "run", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip


@pytest.mark.slow  # ~25 s: two full `lm data run` processes to compare their output
def test_lm_data_run_is_quiet_unless_verbose(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"p{i}.txt").write_text(prose(__import__("random").Random(i), 200))
    args = ["--pipeline=web", "--config.source.type=dir", f"--config.source.path={corpus}",
            "--config.output.num_shards=1"]  # fmt: skip
    quiet = _lm_data([*args, f"--output={tmp_path}/q", "--runner=DirectRunner"])
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.strip().splitlines()
    # One line per stage, nothing else: no Beam (or other library) log line.
    assert [line.split(":")[0] for line in lines] == ["lm data", "lm data"], quiet.stderr
    assert re.match(r"lm data: curating 3 dir inputs on DirectRunner$", lines[0])
    assert re.match(r"lm data: pipeline finished in [\d.]+s; writing the report$", lines[1])
    assert quiet.stdout.startswith("web: 3 documents in, 3 kept")
    verbose = _lm_data([*args, f"--output={tmp_path}/v", "--runner=DirectRunner", "--verbose"])
    assert verbose.returncode == 0, verbose.stderr
    beam_info = [s for s in verbose.stderr.splitlines() if re.search(r" INFO apache_beam", s)]
    assert len(beam_info) >= 3, verbose.stderr
    assert verbose.stdout.startswith("web: 3 documents in, 3 kept")
