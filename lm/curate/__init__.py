"""The data-curation stage: collect, clean, filter, deduplicate and report pretraining data.

`lm data run --pipeline=NAME --output=DIR` (cli.py) runs a named config from `pipelines/` as an
Apache Beam pipeline (pipeline.py): sources (sources.py) -> one per-document chain (chain.py:
decode, clean, URL blocklist, langid, Gopher/C4/FineWeb or code filters, blocklist, PII,
decontamination) -> shuffle-based exact and MinHash near-duplicate removal -> sharded ArrayRecord
documents, JSONL rejects, `manifest.json` and `data_report.{md,json}` (output.py, report.py).
`lm.curate.output.read_documents(DIR)` reads the kept documents back. A run is written into a
staging directory and replaces DIR only when complete and reconciled (publish.py); a failed run
leaves DIR as it was and its report in `DIR.failed/`.

    lm data run --pipeline=stdlib --output=runs/data/stdlib
    lm data run --pipeline=web --output=out --config.source.path=crawl/*.warc.gz \\
        --runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers=2
    lm data run --pipeline=web --output=gs://bucket/out --config.source.path=... \\
        --runner=DataflowRunner --project=P --region=R --temp_location=gs://bucket/tmp \\
        --setup_file=./setup.py
"""
