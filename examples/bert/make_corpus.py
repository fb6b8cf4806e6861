"""Writes ``corpus.txt`` beside this file: the small pretraining corpus of
``examples/bert_pretrain.py``, generated (not downloaded) from the grammar below.

Format (BERT's): one sentence per line, documents separated by an empty line. Each document
keeps to one topic and one cast of characters, so the next sentence of a document is
predictable from the sentence before it and a sentence of another document is not: the
next-sentence task has something to learn, and so does the masked language model (agreement,
topic words, names). Deterministic: ``python examples/bert/make_corpus.py`` rewrites the same
bytes (tests/test_bert_example.py checks that).
"""
import os
import random

NAMES = ["anna", "boris", "clara", "david", "elena", "felix", "greta", "hugo", "irene", "jonas",
         "karla", "leon", "maria", "nils", "olga", "paul", "rosa", "simon", "tara", "viktor"]
TOWNS = ["northfield", "ashby", "millbrook", "redcliff", "stonehaven", "westmoor", "elmdale",
         "brightwater"]
TIMES = ["in the morning", "at noon", "in the evening", "late at night", "on monday",
         "on friday", "after lunch", "before dawn"]

# topic -> (nouns, verbs in past tense, adjectives, sentence templates)
TOPICS = {
    "market": (
        ["apples", "bread", "cheese", "fish", "honey", "onions", "plums", "carrots"],
        ["bought", "sold", "weighed", "wrapped", "counted", "carried"],
        ["fresh", "cheap", "ripe", "heavy", "sweet", "small"],
        ["{name} {verb} {adj} {noun} at the market of {town} {time} .",
         "the stall of {name} had {adj} {noun} and {adj2} {noun2} .",
         "{name} paid three coins for the {noun} and {verb2} the {noun2} .",
         "by {time2} the {noun} were gone and {name} went home .",
         "{name2} asked {name} about the price of the {noun} ."]),
    "river": (
        ["boat", "bridge", "current", "fish", "bank", "reeds", "ferry", "water"],
        ["crossed", "rowed", "watched", "followed", "fished", "waded"],
        ["cold", "wide", "muddy", "quiet", "fast", "deep"],
        ["{name} {verb} the {adj} river near {town} {time} .",
         "the {noun} was {adj} and the {noun2} was {adj2} .",
         "{name} and {name2} {verb2} along the {noun} until {time2} .",
         "a heron stood in the {noun} while {name} {verb} the {noun2} .",
         "the river at {town} rose after the rain and covered the {noun} ."]),
    "school": (
        ["lesson", "teacher", "book", "chalk", "exam", "desk", "library", "letters"],
        ["read", "wrote", "learned", "copied", "explained", "corrected"],
        ["long", "difficult", "new", "old", "careful", "short"],
        ["{name} {verb} a {adj} {noun} at the school of {town} {time} .",
         "the teacher {verb2} the {noun} and {name} listened .",
         "{name2} sat at the {adj} desk next to {name} .",
         "after the {noun} {name} {verb} the {adj2} {noun2} in the library .",
         "the {noun} ended {time2} and the children ran outside ."]),
    "train": (
        ["station", "ticket", "platform", "carriage", "engine", "timetable", "luggage", "rails"],
        ["boarded", "missed", "waited", "checked", "reached", "left"],
        ["late", "crowded", "empty", "slow", "early", "noisy"],
        ["{name} {verb} the {adj} train to {town} {time} .",
         "the {noun} was {adj} and the {noun2} was {adj2} .",
         "{name} showed the {noun} to the conductor and {verb2} the {noun2} .",
         "{name2} waved from the {noun} as the train {verb} .",
         "the train from {town} arrived {time2} with {name} on board ."]),
    "garden": (
        ["roses", "beans", "soil", "spade", "hedge", "tomatoes", "seeds", "fence"],
        ["planted", "watered", "dug", "picked", "trimmed", "sowed"],
        ["green", "dry", "tall", "wet", "young", "bright"],
        ["{name} {verb} the {adj} {noun} in the garden at {town} {time} .",
         "the {noun} grew {adj} and the {noun2} stayed {adj2} .",
         "{name2} helped {name} and {verb2} the {noun} .",
         "{time2} {name} {verb} the {noun2} along the fence .",
         "the garden of {name} was the {adj} one in {town} ."]),
    "kitchen": (
        ["soup", "oven", "pan", "dough", "pepper", "knife", "kettle", "cake"],
        ["cooked", "baked", "stirred", "cut", "tasted", "boiled"],
        ["hot", "salty", "thick", "golden", "burnt", "warm"],
        ["{name} {verb} the {adj} {noun} in the kitchen {time} .",
         "the {noun} smelled {adj} and the {noun2} was {adj2} .",
         "{name2} {verb2} the {noun} while {name} washed the {noun2} .",
         "{time2} the {noun} was ready and {name} called {name2} .",
         "everyone in {town} knew the {adj} {noun} of {name} ."]),
    "mountain": (
        ["path", "summit", "snow", "rope", "cabin", "rocks", "valley", "map"],
        ["climbed", "crossed", "reached", "descended", "followed", "mapped"],
        ["steep", "icy", "narrow", "high", "windy", "rocky"],
        ["{name} {verb} the {adj} {noun} above {town} {time} .",
         "the {noun} was {adj} and the {noun2} was {adj2} .",
         "{name} and {name2} {verb2} the {noun} with a rope .",
         "from the {noun} {name} saw the {noun2} far below .",
         "they reached the cabin {time2} and {name} lit a fire ."]),
    "workshop": (
        ["hammer", "nails", "table", "chair", "saw", "planks", "glue", "drawer"],
        ["built", "repaired", "painted", "measured", "sanded", "fixed"],
        ["wooden", "broken", "smooth", "square", "sturdy", "rough"],
        ["{name} {verb} a {adj} {noun} in the workshop at {town} {time} .",
         "the {noun} was {adj} so {name} {verb2} the {noun2} .",
         "{name2} held the {noun} while {name} {verb} it .",
         "{time2} the {adj} {noun} stood finished by the door .",
         "people from {town} brought {name} every {adj2} {noun2} ."]),
}


def sentence(rng, topic, cast):
    nouns, verbs, adjectives, templates = TOPICS[topic]
    noun, noun2 = rng.sample(nouns, 2)
    verb, verb2 = rng.sample(verbs, 2)
    adj, adj2 = rng.sample(adjectives, 2)
    time, time2 = rng.sample(TIMES, 2)
    return rng.choice(templates).format(
        name=cast[0], name2=cast[1], town=cast[2], noun=noun, noun2=noun2, verb=verb,
        verb2=verb2, adj=adj, adj2=adj2, time=time, time2=time2)


def corpus(documents=700, seed=2026):
    rng = random.Random(seed)
    lines = []
    for _ in range(documents):
        topic = rng.choice(sorted(TOPICS))
        cast = rng.sample(NAMES, 2) + [rng.choice(TOWNS)]
        lines.extend(sentence(rng, topic, cast) for _ in range(rng.randint(3, 8)))
        lines.append("")
    return "\n".join(lines)


PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.txt")

if __name__ == "__main__":
    with open(PATH, "w") as out:
        out.write(corpus())
    print("wrote %s (%d bytes)" % (PATH, os.path.getsize(PATH)))
