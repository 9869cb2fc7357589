"""The data-curation stage: collect, clean, filter, deduplicate and report pretraining data.

`lm data run --pipeline=NAME --output=DIR` (cli.py) runs a named config from `pipelines/` as an
Apache Beam pipeline (pipeline.py): sources -> one per-document chain (chain.py: decode, clean,
langid, quality filters, blocklists, PII, decontamination) -> shuffle-based exact and MinHash
near-duplicate removal -> sharded ArrayRecord documents, JSONL rejects, manifest and report.
`lm.curate.output.read_documents(DIR)` reads the result back.
"""
