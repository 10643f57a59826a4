"""Generated instruction tasks with short, formulaic answers, for the chat part of the mixture.

Each task draws one (user message, assistant answer) pair from a `random.Random`:
arithmetic (2-digit addition above all; held-out pairs are never trained on), counting,
facts stated about a generated scene, short Python code tasks, and a few questions about the
model itself. `conversations.py` turns pairs into Llama 4 chat token sequences.
"""

from __future__ import annotations

import random
import zlib

from .data_images import describe, place_of, random_scene

ADDITION_TEMPLATES = ("What is {a}+{b}?", "What is {a} + {b}?", "{a}+{b}=", "Compute {a} + {b}.",
                      "Add {a} and {b}.", "What is the sum of {a} and {b}?")
EVAL_ADDITION_TEMPLATE = "What is {a}+{b}?"


def addition_held_out(a: int, b: int) -> bool:
    """One 2-digit pair in ten is held out of training (for the evaluation)."""
    return zlib.crc32(f"{a}+{b}".encode()) % 10 == 0


def held_out_additions() -> list[tuple[int, int]]:
    return [(a, b) for a in range(10, 100) for b in range(10, 100) if addition_held_out(a, b)]


def addition(rng: random.Random) -> tuple[str, str]:
    while True:
        if rng.random() < 0.85:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 9)
            if rng.random() < 0.5:
                a, b = b, a
        if not addition_held_out(a, b):
            return rng.choice(ADDITION_TEMPLATES).format(a=a, b=b), str(a + b)


def subtraction(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(0, 99)
    b = rng.randint(0, a)
    return rng.choice(("What is {a}-{b}?", "What is {a} - {b}?", "Subtract {b} from {a}.")).format(a=a, b=b), str(a - b)


def counting(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        a = rng.randint(0, 90)
        b = a + rng.randint(2, 7)
        return f"Count from {a} to {b}.", ", ".join(str(i) for i in range(a, b + 1))
    if kind == 1:
        n = rng.randint(0, 998)
        return rng.choice((f"What number comes after {n}?", f"What comes after {n}?")), str(n + 1)
    if kind == 2:
        n = rng.randint(1, 999)
        return f"What number comes before {n}?", str(n - 1)
    words = rng.sample(("apple", "pear", "plum", "cat", "dog", "bird", "tree", "car", "boat", "book", "cup",
                        "lamp", "star", "moon", "fish"), rng.randint(1, 7))
    return f"How many words are in this list: {', '.join(words)}?", str(len(words))


def scene_facts(rng: random.Random) -> tuple[str, str]:
    scene = random_scene(rng, counted=0.4)
    it, n = scene.items[0], len(scene.items)
    q = rng.choice(["shape", "colour", "count"] + (["where"] if n == 1 else []))
    question, answer = {
        "shape": ("What shape is in the picture?", it.shape),
        "colour": (f"What colour is the {it.shape}?", it.colour),
        "count": (f"How many {it.shape}s are there?", str(n)),
        "where": (f"Where is the {it.shape}?", place_of(it)),
    }[q]
    return f"{describe(scene)} {question}", answer


_CODE_TASKS = [
    ("returns the sum of two numbers", "def add(a, b):\n    return a + b"),
    ("returns the product of two numbers", "def multiply(a, b):\n    return a * b"),
    ("returns the difference of two numbers", "def subtract(a, b):\n    return a - b"),
    ("returns the larger of two numbers", "def maximum(a, b):\n    return a if a > b else b"),
    ("returns the smaller of two numbers", "def minimum(a, b):\n    return a if a < b else b"),
    ("returns the square of a number", "def square(x):\n    return x * x"),
    ("checks whether a number is even", "def is_even(n):\n    return n % 2 == 0"),
    ("reverses a string", "def reverse(s):\n    return s[::-1]"),
    ("returns the length of a list", "def length(items):\n    return len(items)"),
    ("returns the first element of a list", "def first(items):\n    return items[0]"),
    ("returns the last element of a list", "def last(items):\n    return items[-1]"),
    ("sums a list of numbers", "def total(numbers):\n    return sum(numbers)"),
    ("returns the average of a list of numbers", "def mean(numbers):\n    return sum(numbers) / len(numbers)"),
    ("converts a string to upper case", "def shout(text):\n    return text.upper()"),
    ("counts the vowels in a string",
     "def count_vowels(text):\n    return sum(1 for c in text.lower() if c in \"aeiou\")"),
    ("returns the factorial of n",
     "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result"),
    ("checks whether a string is a palindrome", "def is_palindrome(s):\n    return s == s[::-1]"),
    ("returns the even numbers of a list", "def evens(numbers):\n    return [n for n in numbers if n % 2 == 0]"),
    ("prints hello world", "def hello():\n    print(\"Hello, world!\")"),
    ("returns the absolute value of a number", "def absolute(x):\n    return -x if x < 0 else x"),
]


def code_task(rng: random.Random) -> tuple[str, str]:
    what, answer = rng.choice(_CODE_TASKS)
    ask = rng.choice(("Write a Python function that {w}.", "Write a function that {w}.",
                      "Python: a function that {w}."))
    return ask.format(w=what), answer


INTRO = ("Hello! I am a tiny Llama 4 demo model served by maverick-ray. I can add two numbers, "
         "count, describe simple pictures of shapes and write small Python functions.")


def small_talk(rng: random.Random) -> tuple[str, str]:
    return rng.choice(("Hello!", "Hi!", "Hello from maverick-ray", "Who are you?", "What can you do?",
                       "Hello, who are you?")), INTRO


# task name -> (generator, share of the text-chat draws)
CHAT_TASKS = {
    "addition": (addition, 0.55), "subtraction": (subtraction, 0.05), "counting": (counting, 0.1),
    "scene_facts": (scene_facts, 0.12), "code_task": (code_task, 0.14), "small_talk": (small_talk, 0.04),
}


def chat_pair(rng: random.Random) -> tuple[str, str, str]:
    """(task name, question, answer) drawn by the task shares."""
    names = list(CHAT_TASKS)
    name = rng.choices(names, weights=[CHAT_TASKS[n][1] for n in names])[0]
    q, a = CHAT_TASKS[name][0](rng)
    return name, q, a
