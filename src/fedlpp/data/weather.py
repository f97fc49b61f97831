"""The built-in weather data-to-text task: generated, offline and fast.

A record such as `city[Oslo], day[Monday], sky[cloudy], temp[12], wind[strong], rain[60]`
is rendered into a one- or two-sentence report. Each record can be phrased in
many ways (several openings, synonyms, fact orders, sentence shapes), so that a
small model has something real to learn, yet the mapping stays faithful: every
value in the record appears in the text and nothing else is invented. It plays
the role of E2E when no files are at hand, with the same prompt shape.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from fedlpp.data.schema import GENERATION, Example, TaskData

NAME = "weather"
DEFAULT_NUM_TRAIN = 2000
DEFAULT_NUM_EVAL = 50
PROMPT = "Write the weather report.\nData: {record}\nText:"

CITIES = (
    "Oslo",
    "Paris",
    "Berlin",
    "Madrid",
    "Rome",
    "Vienna",
    "Lisbon",
    "Dublin",
    "Prague",
    "Warsaw",
    "Athens",
    "Helsinki",
    "Zurich",
    "Edinburgh",
    "Copenhagen",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
SKIES = ("sunny", "cloudy", "overcast", "rainy", "snowy", "foggy", "stormy")
WINDS = ("calm", "light", "moderate", "strong", "gale")
# Optional attributes are present with this probability, so records vary in shape
# the way E2E MRs do.
OPTIONAL_PRESENT = 0.6

# Temperature (°C) and rain-chance (%) ranges per sky keep records plausible:
# no snow at 30 degrees, no 90% rain under a clear sky.
TEMP_RANGE = {
    "sunny": (5, 35),
    "cloudy": (-5, 25),
    "overcast": (-5, 22),
    "rainy": (2, 24),
    "snowy": (-12, 2),
    "foggy": (-4, 16),
    "stormy": (5, 30),
}
RAIN_RANGE = {
    "sunny": (0, 2),
    "cloudy": (1, 5),
    "overcast": (2, 6),
    "rainy": (6, 10),
    "snowy": (5, 10),
    "foggy": (1, 4),
    "stormy": (7, 10),
}  # in tens of percent

SKY_ADJ = {
    "sunny": ("sunny", "bright and sunny", "clear and sunny"),
    "cloudy": ("cloudy", "mostly cloudy"),
    "overcast": ("overcast", "grey and overcast"),
    "rainy": ("rainy", "wet"),
    "snowy": ("snowy", "wintry"),
    "foggy": ("foggy", "misty"),
    "stormy": ("stormy", "thundery"),
}
SKY_NOUN = {
    "sunny": ("sunshine", "clear skies", "plenty of sun"),
    "cloudy": ("clouds", "cloudy skies"),
    "overcast": ("overcast skies", "a grey sky"),
    "rainy": ("rain", "showers"),
    "snowy": ("snow", "snowfall"),
    "foggy": ("fog", "thick fog"),
    "stormy": ("thunderstorms", "storms"),
}
WIND_NOUN = {
    "calm": ("calm winds", "little wind"),
    "light": ("a light breeze", "light winds"),
    "moderate": ("moderate winds", "a moderate breeze"),
    "strong": ("strong winds", "gusty winds"),
    "gale": ("gale-force winds", "very strong winds"),
}
PRECIPITATION = ("rain", "precipitation")

# Openings carry the city, the optional day and the sky. `{when}` is " on Monday"
# or "" so that a missing day is never invented.
OPENINGS = (
    "{city} will be {adj}{when}",
    "expect {noun} in {city}{when}",
    "it will be {adj} in {city}{when}",
    "the forecast for {city}{when} is {adj}",
    "{city} can look forward to {noun}{when}",
    "{when_lead}{city} will see {noun}",
)
LEADS = ("Expect", "Look out for", "There will be")


@dataclass(frozen=True)
class Record:
    """One weather record; None marks an absent optional attribute."""

    city: str
    sky: str
    temp: int
    day: str | None = None
    wind: str | None = None
    rain: int | None = None

    def linearize(self) -> str:
        """E2E-style `attr[value]` list in a fixed attribute order."""
        fields = [
            ("city", self.city),
            ("day", self.day),
            ("sky", self.sky),
            ("temp", self.temp),
            ("wind", self.wind),
            ("rain", self.rain),
        ]
        return ", ".join(f"{k}[{v}]" for k, v in fields if v is not None)


def sample_record(rng: random.Random) -> Record:
    """A plausible random record (sky-dependent temperature and rain)."""
    sky = rng.choice(SKIES)
    low, high = TEMP_RANGE[sky]
    rain_low, rain_high = RAIN_RANGE[sky]
    return Record(
        city=rng.choice(CITIES),
        sky=sky,
        temp=rng.randint(low, high),
        day=rng.choice(DAYS) if rng.random() < OPTIONAL_PRESENT else None,
        wind=rng.choice(WINDS) if rng.random() < OPTIONAL_PRESENT else None,
        rain=10 * rng.randint(rain_low, rain_high) if rng.random() < OPTIONAL_PRESENT else None,
    )


def _degrees(temp: int, rng: random.Random) -> str:
    return rng.choice((f"{temp} degrees", f"{temp}°C"))


def _temp_phrase(temp: int, rng: random.Random) -> str:
    degrees = _degrees(temp, rng)
    return rng.choice(
        (
            f"temperatures around {degrees}",
            f"a high of {degrees}",
            f"a temperature of {degrees}",
            f"highs near {degrees}",
        )
    )


def _rain_phrase(rain: int, rng: random.Random) -> str:
    what = rng.choice(PRECIPITATION)
    return rng.choice((f"a {rain}% chance of {what}", f"a {rain} percent chance of {what}"))


def _wind_phrase(wind: str, rng: random.Random) -> str:
    return rng.choice(WIND_NOUN[wind])


def _opening(record: Record, rng: random.Random) -> str:
    when = f" on {record.day}" if record.day else ""
    return rng.choice(OPENINGS).format(
        city=record.city,
        when=when,
        when_lead=f"on {record.day}, " if record.day else "",
        adj=rng.choice(SKY_ADJ[record.sky]),
        noun=rng.choice(SKY_NOUN[record.sky]),
    )


def _fact_phrases(record: Record, rng: random.Random) -> list[str]:
    """Noun phrases for temp, wind and rain, in a random order."""
    facts = [_temp_phrase(record.temp, rng)]
    if record.wind is not None:
        facts.append(_wind_phrase(record.wind, rng))
    if record.rain is not None:
        facts.append(_rain_phrase(record.rain, rng))
    rng.shuffle(facts)
    return facts


def _join(phrases: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def render(record: Record, rng: random.Random) -> str:
    """One phrasing of `record`: a single sentence, or an opening plus a second sentence."""
    opening = _capitalize(_opening(record, rng))
    facts = _join(_fact_phrases(record, rng))
    if rng.random() < 0.5:
        return f"{opening}, with {facts}."
    return f"{opening}. {rng.choice(LEADS)} {facts}."


def _distinct_renderings(record: Record, rng: random.Random, count: int) -> tuple[str, ...]:
    """Up to `count` different phrasings (bounded tries: every record has dozens)."""
    seen: dict[str, None] = {}
    for _ in range(20 * count):
        seen.setdefault(render(record, rng), None)
        if len(seen) == count:
            break
    return tuple(seen)


def _draw_records(rng: random.Random, count: int, exclude: set[Record]) -> list[Record]:
    """`count` distinct records not in `exclude` (the space holds ~10^6 records)."""
    records: dict[Record, None] = {}
    while len(records) < count:
        record = sample_record(rng)
        if record not in exclude:
            records.setdefault(record, None)
    return list(records)


def _example(record: Record, references: tuple[str, ...], with_refs: bool) -> Example:
    return Example(
        prompt=PROMPT.format(record=record.linearize()),
        target=references[0],
        group=record.sky,
        references=references if with_refs else (),
    )


def make_weather(num_train: int, num_eval: int, seed: int) -> TaskData:
    """Generate the task. Eval records come from their own stream and are
    excluded from train, so eval is independent of num_train and never seen."""
    if num_train < 0 or num_eval < 0:
        raise ValueError(f"weather: num_train/num_eval must be >= 0, got {num_train}/{num_eval}")
    num_train = num_train or DEFAULT_NUM_TRAIN
    num_eval = num_eval or DEFAULT_NUM_EVAL
    # random.Random with a str seed is deterministic across runs and platforms.
    eval_rng = random.Random(f"weather/{seed}/eval")
    train_rng = random.Random(f"weather/{seed}/train")
    eval_records = _draw_records(eval_rng, num_eval, exclude=set())
    train_records = _draw_records(train_rng, num_train, exclude=set(eval_records))
    eval_examples = tuple(_example(r, _distinct_renderings(r, eval_rng, eval_rng.choice((2, 3))), True) for r in eval_records)
    train_examples = tuple(_example(r, (render(r, train_rng),), False) for r in train_records)
    return TaskData(name=NAME, kind=GENERATION, train=train_examples, eval=eval_examples)


# Well below the ~10^6 distinct records the attribute space holds, so that drawing
# distinct records by rejection always finishes quickly.
MAX_RECORDS = 200_000


def load_weather(*, path: str, hf_id: str, num_train: int, num_eval: int, seed: int) -> TaskData:
    """Task loader: the weather task is generated, so it takes no path or hub id."""
    if path or hf_id:
        raise ValueError(f"task 'weather' is generated in memory and takes no path or hf_id (got path={path!r}, hf_id={hf_id!r})")
    if num_train + num_eval > MAX_RECORDS:
        raise ValueError(
            f"task 'weather' can generate at most {MAX_RECORDS:,} distinct records; "
            f"asked for num_train={num_train} + num_eval={num_eval}"
        )
    return make_weather(num_train, num_eval, seed)
