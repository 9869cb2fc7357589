"""Training metrics: FLOPs and MFU accounting, a metrics.jsonl + TensorBoard writer, progress line.

Why this exists: every run should leave behind numbers a person can compare across machines and
resumptions. `metrics.jsonl` is the source of truth (one JSON object per logged step, read back by
`read_metrics` and by the report); TensorBoard event files are the live view. MFU (model FLOPs
utilisation) is computed from the analytic FLOP count of the model, not from what XLA executes, so
rematerialisation does not inflate it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

# ----------------------------------------------------------------------------------------------
# Model size and FLOPs.
# ----------------------------------------------------------------------------------------------


def _dims(model_cfg: Any) -> tuple[int, int, int, int, int, int, int]:
    """(layers, d_model, heads, kv_heads, head_dim, d_ff, vocab) with the 0-means-default rules."""
    num_heads = int(model_cfg.num_heads)
    d_model = int(model_cfg.d_model)
    head_dim = int(model_cfg.head_dim) or d_model // num_heads
    num_kv_heads = int(model_cfg.num_kv_heads) or num_heads
    return (
        int(model_cfg.num_layers),
        d_model,
        num_heads,
        num_kv_heads,
        head_dim,
        int(model_cfg.d_ff),
        int(model_cfg.vocab_size),
    )


def _mlp_matrices(model_cfg: Any) -> int:
    mlp = str(model_cfg.mlp)
    if mlp == "gelu":
        return 2  # up [d_model, d_ff], down [d_ff, d_model]
    if mlp == "swiglu":
        return 3  # gate and up [d_model, d_ff], down [d_ff, d_model]
    raise ValueError(f"unknown mlp {mlp!r}; expected gelu or swiglu")


def matmul_param_count(model_cfg: Any) -> int:
    """Weights that take part in a matmul per token: attention + MLP per layer, plus the LM head.

    This is the N of the PaLM 6N formula: the input embedding is a lookup (no FLOPs) and is
    excluded, but the LM head [d_model, vocab] is a real matmul and counts whether or not it is tied
    to the embedding. Biases and norm scales are not matmuls and are excluded.
    """
    layers, d, h, kv, hd, d_ff, vocab = _dims(model_cfg)
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d  # q, k, v (GQA: kv heads), out
    mlp = _mlp_matrices(model_cfg) * d * d_ff
    return layers * (attn + mlp) + d * vocab


def model_flops_per_token(model_cfg: Any, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) following PaLM (Chowdhery et al. 2022, App. B).

    FLOPs = 6 N + 12 L H Q T, where
      * N = `matmul_param_count`: q [d, H*Q], k and v [d, KV*Q] each (grouped-query attention makes
        these smaller), output [H*Q, d], the MLP (2 matrices for gelu, 3 for swiglu) and the
        LM head [d, vocab]. A matmul of a [1, n] activation with an [n, m] weight is 2nm FLOPs
        forward; the backward pass costs twice the forward (grads w.r.t. inputs and weights),
        hence 3 x 2N = 6N.
      * 12 L H Q T is attention itself: per layer and token, QK^T ([T, Q] x [Q, T] per head) and
        AV each cost 2 T H Q FLOPs forward, so 4 L H Q T forward and 12 L H Q T for training.
        Following PaLM, this is NOT halved for the causal mask (the full T x T score matrix is
        counted), so MFU is comparable with published PaLM-convention numbers.
    Q = head_dim, H = num_heads (the query heads: K/V sharing in GQA does not shrink the score
    matmuls), T = seq_len. Norms, softmax, activations and the embedding lookup are ignored.
    """
    layers, _, h, _, hd, _, _ = _dims(model_cfg)
    n = matmul_param_count(model_cfg)
    return float(6 * n + 12 * layers * h * hd * int(seq_len))


def param_count(model_cfg: Any) -> int:
    """Number of parameters of the model, by formula (to cross-check against the real pytree).

    Assumed layout (pre-norm decoder):
      * token embedding [vocab, d_model]; learned positions [max_seq_len, d_model] when
        position == "learned" (rope has none);
      * per layer: 2 norms; q [d, H*Q], k and v [d, KV*Q], out [H*Q, d], each with a bias when
        use_bias; MLP gelu: up [d, d_ff] + down [d_ff, d]; swiglu: gate and up [d, d_ff] + down,
        biases when use_bias;
      * a final norm; an untied LM head [d, vocab] (never a bias) when tie_embeddings is false.
    A layernorm has a scale [d] and, when use_bias, a bias [d]; an rmsnorm only a scale.
    """
    layers, d, h, kv, hd, d_ff, vocab = _dims(model_cfg)
    use_bias = bool(getattr(model_cfg, "use_bias", False))
    norm = str(getattr(model_cfg, "norm", "layernorm"))
    mlp_mats = _mlp_matrices(model_cfg)

    total = vocab * d
    if str(getattr(model_cfg, "position", "rope")) == "learned":
        total += int(model_cfg.max_seq_len) * d

    norm_params = d * (2 if (norm == "layernorm" and use_bias) else 1)
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    if use_bias:
        attn += h * hd + 2 * kv * hd + d
    mlp = mlp_mats * d * d_ff
    if use_bias:
        mlp += (mlp_mats - 1) * d_ff + d
    total += layers * (attn + mlp + 2 * norm_params)
    total += norm_params  # final norm
    if not bool(model_cfg.tie_embeddings):
        total += d * vocab
    return total


# ----------------------------------------------------------------------------------------------
# Peak FLOP/s and MFU.
# ----------------------------------------------------------------------------------------------

# Dense (no structured sparsity) bf16 peak FLOP/s per chip. Sources: Google Cloud TPU system
# architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e: 275, 197, 459, 918 TFLOP/s
# bf16 per chip) and NVIDIA datasheets (A100: 312 TFLOP/s bf16 dense; H100 SXM5 and H200 SXM:
# 989 TFLOP/s bf16 dense, the often-quoted 1979 is with 2:4 sparsity; H100 PCIe: 756).
PEAK_FLOPS: dict[str, float] = {
    "tpu_v4": 275e12,
    "tpu_v5e": 197e12,
    "tpu_v5p": 459e12,
    "tpu_v6e": 918e12,
    "a100": 312e12,
    "h100_sxm": 989e12,
    "h100_pcie": 756e12,
    "h200": 989e12,
}


def _peak_key(device_kind: str) -> str | None:
    """Maps a `jax.Device.device_kind` string to a PEAK_FLOPS key (None when unknown)."""
    kind = " ".join(device_kind.lower().replace("-", " ").replace("_", " ").split())
    if "tpu" in kind:
        # Order matters: "TPU v5 lite" (v5e) must be matched before the bare "TPU v5" (v5p).
        if "v6" in kind:
            return "tpu_v6e" if ("lite" in kind or "v6e" in kind) else None
        if "v5" in kind:
            return "tpu_v5e" if ("lite" in kind or "v5e" in kind) else "tpu_v5p"
        if "v4" in kind:
            return None if "lite" in kind else "tpu_v4"
        return None
    if "h200" in kind:
        return "h200"
    if "h100" in kind:
        return "h100_pcie" if "pcie" in kind else "h100_sxm"
    if "a100" in kind:
        return "a100"
    return None


def peak_flops_per_device(device: Any) -> float | None:
    """Dense bf16 peak FLOP/s of one device (a `jax.Device` or its device_kind string).

    None for CPUs and unknown accelerators, so callers print "n/a" instead of a made-up MFU.
    """
    kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
    key = _peak_key(str(kind or ""))
    return PEAK_FLOPS[key] if key else None


def mfu(
    tokens_per_s: float, flops_per_token: float, num_devices: int, peak: float | None
) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over the devices' summed peak.

    `tokens_per_s` is the global throughput (all devices). None when the peak is unknown.
    """
    if peak is None or peak <= 0 or num_devices <= 0:
        return None
    return float(tokens_per_s) * float(flops_per_token) / (float(num_devices) * float(peak))


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
    """Converts a per-token cross-entropy in nats into bits per UTF-8 byte.

    Tokenizer-independent: bits/byte = loss / ln 2 / (bytes per token). Lets runs with different
    vocabularies be compared.
    """
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    return float(loss_nats_per_token) / math.log(2.0) / float(bytes_per_token)


def perplexity(loss_nats_per_token: float) -> float:
    """exp(loss); inf instead of an OverflowError for diverged runs."""
    try:
        return math.exp(float(loss_nats_per_token))
    except OverflowError:
        return math.inf


# ----------------------------------------------------------------------------------------------
# Writing and reading metrics.
# ----------------------------------------------------------------------------------------------

METRICS_FILE = "metrics.jsonl"


def _is_remote(path: str) -> bool:
    return "://" in path


def _join(workdir: str, name: str) -> str:
    return workdir.rstrip("/") + "/" + name if _is_remote(workdir) else os.path.join(workdir, name)


def _tf():
    """Imports TensorFlow lazily (slow import) and hides GPUs from it so JAX keeps them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # Already initialised; devices were hidden by the first call.
    return tf


def _read_text(path: str) -> str | None:
    if _is_remote(path):
        tf = _tf()
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path, "r") as f:
            return f.read()
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _write_text(path: str, text: str) -> None:
    if _is_remote(path):
        with _tf().io.gfile.GFile(path, "w") as f:
            f.write(text)
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _parse_lines(text: str) -> list[dict]:
    """JSON objects, one per line; a torn last line (crash mid-write) is skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def read_metrics(workdir: str) -> list[dict]:
    """All records of `<workdir>/metrics.jsonl` in file order ([] when there is none)."""
    text = _read_text(_join(workdir, METRICS_FILE))
    return _parse_lines(text) if text else []


def _json_value(v: Any) -> Any:
    """Scalars (python, numpy, 0-d jax arrays) as JSON-able python values; NaN/inf kept as str."""
    if isinstance(v, bool | int | str) or v is None:
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isfinite(f):
        if isinstance(v, float):
            return f
        return int(f) if f.is_integer() and "int" in type(v).__name__.lower() else f
    return str(f)  # "nan", "inf": json.dumps would write invalid JSON otherwise.


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _fmt_num(v: float | None, spec: str) -> str:
    if v is None:
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return format(f, spec) if math.isfinite(f) else str(f)


def _first(metrics: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in metrics and metrics[k] is not None:
            return metrics[k]
    return None


class MetricsWriter:
    """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard (`<workdir>/tb/<split>`).

    Only the primary host (jax.process_index() == 0) writes; on other hosts every method is a
    no-op, so the trainer can call it unconditionally. The JSONL file is appended to (a resumed run
    keeps its history); call `truncate_after(step)` on resume to drop records at or after the
    resumed step so no step appears twice. Each record gets a `time` field (unix seconds) unless
    one is given, which the report uses for wall time.

    Keys understood by `progress`: loss, lr (or learning_rate), grad_norm, tokens_per_s, step_ms
    (or step_time_s), mfu.
    """

    def __init__(
        self,
        workdir: str,
        *,
        is_primary: bool = True,
        total_steps: int | None = None,
        stream: TextIO | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.workdir = workdir
        self.is_primary = is_primary
        self.total_steps = total_steps
        self.path = _join(workdir, METRICS_FILE)
        self._stream = stream
        self._tensorboard = tensorboard
        self._tb_writers: dict[str, Any] = {}
        self._remote_lines: list[str] | None = None  # GCS cannot append: keep and rewrite.
        self._file: TextIO | None = None
        self._progress_start: tuple[float, int] | None = None
        self._open_line = False  # a carriage-return progress line is on screen
        self._closed = False
        if not is_primary:
            return
        if _is_remote(workdir):
            tf = _tf()
            tf.io.gfile.makedirs(workdir)
            text = _read_text(self.path) or ""
            self._remote_lines = [ln for ln in text.splitlines() if ln.strip()]
        else:
            os.makedirs(workdir, exist_ok=True)

    # -- JSONL -----------------------------------------------------------------------------------

    def _append(self, line: str) -> None:
        if self._remote_lines is not None:
            self._remote_lines.append(line)
            _write_text(self.path, "\n".join(self._remote_lines) + "\n")
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        self._file.write(line + "\n")
        self._file.flush()

    def truncate_after(self, step: int) -> int:
        """Drops records with step >= `step` (call on resume from `step`); returns how many.

        The resumed run re-logs those steps, so without this metrics.jsonl would hold them twice.
        TensorBoard events cannot be rewritten; TensorBoard shows the newer points on top.
        """
        if not self.is_primary:
            return 0
        if self._file is not None:
            self._file.close()
            self._file = None
        text = _read_text(self.path)
        if text is None:
            return 0
        kept, dropped = [], 0
        for line in text.splitlines():
            if not line.strip():
                continue
            records = _parse_lines(line)
            if not records:
                dropped += 1  # a torn line from a crash: drop it too.
                continue
            s = records[0].get("step")
            if isinstance(s, int | float) and s >= step:
                dropped += 1
                continue
            kept.append(line)
        _write_text(self.path, "".join(ln + "\n" for ln in kept))
        if self._remote_lines is not None:
            self._remote_lines = kept
        return dropped

    # -- writing ---------------------------------------------------------------------------------

    def _tb_writer(self, split: str):
        writer = self._tb_writers.get(split)
        if writer is None:
            tf = _tf()
            writer = tf.summary.create_file_writer(_join(_join(self.workdir, "tb"), split))
            self._tb_writers[split] = writer
        return writer

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        """Records `metrics` (scalars) at `step` under `split` ("train", "eval", ...)."""
        if not self.is_primary:
            return
        record: dict[str, Any] = {"step": int(step), "split": split}
        for k, v in metrics.items():
            if k in ("step", "split"):
                continue
            record[k] = _json_value(v)
        record.setdefault("time", time.time())
        self._append(json.dumps(record, sort_keys=False))

        if self._tensorboard:
            tf = _tf()
            writer = self._tb_writer(split)
            with writer.as_default():
                for k, v in record.items():
                    if k in ("step", "split", "time"):
                        continue
                    try:
                        value = float(v)
                    except (TypeError, ValueError):
                        continue
                    tf.summary.scalar(k, value, step=int(step))
            writer.flush()

    # -- progress --------------------------------------------------------------------------------

    def _eta_seconds(self, step: int, metrics: Mapping[str, Any]) -> float | None:
        if not self.total_steps:
            return None
        remaining = max(0, self.total_steps - step)
        now = time.monotonic()
        if self._progress_start is None:
            self._progress_start = (now, step)
        t0, s0 = self._progress_start
        if step > s0 and now > t0:
            return remaining * (now - t0) / (step - s0)
        step_ms = _first(metrics, "step_ms")
        if step_ms is None and _first(metrics, "step_time_s") is not None:
            step_ms = float(metrics["step_time_s"]) * 1e3
        if step_ms is None:
            return None
        return remaining * float(step_ms) / 1e3

    def format_progress(self, step: int, metrics: Mapping[str, Any]) -> str:
        """The progress line for `step` (no carriage return); see `progress`."""
        total = f"/{self.total_steps}" if self.total_steps else ""
        width = len(str(self.total_steps)) if self.total_steps else 0
        step_ms = _first(metrics, "step_ms")
        if step_ms is None and _first(metrics, "step_time_s") is not None:
            step_ms = float(metrics["step_time_s"]) * 1e3
        m = _first(metrics, "mfu")
        eta = self._eta_seconds(step, metrics)
        parts = [
            f"step {step:>{width}d}{total}",
            f"loss {_fmt_num(_first(metrics, 'loss'), '.4f')}",
            f"lr {_fmt_num(_first(metrics, 'lr', 'learning_rate'), '.2e')}",
            f"gnorm {_fmt_num(_first(metrics, 'grad_norm'), '.3f')}",
            f"tok/s {_fmt_num(_first(metrics, 'tokens_per_s'), ',.0f')}",
            f"step {_fmt_num(step_ms, '.1f')}ms",
            f"MFU {_fmt_num(None if m is None else 100 * float(m), '.1f')}"
            + ("%" if m is not None else ""),
            f"ETA {_fmt_duration(eta) if eta is not None else 'n/a'}",
        ]
        return " | ".join(parts)

    def progress(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Prints a one-line status; overwritten in place (carriage return) on a TTY."""
        if not self.is_primary:
            return
        stream = self._stream or sys.stdout
        line = self.format_progress(step, metrics)
        isatty = getattr(stream, "isatty", lambda: False)()
        if isatty:
            stream.write("\r\x1b[2K" + line)
            self._open_line = True
        else:
            stream.write(line + "\n")
        stream.flush()

    def close(self) -> None:
        """Flushes and closes the files; ends an open progress line."""
        if self._closed:
            return
        self._closed = True
        if self._open_line:
            stream = self._stream or sys.stdout
            stream.write("\n")
            stream.flush()
            self._open_line = False
        if self._file is not None:
            self._file.close()
            self._file = None
        for writer in self._tb_writers.values():
            writer.flush()
            writer.close()
        self._tb_writers.clear()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "METRICS_FILE",
    "PEAK_FLOPS",
    "MetricsWriter",
    "bits_per_byte",
    "matmul_param_count",
    "mfu",
    "model_flops_per_token",
    "param_count",
    "peak_flops_per_device",
    "perplexity",
    "read_metrics",
]
