"""seqio Task registrations for `lm` (see data_mixtures/text.py)."""

from data_mixtures.text import register_text_task, task_name_for

__all__ = ["register_text_task", "task_name_for"]
