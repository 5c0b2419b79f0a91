"""`directpo experiment sentiment|dialogue|summarize`: the paper's experiments, end to end, with a report."""
from __future__ import annotations

import argparse
import json

from ..config import add_flags

WINRATE_HELP = {
    "dialogue": "dialogue (Fig. 3 left, Anthropic HH): DPO vs Preferred-FT, Best-of-N, PPO by win rate "
                "against the chosen response over sampling temperatures, judged by a reward model trained on its own "
                "split, with paired per-prompt tests (--seeds: pooled over seeds); resumable; writes points.json, "
                "winrate.png, summary.md",
    "summarize": "summarization (Fig. 2 right, Reddit TL;DR): DPO vs Preferred-FT, Best-of-N, PPO by win rate "
                 "against the chosen summary over sampling temperatures; resumable; writes points.json, "
                 "winrate.png, summary.md",
}


def register(command: str, parser) -> None:
    from ..experiments.sentiment import SentimentConfig
    from ..experiments.winrate.config import DialogueConfig, SummarizeConfig

    experiments = parser.add_subparsers(dest="experiment", required=True)
    sentiment = experiments.add_parser(
        "sentiment", help="controlled sentiment (Fig. 2 left): DPO vs PPO, PPO-GT, Unlikelihood, Preferred-FT, "
                          "Best-of-N on reward vs KL; resumable; writes points.json, frontier.png, summary.md",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(sentiment, SentimentConfig)
    sentiment.set_defaults(func=run_sentiment)
    for name, cls in (("dialogue", DialogueConfig), ("summarize", SummarizeConfig)):
        study = experiments.add_parser(name, help=WINRATE_HELP[name], description=WINRATE_HELP[name],
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_flags(study, cls)
        study.set_defaults(func=run_winrate, study_config=cls)


def run_sentiment(args) -> int:
    """Run the study; print its output directory, point count, comparisons and time as JSON."""
    from ..experiments.sentiment import run_sentiment as run, sentiment_config

    result = run(sentiment_config(args))
    print(json.dumps({k: result[k] for k in ("output_dir", "points", "comparisons", "seconds")}))
    return 0


def run_winrate(args) -> int:
    """Run the dialogue or summarization study; print its output directory, win rates and time as JSON."""
    from ..experiments.winrate import run_winrate as run, winrate_config

    result = run(winrate_config(args, args.study_config))
    print(json.dumps({k: result[k] for k in ("output_dir", "task", "preset", "win_rates", "seconds")}))
    return 0
