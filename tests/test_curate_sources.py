"""Sources (JSONL, Parquet, WARC, directories) and the `lm data` command line."""

import gzip
import json
import os
import random

import pytest

from lm.curate.cli import main
from lm.curate.config import default_config, list_pipelines, load_pipeline
from lm.curate.inputs import expand_inputs
from lm.curate.output import read_documents, read_rejects
from lm.curate.sources import read_jsonl, read_parquet, read_warc
from lm.curate.synthetic import prose
from lm.errors import ConfigError

SRC = default_config().source.to_dict()


def _warc_record(url: str, content_type: str, body: bytes, rid: str) -> bytes:
    http = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n\r\n".encode() + body
    head = (
        "WARC/1.0\r\nWARC-Type: response\r\n"
        f"WARC-Record-ID: <urn:uuid:{rid}>\r\nWARC-Target-URI: {url}\r\n"
        "WARC-Date: 2024-01-01T00:00:00Z\r\nContent-Type: application/http; msgtype=response\r\n"
        f"Content-Length: {len(http)}\r\n\r\n"
    )
    return head.encode() + http + b"\r\n\r\n"


def _page(seed: int) -> bytes:
    paras = prose(random.Random(seed), 300).split("\n\n")
    body = "".join(f"<p>{p}</p>" for p in paras)
    return (
        "<html><head><title>t</title></head><body><nav><a href='/'>Home</a> | <a>About</a></nav>"
        f"<article>{body}</article><footer>Copyright 2024</footer></body></html>"
    ).encode()


def write_warc(path: str) -> None:
    with open(path, "wb") as f:
        f.write(_warc_record("https://good.example/a", "text/html", _page(0), "0001"))
        f.write(_warc_record("https://www.spam.example/b", "text/html", _page(1), "0002"))
        f.write(_warc_record("https://good.example/c.png", "image/png", b"\x89PNG....", "0003"))


def test_read_jsonl_rejects_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps({"id": "x1", "text": "hello there", "url": "https://a.b/c"}).encode())
        f.write(b"\n{not json\n")
        f.write(json.dumps({"body": "no text field"}).encode() + b"\n")
        f.write(b'{"text": "caf\xe9"}\n')
    docs = list(read_jsonl(str(path), "d.jsonl", dict(SRC, type="jsonl")))
    assert [d["reject"] for d in docs] == [
        None, ("decode", "invalid_record"), ("decode", "invalid_record"),
        ("decode", "invalid_utf8"),
    ]  # fmt: skip
    assert docs[0]["id"] == "jsonl/d.jsonl:x1" and docs[0]["web"] and docs[0]["text"]
    assert len({d["id"] for d in docs}) == 4


def test_read_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"text": ["first doc", None, "third"], "url": ["", "", "u"]}), path)
    docs = list(read_parquet(path, "d.parquet", dict(SRC, type="parquet")))
    assert [d["text"] for d in docs] == ["first doc", "", "third"]
    assert [d["id"] for d in docs] == [f"parquet/d.parquet:{i:09d}" for i in range(3)]
    assert docs[1]["reject"] == ("decode", "null_text")
    with pytest.raises(ValueError, match="no column"):
        list(read_parquet(path, "d.parquet", dict(SRC, type="parquet", text_field="body")))


def test_read_warc(tmp_path):
    path = str(tmp_path / "a.warc")
    write_warc(path)
    docs = list(read_warc(path, "a.warc", dict(SRC, type="warc", kind="prose")))
    assert [d["url"] for d in docs][:2] == ["https://good.example/a", "https://www.spam.example/b"]
    assert docs[0]["html"] and docs[0]["raw"].startswith(b"<html>")
    assert docs[2]["reject"] == ("decode", "not_html")
    with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
        g.write(f.read())
    gz = list(read_warc(path + ".gz", "a.warc.gz", dict(SRC, type="warc", kind="prose")))
    assert [d["raw"] for d in gz] == [d["raw"] for d in docs]


def test_expand_inputs_errors_and_stdlib(tmp_path):
    with pytest.raises(ConfigError, match="input path not found"):
        expand_inputs(dict(SRC, type="dir", path=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="needs --config.source.path"):
        expand_inputs(dict(SRC, type="jsonl", path=""))
    with pytest.raises(ConfigError, match="unknown source.type"):
        expand_inputs(dict(SRC, type="csv", path=str(tmp_path)))
    found = expand_inputs(dict(SRC, type="stdlib", max_documents=50))
    assert len(found) == 50 and any(rel.endswith(".py") for _, rel in found)
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.bin").write_bytes(b"\x00")
    assert [r for _, r in expand_inputs(dict(SRC, type="dir", path=str(tmp_path)))] == ["a.py"]


def test_named_pipelines_load():
    assert {"stdlib", "web"} <= set(list_pipelines())
    assert load_pipeline("stdlib").source.type == "stdlib"
    assert load_pipeline("web").source.type == "warc"
    with pytest.raises(ConfigError, match="Did you mean: stdlib"):
        load_pipeline("stdlb")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pipeline=stdlb"], "unknown pipeline 'stdlb'. Did you mean: stdlib"),
        (["--config.langid.min_scor=1"], "--config.langid.min_scor is not a config key"),
        (["--config.langid.min_score=high"], "expects a float"),
        (["--pipeline=web", "--config.source.path=/no/such/dir"], "input path not found"),
    ],
)
def test_cli_user_errors_are_one_line(args, message, tmp_path, capsys):
    assert main(["run", f"--output={tmp_path}/out", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_runs_the_web_pipeline_on_warc(tmp_path, capsys):
    path = str(tmp_path / "crawl.warc")
    write_warc(path)
    out = str(tmp_path / "out")
    rc = main([
        "run", "--pipeline=web", f"--output={out}", f"--config.source.path={path}",
        "--config.url_blocklist.domains=spam.example", "--config.output.num_shards=1",
        "--runner=DirectRunner", "--direct_running_mode=in_memory",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "3 documents in, 1 kept" in capsys.readouterr().out
    kept = list(read_documents(out))
    assert [d["url"] for d in kept] == ["https://good.example/a"]
    assert "Home" not in kept[0]["text"] and "<p>" not in kept[0]["text"]
    reasons = sorted(f"{r['step']}/{r['reason']}" for r in read_rejects(out))
    assert reasons == ["decode/not_html", "url_blocklist/blocklisted_domain"]
    assert os.path.exists(os.path.join(out, "data_report.md"))


def test_ids_stay_unique_across_several_roots(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "README.md").write_text("hello\n")
    paths = f"{tmp_path / 'a'},{tmp_path / 'b'}"
    rels = [r for _, r in expand_inputs(dict(SRC, type="dir", path=paths))]
    assert rels == ["a/README.md", "b/README.md"]
    # A root named twice (or overlapping another) is read once: no id from two inputs.
    twice = f"{paths},{tmp_path / 'a'},{tmp_path / 'a' / 'README.md'}"
    assert [r for _, r in expand_inputs(dict(SRC, type="dir", path=twice))] == rels
