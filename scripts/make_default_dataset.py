"""Write moe_hub/datasets/default.jsonl: the small multi-task chat dataset moe-hub ships.

Six distinct tasks (arithmetic, string reversal, uppercase, word counting, capitals, sorting) in
chat ``messages`` format. The tasks differ on purpose: a router has something to specialise on.
Deterministic: the same script always writes the same bytes. Run from the repository root:

    python scripts/make_default_dataset.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TARGET = Path(__file__).resolve().parents[1] / "moe_hub" / "datasets" / "default.jsonl"
ROWS_PER_TASK = 50
SEED = 1234

# A small hand-written table; capitals as commonly given in English.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Poland": "Warsaw", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin", "Austria": "Vienna",
    "Greece": "Athens", "Hungary": "Budapest", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa",
    "Mexico": "Mexico City", "Peru": "Lima", "Chile": "Santiago", "Argentina": "Buenos Aires",
    "Australia": "Canberra", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Turkey": "Ankara",
    "Morocco": "Rabat", "Cuba": "Havana",
}
WORDS = [
    "apple", "river", "stone", "cloud", "green", "music", "table", "light", "north", "paper",
    "train", "horse", "glass", "bread", "chair", "smile", "ocean", "tiger", "plant", "storm",
]


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}?", str(value)


def reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS) + rng.choice(WORDS)
    return f"Reverse the string: {word}", word[::-1]


def uppercase(rng: random.Random) -> tuple[str, str]:
    text = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
    return f"Write in uppercase: {text}", text.upper()


def count_words(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
    return f"How many words are in: {' '.join(words)}", str(len(words))


def capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", CAPITALS[country]


def sort_numbers(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
    shown = ", ".join(map(str, numbers))
    return f"Sort in ascending order: {shown}", ", ".join(map(str, sorted(numbers)))


TASKS = {
    "arithmetic": arithmetic, "reverse": reverse, "uppercase": uppercase,
    "count_words": count_words, "capital": capital, "sort": sort_numbers,
}


def rows() -> list[dict]:
    rng = random.Random(SEED)
    out = []
    for _ in range(ROWS_PER_TASK):
        for task, make in TASKS.items():
            question, answer = make(rng)
            out.append({
                "task": task,
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ],
            })
    return out


def main() -> None:
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    with open(TARGET, "w", encoding="utf-8") as f:
        for row in rows():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {ROWS_PER_TASK * len(TASKS)} rows to {TARGET}")


if __name__ == "__main__":
    main()
