"""The ``demo`` task: a shipped, deterministic generator of short dialogue -> summary pairs, and a
word-level tokenizer over its closed vocabulary, so the main job runs offline with nothing downloaded.

Each dialogue is a small chat between two people with one of several intents (plan a meeting, borrow
something, reschedule, pass on news), phrased from several templates, with small talk that the summary
must leave out. The summary repeats the facts that matter (who, what, where, when, why), so a model has
to find them in the dialogue and copy them in the right order: a small model needs real training, and
ROUGE-L keeps rising as it learns. Like human-written summaries, each is phrased one of two or three
ways at random: the target distribution has several modes, as open-ended generation does.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

TEACHER = Path(__file__).resolve().parent / "demo_teacher"
"""The shipped demo teacher: a T5 (4+4 layers, d_model 128, bfloat16 weights) trained by SFT on this task
(``python launch/train.py --config configs/demo.py:teacher`` makes it again)."""
LONG_TEACHER = Path(__file__).resolve().parent / "demo_long_teacher"
"""The same shape trained on ``demo_long`` (``configs/demo.py:teacher,long`` makes it again)."""

# Word pools, written as "|"-separated strings to keep them readable as tables.
NAMES = (
    "Anna|Ben|Carla|David|Emma|Felix|Grace|Henry|Iris|Jack|Kate|Liam|Maya|Noah|Olga|Paul|Rosa|Sam|Tina|"
    "Victor|Wendy|Yusuf|Zoe|Omar|Lena|Marco|Nina|Oscar|Priya|Quinn"
).split("|")
DAYS = "Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday".split("|")
TIMES = "8am|9am|10am|11am|noon|1pm|2pm|3pm|4pm|5pm|6pm|7pm|8pm".split("|")
ACTIVITIES = (
    "play tennis|go running|watch a movie|have lunch|study for the exam|visit the museum|go hiking|"
    "cook dinner|play chess|go swimming|fix the bike|practice guitar|go shopping|paint the fence"
).split("|")
PLACES = (
    "the park|the library|the cafe|the gym|the beach|the station|my place|your place|the office|"
    "the mall|the lake|the market"
).split("|")
ITEMS = "umbrella|laptop|bike|camera|ladder|tent|charger|guitar|car|book|drill|suitcase|jacket|printer".split(
    "|"
)
REASONS = (
    "work|a dentist appointment|a family dinner|a cold|an exam|a flight|a deadline|a wedding|"
    "a job interview|a football match"
).split("|")
NEWS = (
    "got a new job|passed the exam|moved to a new flat|adopted a cat|won the race|"
    "broke a leg|bought a car|started a band|finished the marathon|lost the keys"
).split("|")
SMALL_TALK = (
    "How are you?|Nice weather today.|Did you see the game yesterday?|I am so tired this week.|"
    "Long time no see!|Thanks for the tea last time.|The traffic was terrible this morning."
).split("|")
SMALL_TALK_REPLIES = "Fine, thanks.|Yes, it is lovely.|Ha, not really.|Same here.|Indeed!|Oh no.".split("|")


Drawn = tuple[list[tuple[str, str]], tuple[str, ...], str]
"""What an intent draws: the dialogue's turns, its facts as a record (kind, then the fields in the order the
summary needs them; ``demo_long`` prompts with these), and the summary."""


def _plan(r: random.Random, a: str, b: str) -> Drawn:
    act, place, day, time = r.choice(ACTIVITIES), r.choice(PLACES), r.choice(DAYS), r.choice(TIMES)
    ask = r.choice(
        [f"Are you free on {day}?", f"What are you doing on {day}?", f"Do you have time on {day}?"]
    )
    offer = r.choice(
        [f"Want to {act} at {place}?", f"Shall we {act} at {place}?", f"Let us {act} at {place}."]
    )
    yes = r.choice(["Sure!", "Sounds good.", "Great idea.", "Yes, why not."])
    when = r.choice([f"Let us meet at {time}.", f"{time} works for me.", f"How about {time}?"])
    turns = [(a, ask), (b, "Yes, I am free."), (a, offer), (b, f"{yes} {when}")]
    summary = r.choice(
        [
            f"{a} and {b} will {act} at {place} on {day} at {time}.",
            f"On {day} at {time}, {a} and {b} are going to {act} at {place}.",
            f"{a} invites {b} to {act} at {place}. They meet on {day} at {time}.",
        ]
    )
    return turns, ("plan", a, b, act, place, day, time), summary


def _reschedule(r: random.Random, a: str, b: str) -> Drawn:
    act, day, day2, reason = r.choice(ACTIVITIES), *r.sample(DAYS, 2), r.choice(REASONS)
    turns = [
        (a, r.choice([f"Are we still going to {act} on {day}?", f"We wanted to {act} on {day}, right?"])),
        (b, r.choice([f"Sorry, I cannot, I have {reason}.", f"I have to cancel, I have {reason}."])),
        (a, r.choice([f"No problem. What about {day2}?", f"Too bad. Is {day2} better?"])),
        (b, r.choice([f"{day2} is perfect.", f"Yes, {day2} works."])),
    ]
    summary = r.choice(
        [
            f"{b} cannot {act} on {day} because of {reason}. They will {act} on {day2} instead.",
            f"Because of {reason}, {b} has to cancel on {day}. {a} and {b} will {act} on {day2}.",
            f"{a} and {b} move their plan to {act} from {day} to {day2}, as {b} has {reason}.",
        ]
    )
    return turns, ("move", a, b, act, day, day2, reason), summary


def _borrow(r: random.Random, a: str, b: str) -> Drawn:
    item, day, time = r.choice(ITEMS), r.choice(DAYS), r.choice(TIMES)
    yes = r.random() < 0.7
    turns = [
        (
            a,
            r.choice(
                [
                    f"Can I borrow your {item}?",
                    f"Could you lend me your {item}?",
                    f"Do you still have the {item}?",
                ]
            ),
        ),
        (b, r.choice(["What for?", "Why do you need it?"])),
        (a, r.choice([f"Mine is broken and I need one on {day}.", f"I need it on {day}."])),
    ]
    if yes:
        turns.append((b, r.choice([f"Sure, pick it up at {time}.", f"Of course, come by at {time}."])))
        return (
            turns,
            ("lend", b, a, item, day, time),
            r.choice(
                [
                    f"{b} will lend {a} the {item}. {a} will pick it up at {time}.",
                    f"{a} is borrowing the {item} from {b} and will pick it up at {time}.",
                    f"{a} can borrow {b}'s {item}, to be picked up at {time}.",
                ]
            ),
        )
    other = r.choice([n for n in NAMES if n not in (a, b)])
    turns.append((b, r.choice([f"Sorry, {other} has it now.", f"I gave it to {other} last week."])))
    return (
        turns,
        ("borrow", a, b, item, day, other),
        r.choice(
            [
                f"{a} wants to borrow the {item} from {b}, but {other} has it.",
                f"{b} cannot lend the {item} to {a} because {other} has it.",
            ]
        ),
    )


def _news(r: random.Random, a: str, b: str) -> Drawn:
    who, news = r.choice([n for n in NAMES if n not in (a, b)]), r.choice(NEWS)
    turns = [
        (a, r.choice(["Did you hear the news?", "Guess what!", "You will not believe this."])),
        (b, r.choice(["No, tell me.", "What happened?"])),
        (a, f"{who} {news}!"),
        (b, r.choice(["Wow, really?", "No way!", "Good for them."])),
    ]
    return (
        turns,
        ("news", a, b, who, news),
        r.choice(
            [
                f"{a} tells {b} that {who} {news}.",
                f"{a} shares the news that {who} {news}.",
                f"According to {a}, {who} {news}.",
            ]
        ),
    )


INTENTS = (_plan, _reschedule, _borrow, _news)


def _with_small_talk(r: random.Random, turns: list, a: str, b: str) -> list[tuple[str, str]]:
    if r.random() < 0.6:
        at = r.randrange(len(turns) + 1)
        turns[at:at] = [(a, r.choice(SMALL_TALK)), (b, r.choice(SMALL_TALK_REPLIES))]
    return turns


def example(r: random.Random) -> dict[str, str]:
    """One dialogue -> summary pair drawn with ``r``."""
    a, b = r.sample(NAMES, 2)
    turns, _, summary = r.choice(INTENTS)(r, a, b)
    turns = _with_small_talk(r, turns, a, b)  # which the summary must not mention
    return {"dialogue": "\n".join(f"{who}: {text}" for who, text in turns), "summary": summary}


SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def examples(split: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` deterministic pairs of ``split`` (train / validation / test draw from different streams)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"demo task has splits {', '.join(SPLIT_SEEDS)}; got {split!r}")
    r = random.Random(f"demo-{split}-{seed}")
    return [example(r) for _ in range(n)]


RECORDS_PER_ROW = (3, 5)
"""How many fact records a ``demo_long`` prompt holds (uniform, both ends included): ~40 prompt tokens and
~180 response tokens on average, up to ~260 — the paper's responses are up to 256 tokens."""


def long_example(r: random.Random) -> dict[str, str]:
    """One ``demo_long`` pair: a few fact records (``kind : field , field .``) -> a dialogue for each, in
    order, each phrased from its templates with small talk at random (the short task's dialogues). A
    long response from a short prompt: a mistake early in a sampled answer (a fact dropped, a record
    skipped or repeated) leaves the rest on a prefix the ground truth never shows, which is where training
    on the student's own outputs should matter; and sampling it costs far more than it does on the short
    task, next to a train step."""
    records, lines = [], []
    for _ in range(r.randint(*RECORDS_PER_ROW)):
        a, b = r.sample(NAMES, 2)
        turns, facts, _ = r.choice(INTENTS)(r, a, b)
        records.append(f"{facts[0]} : {' , '.join(facts[1:])} .")
        lines += [f"{who}: {text}" for who, text in _with_small_talk(r, turns, a, b)]
    return {"records": "\n".join(records), "dialogues": "\n".join(lines)}


def long_examples(split: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` deterministic ``demo_long`` pairs of ``split`` (streams apart from the short task's)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"demo_long task has splits {', '.join(SPLIT_SEEDS)}; got {split!r}")
    r = random.Random(f"demo_long-{split}-{seed}")
    return [long_example(r) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------
# Tokenizer: one id per word or punctuation mark of the closed vocabulary.

SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: pad, eos (T5's conventions), unknown
WORD = r"[A-Za-z0-9']+|[^\sA-Za-z0-9']"  # a word, or one punctuation mark


def vocabulary() -> list[str]:
    """Every word the generator emits: the pools, plus the template words found in a fixed sample large
    enough to hit every template (a test checks fresh samples of every split produce no unknown word)."""
    found = dict.fromkeys(SPECIALS)
    texts = [
        *NAMES,
        *DAYS,
        *TIMES,
        *ACTIVITIES,
        *PLACES,
        *ITEMS,
        *REASONS,
        *NEWS,
        *SMALL_TALK,
        *SMALL_TALK_REPLIES,
    ]
    r = random.Random("demo-vocabulary")
    for _ in range(5000):
        pair = example(r)
        texts += [pair["dialogue"], pair["summary"]]
    for text in texts:
        found.update(dict.fromkeys(re.findall(WORD, text)))
    return list(found)


def tokenizer():
    """A ``PreTrainedTokenizerFast`` over the demo vocabulary (pad 0, eos 1, unk 2)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary())}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(WORD), behavior="isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
