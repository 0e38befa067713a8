"""Arctic draft models (MLP and sum-LSTM speculators) against an independent PyTorch
implementation written here from the published formulas, and the checkpoint reader / writer."""
from __future__ import annotations

import builtins
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file as torch_save_safetensors
from torch import nn

from arctic_jax.speculative.draft_checkpoint import (
    check_base_model,
    load_draft_model,
    read_draft_config,
    save_draft_model,
)
from arctic_jax.speculative.draft_model import (
    DraftModelConfig,
    LSTMDraftWeights,
    MLPDraftWeights,
    greedy_draft,
    random_weights,
    teacher_forced_logits,
)

V, HIN, D, B = 97, 24, 16, 5


# ------------------------------------------------------------------ PyTorch reference (Arctic names)

class Norm(nn.Module):
    """x * rsqrt(mean(x^2) + 1e-6), then * weight + bias when it has them."""

    def __init__(self, dim: int, affine: bool = True):
        super().__init__()
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.empty(dim))
            self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * self.weight + self.bias if self.affine else x


def _alpha(n_predict: int, inner: int) -> float:
    sw = 0.5 ** (0.5 / n_predict)
    ew = math.sqrt((1 - sw ** 2) * inner / 2)
    return ew / sw


class TorchMLPSpeculator(nn.Module):
    def __init__(self, n: int, tie: bool, scale_input: bool):
        super().__init__()
        self.n, self.scale_input = n, scale_input
        if tie:
            emb, head, ln = nn.Embedding(V, D), nn.Linear(D, V, bias=False), Norm(D)
            proj_tied = nn.Linear(D, D, bias=False)
            self.emb = nn.ModuleList([emb] * n)
            self.head = nn.ModuleList([head] * n)
            self.ln = nn.ModuleList([ln] * n)
            self.proj = nn.ModuleList([nn.Linear(HIN, D, bias=False)] + [proj_tied] * (n - 1))
        else:
            self.emb = nn.ModuleList([nn.Embedding(V, D) for _ in range(n)])
            self.head = nn.ModuleList([nn.Linear(D, V, bias=False) for _ in range(n)])
            self.ln = nn.ModuleList([Norm(D) for _ in range(n)])
            self.proj = nn.ModuleList([nn.Linear(HIN if i == 0 else D, D, bias=False) for i in range(n)])
        self.ln0 = Norm(HIN, affine=False)
        self.alpha = _alpha(n, D)

    def run(self, hidden, token, given=None):
        """Logits [B, n, V] and greedy tokens [B, n]; step i eats given[:, i] when given."""
        s = self.ln0(hidden) / math.sqrt(2) if self.scale_input else hidden
        logits, tokens = [], []
        for i in range(self.n):
            t = token if given is None else given[:, i]
            s = self.proj[i](s) + self.alpha * self.emb[i](t)
            s = nn.functional.gelu(self.ln[i](s))
            lg = self.head[i](s)
            token = lg.argmax(-1)
            logits.append(lg)
            tokens.append(token)
        return torch.stack(logits, 1), torch.stack(tokens, 1)


class TorchLSTMSpeculator(nn.Module):
    def __init__(self, n: int, scale_input: bool):
        super().__init__()
        self.n, self.scale_input = n, scale_input
        self.forget_emb = nn.ModuleList([nn.Embedding(V, D)])
        self.input_emb = self.cell_emb = self.output_emb = self.forget_emb   # tie_lstm_embs
        for gate in ("forget", "input", "output", "cell"):
            setattr(self, f"{gate}_proj", nn.ModuleList([nn.Linear(HIN, D, bias=False),
                                                         nn.Linear(D, D, bias=False)]))
        self.cell_ln = nn.ModuleList([Norm(D)])
        self.state_ln = nn.ModuleList([Norm(D)])
        head = nn.Linear(D, V, bias=False)
        self.head = nn.ModuleList([head] * n)
        self.ln0 = Norm(HIN, affine=False)
        self.alpha = _alpha(n, D)

    def run(self, hidden, token, given=None):
        s = self.ln0(hidden) / math.sqrt(2) if self.scale_input else hidden
        c = torch.zeros(hidden.shape[0], D)
        logits, tokens = [], []
        for i in range(self.n):
            t = token if given is None else given[:, i]
            k = min(i, 1)

            def gate(name, s=s, t=t, k=k):
                return getattr(self, f"{name}_proj")[k](s) + self.alpha * getattr(self, f"{name}_emb")[0](t)

            c = c * torch.sigmoid(gate("forget")) + (
                nn.functional.gelu(self.cell_ln[0](gate("cell"))) * torch.sigmoid(gate("input")))
            s = nn.functional.gelu(self.state_ln[0](c)) * torch.sigmoid(gate("output"))
            lg = self.head[i](s)
            token = lg.argmax(-1)
            logits.append(lg)
            tokens.append(token)
        return torch.stack(logits, 1), torch.stack(tokens, 1)


def make_torch(kind: str, n: int, tie: bool, scale_input: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = TorchMLPSpeculator(n, tie, scale_input) if kind == "mlp" else TorchLSTMSpeculator(n, scale_input)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "ln" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "emb" in name:
                p.copy_(torch.randn_like(p) / math.sqrt(D))
            else:   # Linear [out, in]
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    return model.eval()


def torch_config(kind: str, n: int, tie: bool, scale_input: bool) -> DraftModelConfig:
    return DraftModelConfig(kind, n, V, HIN, D, tie_weights=tie, scale_input=scale_input)


def weights_from_torch(cfg: DraftModelConfig, model: nn.Module):
    """The JAX pytree straight from the torch parameters (no checkpoint code involved)."""
    def a(t):
        return jnp.asarray(t.detach().numpy())

    N = cfg.num_distinct
    if cfg.kind == "mlp":
        later = [1] if cfg.tie_weights else list(range(1, cfg.n_predict))
        return MLPDraftWeights(
            emb=tuple(a(model.emb[i].weight) for i in range(N)),
            proj_first=a(model.proj[0].weight.T),
            proj=jnp.stack([a(model.proj[i].weight.T) for i in later]),
            ln_weight=jnp.stack([a(model.ln[i].weight) for i in range(N)]),
            ln_bias=jnp.stack([a(model.ln[i].bias) for i in range(N)]),
            head=tuple(a(model.head[i].weight) for i in range(N)))
    gates = ("forget", "input", "output", "cell")
    return LSTMDraftWeights(
        emb=a(model.forget_emb[0].weight),
        proj_first=jnp.concatenate([a(getattr(model, f"{g}_proj")[0].weight.T) for g in gates], 1),
        proj=jnp.concatenate([a(getattr(model, f"{g}_proj")[1].weight.T) for g in gates], 1),
        cell_ln_weight=a(model.cell_ln[0].weight), cell_ln_bias=a(model.cell_ln[0].bias),
        state_ln_weight=a(model.state_ln[0].weight), state_ln_bias=a(model.state_ln[0].bias),
        head=(a(model.head[0].weight),))


def numpy_weights(cfg: DraftModelConfig, seed: int, dtype=jnp.float32):
    """Random weights of ``cfg``'s shapes from numpy (``random_weights``' shapes, no compiles)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: random_weights(cfg, jax.random.key(0)))
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), dtype), shapes)


def random_inputs(seed: int, n: int):
    rng = np.random.default_rng(seed)
    hidden = (2.0 * rng.standard_normal((B, HIN))).astype(np.float32)
    token = rng.integers(0, V, B).astype(np.int32)
    given = rng.integers(0, V, (B, n)).astype(np.int32)
    return hidden, token, given


def assert_matches_torch(cfg: DraftModelConfig, weights, model: nn.Module, seed: int) -> None:
    """Greedy drafts and teacher-forced logits of the JAX model equal the torch model's."""
    hidden, token, given = random_inputs(seed, cfg.n_predict)
    with torch.no_grad():
        ref_logits, ref_tokens = model.run(torch.from_numpy(hidden), torch.from_numpy(token).long())
        ref_forced, _ = model.run(torch.from_numpy(hidden), None, torch.from_numpy(given).long())
    tokens, logits = greedy_draft(cfg, weights, jnp.asarray(hidden), jnp.asarray(token))
    assert tokens.shape == (B, cfg.n_predict) and logits.shape == (B, cfg.n_predict, V)
    np.testing.assert_array_equal(np.asarray(tokens), ref_tokens.numpy())
    np.testing.assert_allclose(np.asarray(logits), ref_logits.numpy(), atol=1e-4, rtol=1e-4)
    forced = teacher_forced_logits(cfg, weights, jnp.asarray(hidden), jnp.asarray(given))
    np.testing.assert_allclose(np.asarray(forced), ref_forced.numpy(), atol=1e-4, rtol=1e-4)
    # The teacher-forced path really differs from the greedy one (the given tokens matter).
    assert not np.allclose(np.asarray(forced)[:, 1:], np.asarray(logits)[:, 1:], atol=1e-3)


CASES = [("mlp", 3, False, False), ("mlp", 4, True, True), ("mlp", 3, True, False),
         ("mlp", 4, False, True), ("lstm", 4, True, False), ("lstm", 3, True, True)]


@pytest.mark.parametrize("kind,n,tie,scale", CASES)
def test_draft_model_matches_torch(kind, n, tie, scale):
    cfg = torch_config(kind, n, tie, scale)
    model = make_torch(kind, n, tie, scale, seed=n + 10 * tie + 100 * scale)
    assert_matches_torch(cfg, weights_from_torch(cfg, model), model, seed=7 + n)


# ----------------------------------------------------------------------------------- checkpoints

def torch_config_json(kind: str, n: int, tie: bool, scale: bool, arch: str | None = None) -> dict:
    if kind == "mlp":
        return {"architectures": [arch or "ArcticMLPSpeculatorPreTrainedModel"],
                "model_type": "mlp_speculator", "emb_dim": HIN, "inner_dim": D, "n_predict": n,
                "vocab_size": V, "tie_weights": tie, "scale_input": scale,
                "top_k_tokens_per_head": [1] * n}
    return {"architectures": ["ArcticLSTMSpeculatorPreTrainedModel"], "model_type": "mlp_speculator",
            "input_hidden_dim": HIN, "inner_dim": str(D), "proj_dim": str(D), "emb_dim": str(D),
            "method": "sum_lstm", "tie_lstm_embs": True, "tie_weights": True, "scale_input": scale,
            "n_predict": n, "vocab_size": V}


def write_checkpoint(path, config: dict, tensors: dict[str, torch.Tensor], fmt: str = "safetensors",
                     prefix: str = "", shards: int = 1):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    tensors = {prefix + k: v.detach().clone().contiguous() for k, v in tensors.items()}
    if fmt == "bin":
        torch.save(tensors, path / "pytorch_model.bin")
        return path
    names = sorted(tensors)
    for s in range(shards):
        part = {k: tensors[k] for k in names[s::shards]}
        torch_save_safetensors(part, str(path / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
    return path


def distinct_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied copies dropped (what a deduplicating writer keeps)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v
    return out


@pytest.mark.parametrize("kind,n,tie,scale,fmt,prefix,copies", [
    ("mlp", 3, False, True, "safetensors", "speculator.", True),
    ("mlp", 4, True, False, "safetensors", "", False),
    ("mlp", 3, True, True, "bin", "speculator.", True),
    ("lstm", 4, True, False, "bin", "", True),
    ("lstm", 3, True, True, "safetensors", "speculator.", False),
])
def test_checkpoint_from_torch_reproduces_torch(tmp_path, kind, n, tie, scale, fmt, prefix, copies):
    model = make_torch(kind, n, tie, scale, seed=3 * n + tie)
    state = model.state_dict() if copies else distinct_state(model)
    if kind == "lstm" and copies:
        assert {"input_emb.0.weight", "head.2.weight"} <= set(state)
    path = write_checkpoint(tmp_path / "ckpt", torch_config_json(kind, n, tie, scale), state, fmt, prefix,
                            shards=2 if fmt == "safetensors" else 1)
    cfg, weights = load_draft_model(path)
    assert cfg == torch_config(kind, n, tie, scale)
    assert_matches_torch(cfg, weights, model, seed=11)


def test_lstm_checkpoint_with_fused_projections(tmp_path):
    model = make_torch("lstm", 3, True, False, seed=5)
    state = distinct_state(model)
    for k in (0, 1):
        state[f"projs.{k}.weight"] = torch.cat(
            [state.pop(f"{g}_proj.{k}.weight") for g in ("forget", "input", "output", "cell")])
    path = write_checkpoint(tmp_path / "c", torch_config_json("lstm", 3, True, False), state)
    cfg, weights = load_draft_model(path)
    assert_matches_torch(cfg, weights, model, seed=4)


def test_arctic_training_mlp_config(tmp_path):
    """ArcticTraining writes the bare string architecture; IBM's inner_dim 0 means emb_dim."""
    cfg_json = torch_config_json("mlp", 3, False, False, arch=None)
    cfg_json["architectures"] = "MLPSpeculatorPreTrainedModel"
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    assert read_draft_config(tmp_path) == torch_config("mlp", 3, False, False)
    cfg_json.update(inner_dim=0, emb_dim=D)
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    assert read_draft_config(tmp_path) == DraftModelConfig("mlp", 3, V, D, D)


@pytest.mark.parametrize("kind,tie,fmt,dtype", [
    ("mlp", False, "safetensors", jnp.float32), ("mlp", True, "bin", jnp.float32),
    ("lstm", True, "safetensors", jnp.bfloat16), ("lstm", True, "bin", jnp.float32),
    ("mlp", True, "safetensors", jnp.bfloat16)])
def test_save_load_round_trip(tmp_path, kind, tie, fmt, dtype):
    cfg = DraftModelConfig(kind, 3, V, HIN, D, tie_weights=tie, scale_input=kind == "lstm")
    weights = numpy_weights(cfg, 17, dtype)
    save_draft_model(tmp_path, cfg, weights, fmt=fmt, base_model_archs=["LlamaForCausalLM"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mlp_speculator" and config["base_model_archs"] == ["LlamaForCausalLM"]
    cfg2, loaded = load_draft_model(tmp_path)
    assert cfg2 == cfg and type(loaded) is type(weights)
    pairs = zip(jax.tree_util.tree_leaves_with_path(weights), jax.tree_util.tree_leaves(loaded), strict=True)
    for (path, a), b in pairs:
        name = jax.tree_util.keystr(path)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
    _, as_f32 = load_draft_model(tmp_path, dtype=jnp.float32)
    assert all(h.dtype == jnp.float32 for h in as_f32.head)


def test_saved_lstm_has_arctic_names_that_torch_reads(tmp_path):
    """The written file is the trainer's layout: the torch model loads it strictly."""
    cfg = DraftModelConfig("lstm", 4, V, HIN, D, tie_weights=True, scale_input=True)
    model = make_torch("lstm", 4, True, True, seed=1)
    save_draft_model(tmp_path, cfg, weights_from_torch(cfg, model), fmt="bin")
    reloaded = make_torch("lstm", 4, True, True, seed=2)
    reloaded.load_state_dict(torch.load(tmp_path / "pytorch_model.bin", weights_only=True), strict=True)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------- errors

@pytest.fixture
def mlp_state():
    return distinct_state(make_torch("mlp", 3, False, False, seed=9))


def test_missing_tensor(tmp_path, mlp_state):
    del mlp_state["head.1.weight"]
    path = write_checkpoint(tmp_path, torch_config_json("mlp", 3, False, False), mlp_state)
    with pytest.raises(ValueError, match=r"missing tensors \(1\): head\.1\.weight"):
        load_draft_model(path)


def test_bad_shape(tmp_path, mlp_state):
    mlp_state["proj.1.weight"] = torch.randn(D, D + 1)
    path = write_checkpoint(tmp_path, torch_config_json("mlp", 3, False, False), mlp_state)
    with pytest.raises(ValueError, match=r"proj\.1\.weight: expected shape \(16, 16\), found \(16, 17\)"):
        load_draft_model(path)


def test_leftover_tensor(tmp_path, mlp_state):
    mlp_state["ln.3.weight"] = torch.randn(D)
    path = write_checkpoint(tmp_path, torch_config_json("mlp", 3, False, False), mlp_state)
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): ln\.3\.weight"):
        load_draft_model(path)


def test_tied_copies_must_match(tmp_path):
    state = make_torch("mlp", 3, True, False, seed=4).state_dict()
    state = {k: v.clone() for k, v in state.items()}
    state["head.2.weight"] += 1e-3
    path = write_checkpoint(tmp_path, torch_config_json("mlp", 3, True, False), state)
    with pytest.raises(ValueError, match=r"head\.2\.weight \(differs from head\.0\.weight\)"):
        load_draft_model(path)


def test_same_tensor_with_and_without_prefix(tmp_path, mlp_state):
    mlp_state["speculator.emb.0.weight"] = mlp_state["emb.0.weight"]
    path = write_checkpoint(tmp_path, torch_config_json("mlp", 3, False, False), mlp_state)
    with pytest.raises(ValueError, match=r"emb\.0\.weight appears twice"):
        load_draft_model(path)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, r"model_type is 'llama'"),
    ({"architectures": ["EagleSpeculator"]}, r"EagleSpeculator is not supported"),
    ({"inner_dim": "16.16"}, r"inner_dim='16\.16' describes a multi-stage .* not supported"),
    ({"proj_dim": "32"}, r"differing widths .*proj_dim=32.* not supported"),
    ({"tie_lstm_embs": False}, r"tie_lstm_embs=False is not supported"),
    ({"method": "sum_rnn"}, r"method 'sum_rnn' is not supported"),
    ({"n_predict": "3"}, r"n_predict must be an integer"),
])
def test_bad_config(tmp_path, change, message):
    config = {**torch_config_json("lstm", 3, True, False), **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_draft_model(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_draft_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_draft_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(torch_config_json("mlp", 3, False, False)))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_draft_model(tmp_path)


def test_base_model_mismatch():
    cfg = DraftModelConfig("mlp", 3, V, HIN, D)
    check_base_model(cfg, HIN, V)
    with pytest.raises(ValueError, match=rf"expects hidden size {HIN} but the base model has 576"):
        check_base_model(cfg, 576, V)
    with pytest.raises(ValueError, match=rf"expects vocabulary size {V} but the base model has 49152"):
        check_base_model(cfg, HIN, 49152)


def test_bin_without_torch(tmp_path, monkeypatch, mlp_state):
    path = write_checkpoint(tmp_path / "c", torch_config_json("mlp", 3, False, False), mlp_state, "bin")
    cfg = DraftModelConfig("mlp", 3, V, HIN, D)
    weights = numpy_weights(cfg, 0)
    monkeypatch.setitem(sys.modules, "torch", None)
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match=r"pytorch_model\.bin needs torch \(pip install torch\)"):
        load_draft_model(path)
    with pytest.raises(ImportError, match=r"pip install torch"):
        save_draft_model(tmp_path / "out", cfg, weights, fmt="bin")
    save_draft_model(tmp_path / "st", cfg, weights)   # safetensors needs no torch
    np.testing.assert_array_equal(np.asarray(load_draft_model(tmp_path / "st")[1].emb),
                                  np.asarray(weights.emb))
