"""Tests for lm/training/metrics.py: FLOPs/params formulas, peak lookup, MetricsWriter, bpb."""

from __future__ import annotations

import glob
import io
import json
import math
import os

import ml_collections
import pytest

from lm.training import evaluate, flops, peaks, writers
from lm.training.progress import ProgressLine


def _model(**kw) -> ml_collections.ConfigDict:
    base = dict(
        num_layers=2,
        d_model=8,
        num_heads=2,
        num_kv_heads=0,
        head_dim=0,
        d_ff=16,
        mlp="gelu",
        vocab_size=10,
        tie_embeddings=True,
        position="learned",
        max_seq_len=6,
        norm="layernorm",
        use_bias=True,
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_flops_hand_computation_gqa():
    cfg = _model(num_kv_heads=1)
    # head_dim = 8 // 2 = 4. Per layer: q 8*(2*4)=64, k+v 2*8*(1*4)=64, out (2*4)*8=64,
    # MLP 2*8*16=256 -> 448; 2 layers -> 896; LM head 8*10=80 -> N = 976.
    n = 976
    attention = 12 * 2 * 2 * 4 * 6  # 12 L H Q T
    assert flops.matmul_param_count(cfg) == n
    assert flops.model_flops_per_token(cfg, seq_len=6) == 6 * n + attention == 7008


def test_gqa_reduces_projection_flops_only():
    mha = _model(num_kv_heads=0)  # 0 means num_heads
    gqa = _model(num_kv_heads=1)
    # MHA k+v: 2*8*8 = 128 per layer, GQA: 64 per layer -> 2 layers * 64 fewer weights.
    assert flops.matmul_param_count(mha) - flops.matmul_param_count(gqa) == 2 * 64
    diff = flops.model_flops_per_token(mha, 6) - flops.model_flops_per_token(gqa, 6)
    assert diff == 6 * 2 * 64  # attention-score term is unchanged (query heads).


def test_swiglu_has_three_mlp_matrices():
    gelu, swiglu = _model(mlp="gelu"), _model(mlp="swiglu")
    assert flops.matmul_param_count(swiglu) - flops.matmul_param_count(gelu) == 2 * 8 * 16
    assert (
        flops.model_flops_per_token(swiglu, 6) - flops.model_flops_per_token(gelu, 6) == 6 * 2 * 128
    )
    with pytest.raises(ValueError):
        flops.matmul_param_count(_model(mlp="relu"))


def test_explicit_head_dim_and_seq_len_term():
    cfg = _model(head_dim=16)
    # q 8*32, k+v 2*8*32, out 32*8 -> 1024 per layer; MLP 256; 2*(1280) + 80 = 2640.
    assert flops.matmul_param_count(cfg) == 2640
    f1, f2 = flops.model_flops_per_token(cfg, 6), flops.model_flops_per_token(cfg, 12)
    assert f2 - f1 == 12 * 2 * 2 * 16 * 6


def test_param_count_by_hand():
    cfg = _model(num_kv_heads=1)
    emb = 10 * 8 + 6 * 8  # tokens + learned positions
    attn = 64 + 64 + 64 + (8 + 2 * 4 + 8)  # weights + q/k/v/out biases
    mlp = 256 + 16 + 8
    norms = 2 * (2 * 8)  # two layernorms with scale + bias
    final = 2 * 8
    assert flops.param_count(cfg) == emb + 2 * (attn + mlp + norms) + final

    rope_rms = _model(
        position="rope", norm="rmsnorm", use_bias=False, tie_embeddings=False, mlp="swiglu"
    )
    attn = 4 * 64
    mlp = 3 * 128
    expected = 80 + 2 * (attn + mlp + 2 * 8) + 8 + 80
    assert flops.param_count(rope_rms) == expected
    # An untied head adds [d, vocab] and no bias, even with use_bias.
    assert flops.param_count(_model(tie_embeddings=False)) - flops.param_count(_model()) == 80


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v5", 459e12),
        ("TPU v6 lite", 918e12),
        ("TPU v6e", 918e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("cpu", None),
        ("TPU v99", None),
        ("", None),
    ],
)
def test_peak_flops_lookup(kind, expected):
    class Dev:
        device_kind = kind

    assert peaks.peak_flops_per_device(Dev()) == expected
    assert peaks.peak_flops_per_device(kind) == expected


def test_peak_for_real_cpu_device_is_none():
    import jax

    assert peaks.peak_flops_per_device(jax.devices("cpu")[0]) is None


def test_mfu():
    assert peaks.mfu(1000.0, 1e9, 4, 1e12) == pytest.approx(1000 * 1e9 / 4e12)
    assert peaks.mfu(1000.0, 1e9, 4, None) is None


def test_bits_per_byte_and_perplexity():
    assert evaluate.bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert evaluate.bits_per_byte(2.0, 4.0) == pytest.approx(2.0 / math.log(2) / 4.0)
    with pytest.raises(ValueError):
        evaluate.bits_per_byte(1.0, 0.0)
    assert evaluate.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert evaluate.perplexity(1e6) == math.inf


def test_writer_jsonl_and_tensorboard(tmp_path):
    workdir = str(tmp_path / "run")
    w = writers.MetricsWriter(workdir)
    w.write(1, {"loss": 3.5, "lr": 1e-3})
    w.write(2, {"loss": 3.0, "lr": 2e-3, "bad": float("nan")})
    w.write(2, {"loss": 3.2}, split="eval")
    # flushed per write: readable before close.
    recs = writers.read_metrics(workdir)
    assert [(r["step"], r["split"], r["loss"]) for r in recs] == [
        (1, "train", 3.5),
        (2, "train", 3.0),
        (2, "eval", 3.2),
    ]
    assert recs[1]["bad"] == "nan" and "time" in recs[0]
    w.close()
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        json.loads(line)  # every line is valid JSON
    train_events = glob.glob(os.path.join(workdir, "tb", "train", "events.out.tfevents.*"))
    eval_events = glob.glob(os.path.join(workdir, "tb", "eval", "events.out.tfevents.*"))
    assert train_events and eval_events

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(workdir, "tb", "train"))
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 3.5), (2, 3.0)]


def test_writer_appends_and_truncates_on_resume(tmp_path):
    workdir = str(tmp_path)
    w = writers.MetricsWriter(workdir, tensorboard=False)
    for s in range(1, 6):
        w.write(s, {"loss": 10.0 - s})
    w.write(4, {"loss": 1.0}, split="eval")
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "spl')  # torn line from a crash

    resumed = writers.MetricsWriter(workdir, tensorboard=False)
    dropped = resumed.truncate_after(4)
    assert dropped == 4  # train 4, train 5, eval 4, the torn line
    assert [r["step"] for r in writers.read_metrics(workdir)] == [1, 2, 3]
    for s in range(4, 7):
        resumed.write(s, {"loss": 0.5})
    resumed.close()
    steps = [r["step"] for r in writers.read_metrics(workdir)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert len(steps) == len(set(steps))


def test_non_primary_writes_nothing(tmp_path):
    out = io.StringIO()
    w = writers.MetricsWriter(str(tmp_path / "x"), is_primary=False)
    w.write(1, {"loss": 1.0})
    ProgressLine(is_primary=False, stream=out).show(1, {"loss": 1.0})
    w.close()
    assert not os.path.exists(tmp_path / "x")
    assert out.getvalue() == ""
    assert writers.read_metrics(str(tmp_path / "x")) == []


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_plain_and_tty(tmp_path):
    out = io.StringIO()
    w = ProgressLine(total_steps=100, stream=out)
    m = {
        "loss": 2.5,
        "lr": 3e-4,
        "grad_norm": 0.75,
        "tokens_per_s": 12345.6,
        "step_ms": 50.0,
        "mfu": 0.423,
    }
    w.show(10, m)
    line = out.getvalue()
    assert line.endswith("\n") and "\r" not in line
    for piece in ["10/100", "2.5000", "3.00e-04", "0.750", "12,346", "50.0ms", "42.3%", "ETA"]:
        assert piece in line, piece
    assert "ETA 0m04s" in line  # first call: 90 steps * 50 ms from step_ms

    tty = _Tty()
    w2 = ProgressLine(total_steps=None, stream=tty)
    w2.show(3, {"loss": 1.0})
    w2.show(4, {"loss": 0.9})
    text = tty.getvalue()
    assert text.count("\r") == 2 and "\n" not in text
    assert "MFU n/a" in text and "ETA n/a" in text and "tok/s n/a" in text
    w2.close()
    assert tty.getvalue().endswith("\n")
