"""`lm data run` from a gs:// input to a gs:// output (the `gcs` emulator fixture): inputs, shards,
rejects, report and manifest all go through lm.storage, so the same run works on Dataflow.

Run with `-s` to see the bucket listing.
"""

import gzip
import json
import os
import random

import pytest

from lm import storage
from lm.curate.cli import main
from lm.curate.config import default_config
from lm.curate.inputs import expand_inputs
from lm.curate.output import read_documents, read_manifest, read_rejects
from lm.curate.synthetic import prose
from lm.errors import ConfigError


def _prose(seed: int) -> str:
    return prose(random.Random(seed), 300)


def _upload_corpus(root: str) -> tuple[set[str], dict[str, str]]:
    """Writes JSONL inputs under `root` (a gs:// dir); returns (kept ids, rejected id -> reason)."""
    lines = [
        json.dumps({"id": "a", "text": _prose(1), "url": "https://a.example/1"}).encode(),
        b'{"id": "bad", "text": "caf\xe9"}',
        json.dumps({"id": "b", "text": _prose(2)}).encode(),
        b'{"id": "s", "text": "x \\ud800 y"}',
    ]
    storage.write_bytes(f"{root}/part-0.jsonl", b"\n".join(lines) + b"\n")
    gz = [json.dumps({"id": f"g{i}", "text": _prose(10 + i)}) for i in range(3)]
    storage.write_bytes(f"{root}/sub/part-1.jsonl.gz", gzip.compress("\n".join(gz).encode()))
    storage.write_bytes(f"{root}/notes.txt", b"not an input of a jsonl source")
    kept = {"jsonl/part-0.jsonl:a", "jsonl/part-0.jsonl:b"}
    kept |= {f"jsonl/sub/part-1.jsonl.gz:g{i}" for i in range(3)}
    rejected = {
        f"jsonl/part-0.jsonl:{1:09d}": "decode/invalid_utf8",
        "jsonl/part-0.jsonl:s": "decode/lone_surrogate",
    }
    return kept, rejected


def _run(src: str, out: str, shards: int, capsys) -> int:
    rc = main(
        [
            "run",
            "--pipeline=web",
            f"--output={out}",
            "--config.source.type=jsonl",
            f"--config.source.path={src}",
            f"--config.output.num_shards={shards}",
            "--config.decontam.enabled=False",
            "--runner=DirectRunner",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    return rc


def test_data_run_reads_and_writes_a_bucket(gcs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a gs:// path mistaken for a local one would appear here
    src, out = gcs.fresh("curate-in"), gcs.fresh("curate-out")
    kept, rejected = _upload_corpus(src)
    _run(src, out, 3, capsys)
    _run(src, out, 2, capsys)  # again, fewer shards: the first run's shards must be gone

    fs = gcs.fs()
    bare = out.removeprefix("gs://")
    files = sorted(f.removeprefix(bare + "/") for f in fs.find(bare))
    with capsys.disabled():
        print(f"\n{out}:", *files, sep="\n  ")
    assert "manifest.json" in files and "data_report.md" in files and "data_report.json" in files
    assert "plots/lengths.png" in files and "_stats.json" not in files
    assert not [f for f in files if "-of-00003" in f], files  # stale shards removed
    assert not os.path.exists(tmp_path / "gs:")
    assert not [f for f in fs.find(bare.split("/")[0]) if ".staging-" in f]  # swapped in, gone

    manifest = read_manifest(out)
    assert manifest["reconciled"] is True
    assert set(manifest["shards"]["documents"]) <= set(files)
    assert {d["id"] for d in read_documents(out)} == kept
    assert {r["id"]: f"{r['step']}/{r['reason']}" for r in read_rejects(out)} == rejected
    report = json.loads(storage.read_text(f"{out}/data_report.json"))
    rec = report["reconciliation"]
    assert rec["ok"] and rec["read"]["inputs"] == 2  # notes.txt is not a JSONL input
    assert rec["read"]["records"] == len(kept) + len(rejected)


def test_inputs_on_a_bucket_expand_like_local_ones(gcs):
    src = gcs.fresh("expand")
    _upload_corpus(src)
    base = default_config().source.to_dict()
    found = expand_inputs(dict(base, type="jsonl", path=f"{src}/*.jsonl"))
    assert found == [(f"{src}/part-0.jsonl", "part-0.jsonl")]
    found = expand_inputs(dict(base, type="jsonl", path=src))
    assert found == [
        (f"{src}/part-0.jsonl", "part-0.jsonl"),
        (f"{src}/sub/part-1.jsonl.gz", "sub/part-1.jsonl.gz"),
    ]
    found = expand_inputs(dict(base, type="dir", path=src, include="*.txt"))
    assert found == [(f"{src}/notes.txt", "notes.txt")]
    with pytest.raises(ConfigError, match="input path not found"):
        expand_inputs(dict(base, type="jsonl", path=f"{src}/missing"))
    with pytest.raises(ConfigError, match="mixes local and gs://"):
        expand_inputs(dict(base, type="jsonl", path=f"{src},/tmp"))
