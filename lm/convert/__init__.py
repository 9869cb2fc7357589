"""Hugging Face checkpoints <-> lm run workdirs (GPT-2, Llama, Mistral, Mixtral, Qwen2).

`import_hf(hf_dir, workdir)` and `export_hf(workdir, out_dir)` (lm/convert/workdir.py); the
per-family config and tensor mappings are in gpt2.py and llama.py.
"""
