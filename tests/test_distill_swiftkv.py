"""SwiftKV distillation (``arctic-jax distill-swiftkv``): the initialisation rules against numpy;
the dense training forward against the paged serving steps (SwiftKV and Llama) and the float64
oracle of the published SwiftKV forward over the exported tensors; the loss ignores padding;
training on a tiny random Llama lowers the loss and beats the initialisation on held-out rows;
the exported checkpoint (Snowflake's layout) loads back as the trained model; bad arguments fail
clearly; the command end to end on the embedded SmolLM2.
"""
from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
from arctic_jax.config import ConfigError, ModelConfig
from arctic_jax.kv_cache import KVCache
from arctic_jax.models import llama, swiftkv, swiftkv_dense
from arctic_jax.models.llama_weights import (
    LayerWeights,
    LlamaWeights,
    expected_layer_shapes,
    expected_model_shapes,
)
from arctic_jax.models.swiftkv_config import SwiftKVConfig
from arctic_jax.models.swiftkv_weights import SwiftKVWeights
from arctic_jax.training import swiftkv_distill, swiftkv_export, trainer
from checkpoints import load_model
from oracles import rel_err, swiftkv_forward_hf

PS = 4
TOL = 1e-5

# name -> (teacher ModelConfig fields, Lkv, g)
TEACHERS = {
    # GQA 2, Lkv 2 of 4.
    "gqa": (dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=4, num_heads=4,
                 num_kv_heads=2, head_dim=12, max_position_embeddings=128), 2, 1),
    # MQA with attention and MLP biases, tied head, llama3 rope; Lkv 1 of 5, AcrossKV g = 2.
    "across_bias": (dict(vocab_size=89, hidden_size=32, intermediate_size=48, num_layers=5,
                         num_heads=4, num_kv_heads=1, head_dim=8, attention_bias=True, mlp_bias=True,
                         tie_word_embeddings=True, rope_theta=500.0, max_position_embeddings=128,
                         rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0,
                                           original_max_position_embeddings=16)), 1, 2),
}


def teacher(name: str, seed: int = 0, scale: float = 0.15):
    """(teacher cfg, SwiftKV cfg, random teacher weights); a large scale gives peaked logits."""
    fields, lkv, g = TEACHERS[name]
    fields = dict(fields)
    from arctic_jax.config import RopeScaling
    if "rope_scaling" in fields:
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    cfg = ModelConfig(**fields)
    rng = np.random.default_rng(seed)

    def draw(name, shape):
        if shape is None:
            return None
        if name.endswith("norm"):
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(shape), jnp.float32)
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    layers = tuple(LayerWeights(**{n: draw(n, s) for n, s in expected_layer_shapes(cfg).items()})
                   for _ in range(cfg.num_layers))
    weights = LlamaWeights(layers=layers, **{n: draw(n, s)
                                             for n, s in expected_model_shapes(cfg).items()})
    return cfg, swiftkv_distill.swiftkv_config(cfg, lkv, g), weights


def perturbed(trainable, seed: int, scale: float = 0.05):
    """``trainable`` plus noise, so that trained parameters differ from the initialisation."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: x + jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), trainable)


def random_rows(cfg, rng, lengths, seq_len):
    seqs = [rng.integers(1, cfg.vocab_size, n) for n in lengths]
    rows, cut = swiftkv_distill.pack_sequences(seqs, seq_len)
    return seqs, rows, cut


# ---------------------------------------------------------------------------------- config, init

def test_config_and_bad_arguments():
    cfg, skv, _ = teacher("gqa")
    assert isinstance(skv, SwiftKVConfig) and skv.num_key_value_layers == 2
    assert swiftkv_distill.swiftkv_config(cfg, None, 1).num_key_value_layers == cfg.num_layers // 2
    for lkv in (0, cfg.num_layers, cfg.num_layers + 1):
        with pytest.raises(ConfigError, match="num-key-value-layers must be in 1..3"):
            swiftkv_distill.swiftkv_config(cfg, lkv, 1)
    with pytest.raises(ConfigError, match="--group-size 2 must be a positive divisor of the 3"):
        swiftkv_distill.swiftkv_config(cfg, 1, 2)
    with pytest.raises(ConfigError, match="group-size 0"):
        swiftkv_distill.swiftkv_config(cfg, 2, 0)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        swiftkv_distill.pack_sequences([[1, 2]], 1)
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        swiftkv_distill.pack_sequences([[1, 2], []], 4)
    rows, cut = swiftkv_distill.pack_sequences([[5, 6, 7], [1, 2, 3, 4, 5, 6]], 4)
    assert cut == 2 and rows.lengths.tolist() == [3, 4]
    assert rows.tokens.tolist() == [[5, 6, 7, 0], [1, 2, 3, 4]]


@pytest.mark.parametrize("name", list(TEACHERS))
def test_init_rules(name):
    """norm_swiftkv <- layer Lkv's input norm, q_proj_swiftkv <- each later layer's q_proj (and
    bias), each group's K/V <- the mean of its layers' k/v projections (and biases)."""
    cfg, skv, w = teacher(name)
    init = swiftkv_dense.init_trainable(w, skv)
    Lkv, g, L = skv.num_key_value_layers, skv.key_value_group_size, cfg.num_layers
    np.testing.assert_array_equal(init.norm_swiftkv, w.layers[Lkv].input_norm)
    assert len(init.q_proj) == L - Lkv
    for j, q in enumerate(init.q_proj):
        np.testing.assert_array_equal(q, w.layers[Lkv + j].q_proj)
        if cfg.attention_bias:
            np.testing.assert_array_equal(init.q_bias[j], w.layers[Lkv + j].q_bias)
    H, K, D = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim
    assert init.kv_fanout.shape == (H, (L - Lkv) // g, 2, K, D)
    for j in range((L - Lkv) // g):
        members = [np.asarray(w.layers[Lkv + j * g + m].kv_proj, np.float64) for m in range(g)]
        np.testing.assert_allclose(init.kv_fanout[:, j], sum(members) / g, rtol=1e-6, atol=1e-7)
        if cfg.attention_bias:
            biases = [np.asarray(w.layers[Lkv + j * g + m].kv_bias, np.float64) for m in range(g)]
            np.testing.assert_allclose(init.kv_fanout_bias[j], sum(biases) / g, rtol=1e-6,
                                       atol=1e-7)
    if g > 1:   # the mean is not any one member
        assert not np.allclose(init.kv_fanout[:, 0], w.layers[Lkv].kv_proj)
    student = swiftkv_dense.student_weights(w, init, skv)
    skv_check = jax.tree_util.tree_map(np.asarray, swiftkv_dense.trainable_of(student))
    jax.tree_util.tree_map(np.testing.assert_array_equal, skv_check,
                           jax.tree_util.tree_map(np.asarray, init))


# ---------------------------------------------------------------------------------- forwards

def forward(step, cfg, weights, cache, batch):
    hidden, _ = step(weights, cache, batch, cfg=cfg)
    return llama.head(weights, hidden, cfg=cfg)


def paged_logits(step, cfg, weights, seqs):
    """Logits at every position of each sequence, all prefilled in one paged step (``step``:
    ``swiftkv.step`` or ``llama.step``)."""
    pages, chunks, start = [], [], 0
    for s in seqs:
        n = -(-len(s) // PS)
        pages.append(list(range(start, start + n)))
        start += n
        chunks.append(SequenceChunk(tokens=[int(t) for t in s], start=0, pages=pages[-1],
                                    logits_at=list(range(len(s)))))
    total = sum(len(s) for s in seqs)
    buckets = Buckets(tokens=(-(-total // 8) * 8,), seqs=(len(seqs),), pages=(max(map(len, pages)),))
    batch, rows = build_step_batch(chunks, PS, buckets)
    cache = KVCache.allocate(cfg, start, PS, jnp.float32)
    logits = jax.jit(functools.partial(forward, step, cfg))(weights, cache, batch)
    logits = np.asarray(logits)[:rows]
    return np.split(logits, np.cumsum([len(s) for s in seqs])[:-1])


@pytest.mark.parametrize("name", list(TEACHERS))
def test_dense_forwards_equal_the_serving_steps(name):
    """On the same weights (trained-looking: perturbed from the initialisation), the dense student
    forward over a padded batch equals the paged SwiftKV step with logits at every position, the
    dense teacher equals llama.step, and ``distill_forward`` gives both."""
    cfg, skv, w = teacher(name, seed=1)
    rng = np.random.default_rng(2)
    trainable = perturbed(swiftkv_dense.init_trainable(w, skv), 3)
    student = swiftkv_dense.student_weights(w, trainable, skv)
    seqs, rows, _ = random_rows(cfg, rng, (13, 7, 10), 16)
    tokens = jnp.asarray(rows.tokens)
    dense = np.asarray(jax.jit(swiftkv_dense.swiftkv_forward, static_argnums=0)(skv, student, tokens))
    paged = paged_logits(swiftkv.step, skv, student, seqs)
    paged_teacher = paged_logits(llama.step, cfg, w, seqs)
    teacher_dense = np.asarray(jax.jit(swiftkv_dense.llama_forward, static_argnums=0)(cfg, w, tokens))
    out = jax.jit(swiftkv_dense.distill_forward, static_argnums=0)(skv, w, trainable, tokens)
    V = cfg.vocab_size
    for r, s in enumerate(seqs):
        n = len(s)
        assert rel_err(dense[r, :n], paged[r]) <= TOL
        assert rel_err(teacher_dense[r, :n], paged_teacher[r]) <= TOL
        np.testing.assert_allclose(np.asarray(out.student_logits).reshape(3, 16, V)[r, :n],
                                   dense[r, :n], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.teacher_logits).reshape(3, 16, V)[r, :n],
                                   teacher_dense[r, :n], rtol=1e-5, atol=1e-5)
    # the student differs from the teacher (the comparison above can fail)
    assert rel_err(dense[0, :13], teacher_dense[0, :13]) > 0.01


def test_loss_ignores_padding_and_matches_numpy():
    cfg, skv, w = teacher("gqa")
    rng = np.random.default_rng(4)
    trainable = perturbed(swiftkv_dense.init_trainable(w, skv), 5)
    _, rows, _ = random_rows(cfg, rng, (9, 14), 16)
    lc = swiftkv_distill.LossConfig(temperature=2.0, mse_weight=0.7)
    loss_fn = jax.jit(swiftkv_distill.distill_loss, static_argnums=(0, 1))
    loss, (kl, mse) = loss_fn(skv, lc, trainable, w, jnp.asarray(rows.tokens), jnp.asarray(rows.mask))
    junk = rows.tokens.copy()
    junk[rows.mask == 0] = rng.integers(1, cfg.vocab_size, int((rows.mask == 0).sum()))
    loss2, _ = loss_fn(skv, lc, trainable, w, jnp.asarray(junk), jnp.asarray(rows.mask))
    assert abs(float(loss2) - float(loss)) <= 1e-5 * abs(float(loss))
    out = jax.jit(swiftkv_dense.distill_forward, static_argnums=0)(skv, w, trainable,
                                                                   jnp.asarray(rows.tokens))
    m = rows.mask.reshape(-1).astype(bool)
    t = np.asarray(out.teacher_logits, np.float64)[m] / 2.0
    s = np.asarray(out.student_logits, np.float64)[m] / 2.0
    logp = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - x.max(-1, keepdims=True)  # noqa: E731
    want_kl = 4.0 * np.mean(np.sum(np.exp(logp(t)) * (logp(t) - logp(s)), -1))
    d = (np.asarray(out.student_penultimate, np.float64) - np.asarray(out.teacher_penultimate))[m]
    want_mse = np.mean(d * d)
    np.testing.assert_allclose([float(kl), float(mse)], [want_kl, want_mse], rtol=1e-4)
    np.testing.assert_allclose(float(loss), want_kl + 0.7 * want_mse, rtol=1e-4)
    assert want_kl > 0 and want_mse > 0


# ---------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def trained():
    """30 steps on random sequences of a tiny random teacher (AcrossKV with biases)."""
    cfg, skv, w = teacher("across_bias", seed=6)
    rng = np.random.default_rng(7)
    _, rows, _ = random_rows(cfg, rng, rng.integers(8, 25, 48), 24)
    train_rows = swiftkv_distill.subset(rows, np.arange(40))
    held = swiftkv_distill.subset(rows, np.arange(40, 48))
    init = swiftkv_dense.init_trainable(w, skv)
    tc = trainer.TrainConfig(steps=30, batch_size=8, lr=1e-2, weight_decay=0.0, seed=0)
    result = swiftkv_distill.train(skv, w, init, train_rows, tc)
    return cfg, skv, w, init, held, result


def test_training_lowers_the_loss_and_beats_the_initialisation(trained):
    cfg, skv, w, init, held, result = trained
    losses = result.losses[:, 0]
    assert result.losses.shape == (30, 3) and np.isfinite(result.losses).all()
    assert losses[-5:].mean() < 0.7 * losses[:5].mean()
    before = swiftkv_distill.evaluate(skv, w, init, held, batch_size=4)
    after = swiftkv_distill.evaluate(skv, w, result.trainable, held, batch_size=4)
    assert before.positions == after.positions == int((held.lengths - 1).sum())
    assert after.kl < 0.8 * before.kl
    assert after.top1_agreement >= before.top1_agreement
    assert before.teacher_perplexity == pytest.approx(after.teacher_perplexity, rel=1e-6)


# ---------------------------------------------------------------------------------- export

def test_export_round_trip(trained, tmp_path, caplog):
    """The written checkpoint loads as SwiftKVConfig / SwiftKVWeights equal to the trained model;
    the file keeps the teacher's later q/k/v (skipped by the loader, logged) and its tensors,
    through the float64 oracle of the published SwiftKV forward, give the dense forward's logits."""
    cfg, skv, w, _, held, result = trained
    student = swiftkv_dense.student_weights(w, result.trainable, skv)
    teacher_hf = swiftkv_export.teacher_hf_config(str(tmp_path / "no-such-dir"), cfg)
    out = tmp_path / "student"
    swiftkv_export.save_swiftkv_checkpoint(out, skv, teacher_hf, w, student)
    d = json.loads((out / "config.json").read_text())
    assert d["architectures"] == ["LlamaSwiftKVForCausalLM"] and d["model_type"] == "llama_swiftkv"
    assert (d["swiftkv"], d["num_key_value_layers"], d["key_value_group_size"]) == (True, 1, 2)
    assert d["rope_parameters"]["rope_type"] == "llama3" and d["attention_bias"] is True
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    late_qkv = [f"model.layers.{i}.self_attn.{n}_proj.{p}" for i in range(1, 5) for n in "qkv"
                for p in ("weight", "bias")]
    assert all(n in tensors for n in late_qkv)
    np.testing.assert_array_equal(tensors["model.layers.3.self_attn.q_proj.weight"],
                                  np.asarray(w.layers[3].q_proj).reshape(32, 32).T)
    assert "model.layers.2.self_attn.k_proj_swiftkv.weight" not in tensors   # g = 2: 1, 3 only
    with caplog.at_level(logging.INFO):
        loaded = load_model(str(out), dtype=jnp.float32, progress=False, use_cache=False)
    assert loaded.config == skv and isinstance(loaded.weights, SwiftKVWeights)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           loaded.weights, student)
    assert "q_proj" in caplog.text and "layers.4" in caplog.text   # the skipped teacher tensors
    tokens = held.tokens[0, :held.lengths[0]]
    dense = np.asarray(swiftkv_dense.swiftkv_forward(skv, student, jnp.asarray(tokens[None])))[0]
    assert rel_err(dense, swiftkv_forward_hf(tensors, skv, tokens)) <= 2e-5
    with pytest.raises(ValueError, match="not an empty directory"):
        swiftkv_export.save_swiftkv_checkpoint(out, skv, teacher_hf, w, student)


def test_teacher_hf_config_keeps_the_teachers_fields(tmp_path):
    """An HF teacher's own config.json is the base of the student's (extra fields kept); a GGUF
    teacher's is built from its ModelConfig; either must describe the loaded model."""
    cfg, skv, _ = teacher("across_bias")
    built = swiftkv_export.llama_hf_config(cfg)
    assert ModelConfig.from_hf_dict(built) == cfg
    hf_dir = tmp_path / "teacher"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({**built, "transformers_version": "9.9",
                                                    "initializer_range": 0.02}))
    d = swiftkv_export.teacher_hf_config(str(hf_dir), cfg)
    assert d["transformers_version"] == "9.9" and d["initializer_range"] == 0.02
    student = swiftkv_export.swiftkv_hf_config(d, skv, np.float32)
    assert student["initializer_range"] == 0.02 and student["model_type"] == "llama_swiftkv"
    assert SwiftKVConfig.from_hf_dict(student) == skv
    (hf_dir / "config.json").write_text(json.dumps({**built, "num_hidden_layers": 7}))
    with pytest.raises(ValueError, match="does not describe the loaded teacher"):
        swiftkv_export.teacher_hf_config(str(hf_dir), cfg)


def test_bfloat16_teacher_trains_and_exports(tmp_path):
    """--dtype bfloat16: a bfloat16 teacher, float32 trained parameters, a bfloat16 checkpoint."""
    cfg, skv, w = teacher("gqa", seed=8)
    w = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), w)
    _, rows, _ = random_rows(cfg, np.random.default_rng(9), (12, 9, 16, 5), 16)
    tc = trainer.TrainConfig(steps=2, batch_size=2, lr=1e-3, weight_decay=0.0)
    result = swiftkv_distill.train(skv, w, swiftkv_dense.init_trainable(w, skv), rows, tc)
    assert np.isfinite(result.losses).all() and result.trainable.kv_fanout.dtype == jnp.float32
    student = swiftkv_dense.student_weights(w, result.trainable, skv)
    assert student.kv_fanout.dtype == jnp.bfloat16
    out = tmp_path / "bf16"
    swiftkv_export.save_swiftkv_checkpoint(out, skv, swiftkv_export.llama_hf_config(cfg), w, student)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_model(str(out), dtype=jnp.bfloat16, progress=False, use_cache=False)
    np.testing.assert_array_equal(np.asarray(loaded.weights.kv_fanout, np.float32),
                                  np.asarray(student.kv_fanout, np.float32))


# ---------------------------------------------------------------------------------- the command

def _cli(out, *extra):
    return ["distill-swiftkv", "--num-prompts", "4", "--max-tokens", "16", "--steps", "3",
            "--batch-size", "2", "--seq-len", "64", "--held-out-fraction", "0.25",
            "--answer-tokens", "8", "--output", str(out), *extra]


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    from arctic_jax import cli

    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    assert cli.main(_cli(used)) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert cli.main(_cli(tmp_path / "a", "--num-key-value-layers", "30")) == 2
    assert "must be in 1..29" in capsys.readouterr().err
    assert cli.main(_cli(tmp_path / "b", "--num-key-value-layers", "15", "--group-size", "4")) == 2
    assert "--group-size 4 must be a positive divisor of the 15" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# The CLI on SmolLM2 end to end (data, training, report, checkpoint served by the engine) runs in
# tests/test_readme_commands.py (the README's quick command) and tests/test_notebook_training.py.
