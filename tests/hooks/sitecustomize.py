"""Fault injection for the processes a test starts; nothing here is part of the library.

Python imports `sitecustomize` by itself at start-up, so a test that puts this folder first on the
child's PYTHONPATH (helpers.fault_env) gets these hooks into `llama-adapter finetune` processes,
including the ranks that `--devices N` or torchrun start:

- LLAMA_ADAPTER_TEST_CRASH_RANK=r: rank r fails after the backward of optimizer step
  LLAMA_ADAPTER_TEST_CRASH_STEP (default 1): exits with code 17, or sleeps forever with
  LLAMA_ADAPTER_TEST_CRASH_MODE=hang (to check that the other ranks do not wait forever).
- LLAMA_ADAPTER_TEST_KILL_AT=k: the process SIGKILLs itself at its k-th event. Events are optimizer
  steps and the file operations (write, rename, delete) of the run under
  LLAMA_ADAPTER_TEST_KILL_DIR; LLAMA_ADAPTER_TEST_KILL_ON=name counts only events of that name
  (`step`, `torch.save`, `save_file`, `write_text`, `os.replace`, `shutil.rmtree`). A write chosen
  at an even k is torn: the file is written, cut to half its size, then the process dies.
"""

import os

if os.environ.get("LLAMA_ADAPTER_TEST_CRASH_RANK") or os.environ.get("LLAMA_ADAPTER_TEST_KILL_AT"):
    import pathlib
    import shutil
    import signal
    import sys
    import time

    import torch

    import llama_adapter.adapter
    from llama_adapter.distributed import Parallel
    from llama_adapter.train.recipe import Recipe

    def _crash_after_backward(real):
        rank, at = (
            int(os.environ["LLAMA_ADAPTER_TEST_CRASH_RANK"]),
            int(os.environ.get("LLAMA_ADAPTER_TEST_CRASH_STEP", "1")),
        )
        mode = os.environ.get("LLAMA_ADAPTER_TEST_CRASH_MODE", "exit")

        def after_backward(self, step):
            if self.rank == rank and step + 1 >= at:
                print(f"[rank {rank}] simulated failure ({mode}) at step {step + 1}", file=sys.stderr, flush=True)
                while mode == "hang":
                    time.sleep(3600)
                os._exit(17)
            return real(self, step)

        return after_backward

    if os.environ.get("LLAMA_ADAPTER_TEST_CRASH_RANK"):
        Parallel.after_backward = _crash_after_backward(Parallel.after_backward)

    if os.environ.get("LLAMA_ADAPTER_TEST_KILL_AT"):
        kill_at = int(os.environ["LLAMA_ADAPTER_TEST_KILL_AT"])
        kill_on = os.environ.get("LLAMA_ADAPTER_TEST_KILL_ON")
        run_dir = os.path.realpath(os.environ.get("LLAMA_ADAPTER_TEST_KILL_DIR", "/"))
        seen = [0]

        def _die(name, path=None):
            print(f"killed at event {seen[0]} ({name} {path or ''})", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        def _event(name, real, path_arg=None, writes=False):
            def hooked(*args, **kwargs):
                path = None if path_arg is None else args[path_arg] if len(args) > path_arg else None
                ours = path is None or os.path.realpath(str(path)).startswith(run_dir)
                if ours and kill_on in (None, name):
                    seen[0] += 1
                    if seen[0] == kill_at:
                        if writes and kill_at % 2 == 0:
                            out = real(*args, **kwargs)
                            with open(path, "r+b") as f:
                                f.truncate(os.path.getsize(path) // 2)
                            _die(f"torn {name}", path)
                            return out
                        _die(name, path)
                return real(*args, **kwargs)

            return hooked

        Recipe.step = _event("step", Recipe.step)
        torch.save = _event("torch.save", torch.save, 1, writes=True)
        llama_adapter.adapter.save_file = _event("save_file", llama_adapter.adapter.save_file, 1, writes=True)
        pathlib.Path.write_text = _event("write_text", pathlib.Path.write_text, 0, writes=True)
        os.replace = _event("os.replace", os.replace, 0)
        shutil.rmtree = _event("shutil.rmtree", shutil.rmtree, 0)
