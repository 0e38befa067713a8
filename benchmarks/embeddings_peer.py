"""The peer for ``arctic-jax bench --embeddings``: transformers' BertModel on the same GPU.

Model forward only, as in ``../shared/reference/h200-baselines.md``: random fp16 weights of the
BERT-base (snowflake-arctic-embed-m) shape, SDPA attention, equal-length pre-tokenized batches
(no padding, no tokenization), CLS pooling and L2 normalisation, the result copied to the host.
Run it in the same lease as our benchmark so that the ratio compares like with like.

    python benchmarks/embeddings_peer.py --shapes 512x256,50x2048 [--append-results]
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=30522, max_position_embeddings=512)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"512x256,50x2048"`` -> [(length, batch), ...]."""
    out = []
    for part in text.split(","):
        length, batch = part.lower().split("x")
        out.append((int(length), int(batch)))
    return out


def time_forward(model, length: int, batch: int, iters: int) -> float:
    """Tokens per second of CLS-pooled, L2-normalised embeddings copied to the host."""
    import torch

    ids = torch.randint(1000, 30000, (batch, length), device="cuda")
    mask = torch.ones_like(ids)

    def once():
        with torch.inference_mode():
            cls = model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
            return torch.nn.functional.normalize(cls.float(), dim=-1).cpu()

    for _ in range(3):
        once()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        once()
    torch.cuda.synchronize()
    return batch * length * iters / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="512x256,50x2048", help="LENGTHxBATCH, comma-separated")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--append-results", action="store_true")
    args = p.parse_args(argv)
    import torch
    import transformers

    model = transformers.BertModel(transformers.BertConfig(**BERT_BASE), add_pooling_layer=False)
    model = model.to("cuda", torch.float16).eval()
    model.config._attn_implementation = "sdpa"
    card = torch.cuda.get_device_name()
    rows = [(length, batch, time_forward(model, length, batch, args.iters))
            for length, batch in parse_shapes(args.shapes)]
    lines = ["| system | input | tokens/s |", "|---|---|---:|"]
    lines += [f"| transformers {transformers.__version__} BertModel, SDPA, fp16 | {length} tokens x "
              f"{batch} | {rate / 1e6:.2f}M |" for length, batch, rate in rows]
    table = "\n".join(lines)
    print(f"{card}, torch {torch.__version__}\n{table}")
    if args.append_results:
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(f"\n### Peer: transformers BertModel forward ({card}, "
                    f"{datetime.date.today()}, torch {torch.__version__})\n\n"
                    f"`python benchmarks/embeddings_peer.py --shapes {args.shapes}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
