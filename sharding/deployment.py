"""A model placed on a (sp, tp) mesh, with one KV-cache sharding and one weight copy per variant.

The TP variant holds every weight matrix split P ways; the SP variant holds it
split TP ways (replicated over sp). Shift mode keeps both copies: the extra
memory over the SP copy alone is 1/SP of it. Both variants' programs take and
return the cache with the same NamedSharding and donate it, so a step of
either kind leaves the cache where it was.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from arctic_jax.config import ModelConfig
from arctic_jax.kv_cache import KVCache
from arctic_jax.models.llama import StepOptions, forward
from arctic_jax.models.llama_weights import LlamaWeights
from sharding.mesh import ParallelConfig, make_mesh
from sharding.placement import HeadPlacement, place_weights, placed_config, plan_heads
from sharding.rules import (ActivationSharding, dataclass_shardings, kv_cache_sharding,
                            variant_rules)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ParallelDeployment:
    parallel: ParallelConfig
    mesh: Mesh
    cfg: ModelConfig               # the placed config (heads padded / replicated)
    plan: HeadPlacement
    weights: dict[str, LlamaWeights]
    split_vocab: bool = True

    @classmethod
    def create(cls, cfg: ModelConfig, weights: LlamaWeights, parallel: ParallelConfig,
               *, allow_head_padding: bool = True,
               devices: list[jax.Device] | None = None) -> "ParallelDeployment":
        mesh = make_mesh(parallel, devices)
        P = parallel.num_devices
        plan = plan_heads(cfg, P, allow_padding=allow_head_padding)
        pcfg = placed_config(cfg, plan)
        tp = parallel.tensor_parallel_size
        for name, size in (("intermediate_size", cfg.intermediate_size),):
            if size % P:
                raise ValueError(f"{name} {size} is not divisible by {P} devices")
        if pcfg.num_kv_heads % P or pcfg.num_heads % tp:
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
        dep = cls(parallel=parallel, mesh=mesh, cfg=pcfg, plan=plan, weights=copies,
                  split_vocab=split_vocab)
        dep.log_memory()
        return dep

    # ---------------------------------------------------------------- layout
    @property
    def cache_sharding(self) -> NamedSharding:
        return kv_cache_sharding(self.mesh)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def cache_shardings(self, cache: KVCache) -> KVCache:
        return jax.tree_util.tree_map(lambda _: self.cache_sharding, cache)

    def weight_shardings(self, variant: str) -> LlamaWeights:
        return jax.tree_util.tree_map(lambda x: x.sharding, self.weights[variant])

    def allocate_cache(self, num_pages: int, page_size: int, dtype: Any) -> KVCache:
        """A zeroed cache created directly in its sharded layout."""
        shape = (self.cfg.num_kv_heads, num_pages, page_size, self.cfg.head_dim)
        make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self.cache_sharding)
        return KVCache(k=tuple(make() for _ in range(self.cfg.num_layers)),
                       v=tuple(make() for _ in range(self.cfg.num_layers)), page_size=page_size)

    def options(self, variant: str, base: StepOptions = StepOptions()) -> StepOptions:
        return dataclasses.replace(base, sharding=ActivationSharding(self.mesh, variant,
                                                                     self.split_vocab))

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

    # ------------------------------------------------------------------ jit
    def jit_engine_model_step(self, variant: str, base: StepOptions) -> Callable:
        """Jitted engine model step for one variant (see ``model_runner.model_step``):
        ``(weights, cache, token_buffer, packed, layout) -> (cache, logits)``, cache donated."""
        from arctic_jax.engine.model_runner import model_step

        fn = functools.partial(model_step, cfg=self.cfg, opts=self.options(variant, base))
        cache_sh, rep = self.cache_sharding, self.replicated
        return jax.jit(fn, donate_argnums=(1,), static_argnums=(4,),
                       in_shardings=(self.weight_shardings(variant), cache_sh, rep, rep),
                       out_shardings=(cache_sh, rep))

    def jit_model_step(self, variant: str, base: StepOptions = StepOptions()) -> Callable:
        """Jitted ``(weights, cache, batch) -> (logits, cache)`` for one variant; cache donated."""
        fn = functools.partial(forward, cfg=self.cfg, opts=self.options(variant, base))
        cache_sh = self.cache_sharding
        return jax.jit(fn, donate_argnums=(1,),
                       in_shardings=(self.weight_shardings(variant), cache_sh, self.replicated),
                       out_shardings=(self.replicated, cache_sh))
