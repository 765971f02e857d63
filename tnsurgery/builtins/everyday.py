"""Everyday English sentences, generated from a small grammar written for tnsurgery:
the default corpus of the ``sentences`` data source.

Label-free general-domain text that needs no file and no download: what a
calibration of a text model can run on when the user has no text of their own (the
shipped MiniLM recipes use it). The sentences are simple (people, places, times,
weather, questions), so a calibration on them fits text of that kind best; a user's
own text of their domain is better where they have some. Deterministic: the same
list on every machine, in an order fixed by a seed.
"""

from __future__ import annotations

import random

PEOPLE = (
    "The farmer", "My aunt", "A young doctor", "Our teacher", "The whole team",
    "A little girl", "Two tourists", "The company", "My older brother", "The captain",
    "A local painter", "The new mayor", "Her grandfather", "The students", "A famous cook",
    "The bus driver", "Our neighbors", "The scientists", "A shy boy", "The night nurse",
    "The twins", "My best friend", "An engineer", "A stranger", "The choir",
    "The firefighters", "Our guests", "The baker", "The manager", "A retired sailor",
    "The librarian", "A group of hikers", "The postman", "My cousin", "The coach",
)  # fmt: skip
ACTIONS = (
    "carried a box of apples to", "walked slowly toward", "painted a picture of",
    "waited a long time near", "found a wallet outside", "took photos of",
    "cleaned the windows of", "drove an old truck past", "wrote a letter about",
    "read a novel at", "cooked dinner for everyone at", "planted trees around",
    "repaired the gate of", "bought warm bread at", "met an old friend at",
    "visited", "watched the sunset from", "jogged along", "opened a shop near",
    "gave a short talk at", "lost a glove at", "sold vegetables at",
    "asked for directions to", "slept badly after a trip to", "danced all night at",
)  # fmt: skip
PLACES = (
    "the market", "the river", "the train station", "the city park", "the chapel",
    "the clinic", "the village", "the seaside", "the primary school", "the town hall",
    "the art gallery", "the airport", "the mountain pass", "the harbor", "the orchard",
    "the football ground", "the bakery", "the dairy farm", "the office", "the stone bridge",
    "the county fair", "the zoo", "the island", "the campsite", "the old mill",
)  # fmt: skip
TIMES = (
    "on Sunday", "last winter", "before dawn", "after the storm", "during the holidays",
    "every weekend", "in the evening", "yesterday afternoon", "at noon", "this morning",
    "for the first time", "despite the rain", "with great care", "without a word",
    "in early spring", "twice a week", "after lunch", "on her birthday", "at midnight",
)  # fmt: skip
THINGS = (
    "the weather", "the new library", "the concert", "the price of rent", "the school play",
    "the bus timetable", "the harvest", "the local team", "the festival", "the elections",
    "the museum's new wing", "the road works", "the summer heat", "the night train",
)  # fmt: skip
OPINIONS = (
    "was better than expected", "has become a topic at every dinner", "made people angry",
    "surprised almost everyone", "will be discussed again next month", "seemed too quiet",
    "is the talk of the town", "was postponed once more", "drew a huge crowd",
)  # fmt: skip
WEATHER = (
    "It rained heavily", "Snow fell quietly", "A cold wind blew", "The sun shone brightly",
    "Thick fog covered the valley", "A thunderstorm broke out", "The air was warm and still",
)  # fmt: skip
QUESTIONS = (
    "Why did {p} go to {l}?", "How far is it from here to {l}?", "Did {p} ever work near {l}?",
    "When does {l} open on weekdays?", "Who told {p} about {t}?", "What did {p} think of {t}?",
)  # fmt: skip


def _one(r: random.Random) -> str:
    kind = r.random()
    person, place, time = r.choice(PEOPLE), r.choice(PLACES), r.choice(TIMES)
    if kind < 0.55:
        return f"{person} {r.choice(ACTIONS)} {place} {time}."
    if kind < 0.75:
        return f"{r.choice(THINGS).capitalize()} {r.choice(OPINIONS)}."
    if kind < 0.87:
        return f"{r.choice(WEATHER)} {time}, so {person.lower()} stayed at {place}."
    q = r.choice(QUESTIONS)
    return q.format(p=person.lower(), l=place, t=r.choice(THINGS))


def everyday_sentences(count: int = 4096, seed: int = 0) -> list[str]:
    """``count`` distinct sentences (at most about 100,000), in an order fixed by
    ``seed``."""
    r = random.Random(seed)
    out: dict[str, None] = {}
    tries = 0
    while len(out) < count and tries < 20 * count:
        out.setdefault(_one(r), None)
        tries += 1
    return list(out)
