"""lm/storage.py on local paths and on a GCS emulator (tests/gcs_emulator.py), and the writers
(metrics.jsonl, TensorBoard, report.md) and orbax checkpoints that go through it to gs://."""

from __future__ import annotations

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm import storage


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("gcs").fresh("storage")


def test_join_and_is_remote():
    assert storage.join("gs://b/run", "checkpoints", "4") == "gs://b/run/checkpoints/4"
    assert storage.join("/a/b", "c") == "/a/b/c"
    assert storage.is_remote("gs://b/x") and not storage.is_remote("/tmp/gs:/x")
    assert storage.absolute("gs://b/x") == "gs://b/x"
    assert storage.absolute("rel") == os.path.abspath("rel")


def test_write_read_exists_listdir_remove(root):
    a, b = storage.join(root, "a.txt"), storage.join(root, "sub", "deep", "b.bin")
    assert not storage.exists(a) and storage.listdir(root) == []
    storage.write_text(a, "héllo\n")
    storage.write_bytes(b, b"\x00\x01\xff")
    assert storage.exists(a) and storage.exists(b)
    assert storage.read_text(a) == "héllo\n"
    assert storage.read_bytes(b) == b"\x00\x01\xff"
    assert storage.isdir(storage.join(root, "sub")) and not storage.isdir(a)
    assert storage.listdir(root) == ["a.txt", "sub"]
    assert storage.relative_files(root) == ["a.txt", "sub/deep/b.bin"]
    assert list(storage.walk_files(root)) == [a, b]
    storage.write_text(a, "replaced")  # overwrite in place
    assert storage.read_text(a) == "replaced"
    storage.remove(a)
    storage.remove(a)  # missing: no error
    assert not storage.exists(a)
    storage.remove(storage.join(root, "sub"))  # a whole tree
    assert not storage.exists(b) and storage.listdir(root) == []


def test_local_write_leaves_no_temporary_files(tmp_path):
    storage.write_text(tmp_path / "x.txt", "1")
    storage.write_text(tmp_path / "x.txt", "2")
    assert os.listdir(tmp_path) == ["x.txt"]


def test_copy_tree_and_publish_dir(root, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "top.txt").write_text("t")
    (src / "d" / "inner.txt").write_text("i")
    remote_or_local = storage.join(root, "copy")
    storage.copy_tree(src, remote_or_local)
    assert storage.relative_files(remote_or_local) == ["d/inner.txt", "top.txt"]
    back = tmp_path / "back"
    storage.copy_tree(remote_or_local, back)
    assert (back / "d" / "inner.txt").read_text() == "i"

    tmp, final = storage.join(root, ".tmp-pack"), storage.join(root, "pack")
    storage.copy_tree(src, tmp)
    assert storage.publish_dir(tmp, final) is True
    assert not storage.exists(tmp)
    assert storage.read_text(storage.join(final, "d", "inner.txt")) == "i"
    storage.copy_tree(src, tmp)
    storage.write_text(storage.join(tmp, "top.txt"), "loser")
    assert storage.publish_dir(tmp, final) is False  # the first finisher is kept
    assert not storage.exists(tmp)
    assert storage.read_text(storage.join(final, "top.txt")) == "t"


def test_local_copy_of_local_path_is_the_path(tmp_path):
    assert storage.local_copy(str(tmp_path / "f")) == str(tmp_path / "f")


def test_local_copy_downloads_each_version_once(gcs, tmp_path):
    root = gcs.fresh("cache")
    f = storage.join(root, "tok", "spm.model")
    storage.write_bytes(f, b"v1")
    cache = tmp_path / "cache"
    local = storage.local_copy(f, cache)
    assert not storage.is_remote(local) and open(local, "rb").read() == b"v1"
    assert str(cache) in local and "gs:" not in os.listdir(cache)[0] + os.getcwd()
    assert storage.local_copy(f, cache) == local  # cached
    storage.write_bytes(f, b"v2")  # replaced under the same name: never the stale copy
    local2 = storage.local_copy(f, cache)
    assert local2 != local and open(local2, "rb").read() == b"v2"
    d = storage.local_copy(storage.join(root, "tok"), cache)
    assert os.listdir(d) == ["spm.model"]


def test_emulator_settings_are_derived_from_storage_emulator_host(gcs):
    storage.path(f"gs://{gcs.bucket}/x")
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == gcs.url
    assert os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"


def _tfrecords(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        out.append(data[i + 12 : i + 12 + n])
        i += 12 + n + 4
    return out


def test_metrics_writer_tensorboard_and_report_on_gcs(gcs):
    from tensorboard.compat.proto import event_pb2

    from lm.config import default_config
    from lm.training.report import write_report
    from lm.training.writers import MetricsWriter, read_metrics

    workdir = gcs.fresh("metrics")
    with MetricsWriter(workdir) as w:
        for step in range(1, 6):
            w.write(step, {"loss": 5.0 - step, "tokens_per_s": 100.0})
        w.write(5, {"loss": 0.5}, split="validation")
    with MetricsWriter(workdir) as w:  # a resumed run at step 4
        assert w.truncate_after(4) == 3
        w.write(4, {"loss": 1.5})
    records = read_metrics(workdir)
    assert [(r["step"], r["split"]) for r in records] == [
        (1, "train"),
        (2, "train"),
        (3, "train"),
        (4, "train"),
    ]
    assert records[-1]["loss"] == 1.5

    fs = gcs.fs()
    bare = workdir.removeprefix("gs://")
    events = fs.ls(f"{bare}/tb/train")
    assert len(events) >= 1 and all("events.out.tfevents" in e for e in events)
    steps = []
    for e in events:
        for rec in _tfrecords(fs.cat(e))[1:]:
            ev = event_pb2.Event.FromString(rec)
            steps.append((ev.step, ev.summary.value[0].tag))
    assert (3, "loss") in steps and (4, "loss") in steps
    assert fs.exists(f"{bare}/tb/validation")

    path = write_report(workdir, default_config(), samples=[("ab", "cd")])
    assert path == f"{workdir}/report.md"
    text = fs.cat(f"{bare}/report.md").decode()
    assert "# Run report" in text and "cd" in text
    assert fs.exists(f"{bare}/loss_curve.png")
    assert json.loads(fs.cat(f"{bare}/metrics.jsonl").decode().splitlines()[0])["step"] == 1


def test_checkpointer_round_trip_on_gcs(gcs):
    from lm.training.checkpoint import Checkpointer

    devices = np.array(jax.devices())
    sharding = NamedSharding(Mesh(devices, ("d",)), PartitionSpec("d"))
    n = 4 * len(devices)
    state = {
        "w": jax.device_put(jnp.arange(n * 3, dtype=jnp.float32).reshape(n, 3), sharding),
        "step": jnp.asarray(7, jnp.int32),
    }
    directory = storage.join(gcs.fresh("ckpt"), "checkpoints")
    ckpt = Checkpointer(directory, keep=2, every=1)
    for step in (1, 2, 3):
        assert ckpt.save(step, state, {"position": step})
    ckpt.close()

    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )
    reopened = Checkpointer(directory, keep=2, every=1)
    assert reopened.steps() == [2, 3]  # keep=2 deleted step 1 from the bucket
    restored, data_state, step = reopened.restore_latest(abstract)
    reopened.close()
    assert step == 3 and data_state == {"position": 3}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
    assert restored["w"].sharding == sharding
    names = gcs.fs().ls(directory.removeprefix("gs://"))
    listed = {n.rsplit("/", 1)[-1] for n in names}
    assert {"2", "3"} <= listed and "1" not in listed


def test_run_files_get_the_mode_a_plain_open_gives(tmp_path):
    """Not mkstemp's 0600: run files are readable by whoever may read the directory."""
    import stat

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = tmp_path / "written.txt"
    storage.write_text(str(written), "x")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
