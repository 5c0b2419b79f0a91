"""SYNTHETIC comparisons in the Reddit TL;DR format, for the summarize smoke preset only: the study
runs end to end without a download. Nothing learned from them is a result about summarization.

Each post is about one topic; the preferred summary names the topic and the poster's problem, the
other one is about something else, so a preference does exist to be learned."""
from __future__ import annotations

import random

SUBREDDITS = ["relationships", "personalfinance", "AskReddit", "cooking", "running", "jobs"]
TOPICS = ["landlord", "roommate", "boss", "car", "dog", "sister", "budget", "marathon", "oven", "interview"]
PROBLEMS = ["keeps ignoring me", "costs too much", "broke down again", "is always late", "makes me anxious",
            "wants more money", "will not listen"]
FILLER = ["I have tried talking about it.", "It has been going on for months.", "Friends say I should wait.",
          "I do not know what to do next.", "Any advice is welcome.", "Thanks for reading this far."]


def synthetic_tldr_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` comparison rows {info: {post, title, subreddit}, summaries: [{text}, {text}], choice}."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic, problem = rng.choice(TOPICS), rng.choice(PROBLEMS)
        other = rng.choice([t for t in TOPICS if t != topic])
        post = " ".join([f"My {topic} {problem}."] + rng.sample(FILLER, 3) + [f"Post {i}."])
        good = f" my {topic} {problem}, what should I do?"
        bad = f" I like my {other} and {rng.choice(FILLER).lower()}"
        choice = rng.randint(0, 1)
        summaries = [{"text": good}, {"text": bad}] if choice == 0 else [{"text": bad}, {"text": good}]
        rows.append({"info": {"post": post, "title": f"Advice about my {topic}?", "subreddit": rng.choice(SUBREDDITS)},
                     "summaries": summaries, "choice": choice})
    return rows
