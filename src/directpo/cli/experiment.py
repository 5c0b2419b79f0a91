"""`directpo experiment sentiment`: the paper's experiments, end to end, with a report."""
from __future__ import annotations

import argparse
import json

from ..config import add_flags


def register(command: str, parser) -> None:
    from ..experiments.sentiment import SentimentConfig

    experiments = parser.add_subparsers(dest="experiment", required=True)
    sentiment = experiments.add_parser(
        "sentiment", help="controlled sentiment (Fig. 2 left): DPO vs PPO, PPO-GT, Unlikelihood, Preferred-FT, "
                          "Best-of-N on reward vs KL; resumable; writes points.json, frontier.png, summary.md",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(sentiment, SentimentConfig)
    sentiment.set_defaults(func=run_sentiment)


def run_sentiment(args) -> int:
    """Run the study; print its output directory, point count, comparisons and time as JSON."""
    from ..experiments.sentiment import run_sentiment as run, sentiment_config

    result = run(sentiment_config(args))
    print(json.dumps({k: result[k] for k in ("output_dir", "points", "comparisons", "seconds")}))
    return 0
