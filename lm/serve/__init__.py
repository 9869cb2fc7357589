"""`lm serve`: an OpenAI-compatible HTTP server over the generation engine (FastAPI + uvicorn).

`create_app(engine, model_name=...)` builds the app (lm/serve/app.py); `ServerThread` runs one
in a background thread for tests, the speedrun and benchmarks (lm/serve/runner.py).
"""
