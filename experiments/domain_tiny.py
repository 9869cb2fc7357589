"""Domain adaptation of a `tiny` run (--init=W) from code to prose (the stdlib's .rst/.txt
files) with 25% replay of code; lm_py_perplexity before and after measures the forgetting."""

from lm.config import default_config, mixture_component


def get_config():
    c = default_config()
    c.description = __doc__.strip().splitlines()[0]
    c.finetune.update(method="lm", domain="prose", eval_tasks="lm_py_perplexity", eval_limit=20)
    c.data.update(seq_len=128, batch_size=16, max_documents=600)
    c.data.mixture = dict(
        prose=mixture_component(c.data, 0.75, source="stdlib", include="*.rst,*.txt"),
        code=mixture_component(c.data, 0.25, source="stdlib", include="*.py"),
    )
    c.data.source = "mixture"
    c.optim.update(lr=1e-3, warmup_steps=10, weight_decay=0.0)
    c.train.update(steps=100, log_every=10, eval_every=50, checkpoint_every=50, steps_per_call=10)
    return c
