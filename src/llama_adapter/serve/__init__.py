"""OpenAI-compatible HTTP server and a web chat page for a base model plus any number of adapters.

    llama-adapter serve --model stories260k --adapter tiny=runs/tiny --port 8000

- scheduler.py: the engine thread (bounded queue, continuous batching over the one decode engine);
- api.py: the OpenAI request format (parsing, checks, errors);
- http.py: the FastAPI routes and the page at `/`;
- main.py: command-line flags, loading through `loading.load_stack`, uvicorn.
"""

from .api import APIError, ServeOptions
from .http import build_app
from .main import add_arguments, run, serve_main
from .scheduler import Job, QueueFull, Sampling, Scheduler

__all__ = [
    "APIError", "Job", "QueueFull", "Sampling", "Scheduler", "ServeOptions",
    "add_arguments", "build_app", "run", "serve_main",
]  # fmt: skip
