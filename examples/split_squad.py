"""Split a SQuAD JSON file by article into train.json and dev.json (no context is shared).

    python examples/split_squad.py ../shared/data/squad-v1.1/dev-v1.1.json squad-split --dev-articles 8
"""

import argparse
import json
import random
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("source", type=Path)
parser.add_argument("target", type=Path)
parser.add_argument("--dev-articles", type=int, default=8, help="articles held out for dev (default 8)")
parser.add_argument("--seed", type=int, default=13)
args = parser.parse_args()

tree = json.loads(args.source.read_text(encoding="utf-8"))
articles = list(tree["data"])
random.Random(args.seed).shuffle(articles)
args.target.mkdir(parents=True, exist_ok=True)
for name, part in (("dev", articles[:args.dev_articles]), ("train", articles[args.dev_articles:])):
    (args.target / f"{name}.json").write_text(json.dumps({"version": tree.get("version", ""), "data": part}))
    questions = sum(len(p["qas"]) for a in part for p in a["paragraphs"])
    print(f"{args.target / name}.json: {len(part)} articles, {questions} questions")
