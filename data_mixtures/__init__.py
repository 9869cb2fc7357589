"""seqio Task and Mixture registrations for `lm`.

`text.py` registers a Task per data config at run time; `objectives.py` holds the masked-LM
preprocessors. A module of your own here (e.g. `my_mixture.py` calling `seqio.TaskRegistry.add` /
`seqio.MixtureRegistry.add` at import) is imported by `lm train` before it looks up
`--config.data.task=NAME`, so registering by name needs no other wiring.
"""

import importlib
import pkgutil

from data_mixtures.text import register_text_task, task_name_for

__all__ = ["load_registrations", "register_text_task", "task_name_for"]


def load_registrations() -> None:
    """Imports every module of this package, so its import-time registrations run (once)."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
