"""What every modality's frozen encoder shares: the `Embedder` interface, batched encoding with a
progress bar, and an on-disk cache of per-file embeddings keyed by the file's sha256.

A modality (image, audio; video and point clouds later) is one module whose encoder satisfies
`Embedder`: a `name`, a `cache_id` that changes whenever its embeddings would, `feature_dim`, and
`embed(items) -> [B, feature_dim]` for one batch of files (or in-memory inputs). `embed_files` then
gives any of them batching, a progress bar and the cache, and `bind.py` binds their outputs to the
image space the same way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..adapter import _atomic_write
from .weights import file_digest


@runtime_checkable
class Embedder(Protocol):
    """A frozen encoder of one modality, as the cache and the bind path see it."""

    name: str

    @property
    def cache_id(self) -> str:
        """Identity for caches: changes when weights, preprocessing or pooling change."""
        ...

    @property
    def feature_dim(self) -> int: ...

    def embed(self, items: Sequence[Any]) -> torch.Tensor:
        """One batch of files (or loaded inputs) -> [len(items), feature_dim] float32."""
        ...


def in_batches(
    items: Sequence[Any], batch_size: int = 32, progress: bool = False, desc: str = "encoding"
) -> Iterator[Sequence[Any]]:
    """`items` in slices of `batch_size`, counted on a progress bar on stderr."""
    with tqdm(total=len(items), desc=desc, file=sys.stderr, dynamic_ncols=True, disable=not progress) as bar:
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            yield chunk
            bar.update(len(chunk))


class EmbeddingCache:
    """Precomputed embeddings, one `<sha256>.safetensors` per input file under
    `directory/<cache_id>/<sha[:2]>/`, written atomically; missing ones computed with `compute`
    (one batch of paths -> [B, *shape]). Keyed by content, so renamed copies are hits."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        cache_id: str,
        shape: tuple[int, ...],
        compute: Callable[[Sequence[Any]], torch.Tensor],
        batch_size: int = 32,
        progress: bool = True,
        desc: str = "encoding",
        what: str = "file",
    ) -> None:
        self.root = Path(directory) / cache_id
        self.shape = tuple(shape)
        self.compute = compute
        self.batch_size = batch_size
        self.progress = progress
        self.desc = desc
        self.what = what  # names the input in errors ("image x.png not found")
        self._hashes: dict[tuple[str, int, int], str] = {}

    def key(self, path: str | os.PathLike[str]) -> str:
        """The file's sha256, memoised per (path, size, mtime) so repeated rows hash once."""
        p = Path(path)
        try:
            st = p.stat()
        except OSError as e:
            raise ValueError(f"{self.what} {p} not found; check the path") from e
        k = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if k not in self._hashes:
            self._hashes[k] = file_digest(p)
        return self._hashes[k]

    def _file(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.safetensors"

    def get(self, paths: Sequence[str | os.PathLike[str]]) -> torch.Tensor:
        """[len(paths), *shape] float32, computing and storing what is missing."""
        rows = self.get_rows(paths)
        return torch.stack(rows) if rows else torch.zeros(0, *self.shape)

    def get_rows(self, paths: Sequence[str | os.PathLike[str]]) -> list[torch.Tensor]:
        """One tensor per path; repeated files share one tensor (captions datasets repeat each
        image several times, and token features are large)."""
        shas = [self.key(p) for p in paths]
        todo: dict[str, str | os.PathLike[str]] = {}
        for s, p in zip(shas, paths):
            if s not in todo and not self._file(s).is_file():
                todo[s] = p
        if todo:
            self._store(list(todo.items()))
        loaded: dict[str, torch.Tensor] = {}
        for s in shas:
            if s not in loaded:
                loaded[s] = self._load(s)
        return [loaded[s] for s in shas]

    def _store(self, items: list[tuple[str, str | os.PathLike[str]]]) -> None:
        # Saved batch by batch and never all held at once: a killed run keeps what it computed, and
        # a token cache of a thousand images would be gigabytes in memory.
        for chunk in in_batches(items, self.batch_size, self.progress, self.desc):
            feats = self.compute([p for _, p in chunk]).cpu()
            for (s, _), f in zip(chunk, feats):
                _atomic_write(self._file(s), lambda t, f=f: save_file({"features": f.contiguous()}, t))

    def _load(self, sha: str) -> torch.Tensor:
        f = load_file(str(self._file(sha)))["features"]
        if tuple(f.shape) != self.shape:
            raise ValueError(
                f"cached features {self._file(sha)} have shape {list(f.shape)}, expected "
                f"{list(self.shape)}; delete {self.root} and re-run"
            )
        return f


def embed_files(
    embedder: Embedder,
    paths: Sequence[str | os.PathLike[str]],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> torch.Tensor:
    """Embeddings [len(paths), feature_dim] of any modality's files; with `cache_dir`, each file's
    embedding is kept under `cache_dir/<embedder.cache_id>/`, so re-runs skip decoding and encoding."""
    desc = f"embedding ({embedder.name})"
    if cache_dir is not None:
        cache = EmbeddingCache(cache_dir, embedder.cache_id, (embedder.feature_dim,), embedder.embed, batch_size,
                               progress, desc)  # fmt: skip
        return cache.get(paths)
    rows = [embedder.embed(chunk).cpu() for chunk in in_batches(list(paths), batch_size, progress, desc)]
    return torch.cat(rows) if rows else torch.zeros(0, embedder.feature_dim)
