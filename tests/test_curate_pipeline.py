"""The curation pipeline end to end on a generated mixed corpus, in-memory and multi-process."""

import json
import os

import pytest

from lm.curate.cli import run_curation
from lm.curate.config import default_config
from lm.curate.output import read_documents, read_manifest, read_rejects
from lm.curate.synthetic import EVAL_PASSAGE, write_mixed_corpus


def _config(corpus: str, eval_file: str):
    c = default_config()
    c.source.update(type="dir", path=corpus, include="*", max_doc_bytes=20_000)
    c.blocklist.words = "zorblax"
    c.c4.reject_bad_words = False  # let the blocklist step (not C4's any-bad-word rule) see it
    c.decontam.eval_sets = eval_file
    c.output.num_shards = 3
    return c


def _run(tmp, mode: str):
    corpus = os.path.join(tmp, "corpus")
    expected = write_mixed_corpus(corpus)
    eval_file = os.path.join(tmp, "eval.jsonl")
    with open(eval_file, "w") as f:
        f.write(json.dumps({"question": "q", "text": EVAL_PASSAGE}) + "\n")
    out = os.path.join(tmp, f"out_{mode}")
    args = ["--runner=DirectRunner", f"--direct_running_mode={mode}"]
    if mode == "multi_processing":
        args.append("--direct_num_workers=2")
    report = run_curation(_config(corpus, eval_file), out, args, name="mixed")
    return expected, out, report


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory):
    return _run(str(tmp_path_factory.mktemp("curate")), "in_memory")


def _by_name(records):
    return {r["id"].split("/", 1)[1]: r for r in records}


def test_every_document_is_kept_or_rejected_with_a_reason(in_memory):
    expected, out, report = in_memory
    kept = _by_name(read_documents(out))
    rejected = _by_name(read_rejects(out))
    assert not set(kept) & set(rejected)
    assert set(kept) | set(rejected) == set(expected)
    # Reconciliation: inputs == kept + sum(rejected by reason), in the report and the manifest.
    assert report["reconciled"]
    assert report["inputs"][0] == len(expected)
    assert report["kept"][0] == len(kept)
    assert sum(n for n, _ in report["reasons"].values()) == len(rejected)
    manifest = read_manifest(out)
    assert manifest["counts"]["inputs"] == len(kept) + sum(manifest["counts"]["by_reason"].values())
    for name, outcome in expected.items():
        if outcome == "kept":
            assert name in kept, (name, rejected.get(name))
        elif not outcome.startswith("kept_one_of"):
            r = rejected[name]
            assert f"{r['step']}/{r['reason']}" == outcome, name


def test_duplicates_are_clustered_and_the_smallest_id_kept(in_memory):
    _, out, report = in_memory
    kept = _by_name(read_documents(out))
    rejected = _by_name(read_rejects(out))
    assert "near_a.txt" in kept and rejected["near_b.txt"]["reason"] == "near_duplicate"
    assert rejected["near_b.txt"]["detail"] == "cluster_of:dir/near_a.txt"
    assert "exact_1.txt" in kept and rejected["exact_2.txt"]["reason"] == "exact_duplicate"
    assert report["clusters"]["near"] == {"2": 1}
    assert report["clusters"]["exact"] == {"2": 1}


def test_pii_is_replaced_not_dropped(in_memory):
    _, out, report = in_memory
    kept = _by_name(read_documents(out))
    doc = kept["pii.txt"]
    for secret in ("jane.doe@example.com", "555-0123", "192.168.10.20", "AKIAIOSFODNN7EXAMPLE",
                   "2001:db8:85a3::8a2e:370:7334", "ghp_abcdefghijklmnopqrstuvwxyz"):  # fmt: skip
        assert secret not in doc["text"]
    for placeholder in ("<EMAIL>", "<PHONE>", "<IPV4>", "<IPV6>", "<AWS_KEY>", "<GITHUB_TOKEN>"):
        assert placeholder in doc["text"]
    assert doc["pii"] == {
        "email": 1, "phone": 1, "ipv4": 1, "ipv6": 1, "aws_key": 1, "github_token": 1
    }  # fmt: skip
    assert 'API_KEY = "<SECRET>"' in kept["secrets.py"]["text"]
    assert report["pii"]["email"] >= 1


def test_kept_documents_carry_metadata(in_memory):
    _, out, _ = in_memory
    kept = _by_name(read_documents(out))
    assert kept["prose_0.txt"]["language"] == "en" and kept["prose_0.txt"]["lang_score"] > 0.9
    assert kept["module_0.py"]["language"] == "code:python"
    assert kept["module_0.py"]["kind"] == "code"


def test_report_and_manifest_files(in_memory):
    _, out, report = in_memory
    for name in ("data_report.md", "data_report.json", "manifest.json",
                 "plots/languages.png", "plots/lengths.png"):  # fmt: skip
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "plots/lengths.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(os.path.join(out, "data_report.md")).read()
    assert "decode/invalid_utf8" in md and "near_dedup" in md
    manifest = read_manifest(out)
    assert manifest["shards"]["documents"] and manifest["config_hash"]
    assert all(os.path.exists(os.path.join(out, s)) for s in manifest["shards"]["documents"])
    steps = report["steps"]
    assert steps["decode"][0] == report["inputs"][0]  # every input entered the first step
    assert report["examples"]["decode/oversized"][0][0] == "dir/big.txt"


def test_multi_process_direct_runner_gives_the_same_output(in_memory, tmp_path):
    _, out, report = in_memory
    _, out_mp, report_mp = _run(str(tmp_path), "multi_processing")
    a = {d["id"]: d["text"] for d in read_documents(out)}
    b = {d["id"]: d["text"] for d in read_documents(out_mp)}
    assert a == b
    assert report_mp["reasons"] == report["reasons"]
    # The same shard files, each holding the same records (shards are written streaming, in
    # arrival order, so only the order inside a shard may differ between runners).
    shards = read_manifest(out)["shards"]
    assert read_manifest(out_mp)["shards"] == shards
    for name in shards["documents"]:
        assert sorted(_shard_records(out, name)) == sorted(_shard_records(out_mp, name)), name


def _shard_records(out: str, name: str) -> list[bytes]:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(os.path.join(out, name))
    try:
        return list(reader.read(list(range(reader.num_records()))))
    finally:
        reader.close()


_RSS_SCRIPT = r"""
import random, resource, sys
from apache_beam.pvalue import TaggedOutput
from lm.curate.pipeline import WriteShardFn

kind, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(5000)]
pool = [" ".join(rng.choice(words) for _ in range(300)) for _ in range(1000)]


def docs():
    # ~2 KB of text per document, made as it is consumed (never all at once)
    for i in range(n):
        text = f"{i} {pool[i % len(pool)]}"
        yield {"id": f"doc-{i:09d}", "source": "dir", "path": f"{i}.txt", "url": "",
               "kind": "prose", "language": "en", "lang_score": 1.0, "pii": {}, "text": text,
               "rejected": ("gopher_quality", "too_few_words"), "bytes_in": len(text)}


items = WriteShardFn(out, kind, 1, 2000).process((0, docs()))
written = sum(isinstance(item, TaggedOutput) for item in items)
print(written, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["documents", "rejects"])
def test_shard_writer_memory_does_not_grow_with_shard_size(kind, tmp_path, capsys):
    """Peak RSS of the pipeline's shard writer at 1x and 10x the records of one shard (~40 MB
    and ~400 MB of text) stays within 10%: records are streamed to the file, never held."""
    import subprocess
    import sys

    peaks = {}
    for n in (20_000, 200_000):
        out = str(tmp_path / f"out_{n}")
        run = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, kind, str(n), out],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        written, peak_kb = map(int, run.stdout.split()[-2:])
        assert written == n  # one `written` id per record
        peaks[n] = peak_kb / 1024
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
        with capsys.disabled():
            print(f"\n{kind}: {n:,} records, shard {size / 2**20:.0f} MiB, "
                  f"peak RSS {peaks[n]:.0f} MiB")  # fmt: skip
    assert peaks[200_000] <= 1.10 * peaks[20_000], peaks
