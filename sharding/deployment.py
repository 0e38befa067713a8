"""Where a model lives: a mesh of one or more devices, one weight copy per step variant, and one
KV-cache sharding. This module places arrays and hands out shardings; it compiles nothing
(the engine's ``programs`` module is the one place that jits steps).

- One device is a one-device deployment with the single variant ``"single"``: no activation
  constraints, everything on the device that holds the weights.
- On P = SP x TP devices the TP variant holds every weight matrix split P ways; the SP variant
  holds it split TP ways (replicated over sp). Shift mode keeps both copies: the extra memory
  over the SP copy alone is 1/SP of it. Both variants' programs take and return the cache
  with the same NamedSharding, so a step of either kind leaves the cache where it was.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from arctic_jax.config import ModelConfig
from arctic_jax.kv_cache import KVCache
from sharding.mesh import ParallelConfig, make_mesh
from sharding.placement import HeadPlacement, place_weights, placed_config, plan_heads
from sharding.rules import (
    ActivationSharding,
    dataclass_shardings,
    kv_cache_sharding,
    replicated,
    variant_rules,
)

log = logging.getLogger(__name__)

SINGLE = "single"
_ONE_DEVICE = ParallelConfig(1, 1, "tp")


def _weights_device(weights: Any) -> jax.Device:
    """The device holding a one-device model's weights; the default device (``jax.default_device``)
    for host arrays. Weights spread over several devices are an error here."""
    leaf = jax.tree_util.tree_leaves(weights)[0]
    devices = getattr(leaf, "devices", lambda: set())()
    if len(devices) > 1:
        raise ValueError(f"one-device deployment of weights that span {len(devices)} devices")
    if devices:
        return next(iter(devices))
    default = jax.config.jax_default_device or jax.devices()[0]
    return jax.devices(default)[0] if isinstance(default, str) else default


@dataclasses.dataclass
class Deployment:
    parallel: ParallelConfig
    mesh: Mesh
    variants: tuple[str, ...]
    cfg: ModelConfig               # the placed config (heads padded / replicated)
    plan: HeadPlacement
    weights: dict[str, Any]        # one weights pytree per variant
    split_vocab: bool = True

    @classmethod
    def create(cls, cfg: ModelConfig, weights: Any, parallel: ParallelConfig | None = None,
               *, allow_head_padding: bool = True,
               devices: Sequence[jax.Device] | None = None) -> Deployment:
        """Place ``weights`` (any weights dataclass whose fields declare logical axes).

        ``parallel`` None (or one device): a one-device deployment on ``devices[0]``, or on
        the device that holds the weights.
        """
        if parallel is None or parallel.num_devices == 1:
            device = devices[0] if devices else _weights_device(weights)
            mesh = make_mesh(_ONE_DEVICE, [device])
            return cls(parallel=_ONE_DEVICE, mesh=mesh, variants=(SINGLE,), cfg=cfg,
                       plan=plan_heads(cfg, 1),
                       weights={SINGLE: jax.device_put(weights, replicated(mesh))})
        mesh = make_mesh(parallel, devices)
        P = parallel.num_devices
        plan = plan_heads(cfg, P, allow_padding=allow_head_padding)
        pcfg = placed_config(cfg, plan)
        if cfg.intermediate_size % P:
            raise ValueError(f"intermediate_size {cfg.intermediate_size} is not divisible by "
                             f"{P} devices")
        if pcfg.num_kv_heads % P or pcfg.num_heads % parallel.tensor_parallel_size:
            raise ValueError(f"heads ({pcfg.num_heads} q / {pcfg.num_kv_heads} kv after placement) "
                             f"do not split over {P} devices")
        if plan.changes_model:
            log.warning("KV heads replicated x%d and %d zero query heads added to place %d q / %d kv "
                        "heads on %d devices", plan.kv_replication, plan.zero_heads,
                        cfg.num_heads, cfg.num_kv_heads, P)
        placed = place_weights(weights, cfg, plan)
        split_vocab = cfg.vocab_size % P == 0
        if not split_vocab:
            log.warning("vocab %d does not split over %d devices: embedding and LM head replicated",
                        cfg.vocab_size, P)
        copies = {v: jax.device_put(placed, dataclass_shardings(placed, mesh,
                                                                variant_rules(v, split_vocab)))
                  for v in parallel.variants}
        dep = cls(parallel=parallel, mesh=mesh, variants=tuple(parallel.variants), cfg=pcfg,
                  plan=plan, weights=copies, split_vocab=split_vocab)
        dep.log_memory()
        return dep

    # ---------------------------------------------------------------- layout
    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def cache_sharding(self) -> NamedSharding:
        return kv_cache_sharding(self.mesh)

    @property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)

    def cache_shardings(self, cache: Any) -> Any:
        return jax.tree_util.tree_map(lambda _: self.cache_sharding, cache)

    def weight_shardings(self, variant: str) -> Any:
        return jax.tree_util.tree_map(lambda x: x.sharding, self.weights[variant])

    def activation_sharding(self, variant: str) -> ActivationSharding | None:
        """The activation layout of one variant's step (None on one device: no constraints)."""
        if variant == SINGLE:
            return None
        return ActivationSharding(self.mesh, variant, self.split_vocab)

    def allocate_cache(self, num_pages: int, page_size: int, dtype: Any,
                       num_layers: int | None = None) -> KVCache:
        """A zeroed cache (per layer K/V [K', P, PS, D]) created directly in its sharded layout."""
        shape = (self.cfg.num_kv_heads, num_pages, page_size, self.cfg.head_dim)
        layers = self.cfg.num_cache_layers if num_layers is None else num_layers
        make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self.cache_sharding)
        return KVCache(k=tuple(make() for _ in range(layers)),
                       v=tuple(make() for _ in range(layers)), page_size=page_size)

    def log_memory(self) -> None:
        """Log each weight copy's bytes on one device (the shift copy's overhead included)."""
        per_device = {v: sum(int(x.addressable_shards[0].data.size) * x.dtype.itemsize
                             for x in jax.tree_util.tree_leaves(w))
                      for v, w in self.weights.items()}
        total = sum(per_device.values())
        msg = ", ".join(f"{v}: {b / 2**30:.3f} GiB" for v, b in per_device.items())
        extra = ""
        if len(per_device) == 2:
            extra = f" (shift keeps both: +{per_device['tp'] / per_device['sp']:.1%} over SP alone)"
        log.info("weights per device: %s; total %.3f GiB%s", msg, total / 2**30, extra)
        self.weight_bytes_per_device = per_device
