"""Read and write Arctic / IBM draft-model checkpoints (``model_type: mlp_speculator``).

A checkpoint is a directory with ``config.json`` and the tensors in ``*.safetensors`` (one
file or several) or a torch ``pytorch_model.bin`` (read only when torch is installed). Tensor
names may carry a leading ``speculator.``; torch ``Linear`` weights are [out, in].

MLP speculator (architectures ArcticMLPSpeculatorPreTrainedModel / MLPSpeculatorPreTrainedModel):
``emb.{i}.weight`` [V, D], ``proj.0.weight`` [D, Hin], ``proj.{i}.weight`` [D, D],
``ln.{i}.weight|bias`` [D], ``head.{i}.weight`` [V, D]. With ``tie_weights`` only index 0 of
emb / ln / head and ``proj.0``, ``proj.1`` are distinct; per-step copies, when the file holds
them, must equal the shared tensor.

Sum-LSTM speculator (ArcticLSTMSpeculatorPreTrainedModel, ``method: sum_lstm``):
``forget_emb.0.weight`` [V, D] (``input_emb`` / ``cell_emb`` / ``output_emb`` copies of it may
be present), ``{forget,input,output,cell}_proj.{0,1}.weight`` [D, Hin] and [D, D] (or already
fused ``projs.{0,1}.weight`` [4D, .] in f, i, o, c order), ``cell_ln.0`` / ``state_ln.0``
weight and bias [D], and the tied ``head.{i}.weight`` [V, D].
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from arctic_jax.config import ConfigError
from arctic_jax.speculative.draft_model import DraftModelConfig, LSTMDraftWeights, MLPDraftWeights
from checkpoints.errors import CheckpointError, tensor_mismatch_error

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
MODEL_TYPE = "mlp_speculator"
MLP_ARCH = "ArcticMLPSpeculatorPreTrainedModel"
LSTM_ARCH = "ArcticLSTMSpeculatorPreTrainedModel"
IBM_ARCH = "MLPSpeculatorPreTrainedModel"
ARCHITECTURES = (MLP_ARCH, LSTM_ARCH, IBM_ARCH)
LSTM_METHOD = "sum_lstm"
PREFIX = "speculator."
GATES = ("forget", "input", "output", "cell")   # the order of the fused projection's blocks
EMB_ALIASES = ("input_emb.0.weight", "cell_emb.0.weight", "output_emb.0.weight")
_TORCH_NEEDED = (f"reading or writing {BIN_FILE} needs torch (pip install torch); "
                 "a .safetensors checkpoint needs no torch")

Shape = tuple[int, ...]


# ------------------------------------------------------------------------------------------ config

def _int_field(d: dict[str, Any], key: str, where: str) -> int:
    if key not in d:
        raise ConfigError(f"{where}: missing {key!r}")
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    return value


def _bool_field(d: dict[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _lstm_dim(d: dict[str, Any], key: str, where: str) -> int:
    """An LSTM width: an int or a string such as "4096" (dotted multi-stage values rejected)."""
    if key not in d:
        raise ConfigError(f"{where}: missing {key!r}")
    value = d[key]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and "." in value:
        raise ConfigError(f"{where}: {key}={value!r} describes a multi-stage LSTM speculator, which is "
                          "not supported (only a single width such as \"4096\")")
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ConfigError(f"{where}: {key} must be a width such as \"4096\", got {value!r}")


def _architectures(d: dict[str, Any], where: str) -> list[str]:
    archs = d.get("architectures", [])
    archs = [archs] if isinstance(archs, str) else archs   # ArcticTraining writes a bare string
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{where}: architectures must be a list of names, got {archs!r}")
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        raise ConfigError(f"{where}: draft model architecture {', '.join(unknown)} is not supported "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    return archs


def draft_config_from_dict(d: dict[str, Any], where: str = CONFIG_FILE) -> DraftModelConfig:
    """The DraftModelConfig of a parsed ``config.json`` (ConfigError naming ``where``)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} does not hold a JSON object")
    if d.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{where}: model_type is {d.get('model_type')!r}; a draft model "
                          f"checkpoint has model_type {MODEL_TYPE!r}")
    archs = _architectures(d, where)
    method = d.get("method")
    lstm = method == LSTM_METHOD or LSTM_ARCH in archs
    n_predict = _int_field(d, "n_predict", where)
    vocab_size = _int_field(d, "vocab_size", where)
    scale_input = _bool_field(d, "scale_input", where)
    try:
        if not lstm:
            emb_dim = _int_field(d, "emb_dim", where)
            inner_dim = _int_field(d, "inner_dim", where) if "inner_dim" in d else 0
            return DraftModelConfig(
                kind="mlp", n_predict=n_predict, vocab_size=vocab_size, input_hidden_dim=emb_dim,
                inner_dim=inner_dim or emb_dim, tie_weights=_bool_field(d, "tie_weights", where),
                scale_input=scale_input)
        if method is not None and method != LSTM_METHOD:
            raise ConfigError(f"{where}: LSTM speculator method {method!r} is not supported "
                              f"(only {LSTM_METHOD!r})")
        dims = {k: _lstm_dim(d, k, where) for k in ("emb_dim", "proj_dim", "inner_dim")}
        if len(set(dims.values())) != 1:
            raise ConfigError(f"{where}: LSTM speculator with differing widths "
                              f"{', '.join(f'{k}={v}' for k, v in dims.items())} is not supported "
                              "(emb_dim, proj_dim and inner_dim must be equal)")
        for key in ("tie_lstm_embs", "tie_weights"):
            if d.get(key) is not True:
                raise ConfigError(f"{where}: {key}={d.get(key)!r} is not supported for the LSTM "
                                  f"speculator ({key} must be true)")
        return DraftModelConfig(
            kind="lstm", n_predict=n_predict, vocab_size=vocab_size,
            input_hidden_dim=_int_field(d, "input_hidden_dim", where), inner_dim=dims["inner_dim"],
            tie_weights=True, scale_input=scale_input)
    except ConfigError:
        raise
    except ValueError as e:   # DraftModelConfig's own checks
        raise ConfigError(f"{where}: {e}") from e


def read_draft_config(path: str | os.PathLike) -> DraftModelConfig:
    """The DraftModelConfig of the checkpoint directory ``path`` (its ``config.json``)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"draft model checkpoint {path} has no {CONFIG_FILE}")
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from e
    return draft_config_from_dict(d, str(file))


def config_to_dict(cfg: DraftModelConfig, base_model_archs: list[str] | None = None) -> dict[str, Any]:
    """``cfg`` as an Arctic ``config.json`` object."""
    common = {"model_type": MODEL_TYPE, "n_predict": cfg.n_predict, "vocab_size": cfg.vocab_size,
              "tie_weights": cfg.tie_weights, "scale_input": cfg.scale_input,
              "top_k_tokens_per_head": [1] * cfg.n_predict}
    if cfg.kind == "mlp":
        d = {"architectures": [MLP_ARCH], **common, "emb_dim": cfg.input_hidden_dim,
             "inner_dim": cfg.inner_dim}
    else:
        width = str(cfg.inner_dim)
        d = {"architectures": [LSTM_ARCH], **common, "input_hidden_dim": cfg.input_hidden_dim,
             "inner_dim": width, "proj_dim": width, "emb_dim": width, "method": LSTM_METHOD,
             "tie_lstm_embs": True}
    if base_model_archs is not None:
        d["base_model_archs"] = list(base_model_archs)
    return d


def check_base_model(cfg: DraftModelConfig, hidden_size: int, vocab_size: int) -> None:
    """ValueError naming both values when the draft model does not fit the base model."""
    problems = []
    if cfg.input_hidden_dim != hidden_size:
        problems.append(f"draft model expects hidden size {cfg.input_hidden_dim} but the base model "
                        f"has {hidden_size}")
    if cfg.vocab_size != vocab_size:
        problems.append(f"draft model expects vocabulary size {cfg.vocab_size} but the base model "
                        f"has {vocab_size}")
    if problems:
        raise ValueError("; ".join(problems))


# ----------------------------------------------------------------------------------- tensor layout

def _mlp_layout(cfg: DraftModelConfig) -> tuple[dict[str, Shape], dict[str, str]]:
    """(required name -> shape, optional per-step copy -> the shared name it must equal)."""
    V, D, H, n = cfg.vocab_size, cfg.inner_dim, cfg.input_hidden_dim, cfg.n_predict
    per_step = {"emb.{}.weight": (V, D), "head.{}.weight": (V, D), "ln.{}.weight": (D,),
                "ln.{}.bias": (D,)}
    required: dict[str, Shape] = {"proj.0.weight": (D, H)}
    copies: dict[str, str] = {}
    for i in range(n):
        for fmt, shape in per_step.items():
            if cfg.tie_weights and i > 0:
                copies[fmt.format(i)] = fmt.format(0)
            else:
                required[fmt.format(i)] = shape
        if i >= 2 and cfg.tie_weights:
            copies[f"proj.{i}.weight"] = "proj.1.weight"
        elif i >= 1:
            required[f"proj.{i}.weight"] = (D, D)
    return required, copies


def _lstm_layout(cfg: DraftModelConfig, fused: bool) -> tuple[dict[str, Shape], dict[str, str]]:
    V, D, H = cfg.vocab_size, cfg.inner_dim, cfg.input_hidden_dim
    required: dict[str, Shape] = {"forget_emb.0.weight": (V, D), "head.0.weight": (V, D)}
    for ln in ("cell_ln", "state_ln"):
        required[f"{ln}.0.weight"] = required[f"{ln}.0.bias"] = (D,)
    for k, width in ((0, H), (1, D)):
        if fused:
            required[f"projs.{k}.weight"] = (4 * D, width)
        else:
            required.update({f"{g}_proj.{k}.weight": (D, width) for g in GATES})
    copies = {alias: "forget_emb.0.weight" for alias in EMB_ALIASES}
    copies.update({f"head.{i}.weight": "head.0.weight" for i in range(1, cfg.n_predict)})
    return required, copies


def _layout(cfg: DraftModelConfig, names: set[str]) -> tuple[dict[str, Shape], dict[str, str]]:
    if cfg.kind == "mlp":
        return _mlp_layout(cfg)
    return _lstm_layout(cfg, fused=any(n.startswith("projs.") for n in names))


# ----------------------------------------------------------------------------------- tensor files

class _TensorFiles:
    """The tensors of a checkpoint directory: their shapes, and a reader returning numpy arrays."""

    def __init__(self, shapes: dict[str, Shape], read: Callable[[str], np.ndarray], source: str):
        self.shapes, self.read, self.source = shapes, read, source


def _strip(name: str, where: str, seen: dict[str, str]) -> str:
    short = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if short in seen:
        raise CheckpointError(f"{where}: tensor {short} appears twice (as {seen[short]} and {name})")
    seen[short] = name
    return short


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({directory / f for f in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from e
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists missing files: {', '.join(missing)}")
        return files
    return sorted(directory.glob("*.safetensors"))


@contextlib.contextmanager
def _open_safetensors(directory: Path, files: list[Path]) -> Iterator[_TensorFiles]:
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        shapes: dict[str, Shape] = {}
        where: dict[str, tuple[Any, str]] = {}
        seen: dict[str, str] = {}
        for file in files:
            try:
                handle = stack.enter_context(safe_open(str(file), framework="numpy"))
                names = list(handle.keys())
                file_shapes = {n: tuple(int(s) for s in handle.get_slice(n).get_shape()) for n in names}
            except Exception as e:   # safetensors raises its own error type
                raise CheckpointError(f"{file} is truncated or corrupt: {e}") from e
            for name in names:
                short = _strip(name, str(directory), seen)
                shapes[short], where[short] = file_shapes[name], (handle, name)

        def read(short: str) -> np.ndarray:
            handle, name = where[short]
            try:
                return handle.get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"cannot read tensor {name} from {directory}: {e}") from e

        yield _TensorFiles(shapes, read, str(directory))


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(_TORCH_NEEDED) from e
    return torch


def _torch_to_numpy(torch: Any, t: Any) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _numpy_to_torch(torch: Any, a: np.ndarray) -> Any:
    a = np.array(a, order="C", copy=True)   # writable, as torch.from_numpy wants
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


@contextlib.contextmanager
def _open_bin(directory: Path, file: Path) -> Iterator[_TensorFiles]:
    torch = _import_torch()
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{file} cannot be read as a torch state dict: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a flat mapping of tensor names to tensors")
    seen: dict[str, str] = {}
    tensors = {_strip(name, str(directory), seen): value for name, value in state.items()}
    yield _TensorFiles({n: tuple(t.shape) for n, t in tensors.items()},
                       lambda n: _torch_to_numpy(torch, tensors[n]), str(directory))


def _open_tensors(directory: Path) -> contextlib.AbstractContextManager[_TensorFiles]:
    files = _safetensors_files(directory)
    if files:
        return _open_safetensors(directory, files)
    if (directory / BIN_FILE).is_file():
        return _open_bin(directory, directory / BIN_FILE)
    raise FileNotFoundError(f"draft model checkpoint {directory} has no weights: neither *.safetensors "
                            f"nor {BIN_FILE}")


# ---------------------------------------------------------------------------------------- loading

def _check_float(name: str, a: np.ndarray, source: str) -> np.ndarray:
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16):
        raise CheckpointError(f"{source}: tensor {name} has dtype {a.dtype}; a draft model's weights "
                              "are floating point")
    return a


def _read_checked(cfg: DraftModelConfig, tensors: _TensorFiles) -> dict[str, np.ndarray]:
    """The distinct tensors of ``cfg``'s layout, after checking names, shapes and copies."""
    names = set(tensors.shapes)
    required, copies = _layout(cfg, names)
    expected = {**required, **{c: required[base] for c, base in copies.items()}}
    problem = tensor_mismatch_error(
        f"draft model checkpoint {tensors.source}",
        missing=set(required) - names, unexpected=names - set(expected),
        misshaped=[(n, expected[n], tensors.shapes[n]) for n in sorted(names & set(expected))
                   if tuple(expected[n]) != tensors.shapes[n]])
    if problem is not None:
        raise problem
    arrays = {n: _check_float(n, tensors.read(n), tensors.source) for n in sorted(required)}
    differing = [f"{c} (differs from {base})" for c, base in sorted(copies.items())
                 if c in names and not np.array_equal(tensors.read(c), arrays[base])]
    if differing:
        raise CheckpointError(f"draft model checkpoint {tensors.source}: the config ties these tensors "
                              f"to a shared one, but the file's copies differ: {', '.join(differing)}")
    return arrays


def _assemble(cfg: DraftModelConfig, t: dict[str, np.ndarray], dtype: Any
              ) -> MLPDraftWeights | LSTMDraftWeights:
    def arr(a: np.ndarray) -> Any:
        return jnp.asarray(a, dtype=dtype if dtype is not None else a.dtype)

    def stack(fmt: str, indices: range, transpose: bool = False) -> Any:
        return arr(np.stack([t[fmt.format(i)].T if transpose else t[fmt.format(i)] for i in indices]))

    n, N = cfg.n_predict, cfg.num_distinct
    if cfg.kind == "mlp":
        later = range(1, 2) if cfg.tie_weights else range(1, n)
        return MLPDraftWeights(
            emb=tuple(arr(t[f"emb.{i}.weight"]) for i in range(N)), proj_first=arr(t["proj.0.weight"].T),
            proj=stack("proj.{}.weight", later, transpose=True),
            ln_weight=stack("ln.{}.weight", range(N)), ln_bias=stack("ln.{}.bias", range(N)),
            head=tuple(arr(t[f"head.{i}.weight"]) for i in range(N)))

    def fused(k: int) -> np.ndarray:   # [in, 4D], gate blocks f | i | o | c
        if f"projs.{k}.weight" in t:
            return t[f"projs.{k}.weight"].T
        return np.concatenate([t[f"{g}_proj.{k}.weight"] for g in GATES], axis=0).T

    return LSTMDraftWeights(
        emb=arr(t["forget_emb.0.weight"]), proj_first=arr(fused(0)), proj=arr(fused(1)),
        cell_ln_weight=arr(t["cell_ln.0.weight"]), cell_ln_bias=arr(t["cell_ln.0.bias"]),
        state_ln_weight=arr(t["state_ln.0.weight"]), state_ln_bias=arr(t["state_ln.0.bias"]),
        head=(arr(t["head.0.weight"]),))


def load_draft_model(path: str | os.PathLike, dtype: Any = None
                     ) -> tuple[DraftModelConfig, MLPDraftWeights | LSTMDraftWeights]:
    """The config and weights of the draft-model checkpoint directory ``path``.

    ``dtype`` (default: each tensor's own) is the weights' dtype. Raises FileNotFoundError for a
    missing directory, config or weights file, ConfigError for a config that is not a supported
    draft model, CheckpointError naming missing, unexpected or misshaped tensors, and ImportError
    for a ``pytorch_model.bin`` without torch installed.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"draft model checkpoint directory {directory} does not exist")
    cfg = read_draft_config(directory)
    with _open_tensors(directory) as tensors:
        arrays = _read_checked(cfg, tensors)
    return cfg, _assemble(cfg, arrays, dtype)


# ---------------------------------------------------------------------------------------- writing

def _expected_weight_shapes(cfg: DraftModelConfig) -> dict[str, Shape]:
    V, D, H, N = cfg.vocab_size, cfg.inner_dim, cfg.input_hidden_dim, cfg.num_distinct
    if cfg.kind == "mlp":
        n_proj = 1 if cfg.tie_weights else cfg.n_predict - 1
        return {"emb": (N, V, D), "proj_first": (H, D), "proj": (n_proj, D, D), "ln_weight": (N, D),
                "ln_bias": (N, D), "head": (N, V, D)}
    return {"emb": (V, D), "proj_first": (H, 4 * D), "proj": (D, 4 * D), "cell_ln_weight": (D,),
            "cell_ln_bias": (D,), "state_ln_weight": (D,), "state_ln_bias": (D,), "head": (N, V, D)}


def weights_to_tensors(cfg: DraftModelConfig, weights: MLPDraftWeights | LSTMDraftWeights
                       ) -> dict[str, np.ndarray]:
    """``weights`` as Arctic-layout tensors ([out, in] projections, the LSTM's gates unfused)."""
    wanted = MLPDraftWeights if cfg.kind == "mlp" else LSTMDraftWeights
    if not isinstance(weights, wanted):
        raise ValueError(f"a {cfg.kind} draft model needs {wanted.__name__}, got {type(weights).__name__}")
    w = {name: np.asarray(getattr(weights, name)) for name in _expected_weight_shapes(cfg)}
    bad = [f"{name} {w[name].shape} (expected {shape})"
           for name, shape in _expected_weight_shapes(cfg).items() if w[name].shape != shape]
    if bad:
        raise ValueError(f"draft model weights do not match the config: {', '.join(bad)}")
    if cfg.kind == "mlp":
        out = {"proj.0.weight": w["proj_first"].T}
        for i in range(cfg.num_distinct):
            out.update({f"emb.{i}.weight": w["emb"][i], f"ln.{i}.weight": w["ln_weight"][i],
                        f"ln.{i}.bias": w["ln_bias"][i], f"head.{i}.weight": w["head"][i]})
        out.update({f"proj.{i + 1}.weight": p.T for i, p in enumerate(w["proj"])})
        return {k: np.ascontiguousarray(v) for k, v in out.items()}
    D = cfg.inner_dim
    out = {"forget_emb.0.weight": w["emb"], **{alias: w["emb"] for alias in EMB_ALIASES}}
    for k, fused in enumerate((w["proj_first"], w["proj"])):
        out.update({f"{g}_proj.{k}.weight": fused[:, j * D:(j + 1) * D].T for j, g in enumerate(GATES)})
    out.update({"cell_ln.0.weight": w["cell_ln_weight"], "cell_ln.0.bias": w["cell_ln_bias"],
                "state_ln.0.weight": w["state_ln_weight"], "state_ln.0.bias": w["state_ln_bias"]})
    out.update({f"head.{i}.weight": w["head"][0] for i in range(cfg.n_predict)})
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_draft_model(path: str | os.PathLike, cfg: DraftModelConfig,
                     weights: MLPDraftWeights | LSTMDraftWeights, *,
                     base_model_archs: list[str] | None = None, fmt: str = "safetensors") -> Path:
    """Write ``cfg`` and ``weights`` to the directory ``path`` in the Arctic layout
    (``config.json`` plus ``model.safetensors`` or, with ``fmt="bin"``, ``pytorch_model.bin``),
    keeping the weights' dtype. Returns the weights file's path."""
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"draft model format must be 'safetensors' or 'bin', got {fmt!r}")
    tensors = weights_to_tensors(cfg, weights)
    torch = _import_torch() if fmt == "bin" else None
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / (SAFETENSORS_FILE if fmt == "safetensors" else BIN_FILE)
    others = [p.name for p in [*directory.glob("*.safetensors"), directory / BIN_FILE,
                               directory / SAFETENSORS_INDEX] if p.is_file() and p != target]
    if others:
        raise FileExistsError(f"{directory} already holds other weight files ({', '.join(others)}); "
                              "write the draft model to an empty directory")
    (directory / CONFIG_FILE).write_text(
        json.dumps(config_to_dict(cfg, base_model_archs), indent=2) + "\n", encoding="utf-8")
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(tensors, str(target), metadata={"format": "pt"})
    else:
        by_id: dict[int, Any] = {}   # alias copies (one array) stay one storage in the file
        for v in tensors.values():
            by_id.setdefault(id(v), v)
        as_torch = {i: _numpy_to_torch(torch, v) for i, v in by_id.items()}
        torch.save({k: as_torch[id(v)] for k, v in tensors.items()}, str(target))
    return target

