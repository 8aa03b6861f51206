"""An offline corpus of simple children's stories, written by a seeded template generator.

The main job trains a tiny language model and asks it to continue "Once upon a time". The
natural data for that is TinyStories, but it needs a download, so this module writes stories in
the same spirit instead: short plots a small child can follow, a small vocabulary and a lot of
repetition. That regularity is exactly what lets a tiny model learn grammar in minutes on a CPU.

A story is an opening plus a plot. A plot is a list of beats, and each beat lists a few
interchangeable phrasings with slots: {A} is the hero, {B} a friend, {P} the hero's mom or dad.
{A.he}, {A.him}, {A.his}, {A.himself}, {A.He} and {A.His} become the hero's own pronouns, so
agreement is decided once per character rather than in every sentence. All choices come from
one random.Random, so the same seed always gives the same stories.

The words live in `words.py` and the plots in `plots.py`; this file only assembles them.
"""

import random
import re
from types import SimpleNamespace
from typing import Iterator

from .plots import PLOTS
from .words import (ANIMALS, BOY_NAMES, BREAKABLE, CHILD_ADJECTIVES, CHILD_JOY, DAYS, DESCRIPTIONS, FEARS, FINDS,
                    FLOWERS, GAMES, GIFTS, GIRL_NAMES, HE_PET_NAMES, HOMES, LATER, ONCE_OPENINGS, OTHER_OPENINGS,
                    PLACES, PRONOUNS, RULES, SHE_PET_NAMES, TOYS, TRAITS, TROUBLES)

CORPUS_DESCRIPTION = (
    "Synthetic corpus of template-generated children's stories made by tinymixtral's seeded "
    "story generator (not TinyStories), for offline use."
)

PLOT_NAMES = list(PLOTS)
TOY_NAMES, PLACE_NAMES, ANIMAL_KINDS = list(TOYS), list(PLACES), list(ANIMALS)


# ---------------------------------------------------------------- generator
class Slot(SimpleNamespace):
    """A bag of words for one slot; it formats as its name, so templates say {A} and {A.his}."""

    def __format__(self, spec):
        return format(self.name, spec)


def _article(phrase: str) -> str:
    """Return phrase with "a" or "an" in front, chosen by its first letter."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _character(rng, taken, animal):
    gender = rng.choice(("he", "she"))
    if animal:
        kind = rng.choice(ANIMAL_KINDS)
        adjectives, joy = ANIMALS[kind]
        names = HE_PET_NAMES if gender == "he" else SHE_PET_NAMES
    else:
        kind = "boy" if gender == "he" else "girl"
        adjectives, joy = CHILD_ADJECTIVES, rng.choice(CHILD_JOY)
        names = BOY_NAMES if gender == "he" else GIRL_NAMES
    name = rng.choice([n for n in names if n not in taken])  # never "Tom gave Tom a hug"
    taken.add(name)
    he, him, his, himself = PRONOUNS[gender]
    named = rng.choice(("named", "called"))
    intro = f"{_article(rng.choice(adjectives) + ' ' + kind)} {named} {name}"
    return Slot(name=name, kind=kind, intro=intro, joy=joy.format(his=his), he=he, him=him,
                his=his, himself=himself, He=he.capitalize(), His=his.capitalize())


def _parent(rng):
    if rng.random() < 0.5:
        return Slot(name="mom", Name="Mom", he="she", him="her", his="her", He="She")
    return Slot(name="dad", Name="Dad", he="he", him="him", his="his", He="He")


def _thing(rng, name, adjectives):
    full = f"{rng.choice(adjectives)} {name}"
    return Slot(name=name, full=full, a=_article(full), the="the " + name)


def _place(rng):
    name = rng.choice(PLACE_NAMES)
    preposition, spots = PLACES[name]
    return Slot(name=name, at=f"{preposition} the {name}", to=f"to the {name}", spot=rng.choice(spots))


def _fill(template: str, slots: dict) -> str:
    """Fill a template's {slots}; repeat, since a slot's own text may contain slots."""
    while "{" in template:
        template = template.format_map(slots)
    return template


# A slot such as {toy.the} can begin a sentence; capitalise after ". ", "! ", "? ", '. "' and '." '.
# ('!" said Tom' stays lower case: there the quote closes and the sentence goes on.)
_SENTENCE_START = re.compile(r'(^|[.!?] "?|\." )([a-z])')


def generate_story(rng: random.Random) -> str:
    """Return one story, drawing every choice from rng."""
    plot = PLOTS[rng.choice(PLOT_NAMES)]
    taken = set()
    hero = _character(rng, taken, animal=not plot["child"] and rng.random() < 0.4)
    friend = _character(rng, taken, animal=rng.random() < 0.4)
    opening = rng.choice(ONCE_OPENINGS if rng.random() < 0.8 else OTHER_OPENINGS)
    toy, btoy = rng.choice(TOY_NAMES), rng.choice(BREAKABLE)
    slots = dict(
        A=hero, B=friend, P=_parent(rng), place=_place(rng),
        day=rng.choice(LATER if opening.startswith("One") else DAYS),
        toy=_thing(rng, toy, TOYS[toy]), btoy=_thing(rng, btoy, TOYS[btoy]),
        trait=rng.choice(TRAITS), home=rng.choice(HOMES), game=rng.choice(GAMES),
        flower=Slot(a=_article(rng.choice(FLOWERS))), fear=Slot(**rng.choice(FEARS)),
        trouble=Slot(**rng.choice(TROUBLES)), gift=Slot(**rng.choice(GIFTS)),
        find=Slot(**rng.choice(FINDS)), rule=Slot(**rng.choice(RULES)),
    )
    parts = [opening, rng.choice(DESCRIPTIONS)] + [rng.choice(beat) for beat in plot["beats"]]
    text = " ".join(_fill(part, slots) for part in parts if part)
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)


def iter_stories(n: int, seed: int = 0) -> Iterator[str]:
    """Yield n stories, lazily; the same seed always yields the same stories."""
    rng = random.Random(seed)
    for _ in range(n):
        yield generate_story(rng)


def generate_stories(n: int, seed: int = 0) -> list[str]:
    """Return n stories as a list; the same seed always gives the same list."""
    return list(iter_stories(n, seed))
