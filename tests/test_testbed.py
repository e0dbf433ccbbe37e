"""The testbed (zppo_fast/testbed.py): its families, its splits, and what each warm-up may see."""

import random
import re

import pytest

from zppo_fast import prompts
from zppo_fast.config import load_config
from zppo_fast.data import tokenizer_corpus
from zppo_fast.reward import grade
from zppo_fast import testbed
from zppo_fast.testbed import EASY, HARD, STUDENT, TEACHER, WORDINGS, embedded_task


@pytest.fixture(scope="module")
def task():
    return embedded_task(load_config().task)


def hard_texts(task: testbed.TestbedTask) -> tuple[set[str], set[str]]:
    """Every hard question (all wordings of all facts, both splits) and every hard chain of steps."""
    questions = {task.problem(task._id(HARD, f, w)).question
                 for f in range(len(task.facts[HARD])) for w in range(len(WORDINGS))}
    return questions, {testbed.chain(fact)[0] for fact in task.facts[HARD]}


def test_the_default_task_is_the_testbed(task):
    assert isinstance(task, testbed.TestbedTask)


def test_every_hard_step_is_an_easy_fact_and_the_answers_check_out(task):
    easy = {(start, steps[0]) for start, steps in task.facts[EASY]}
    for start, steps in task.facts[HARD]:
        value = start
        for step in steps:
            assert (value, step) in easy
            value = value + step[1] if step[0] == "+" else value - step[1]
    rng = random.Random(0)
    for qid in rng.sample(range(len(task)), 300):
        p = task.problem(qid)
        assert p.family == task.family(qid)
        assert grade(p.solution, p.answer) == 1.0
        assert len(re.findall(r"\d+[+-]\d+=\d+", p.solution)) == (1 if p.family == EASY else 2)


def test_splits_are_by_fact_and_disjoint(task):
    def fact(qid):
        return task.family(qid), task.problem(qid).question.split(",", 1)[1].split(".")[0], \
            task.problem(qid).question.split(" has ")[1].split(" ")[0]

    train = set(task.train_ids())
    for family in (EASY, HARD):
        held = task.heldout_ids(family)
        assert held and not train & set(held)
        assert {task.family(q) for q in held} == {family}
        assert {fact(q) for q in held}.isdisjoint({fact(q) for q in train if task.family(q) == family})
    families = [task.family(q) for q in train]
    assert 0.35 < families.count(HARD) / len(families) < 0.65  # the stream is about even


def test_heldout_sets_cover_distinct_facts_first(task):
    sets = task.heldout_sets(200)
    assert set(sets) == {EASY, HARD}
    for family, ids in sets.items():
        facts = len(task.heldout_ids(family)) // len(WORDINGS)
        assert len(ids) == 200
        assert len({task.problem(q).answer + task.problem(q).solution for q in ids}) == min(200, facts)


def test_the_students_warm_up_holds_no_hard_question(task):
    """By id and by text: no hard question, and no hard worked solution (its chain of steps) anywhere
    in a warm-up example, its candidates included, nor in the tokenizer's corpus."""
    questions, chains = hard_texts(task)
    rng = random.Random(1)
    kinds = set()
    for _ in range(3000):
        qid, text, target = task.warmup_example(STUDENT, rng, reading_share=0.5)
        assert task.family(qid) == EASY
        question = text.split("\n\n", 1)[0]
        assert question == task.problem(qid).question and question not in questions
        steps = re.findall(r"\d+[+-]\d+=\d+(?:, \d+[+-]\d+=\d+)*", text + target)
        assert steps and not chains & set(steps)
        kinds.add("bcq" if prompts.BCQ_INSTRUCTION in text else "ncq" if "<candidate>" in text else "plain")
    assert kinds == {"plain", "bcq", "ncq"}
    corpus = "\n".join(tokenizer_corpus(task))
    assert not any(q in corpus for q in random.Random(2).sample(sorted(questions), 2000))
    assert not any(c in corpus for c in chains)


def test_the_teachers_warm_up_holds_both_families(task):
    rng = random.Random(3)
    seen = {task.family(task.warmup_example(TEACHER, rng)[0]) for _ in range(50)}
    assert seen == {EASY, HARD}
    with pytest.raises(ValueError, match="role"):
        task.warmup_example("judge", rng)


def test_reading_examples_target_the_correct_candidate(task):
    rng = random.Random(4)
    for _ in range(500):
        qid, text, target = task.warmup_example(STUDENT, rng, reading_share=1.0)
        answer = task.problem(qid).answer
        assert grade(target, answer) == 1.0
        candidates = re.findall(r"<candidate>\n(.*?)\n</candidate>", text, re.DOTALL)
        assert candidates
        if prompts.BCQ_INSTRUCTION in text:
            assert sorted(grade(c, answer) for c in candidates) == [0.0, 1.0] and target in candidates
        else:
            assert all(grade(c, answer) == 0.0 for c in candidates)


def test_detours_can_only_be_written_by_following_the_candidate(task):
    """Three in four correct candidates (where the fact allows) take a detour: two steps whose first is
    not the question's own step; every step of a correct candidate is right arithmetic within the
    task's bounds, and the wrong candidate beside a detour shares its first step or stops there."""
    rng = random.Random(5)
    detours = one_step = 0
    for fact in task.facts[EASY] * 3:
        correct, wrong = task.reading_pair(fact, rng)
        answer = testbed.chain(fact)[1]
        steps = re.findall(r"(\d+)([+-])(\d+)=(\d+)", correct)
        assert grade(correct, str(answer)) == 1.0 and grade(wrong, str(answer)) == 0.0
        assert steps[0][0] == str(fact[0]) and steps[-1][3] == str(answer)
        for a, op, b, c in steps:
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert 0 <= int(c) <= task.max_value and int(b) <= task.max_operand
        if len(steps) == 2:
            detours += 1
            assert "; " in correct and (steps[0][1], int(steps[0][2])) != fact[1][0]
            assert steps[1][0] == steps[0][3]
            assert wrong.startswith(correct.split("; ")[0].split("</think>")[0])
        else:
            one_step += 1
            assert correct == testbed.solution_text(*testbed.chain(fact))
    assert 0.65 < detours / (detours + one_step) < 0.8


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="max_value"):
        testbed.TestbedTask(max_value=0)


def test_the_warm_ups_length_halves_give_the_padded_batchs_gradient(task):
    """sft.py computes a batch's mean token loss in two halves by length; the gradient must be the
    one padded batch's, within float32 reordering error (tests/numerics.py)."""
    import torch

    from numerics import reorder_tol
    from zppo_fast.config import ModelConfig
    from zppo_fast.model import build_tiny_model
    from zppo_fast.sft import _sequence, _token_loss_sum
    from zppo_fast.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_corpus(task, size=200), vocab_size=400)
    model = build_tiny_model(ModelConfig(hidden_size=32), tokenizer, seed=0)
    rng = random.Random(5)
    batch = sorted((_sequence(tokenizer, text, target) for _, text, target in
                    (task.warmup_example(STUDENT, rng) for _ in range(9))), key=lambda item: len(item[0]))
    targets = sum(len(seq) - n for seq, n in batch)
    grads = []
    for parts in ([batch], [batch[:4], batch[4:]]):
        model.zero_grad()
        for part in parts:
            (_token_loss_sum(model, part, tokenizer.pad_token_id) / targets).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert len({len(s) for s, _ in batch}) > 1  # the halves differ in width, so padding differs
    scale = grads[0].abs().max().item()
    assert torch.allclose(grads[1], grads[0], rtol=0, atol=reorder_tol(targets, scale))
