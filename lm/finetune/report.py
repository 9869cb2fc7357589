"""What `lm finetune` shows: sample replies before and after, `report.md`, and the summary it
prints.

Why: a fine-tuned workdir should explain itself like a pretraining run does: what was tuned
from what and how (method, init, learning rate), on what data (examples kept, records rejected
and why), how the loss went (loss_curve.png from metrics.jsonl), the held-out measure before and
after, and what the model now says. Replies are the engine's greedy answers to a few held-out
prompts, from the init's weights and from the result, so the difference is the training's
alone. The printed summary shows metrics as before -> after and counts as counts (the
validation's token or pair count is how much was measured, not a result).
"""

from __future__ import annotations

from typing import Any

import jax

from lm import storage
from lm.finetune.chat_eval import chat_replies
from lm.finetune.policy import Policy
from lm.inference.engine import Engine
from lm.training import report as run_report
from lm.training.report_plots import plot_loss_curve
from lm.training.writers import read_metrics

SAMPLE_COUNT = 3  # held-out prompts answered before and after
SECTION = "finetune"
# What `validation["weight"]` counts, per method: the measure's size, not a result.
WEIGHT_NAMES = {"sft": "tokens", "rm": "pairs", "dpo": "pairs"}


def prompt_of(item) -> list[dict]:
    """The conversation a held-out item asks: a PreferencePair's or PromptItem's prompt, or a
    conversation up to (without) its last assistant turn."""
    prompt = getattr(item, "prompt", None)
    if prompt is not None:
        return list(prompt)
    last = max(i for i, m in enumerate(item) if m["role"] == "assistant")
    return list(item[:last])


class SampleReplies:
    """Greedy replies to a few held-out prompts through the generation engine, before training
    (`before`) and after (`after`). Every host calls both (generation is a collective on a
    pod). Off for a reward model (its language-model head is not what it trains) and when
    `train.sample_tokens` is 0."""

    def __init__(self, cfg, trainer, model_cfg, vocab):
        self.cfg, self.vocab, self.model_cfg = cfg, vocab, model_cfg
        self.enabled = cfg.finetune.method != "rm" and cfg.train.sample_tokens > 0
        self.policy = Policy(trainer, model_cfg) if self.enabled else None
        self.prompts: list[list[dict]] = []
        self.replies_before: list[str] = []
        self.replies_after: list[str] = []

    def _replies(self, params) -> list[str]:
        engine = Engine(
            self.policy.lm_graphdef,  # one graphdef: the second engine reuses the compiled steps
            self.policy.lm_params(params),
            self.model_cfg,
            self.vocab,
            slots=1 << max(len(self.prompts) - 1, 0).bit_length(),
            rules=tuple(tuple(r) for r in self.cfg.mesh.rules),
        )
        results = chat_replies(engine, self.prompts, self.cfg.train.sample_tokens)
        return [r.text for r in results]

    def before(self, params, held_items: list) -> None:
        """Replies of the init's weights (`params` before any update) to the first held-out
        items' prompts."""
        if self.enabled and held_items:
            self.prompts = [prompt_of(item) for item in held_items[:SAMPLE_COUNT]]
            self.replies_before = self._replies(params)

    def after(self, params) -> None:
        if self.enabled and self.prompts:
            self.replies_after = self._replies(params)

    def records(self) -> list[dict]:
        """[{"prompt": messages, "before": text, "after": text}] for finetune.json."""
        return [
            {"prompt": p, "before": b, "after": a}
            for p, b, a in zip(self.prompts, self.replies_before, self.replies_after)
        ]


# -- report.md ---------------------------------------------------------------------------------


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _metric_rows(record: dict) -> tuple[list[tuple[str, Any, Any]], tuple[str, Any] | None]:
    """([(metric, before, after)], (count name, count) or None) of the validation."""
    before, after = record.get("validation_before") or {}, record.get("validation") or {}
    count = None
    rows = []
    for key in sorted(after):
        if key == "weight":
            name = WEIGHT_NAMES.get(record.get("method"), "weight")
            count = (f"validation {name}", int(after[key]))
        elif isinstance(after[key], int | float):
            rows.append((key, before.get(key), after[key]))
    return rows, count


def _data_lines(data: dict) -> list[str]:
    """The data counts: examples (or prompts) kept, records rejected by reason, examples cut."""
    lines = ["| data | count |", "|---|---|"]
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"| {key.replace('_', ' ')} | {value} |")
    for group in ("rejected", "cut"):
        reasons = data.get(group) or {}
        label = "rejected records" if group == "rejected" else "cut examples"
        lines.append(f"| {label} | {sum(reasons.values())} |")
        lines += [f"| &nbsp;&nbsp;{group}: {k} | {v} |" for k, v in sorted(reasons.items())]
    return [*lines, ""]


def _conversation_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _sample_lines(samples: list[dict]) -> list[str]:
    if not samples:
        return ["_No samples (reward model, or train.sample_tokens=0)._", ""]
    lines = []
    for i, sample in enumerate(samples, 1):
        prompt = _conversation_text(sample["prompt"])
        lines += [f"**Held-out prompt {i}**", ""]
        for label, text in (("prompt", prompt), ("before", sample["before"]),
                            ("after", sample["after"])):  # fmt: skip
            fence = run_report._fence(text)
            lines += [f"{label}:", "", fence, text, fence, ""]
    return lines


def markdown(workdir: str, cfg, record: dict) -> str:
    """The report's fine-tuning section (loss_curve.png is written next to report.md)."""
    ft, optim = cfg.finetune, cfg.optim
    lines = ["## Fine-tuning", "", cfg.get("description", "") or "_No description._", ""]
    lines += [f"Workdir: `{workdir}`", "", "| setting | value |", "|---|---|"]
    lora = f"rank {ft.lora.rank}, alpha {ft.lora.alpha}" if ft.lora.rank > 0 else "off (full)"
    rows = [
        ("method", ft.method),
        ("init", f"`{ft.init}`"),
        ("LoRA", lora),
        ("steps", cfg.train.steps),
        ("batch size x seq len", f"{cfg.data.batch_size} x {cfg.data.seq_len}"),
        ("learning rate", f"{optim.lr:.3g} ({optim.schedule}, warmup {optim.warmup_steps})"),
        ("weight decay", optim.weight_decay),
        ("trainable params", f"{record.get('trainable_params') or 0:,}"),
    ]
    if record.get("recipe"):
        rows.append(("optim from", "the recipe for imported checkpoints (lm/finetune/recipe.py)"))
    if record.get("lr_warning"):
        rows.append(("warning", record["lr_warning"]))
    lines += [f"| {k} | {v} |" for k, v in rows] + ["", "## Data", ""]
    lines += _data_lines(record.get("data") or {})

    metrics, count = _metric_rows(record)
    lines += ["## Validation before and after", "", "| metric | before | after |", "|---|---|---|"]
    lines += [f"| {k} | {_number(b)} | {_number(a)} |" for k, b, a in metrics]
    if count:
        lines += ["", f"Measured on {count[1]:,} held-out {count[0].split()[-1]}."]
    lines += [""]

    lines += ["## Loss curve", ""]
    png = plot_loss_curve(read_metrics(workdir))
    if png is not None:
        storage.write_bytes(storage.join(workdir, run_report.LOSS_CURVE_FILE), png)
        lines += [f"![loss curve]({run_report.LOSS_CURVE_FILE})", ""]
    else:
        lines += ["_No loss metrics were logged._", ""]
    lines += ["## Sample replies (greedy, held-out prompts)", ""]
    lines += _sample_lines(record.get("samples") or [])
    return "\n".join(lines)


def write_report(workdir: str, cfg, record: dict) -> str | None:
    """Writes the "finetune" and "config" sections of report.md on the primary host (sections
    other commands wrote, such as `lm eval`'s, are kept); returns its path."""
    if jax.process_index() != 0:
        return None
    path = run_report.write_report_section(workdir, SECTION, markdown(workdir, cfg, record))
    config = ["## Config", "", "```yaml", *run_report._yamlish(cfg.to_dict()), "```"]
    run_report.write_report_section(workdir, "config", "\n".join(config))
    return path


# -- the printed summary ---------------------------------------------------------------------


def summary_lines(record: dict, report: str | None) -> list[str]:
    """What `lm finetune` prints: each validation metric before -> after, then counts."""
    metrics, count = _metric_rows(record)
    rows = [
        (f"validation {k}", f"{_number(b) if b is not None else 'n/a':>10s} -> {_number(a):>10s}")
        for k, b, a in metrics
    ]
    if count:
        rows.append((count[0], f"{count[1]:>10,}"))
    data = record.get("data") or {}
    rows += [(k.replace("_", " "), f"{v:>10,}") for k, v in data.items() if not isinstance(v, dict)]
    rejected = data.get("rejected") or {}
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items()))
    total = f"{sum(rejected.values()):>10,}"
    rows.append(("rejected records", total + (f"  ({reasons})" if reasons else "")))
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:{width}s} {value}" for label, value in rows]
    return lines + ([f"report: {report}"] if report else [])
