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
    for name in read_manifest(out)["shards"]["documents"]:
        with (
            open(os.path.join(out, name), "rb") as f1,
            open(os.path.join(out_mp, name), "rb") as f2,
        ):
            assert f1.read() == f2.read(), name
