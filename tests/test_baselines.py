"""Hint / Prefix / off-policy distillation building blocks: leak detection, prefix masking on a
real tiny model, the builder with a scripted and with a real (overfit) tiny teacher."""

import pytest
import torch
import zppo_fast.kernels as K

from zppo_fast import prompts
from zppo_fast.baselines import (
    GuidanceSettings,
    HintPrefixBuilder,
    check_shared_vocab,
    distillation_data,
    forced_prefix,
    hint_leak,
    parse_hint,
    prefix_target_mask,
)
from zppo_fast.data import chat_prompt_ids, instruction_prompt_ids, tokenizer_corpus
from zppo_fast.engine import Sample, SamplingParams, TransformersEngine
from zppo_fast.task import ArithmeticTask, Problem
from zppo_fast.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(tokenizer_corpus(ArithmeticTask(), size=300), vocab_size=400)


class ScriptedTeacher:
    """Rollouts fixed per question marker; hint requests answered from `hints` by the marker
    found in the solved response. Records every decoded prompt and its sampling params."""

    def __init__(self, tokenizer, rollouts: dict[str, list[str]], hints: dict[str, str] | None = None):
        self.tokenizer, self.rollouts, self.hints, self.calls = tokenizer, rollouts, hints or {}, []

    def generate(self, prompt_ids, params: SamplingParams):
        out = []
        for ids in prompt_ids:
            text = self.tokenizer.decode(ids)
            self.calls.append((text, params))
            if "Read the solved response below" in text:
                response = text.split("<response>\n")[1].split("\n</response>")[0]
                hint = next(h for key, h in self.hints.items() if key in response)
                out.append([Sample([5] * 3, hint, "stop", [0.0] * 3)])
            else:
                key = next(k for k in self.rollouts if k in text)
                out.append([Sample([5] * 4, a, "stop", [0.0] * 4) for a in self.rollouts[key][: params.n]])
        return out


def right(answer):
    return f"<think>work {answer}</think> \\boxed{{{answer}}}"


WRONG = "<think>hmm</think> \\boxed{99}"


# --- leak detection ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hint,gold,why",
    [
        ("use \\boxed{3} carefully", "7", "boxed"),
        ("a lone \\boxed without braces", "7", "boxed"),
        ("so the total is 7.", "7", "answer"),
        ("you get 7.0 pens", "7", "answer"),
        ("x = 7", "7", "answer"),
        ("there are 1,000 of them", "1000", "answer"),
        ("halve it: 1/2", "\\frac{1}{2}", "answer"),
        ("it simplifies to (x+1)", "x+1", "answer"),
        ("pick B here", "B", "answer"),
        ("count to 17 first", "7", None),
        ("the rate is 3.7 per day", "7", None),
        ("7.5 is close but not it", "7", None),
        ("variable x7 holds it", "7", None),
        ("add 3 and 4 together", "7", None),
        ("it is 2x+12 in the end", "x+1", None),
        ("Bob has some pens", "B", None),
    ],
)
def test_hint_leak(hint, gold, why):
    assert hint_leak(hint, gold) == why


def test_parse_hint():
    assert parse_hint("  Add the counts.  ") == "Add the counts."
    assert parse_hint("<think>it is 7</think>\nCount up from the start.") == "Count up from the start."
    assert parse_hint("noise <hint>first</hint> <hint>Second one</hint> tail") == "Second one"
    assert parse_hint("preamble <hint>cut off by the token cap") == "cut off by the token cap"
    assert parse_hint("stray </hint> tag and <hint> more") == "more"
    assert parse_hint("<think>only thinking</think>") == ""


# --- prefix --------------------------------------------------------------------------------


def test_forced_prefix_rounding():
    assert forced_prefix(list(range(10)), 0.4) == [0, 1, 2, 3]
    assert forced_prefix(list(range(9)), 0.4) == [0, 1, 2]  # floor(3.6)
    assert forced_prefix([7, 8], 0.4) == []
    with pytest.raises(ValueError, match="fraction"):
        forced_prefix([1, 2], 1.0)


class _Record:
    def __init__(self, prompt_ids, response_ids):
        self.prompt_ids, self.response_ids = prompt_ids, response_ids


def test_prefix_target_mask_positions():
    mask = prefix_target_mask(_Record([1, 2, 3], [4, 5, 6, 7, 8]), 2)
    # T = 8 tokens; position t predicts t + 1; tokens 3, 4 are forced, 5..7 are the student's
    assert mask.tolist() == [False, False, False, False, True, True, True]
    assert prefix_target_mask(_Record([1], [4, 5]), 0).tolist() == [True, True]
    with pytest.raises(ValueError, match="n_forced"):
        prefix_target_mask(_Record([1], [4, 5]), 3)


def test_no_prefix_token_carries_gradient(tokenizer):
    """A real tiny Qwen3.5 and the trainer's fused policy loss under `prefix_target_mask`: the
    hidden state at exactly the positions that predict the student's own tokens gets a gradient;
    every position predicting a prompt or forced-prefix token gets exactly zero."""
    from zppo_fast.config import ModelConfig
    from zppo_fast.model import build_tiny_model

    model = build_tiny_model(ModelConfig(hidden_size=32, num_layers=4), tokenizer, seed=0)
    gen = torch.Generator().manual_seed(0)
    prompt = chat_prompt_ids(tokenizer, "Ann has 3 pens, gets 4 more. How many pens does Ann have now?")
    response = torch.randint(3, len(tokenizer), (12,), generator=gen).tolist()
    n_forced = len(forced_prefix(response, 0.4))  # 4
    record = _Record(prompt, response)
    mask = prefix_target_mask(record, n_forced)
    ids = torch.tensor([prompt + response])
    hidden = model.model(input_ids=ids).last_hidden_state  # (1, T, H)
    hidden.retain_grad()
    targets = ids[0, 1:]
    n = targets.numel()
    with torch.no_grad():  # old = current log-probs: ratio 1, so no token is clipped to zero gradient
        old = K.linear_logprobs(hidden[0, :-1], model.lm_head.weight, targets)
    adv = torch.randn(n, generator=gen)
    loss, _ = K.fused_linear_policy_loss(hidden[0, :-1], model.lm_head.weight, targets, old, adv, mask)
    loss.backward()
    carries = (hidden.grad[0, :-1].abs().sum(-1) > 0).tolist()
    start = len(prompt) + n_forced - 1  # the position predicting the first continuation token
    assert carries == [t >= start for t in range(n)]
    assert sum(carries) == len(response) - n_forced


# --- the builder: scripted teacher ---------------------------------------------------------


def _problems():
    # answers are distinct single digits so a leaking hint is unambiguous
    return [Problem(i, f"Q{i} how many?", str(i + 3), "") for i in range(5)]


def test_hint_builder_drops_and_counts_leaks(tokenizer):
    problems = _problems()
    teacher = ScriptedTeacher(
        tokenizer,
        rollouts={
            "Q0 ": [right(3), WRONG],
            "Q1 ": [right(4)] * 2,
            "Q2 ": [right(5)] * 2,
            "Q3 ": [WRONG] * 2,
            "Q4 ": [right(7)] * 2,
        },
        hints={
            "work 3": "Start from the first count and add.",
            "work 4": "It comes to 4.",
            "work 5": "Think \\boxed{} style.",
            "work 7": "<think>x</think>",
        },
    )
    texts = [["a", "b"]] * 5
    rewards = [[0.0, 0.0]] * 4 + [[0.0, 1.0]]  # Q4 (accuracy 0.5) is not hard
    settings = GuidanceSettings(teacher_group_size=2, teacher_max_new_tokens=16)
    out, m = HintPrefixBuilder("hint", teacher, tokenizer, tokenizer, settings, seed=1)(problems, texts, rewards, 4, 3)
    assert [(g.question, g.kind) for g in out] == [(0, "hint")]
    assert m["hint/dropped_leak"] == 2 and m["hint/dropped_empty"] == 0 and m["hint/built"] == 1
    assert m["hint/eligible"] == 3 and m["hint/hard_frac"] == 4 / 5 and m["hint/skipped_teacher_wrong"] == 1
    assert m["hint/teacher_acc_on_hard"] == pytest.approx(5 / 8)
    # teacher rollouts for the 4 hard questions, then one hint request per chosen question
    rollout_calls = [c for c in teacher.calls if "Read the solved" not in c[0]]
    hint_calls = [c for c in teacher.calls if "Read the solved" in c[0]]
    assert len(rollout_calls) == 4 and len(hint_calls) == 3
    assert all(p.temperature == 0.0 and p.n == 1 for _, p in hint_calls)
    assert prompts.build_hint_prompt(right(3)) in hint_calls[0][0]
    # the student's prompt: question, the hint block, the closing instruction -- and nothing of
    # the answer in what our code added
    g = out[0]
    assert g.text == prompts.with_hint("Q0 how many?", "Start from the first count and add.")
    assert g.prompt_ids == chat_prompt_ids(tokenizer, g.text)
    added = tokenizer.decode(g.prompt_ids).split("<hint>")[1].split("</hint>")[0]
    assert "\\boxed" not in added and hint_leak(added, problems[0].answer) is None
    assert "\\boxed" not in g.text


def test_builder_cap_priority_and_prefix(tokenizer):
    problems = _problems()
    long_right = "<think>3 + 4 makes 7 so count on</think> \\boxed{7}"
    teacher = ScriptedTeacher(
        tokenizer,
        rollouts={
            "Q0 ": [right(3)],
            "Q1 ": [right(4)],
            "Q2 ": [long_right.replace("7", "5")],
            "Q3 ": ["\\boxed{6}"],
            "Q4 ": [WRONG],
        },
    )
    problems[3] = Problem(3, "Q3 how many?", "6", "")
    texts = [["a", "b", "c"]] * 5
    # accuracies 1/3, 0, 1/3, 0, 0: ascending with ties by index -> Q1, Q3, Q4 (no teacher-correct), Q0, Q2
    rewards = [[1.0, 0.0, 0.0], [0.0] * 3, [0.0, 1.0, 0.0], [0.0] * 3, [0.0] * 3]
    settings = GuidanceSettings(teacher_group_size=1)
    builder = HintPrefixBuilder("prefix", teacher, tokenizer, tokenizer, settings, seed=0)
    out, m = builder(problems, texts, rewards, 3, 0)
    assert [g.question for g in out] == [1, 3]  # X_aug = Q1, Q3, Q4; Q4's teacher is all wrong: skipped
    assert m["prefix/dropped_empty"] == 0 and m["prefix/eligible"] == 2 and m["prefix/built"] == 2
    for g in out:
        full = tokenizer(teacher.rollouts[f"Q{g.question} "][0], add_special_tokens=False)["input_ids"]
        assert g.prefix_ids == full[: int(0.4 * len(full))] and len(g.prefix_ids) > 0
        assert g.prompt_ids == chat_prompt_ids(tokenizer, problems[g.question].question)
        assert g.text == problems[g.question].question
    assert m["prefix/forced_tokens"] == sum(len(g.prefix_ids) for g in out)
    out_cap1, _ = builder(problems, texts, rewards, 1, 0)
    assert [g.question for g in out_cap1] == [1]  # the lowest accuracy first
    # a fraction that rounds every (short) response's prefix down to nothing: dropped, counted
    tiny = HintPrefixBuilder("prefix", teacher, tokenizer, tokenizer, GuidanceSettings(1, prefix_fraction=0.01))
    out, m = tiny(problems, texts, rewards, 3, 0)
    assert out == [] and m["prefix/dropped_empty"] == 2 and m["prefix/built"] == 0
    with pytest.raises(ValueError, match="kind"):
        HintPrefixBuilder("bcq", teacher, tokenizer, tokenizer)


def asked(teacher) -> list[int]:
    """The questions the scripted teacher was asked to solve, in call order (hint requests left out)."""
    return [int(text.split(" how many?")[0].rsplit("Q", 1)[1]) for text, _ in teacher.calls
            if "Read the solved" not in text]


@pytest.mark.parametrize("kind", ["hint", "prefix"])
def test_hint_and_prefix_select_as_the_paper_defines(tokenizer, kind):
    """X_aug = the `cap` hard questions of lowest accuracy, chosen before the teacher runs; the teacher
    is asked for those only; one whose teacher rollouts are all wrong is skipped, not replaced.

    Accuracies (G_S = 8): Q0 2/8, Q1 0, Q2 4/8 (not hard: exactly 0.5), Q3 1/8, Q4 0, Q5 3/8.
    Ascending, ties by index: Q1, Q4, Q3, Q0, Q5. The teacher solves every question but Q4.
      cap 3 -> X_aug Q1, Q4, Q3 -> built Q1, Q3 (Q4 skipped; Q0, which the teacher solves, not taken)
      cap 1 -> X_aug Q1 (the tie with Q4 goes to the lower index)
      cap 0 -> nothing asked
      cap 9 -> X_aug all 5 hard -> built Q1, Q3, Q0, Q5
    """
    problems = [Problem(i, f"Q{i} how many?", str(i + 3), "") for i in range(6)]
    rollouts = {f"Q{i} ": [WRONG, WRONG] if i == 4 else [WRONG, right(i + 3)] for i in range(6)}
    hints = {f"work {i + 3}": "Count carefully." for i in range(6)}
    correct = [2, 0, 4, 1, 0, 3]
    rewards = [[1.0] * c + [0.0] * (8 - c) for c in correct]
    texts = [["a"] * 8] * 6
    settings = GuidanceSettings(teacher_group_size=2, teacher_max_new_tokens=16)
    for cap, want_asked, want_built in ((3, [1, 4, 3], [1, 3]), (1, [1], [1]), (0, [], []),
                                        (9, [1, 4, 3, 0, 5], [1, 3, 0, 5])):
        teacher = ScriptedTeacher(tokenizer, rollouts, hints)
        out, m = HintPrefixBuilder(kind, teacher, tokenizer, tokenizer, settings, seed=2)(problems, texts, rewards,
                                                                                           cap, 1)
        assert asked(teacher) == want_asked, cap
        assert [g.question for g in out] == want_built, cap
        assert m[f"{kind}/skipped_teacher_wrong"] == (4 in want_asked) and m[f"{kind}/built"] == len(want_built)


# --- the builder: a real tiny teacher ------------------------------------------------------


def _overfit_teacher(tokenizer, pairs, steps=50):
    """A tiny Qwen3.5 trained to answer each prompt (ids) with its target text, so its greedy
    TransformersEngine rollouts are known: a real model and engine, with scripted behaviour."""
    from zppo_fast.config import ModelConfig
    from zppo_fast.model import build_tiny_model

    model = build_tiny_model(ModelConfig(hidden_size=32, num_layers=4), tokenizer, seed=0)
    rows = [p + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for p, t in pairs]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)  # loss on the targets only
    for b, (row, (prompt, _)) in enumerate(zip(rows, pairs)):  # right padding: causal, so harmless
        ids[b, : len(row)] = torch.tensor(row)
        labels[b, len(prompt) : len(row)] = ids[b, len(prompt) : len(row)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        logits = model(input_ids=ids).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)).backward()
        opt.step()
    return TransformersEngine(model.eval(), tokenizer)


def test_builder_with_a_real_tiny_teacher(tokenizer):
    """A real model behind the real engine: trained on the two solutions only, so its greedy
    rollouts are right; whatever it writes for the hint requests is parsed, screened and
    accounted for exactly as the builder's rules say."""
    problems = [
        Problem(0, "Ann has 3 pens, gets 4 more. How many pens does Ann have now?", "7", ""),
        Problem(1, "Bob has 5 coins, loses 3. How many coins does Bob have now?", "2", ""),
    ]
    sol = ["<think>3+4=7</think>\n\\boxed{7}", "<think>5-3=2</think>\n\\boxed{2}"]
    teacher = _overfit_teacher(tokenizer, [(chat_prompt_ids(tokenizer, p.question), s) for p, s in zip(problems, sol)])
    settings = GuidanceSettings(
        teacher_group_size=2, teacher_temperature=0.0, teacher_max_new_tokens=24, hint_max_new_tokens=24
    )
    texts, rewards = [["x", "y"]] * 2, [[0.0, 0.0]] * 2
    out, m = HintPrefixBuilder("hint", teacher, tokenizer, tokenizer, settings)(problems, texts, rewards, 2, 0)
    assert m["hint/teacher_acc_on_hard"] == 1.0  # the greedy teacher reproduces both solutions
    requests = [instruction_prompt_ids(tokenizer, prompts.build_hint_prompt(s)) for s in sol]
    raw = [g[0].text for g in teacher.generate(requests, SamplingParams(n=1, temperature=0.0, max_new_tokens=24))]
    hints = [parse_hint(r) for r in raw]
    leaks = [bool(h) and hint_leak(h, p.answer) is not None for h, p in zip(hints, problems)]
    assert m["hint/dropped_leak"] == sum(leaks) and m["hint/dropped_empty"] == sum(not h for h in hints)
    kept = [i for i in range(2) if hints[i] and not leaks[i]]
    assert [g.question for g in out] == kept and m["hint/built"] == len(kept)
    for g in out:
        assert g.text == prompts.with_hint(problems[g.question].question, hints[g.question])
    out, m = HintPrefixBuilder("prefix", teacher, tokenizer, tokenizer, settings)(problems, texts, rewards, 2, 0)
    assert [g.question for g in out] == [0, 1]
    for g in out:
        full = tokenizer(sol[g.question], add_special_tokens=False)["input_ids"]
        assert g.prefix_ids == full[: int(0.4 * len(full))]
    # off-policy distillation data from the same real teacher: every rollout is graded correct
    examples, dm = distillation_data(teacher, tokenizer, problems, settings, step=0)
    assert dm["distill/teacher_acc"] == 1.0 and len(examples) == 4
    assert examples[0].response_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(examples[0].response_ids, skip_special_tokens=True) == sol[0]


# --- off-policy distillation data ----------------------------------------------------------


def test_distillation_data_keeps_graded_correct_rollouts(tokenizer):
    problems = _problems()[:3]
    teacher = ScriptedTeacher(
        tokenizer, {"Q0 ": [right(3), WRONG, right(3)], "Q1 ": [WRONG] * 3, "Q2 ": [WRONG, "\\boxed{5.0}", WRONG]}
    )
    settings = GuidanceSettings(teacher_group_size=3, teacher_temperature=0.7, teacher_max_new_tokens=9)
    examples, m = distillation_data(teacher, tokenizer, problems, settings, step=2, seed=1)
    assert [e.question for e in examples] == [0, 0, 2]
    assert all(e.prompt_ids == chat_prompt_ids(tokenizer, problems[e.question].question) for e in examples)
    assert all(e.response_ids == [5] * 4 for e in examples)
    assert m["distill/teacher_acc"] == pytest.approx(3 / 9) and m["distill/questions_covered"] == 2
    _, params = teacher.calls[0]
    assert (params.n, params.temperature, params.max_new_tokens, params.seed) == (3, 0.7, 9, 1_000_003 + 2)
    assert distillation_data(teacher, tokenizer, [], settings, step=0)[0] == []


def test_check_shared_vocab(tokenizer):
    check_shared_vocab(tokenizer, tokenizer)
    other = build_tokenizer(tokenizer_corpus(ArithmeticTask(), size=100), vocab_size=300)
    with pytest.raises(ValueError, match="shared vocabulary"):
        check_shared_vocab(tokenizer, other)
