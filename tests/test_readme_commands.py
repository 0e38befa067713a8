"""Commands in README.md work as written: every ``arctic-jax`` command parses, and the speculative
``arctic-jax generate`` examples (n-gram, suffix path and tree) run, as does the quick
``train-speculator`` command followed by the draft-model examples (arctic, arctic + suffix), and
the quick ``distill-swiftkv`` command followed by ``generate`` on the student it writes."""
from __future__ import annotations

import os
import re
import shlex

import pytest

from arctic_jax import cli
from arctic_jax.speculative.config import SpeculativeConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _shared_compilation_cache():
    """The commands here start engines over the embedded model again and again, as do the
    notebook kernels and test servers: with the run's persistent compilation cache (off in
    test processes otherwise, see conftest) a later start loads programs instead of compiling."""
    from arctic_jax.engine.compilation_cache import OFF, configure_compilation_cache, default_cache_dir

    configure_compilation_cache(default_cache_dir())
    yield
    configure_compilation_cache(OFF)


def readme_commands() -> list[list[str]]:
    """argv (without the program name) of every ``arctic-jax`` command in README.md's bash blocks,
    backslash continuations joined and trailing comments dropped."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("arctic-jax "):   # other lines (curl) may hold multi-line quotes
                commands.append(shlex.split(line, comments=True)[1:])
    return commands


def speculative_generate_commands() -> list[list[str]]:
    return [argv for argv in readme_commands()
            if argv[0] == "generate" and "--speculative-config" in argv]


def test_every_readme_command_parses():
    commands = readme_commands()
    assert {argv[0] for argv in commands} == {"generate", "serve", "bench", "train-speculator",
                                              "distill-swiftkv", "embed"}, commands
    parser = cli.build_parser()
    for argv in commands:
        parser.parse_args(argv)     # exits (failing the test) on an unknown flag or a bad value


def _kind(config: SpeculativeConfig) -> str:
    return (config.method + ("-tree" if config.suffix_use_tree_spec else "")
            + ("+suffix" if config.enable_suffix_decoding else ""))


@pytest.mark.parametrize("method", ["ngram", "suffix", "suffix-tree"])
def test_readme_speculative_generate_runs(capsys, method):
    parser = cli.build_parser()
    found = [argv for argv in speculative_generate_commands()
             if _kind(parser.parse_args(argv).speculative_config) == method]
    assert len(found) == 1, f"expected one {method} generate command in README.md, got {found}"
    argv = found[0]
    args = parser.parse_args(argv)
    assert isinstance(args.speculative_config, SpeculativeConfig) and args.temperature == 0
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert out.strip(), f"no text on stdout; stderr: {err[-2000:]}"


def test_readme_governor_bench_runs(capsys):
    """The README's ``bench`` command with ``adaptive_disable_batch_size`` runs and reports the
    governor's steps (which mode wins depends on the machine's timing, so it is not asserted)."""
    found = [argv for argv in readme_commands()
             if argv[0] == "bench" and "adaptive_disable_batch_size" in " ".join(argv)]
    assert len(found) == 1, found
    assert cli.main(found[0]) == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("governor: above 4 running requests"))
    on, off = (int(n) for n in re.findall(r"(\d+) steps speculated and (\d+) did not", line)[0])
    # a first window of 16 timed steps speculating (+1 untimed), then plain decoding measured:
    # the run has at least 2 x 13 steps with 8 requests running (64 tokens, at most 5 a step)
    assert on >= 17 and off > 0, line
    assert "16/16 completed" in out


def test_readme_train_speculator_then_arctic_generate_runs(capsys, tmp_path, monkeypatch):
    """The quick ``train-speculator`` command writes the checkpoint the two draft-model ``generate``
    examples read (run from a scratch directory, as a user would from theirs)."""
    monkeypatch.chdir(tmp_path)
    parser = cli.build_parser()
    train = [argv for argv in readme_commands() if argv[0] == "train-speculator"]
    assert len(train) == 1, train
    assert cli.main(train[0]) == 0, capsys.readouterr().err[-2000:]
    out, _ = capsys.readouterr()
    assert "tokens per step" in out
    found = {}
    for argv in speculative_generate_commands():
        kind = _kind(parser.parse_args(argv).speculative_config)
        if kind.startswith("arctic"):
            found[kind] = argv
    assert set(found) == {"arctic", "arctic+suffix"}, found
    for argv in found.values():
        rc = cli.main(argv)
        out, err = capsys.readouterr()
        assert rc == 0, err[-2000:]
        assert out.strip(), f"no text on stdout; stderr: {err[-2000:]}"


def test_readme_distill_swiftkv_then_generate_runs(capsys, tmp_path, monkeypatch):
    """The quick ``distill-swiftkv`` command writes the SwiftKV checkpoint the ``generate`` example
    after it serves (run from a scratch directory)."""
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    distill = [argv for argv in commands if argv[0] == "distill-swiftkv"]
    assert len(distill) == 1, distill
    output = distill[0][distill[0].index("--output") + 1]
    serve = [argv for argv in commands if argv[0] == "generate" and "--model" in argv
             and argv[argv.index("--model") + 1] == output]
    assert len(serve) == 1, serve
    assert cli.main(distill[0]) == 0, capsys.readouterr().err[-2000:]
    out, _ = capsys.readouterr()
    assert "top-1" in out
    with open(os.path.join(output, "config.json"), encoding="utf-8") as f:
        assert '"llama_swiftkv"' in f.read()
    rc = cli.main(serve[0])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert out.strip(), f"no text on stdout; stderr: {err[-2000:]}"


def test_readme_embed_command_runs(tmp_path, monkeypatch):
    """The README's ``printf ... > texts.txt`` then ``arctic-jax embed`` writes one normalised
    384-wide all-MiniLM-L6-v2 vector per line, equal to ``Embedder.embed`` of those lines; with
    ``--quantization fp8``, close to them."""
    import numpy as np

    from arctic_jax import Embedder

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        printf = re.search(r"^printf '(.*)' > texts\.txt$", f.read(), flags=re.MULTILINE)
    assert printf, "README.md: expected the printf line that writes texts.txt"
    texts = printf.group(1).encode().decode("unicode_escape").splitlines()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    [plain, fp8] = [a for a in readme_commands() if a[0] == "embed"]
    assert "--quantization" not in plain and fp8[fp8.index("--quantization") + 1] == "fp8"
    reference = Embedder("all-MiniLM-L6-v2").embed(texts)
    for argv in (plain, fp8):
        assert cli.main(argv) == 0
        vectors = np.load(tmp_path / argv[argv.index("--output") + 1])
        assert vectors.shape == (len(texts), 384) and len(texts) == 2
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        if argv is plain:
            np.testing.assert_allclose(vectors, reference, atol=1e-5)
        else:   # FP8 matmuls: close to the float32 vectors, not equal to them
            cosines = np.sum(vectors * reference, axis=1)
            assert (cosines >= 0.99).all() and np.abs(vectors - reference).max() > 1e-4, cosines
