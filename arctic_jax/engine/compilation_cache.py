"""The persistent XLA compilation cache: where it lives, turning it on, and what it saved.

``configure_compilation_cache(setting)`` takes what ``--compilation-cache-dir`` (and the
``compilation_cache_dir`` keyword of ``LLM`` and ``Embedder``) says:

- ``"auto"`` (the default): ``<root>/xla/<key>``, ``<root>`` being ``$ARCTIC_JAX_CACHE`` or
  ``~/.cache/arctic-jax`` (the converted weights' cache root), ``<key>`` naming the jax and
  jaxlib versions, the backend and the device kind (``cache_key``), so that a jax upgrade or
  another device never reads programs compiled for something else (jax's own entry keys cover
  these too; separate directories keep them apart and easy to delete). A cache directory the
  user already gave jax (``JAX_COMPILATION_CACHE_DIR``, ``jax.config``) is kept, and jax's
  cache left off where the user turned it off (``jax_enable_compilation_cache``).
- ``"none"`` or None: off (jax's ``jax_enable_compilation_cache`` false, so a later
  ``"auto"`` in this process leaves it off too).
- any other string: that directory.

In short, ``"auto"`` keeps what this process has configured and sets the default directory
only where nothing is.

Every program is cached, however small or quick to compile. ``CompilationCacheStats`` counts,
through ``jax.monitoring``, the programs loaded from the cache and those compiled.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings
from typing import Any

import jax

from arctic_jax.cache_root import cache_root

log = logging.getLogger(__name__)

AUTO = "auto"
OFF = "none"
SUBDIR = "xla"

HIT_EVENT = "/jax/compilation_cache/cache_hits"                 # an executable read back
# One per program jax needs (an XLA compilation or a cache hit: it times both).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def cache_key(jax_version: str, jaxlib_version: str, backend: str, device_kind: str) -> str:
    """The directory name of one jax/jaxlib version pair, backend and device kind, e.g.
    ``jax-0.10.2_jaxlib-0.10.2_gpu_NVIDIA-H100-80GB-HBM3`` (characters other than letters,
    digits, ``.`` and ``-`` become ``-``)."""
    parts = (f"jax-{jax_version}", f"jaxlib-{jaxlib_version}", backend, device_kind)
    for name, value in zip(("jax_version", "jaxlib_version", "backend", "device_kind"),
                           (jax_version, jaxlib_version, backend, device_kind), strict=True):
        if not str(value).strip():
            raise ValueError(f"cache_key: {name} is empty")
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", str(p).strip()) for p in parts)


def current_cache_key() -> str:
    """``cache_key`` of this process's jax, jaxlib, default backend and first device."""
    import jaxlib

    return cache_key(jax.__version__, jaxlib.__version__, jax.default_backend(),
                     jax.devices()[0].device_kind)


def default_cache_dir() -> str:
    """What ``"auto"`` means here: ``<root>/xla/<key>``."""
    return os.path.join(cache_root(), SUBDIR, current_cache_key())


def resolve_cache_dir(setting: str | os.PathLike | None, *, jax_dir: str | None,
                      jax_enabled: bool) -> str | None:
    """The cache directory ``setting`` asks for (None: off), given jax's current
    ``jax_compilation_cache_dir`` and ``jax_enable_compilation_cache``; see the module
    docstring. ValueError for an empty string."""
    if setting is None:
        return None
    text = os.fspath(setting)
    if not text.strip():
        raise ValueError("compilation cache directory is empty: give a directory, 'auto' or "
                         "'none'")
    if text.lower() == OFF:
        return None
    if text.lower() == AUTO:
        if not jax_enabled:
            return None
        return jax_dir or default_cache_dir()
    return os.path.expanduser(text)


def _switch_jax_cache(directory: str | None) -> None:
    """Point jax's persistent cache at ``directory`` (None: off), dropping the cache jax may
    have opened already (it opens one at its first compilation and keeps it)."""
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_enable_compilation_cache", directory is not None)
    if directory is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor
    jax_cache.reset_cache()


def configure_compilation_cache(setting: str | os.PathLike | None = AUTO) -> CompilationCacheStats:
    """Turn jax's persistent compilation cache on at the directory ``setting`` asks for, or
    off (see the module docstring), and count what it serves from now on.

    An explicit directory that cannot be created is a ValueError naming it; the automatic one
    falls back to no cache, with a warning.
    """
    jax_dir = jax.config.jax_compilation_cache_dir
    jax_enabled = bool(jax.config.jax_enable_compilation_cache)
    directory = resolve_cache_dir(setting, jax_dir=jax_dir, jax_enabled=jax_enabled)
    if directory is None and str(setting).lower() == AUTO:
        return CompilationCacheStats(None)  # the user turned jax's cache off: left as it is
    if directory is not None:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            if str(setting).lower() != AUTO:
                raise ValueError(f"cannot create the compilation cache directory {directory}: "
                                 f"{e}") from None
            warnings.warn(f"compilation cache off: cannot create {directory}: {e}", stacklevel=2)
            directory = None
    if directory != jax_dir or (directory is not None) != jax_enabled:
        _switch_jax_cache(directory)
    log.debug("persistent compilation cache: %s", directory or "off")
    return CompilationCacheStats(directory)


@dataclasses.dataclass(eq=False)
class CompilationCacheStats:
    """Programs loaded from the persistent cache (``loaded``) and compiled by XLA
    (``compiled``) in this process while counting (from construction until ``stop``).

    ``directory``: the cache directory, or None when the cache is off. The counts are
    process-wide: another thread's compilations count too.
    """

    directory: str | None
    loaded: int = 0
    requested: int = 0      # programs jax compiled or loaded

    @property
    def compiled(self) -> int:
        """Programs XLA compiled (those jax needed and did not load)."""
        return max(0, self.requested - self.loaded)

    def __post_init__(self) -> None:
        self.counting = True
        jax.monitoring.register_event_listener(self._on_event)
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)

    def stop(self) -> None:
        """Stop counting (idempotent)."""
        if self.counting:
            self.counting = False
            jax.monitoring.unregister_event_listener(self._on_event)
            jax.monitoring.unregister_event_duration_listener(self._on_duration)

    def _on_event(self, event: str, **kwargs: Any) -> None:
        if event == HIT_EVENT:
            self.loaded += 1

    def _on_duration(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == COMPILE_EVENT:
            self.requested += 1

    def summary(self) -> str:
        """One line: where the cache is and how many programs it served."""
        if self.directory is None:
            return f"compilation cache off: {self.compiled} programs compiled"
        return (f"compilation cache {self.directory}: {self.loaded} programs loaded, "
                f"{self.compiled} compiled")
