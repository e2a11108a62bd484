"""Write train.csv and dev.csv: a small, clearly synthetic news-topic set in AG News's CSV layout.

Same header and label convention as the AG News CSV most people download (``Class Index,Title,
Description``; classes 1 = World, 2 = Sports, 3 = Business, 4 = Sci/Tech), but every row is made
here from the templates and word lists below (seeded): no AG News text is copied. Run from this
folder: ``python generate.py``.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

TOPICS = {
    1: (
        ["Talks", "Ceasefire", "Election", "Summit", "Protests", "Embassy"],
        ["the prime minister", "the foreign ministry", "rebel leaders", "the United Nations", "opposition parties"],
        ["met in the capital to discuss the border dispute", "called for new elections after the vote",
         "agreed to a ceasefire after weeks of fighting", "sent envoys to resume peace negotiations"],
    ),
    2: (
        ["Striker", "Cup final", "Coach", "Season opener", "Title race", "Olympic team"],
        ["the home side", "the league champions", "the national team", "the veteran striker", "the coach"],
        ["scored twice in the second half to win the match", "lost the final on penalties",
         "signed a new contract before the season", "set a record in the qualifying round"],
    ),
    3: (
        ["Shares", "Profit", "Merger", "Oil prices", "Earnings", "Central bank"],
        ["the retailer", "investors", "the airline", "the central bank", "the chip maker's shareholders"],
        ["reported quarterly profit above forecasts", "agreed to buy a rival for two billion dollars",
         "raised interest rates by a quarter point", "saw shares fall after weak sales"],
    ),
    4: (
        ["Software", "Satellite", "Browser", "Chip", "Researchers", "Internet"],
        ["scientists", "the software company", "engineers", "the space agency", "a team of researchers"],
        ["released a new version of its operating system", "launched a satellite to study the climate",
         "found a security flaw in the web browser", "built a faster processor for mobile phones"],
    ),
}  # fmt: skip


def rows(count: int, seed: int) -> list[tuple[int, str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        label = rng.choice(sorted(TOPICS))
        titles, subjects, actions = TOPICS[label]
        title = f"{rng.choice(titles)}: {rng.choice(subjects)} {rng.choice(actions).split(' ')[0]}"
        subject = rng.choice(subjects)
        description = f"{subject[0].upper()}{subject[1:]} {rng.choice(actions)}, officials said on Monday."
        out.append((label, title, description))
    return out


def write(path: Path, data: list[tuple[int, str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Class Index", "Title", "Description"])
        writer.writerows(data)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    write(here / "train.csv", rows(320, seed=1))
    write(here / "dev.csv", rows(80, seed=2))
