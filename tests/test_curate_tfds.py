"""The TFDS source end to end: a tiny builder prepared into a temp data_dir, then curated."""

import random

import pytest

from lm.curate.cli import main, run_curation
from lm.curate.config import default_config
from lm.curate.inputs import expand_inputs
from lm.curate.output import read_documents, read_manifest, read_rejects
from lm.curate.synthetic import prose
from lm.errors import ConfigError

tfds = pytest.importorskip("tensorflow_datasets")

PROSE = [prose(random.Random(seed), 300) for seed in range(3)]
SHORT = "Too short to be a document."
# What each example must become: kept, or the step/reason it is rejected with.
EXAMPLES = [
    (PROSE[0].encode(), "kept"),
    (PROSE[1].encode(), "kept"),
    (PROSE[2].encode(), "kept"),
    (b"", "decode/empty"),
    (b"caf\xe9 au lait \xff\xfe", "decode/invalid_utf8"),
    (SHORT.encode(), "gopher_quality"),  # the exact reason belongs to the filter tests
]


class LmCurateTfdsTestText(tfds.core.GeneratorBasedBuilder):
    """Registered as `lm_curate_tfds_test_text`: TFDS keys its global registry on the snake-cased
    class name and raises on a second class of the same name, hence one unlikely to collide."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (text, _) in enumerate(EXAMPLES):
            yield i, {"text": text}


NAME = LmCurateTfdsTestText.name


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    LmCurateTfdsTestText(data_dir=path).download_and_prepare()
    return path


def _source(data_dir: str, **kw):
    base = dict(type="tfds", tfds_name=NAME, tfds_data_dir=data_dir)
    return {**default_config().source.to_dict(), **base, **kw}


def test_tfds_is_read_from_the_configured_data_dir(data_dir):
    assert LmCurateTfdsTestText(data_dir=data_dir).is_prepared()
    assert expand_inputs(_source(data_dir)) == [(NAME, NAME)]


def test_tfds_dataset_curated_end_to_end(data_dir, tmp_path):
    c = default_config()
    c.source.update(type="tfds", tfds_name=NAME, tfds_data_dir=data_dir)
    c.output.num_shards = 1
    out = str(tmp_path / "out")
    beam = ["--runner=DirectRunner", "--direct_running_mode=in_memory"]
    report = run_curation(c, out, beam, name="tfds_test")

    kept, rejected = list(read_documents(out)), list(read_rejects(out))
    ids = [d["id"] for d in kept + rejected]
    assert len(ids) == len(set(ids)) == len(EXAMPLES)  # every example accounted for, once
    assert all(i.startswith(f"tfds/{NAME}/train:") for i in ids)
    assert report["reconciled"] and report["inputs"][0] == len(EXAMPLES)
    assert report["kept"][0] == len(kept) == 3
    assert sum(n for n, _ in report["reasons"].values()) == len(rejected)
    counts = read_manifest(out)["counts"]
    assert counts["inputs"] == counts["kept"] + sum(counts["by_reason"].values())

    # The prose arrives intact but for its blank lines: C4's cleaner (as its reference) joins the
    # lines it keeps with single newlines. TFDS reorders examples by key hash on write, so
    # compare sorted.
    paragraphs = ["\n".join(line for line in p.split("\n") if line) for p in PROSE]
    assert sorted(d["text"] for d in kept) == sorted(paragraphs)
    assert {d["source"] for d in kept} == {"tfds"} and {d["kind"] for d in kept} == {"prose"}
    outcomes = sorted(f"{r['step']}/{r['reason']}" for r in rejected)
    expected = sorted(outcome for _, outcome in EXAMPLES if outcome != "kept")
    assert len(outcomes) == len(expected)
    assert all(o == e or o.startswith(e + "/") for o, e in zip(outcomes, expected, strict=True))
    assert [r["text"] for r in rejected if r["step"] == "gopher_quality"] == [SHORT]


def test_tfds_max_documents(data_dir, tmp_path):
    c = default_config()
    c.source.update(type="tfds", tfds_name=NAME, tfds_data_dir=data_dir, max_documents=2)
    c.output.num_shards = 1
    report = run_curation(c, str(tmp_path / "out"), ["--runner=DirectRunner"], name="tfds_test")
    assert report["inputs"][0] == 2 and report["reconciled"]


def test_unprepared_or_unknown_tfds_dataset_is_a_config_error(tmp_path):
    empty = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match="is not prepared locally"):
        expand_inputs(_source(empty))
    with pytest.raises(ConfigError, match="needs --config.source.tfds_name"):
        expand_inputs(_source(empty, tfds_name=""))


@pytest.mark.parametrize(
    "name, message",
    [
        (NAME, f"TFDS dataset {NAME!r} is not prepared locally"),
        ("lm_no_such_tfds_dataset", "TFDS dataset 'lm_no_such_tfds_dataset': "),
    ],
)
def test_cli_tfds_user_errors_are_one_line(name, message, tmp_path, capsys):
    rc = main([
        "run", f"--output={tmp_path}/out", "--config.source.type=tfds",
        f"--config.source.tfds_name={name}", f"--config.source.tfds_data_dir={tmp_path}/empty",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
