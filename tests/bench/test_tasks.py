"""Task generators, scoring and prompt rendering of ``infercache.bench.tasks`` (no real model loaded)."""

from __future__ import annotations

import copy
import re
from collections import Counter

import pytest

from infercache.bench.tasks import (
    FILLERS,
    TASKS,
    LengthFitError,
    UnknownFillerError,
    UnknownTaskError,
    get_task,
    render_prompt,
)
from infercache.bench.tasks.fitting import count_tokens
from infercache.bench.tasks.haystack import Needle, insert_needles

TOLERANCE = 0.02
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    from infercache.models import load

    return load("tiny-random-llama")[1]


@pytest.fixture(scope="module")
def chat_tok(tok):
    chat = copy.deepcopy(tok)
    chat.chat_template = CHAT_TEMPLATE
    return chat


@pytest.fixture(scope="module")
def stories_tok():
    from infercache.models import load

    try:
        return load("stories260k")[1]
    except Exception as exc:  # the shared stories260K copy is optional
        pytest.skip(f"stories260k not available: {exc}")


# ------------------------------------------------------------------------------------- registry


def test_registry_has_the_ruler_style_tasks():
    assert set(TASKS) == {
        "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
        "variable_tracking", "common_words", "frequent_words", "multihop",
    }
    for name, task in TASKS.items():
        assert task.name == name and get_task(name) is task


def test_unknown_task_names_the_known_ones():
    with pytest.raises(UnknownTaskError, match="unknown task 'niah'; known tasks: niah_single") as info:
        get_task("niah")
    assert isinstance(info.value, KeyError)
    assert str(info.value).startswith("unknown task 'niah'")


def test_task_options_make_variants_and_are_checked():
    variant = get_task("niah_multikey", n_keys=6, filler="repeat")
    assert variant.n_keys == 6 and TASKS["niah_multikey"].n_keys == 4
    with pytest.raises(ValueError, match="has no option"):
        get_task("niah_single", n_keys=3)
    with pytest.raises(UnknownFillerError, match="unknown filler 'python'"):
        get_task("niah_single", filler="python")


# ---------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_seed_same_samples_other_seed_other_samples(tok, name):
    task = TASKS[name]
    first = [s.to_dict() for s in task.generate(tok, 512, 2, seed=3)]
    again = [s.to_dict() for s in task.generate(tok, 512, 2, seed=3)]
    other = [s.to_dict() for s in task.generate(tok, 512, 2, seed=4)]
    assert first == again
    assert first[0]["context"] != other[0]["context"] and first[0]["answers"] != other[0]["answers"]
    assert first[0]["context"] != first[1]["context"]
    assert task.generate(tok, 512, 1, seed=3)[0].to_dict() == first[0]  # sample i ignores n_samples
    assert first[0]["sample_id"] == f"{name}-512-3-0" and first[1]["seed"] == 3


# -------------------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("length", [512, 2048])
def test_context_length_within_tolerance(tok, name, length):
    for sample in TASKS[name].generate(tok, length, 2, seed=0):
        measured = count_tokens(tok, sample.context)
        assert measured == sample.context_tokens
        assert abs(measured - length) <= TOLERANCE * length
        assert sample.length_tokens == length


@pytest.mark.parametrize("filler", FILLERS)
def test_every_filler_fits_the_length(tok, filler):
    (sample,) = get_task("niah_single", filler=filler).generate(tok, 1500, 1, seed=0)
    assert abs(sample.context_tokens - 1500) <= TOLERANCE * 1500
    assert sample.answers[0] in sample.context


def test_lengths_with_a_sentencepiece_tokenizer(stories_tok):
    for name in ("niah_single", "variable_tracking", "common_words"):
        for sample in TASKS[name].generate(stories_tok, 400, 2, seed=0):
            measured = count_tokens(stories_tok, sample.context)
            assert abs(measured - 400) <= TOLERANCE * 400, (name, measured)
            for answer in sample.answers:
                assert answer in sample.context


def test_too_short_target_is_a_clear_error(tok):
    with pytest.raises(LengthFitError, match="cannot build"):
        TASKS["niah_multikey"].generate(tok, 120, 1)


# ---------------------------------------------------------------------------------------- depth


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_goes_at_the_requested_depth(tok, depth):
    (sample,) = TASKS["niah_single"].generate(tok, 2048, 1, seed=5, depth=depth)
    assert sample.depth == depth
    assert sample.metadata["needle_depths"][0] == pytest.approx(depth, abs=0.03)
    # Independent check on the text: the share of haystack characters before the needle.
    body = sample.context.split("\n\n", 1)[1]
    needle_at = body.index(f"The pass key is {sample.answers[0]}")
    needle_len = len(f"The pass key is {sample.answers[0]}. Remember it. {sample.answers[0]} is the pass key.")
    assert needle_at / (len(body) - needle_len) == pytest.approx(depth, abs=0.03)


def test_depth_defaults_spread_over_the_haystack(tok):
    samples = TASKS["niah_single"].generate(tok, 512, 10, seed=0)
    depths = sorted(s.depth for s in samples)
    assert all(0.0 <= d < 1.0 for d in depths)
    assert max(b - a for a, b in zip(depths, depths[1:])) < 0.25  # no big holes


def test_depth_is_checked(tok):
    with pytest.raises(ValueError, match="within"):
        TASKS["niah_single"].generate(tok, 512, 1, depth=1.5)
    with pytest.raises(ValueError, match="has no needle"):
        TASKS["common_words"].generate(tok, 512, 1, depth=0.5)


def test_insert_needles_keeps_order_and_offsets():
    text = "One line here.\nTwo line here.\nThree line here.\nFour line here."
    out, offsets = insert_needles(text, [Needle("NEEDLE A.", 0.5), Needle("NEEDLE B.", 0.5), Needle("END.", 1.0)])
    assert out.index("NEEDLE A.") == offsets[0] < offsets[1] == out.index("NEEDLE B.")
    assert out.endswith("\nEND.") and out.index("END.") == offsets[2]
    assert "\nNEEDLE A.\nNEEDLE B.\nThree" in out


# -------------------------------------------------------------------------------------- answers


def test_niah_answers_are_in_the_context(tok):
    for name in ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"):
        for sample in TASKS[name].generate(tok, 1024, 3, seed=1):
            for answer in sample.answers:
                assert sample.context.count(answer) >= 1
            numbers = set(re.findall(r"\d+", sample.context))
            assert set(sample.answers) <= numbers
    (multikey,) = TASKS["niah_multikey"].generate(tok, 1024, 1, seed=2)
    key, value = multikey.metadata["keys"][0], multikey.answers[0]
    assert f"The special magic number for {key} is: {value}." in multikey.context
    assert key in multikey.question and len(set(multikey.metadata["values"])) == 4


def test_variable_tracking_chain_is_in_order(tok):
    for sample in TASKS["variable_tracking"].generate(tok, 1024, 3, seed=1):
        chain, value = sample.answers, sample.metadata["values"][0]
        statements = [f"VAR {chain[0]} = {value}."] + [
            f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])
        ]
        positions = [sample.context.index(s) for s in statements]
        assert positions == sorted(positions)
        assert value in sample.question


def test_common_words_answers_are_the_most_common(tok):
    for sample in TASKS["common_words"].generate(tok, 1024, 2, seed=1):
        items = re.findall(r"^\d+\. (\S+)$", sample.context, flags=re.MULTILINE)
        counts = Counter(items)
        top = {w for w, _ in counts.most_common(len(sample.answers))}
        assert top == set(sample.answers)
        rest = max(c for w, c in counts.items() if w not in top)
        assert min(counts[w] for w in sample.answers) > rest


def test_frequent_words_answers_are_the_most_frequent(tok):
    for sample in TASKS["frequent_words"].generate(tok, 1024, 2, seed=1):
        words = sample.context.split("\n\n", 1)[1].split()
        ranked = [w for w, _ in Counter(words).most_common()]
        assert ranked[: len(sample.answers)] == sample.answers


def test_multihop_facts_are_in_the_context(tok):
    for sample in TASKS["multihop"].generate(tok, 1024, 3, seed=1):
        person, town = sample.metadata["people"][0], sample.metadata["towns"][0]
        assert f"{person} lives in the town of {town}." in sample.context
        assert f"The town of {town} is famous for its {sample.answers[0]}." in sample.context
        assert person in sample.question and town not in sample.question


# -------------------------------------------------------------------------------------- scoring


def test_scoring_on_hand_made_predictions(tok):
    (single,) = TASKS["niah_single"].generate(tok, 512, 1, seed=0)
    value = single.answers[0]
    assert TASKS["niah_single"].score(f" {value}.", single) == 1.0
    assert TASKS["niah_single"].score(f" {value}7", single) == 0.0
    assert TASKS["niah_single"].score(" a magical object", single) == 0.0

    (multi,) = TASKS["niah_multivalue"].generate(tok, 512, 1, seed=0)
    half = ", ".join(multi.answers[:2])
    assert TASKS["niah_multivalue"].score(half, multi) == 0.5

    (chain,) = TASKS["variable_tracking"].generate(tok, 512, 1, seed=0)
    prediction = " " + ", VAR ".join(name.lower() for name in chain.answers)
    assert TASKS["variable_tracking"].score(prediction, chain) == 1.0

    (hop,) = TASKS["multihop"].generate(tok, 512, 1, seed=0)
    assert TASKS["multihop"].score(f" {hop.answers[0].upper()}.", hop) == 1.0
    assert TASKS["multihop"].score(f" {hop.metadata['specialties'][1]}.", hop) == 0.0


# -------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("name", ["niah_single", "variable_tracking", "common_words"])
def test_protocols_split_one_tokenization(tok, chat_tok, name):
    (sample,) = TASKS[name].generate(tok, 512, 1, seed=0)
    for tokenizer, fmt in ((tok, "completion"), (chat_tok, "chat")):
        aware = render_prompt(sample, tokenizer, "question_aware")
        agnostic = render_prompt(sample, tokenizer, "question_agnostic")
        assert aware.format == agnostic.format == fmt
        assert aware.question_ids == [] and aware.input_ids == aware.context_ids
        assert agnostic.context_ids + agnostic.question_ids == aware.input_ids
        assert agnostic.question_ids and len(agnostic.context_ids) >= sample.context_tokens
        question_text = tokenizer.decode(agnostic.question_ids)
        assert question_text.startswith(sample.question if fmt == "chat" else "Question: ")
        assert question_text.endswith(sample.answer_prefix)
        assert sample.context in tokenizer.decode(agnostic.context_ids)
        assert sample.question not in tokenizer.decode(agnostic.context_ids)


def test_chat_prompt_puts_question_in_user_turn_and_prefix_after_generation_prompt(chat_tok, tok):
    (sample,) = TASKS["niah_single"].generate(tok, 512, 1, seed=0)
    prompt = render_prompt(sample, chat_tok, "question_agnostic")
    assert prompt.text.endswith(f"{sample.question}<|im_end|>\n<|im_start|>assistant\n{sample.answer_prefix}")
    assert prompt.text.startswith("<|im_start|>user\n" + sample.context)


def test_completion_prompt_with_bos_tokenizer(stories_tok):
    (sample,) = TASKS["niah_single"].generate(stories_tok, 400, 1, seed=0)
    aware = render_prompt(sample, stories_tok, "question_aware")
    agnostic = render_prompt(sample, stories_tok, "question_agnostic")
    assert aware.input_ids[0] == stories_tok.bos_token_id
    assert agnostic.context_ids + agnostic.question_ids == aware.input_ids
    assert aware.input_ids == stories_tok(aware.text)["input_ids"]
    assert "Question:" in stories_tok.decode(agnostic.question_ids)


def test_prompt_options_are_checked(tok):
    (sample,) = TASKS["niah_single"].generate(tok, 512, 1, seed=0)
    with pytest.raises(ValueError, match="unknown protocol"):
        render_prompt(sample, tok, "query_aware")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        render_prompt(sample, tok, prompt_format="chat")
