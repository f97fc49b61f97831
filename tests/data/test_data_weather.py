"""The built-in weather task: deterministic, varied, faithful, train/eval disjoint."""

from __future__ import annotations

import random
import re
import time

import pytest

from fedlpp.data import load_task
from fedlpp.data.weather import (
    SKY_ADJ,
    SKY_NOUN,
    WIND_NOUN,
    Record,
    make_weather,
    render,
    sample_record,
)


def _record_of(prompt: str) -> str:
    return prompt.split("Data: ", 1)[1].rsplit("\nText:", 1)[0]


def test_same_seed_same_data_other_seed_other_data() -> None:
    first = load_task("weather", num_train=200, num_eval=20, seed=3)
    again = load_task("weather", num_train=200, num_eval=20, seed=3)
    other = load_task("weather", num_train=200, num_eval=20, seed=4)
    assert first == again
    assert first.train != other.train
    assert first.eval != other.eval


def test_defaults_sizes_and_prompt_shape() -> None:
    task = load_task("weather")
    assert (task.name, task.kind) == ("weather", "generation")
    assert (len(task.train), len(task.eval)) == (2000, 50)
    example = task.train[0]
    assert example.prompt.startswith("Write the weather report.\nData: city[")
    assert example.prompt.endswith("\nText:")
    assert example.target and example.target == example.target.strip()


def test_eval_is_independent_of_num_train() -> None:
    small = load_task("weather", num_train=10, num_eval=30, seed=1)
    large = load_task("weather", num_train=500, num_eval=30, seed=1)
    assert small.eval == large.eval


def test_train_and_eval_records_are_disjoint_and_distinct() -> None:
    task = load_task("weather", num_train=3000, num_eval=200, seed=0)
    train = [_record_of(e.prompt) for e in task.train]
    evals = [_record_of(e.prompt) for e in task.eval]
    assert len(set(train)) == len(train)
    assert len(set(evals)) == len(evals)
    assert not set(train) & set(evals)


def test_eval_examples_carry_two_or_three_distinct_references() -> None:
    task = load_task("weather", num_eval=100, seed=0)
    counts = {len(e.references) for e in task.eval}
    assert counts <= {2, 3} and counts == {2, 3}
    for example in task.eval:
        assert len(set(example.references)) == len(example.references)
        assert example.target == example.references[0]
    assert all(e.references == () for e in task.train)


def test_group_is_the_sky_value() -> None:
    task = load_task("weather", num_train=300, seed=0)
    for example in task.train:
        assert f"sky[{example.group}]" in example.prompt
    assert len({e.group for e in task.train}) >= 5


def _shape(text: str) -> str:
    """The sentence shape of a rendering of the Oslo record: value phrases abstracted away."""
    text = re.sub(
        r"(temperatures around|a high of|a temperature of|highs near) 12(°C| degrees)",
        "<TEMP>",
        text,
    )
    text = re.sub(r"a 60(%| percent) chance of (rain|precipitation)", "<RAIN>", text)
    text = re.sub(r"strong winds|gusty winds", "<WIND>", text)
    return re.sub(r"mostly cloudy|cloudy skies|cloudy|clouds", "<SKY>", text)


def test_phrasing_varies_for_one_record() -> None:
    record = Record(city="Oslo", sky="cloudy", temp=12, day="Monday", wind="strong", rain=60)
    rng = random.Random(0)
    texts = {render(record, rng) for _ in range(200)}
    assert len(texts) >= 50
    shapes = {_shape(t) for t in texts}
    assert all("12" not in shape and "60" not in shape for shape in shapes)
    # Several sentence templates, not just synonyms: openings, fact orders, one or two sentences.
    assert len(shapes) >= 5
    orders = {tuple(re.findall(r"<TEMP>|<WIND>|<RAIN>", shape)) for shape in shapes}
    assert len(orders) >= 3
    assert {shape.count(". ") for shape in shapes} == {0, 1}
    openings = {re.split(r"[,.] ", shape)[0] for shape in shapes}
    assert len(openings) >= 4


@pytest.mark.parametrize("seed", range(5))
def test_every_value_is_mentioned(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        record = sample_record(rng)
        text = render(record, rng)
        assert record.city in text
        assert re.search(rf"(?<![\d-]){record.temp}(?:°C| degrees)", text), text
        if record.day:
            assert record.day in text
        else:
            assert not any(day in text for day in ("Monday", "Sunday", "Friday"))
        assert any(w in text for w in SKY_ADJ[record.sky] + SKY_NOUN[record.sky]), text
        if record.wind is not None:
            assert any(w in text for w in WIND_NOUN[record.wind]), text
        if record.rain is not None:
            assert re.search(rf"(?<!\d){record.rain}(?:%| percent)", text), text
        assert text.endswith(".") and text[0].isupper()


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    make_weather(2000, 50, seed=7)
    assert time.perf_counter() - start < 1.0


def test_weather_refuses_a_path_or_hub_id() -> None:
    with pytest.raises(ValueError, match="takes no path"):
        load_task("weather", path="/some/dir")
    with pytest.raises(ValueError, match="takes no path"):
        load_task("weather", hf_id="x/y")
