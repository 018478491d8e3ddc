"""GEPA evolution core: selection, set cover, budget, reflection prompt, and the engine (with fake LLMs)."""

import hashlib
import itertools
import json
import math
import random

import pytest
from gepa.strategies.instruction_proposal import InstructionProposalSignature

from p2o_hpc.gepa import (
    Evaluation,
    FeedbackRecord,
    GEPAEngine,
    GEPASettings,
    HardItem,
    MetricBudget,
    BudgetExhausted,
    assign_templates,
    auto_budget,
    build_reflection_prompt,
    greedy_set_cover,
    pareto_front,
    parse_proposal,
    select_parents,
)
from p2o_hpc.config import GEPAConfig
from p2o_hpc.gepa.evolve import split_hard_set
from p2o_hpc.gepa.reflection_prompt import (
    FORMAT_ERROR_MARK,
    PROMPT_MARGIN_TOKENS,
    TRUNCATION_MARK,
    feedback_text,
    fit_responses,
)
from p2o_hpc.gepa.selection import instance_best_counts

# ---------------------------------------------------------------- helpers


def random_matrix(rng, binary):
    n, m = rng.randint(1, 7), rng.randint(1, 8)
    if binary:
        return [[float(rng.random() < 0.4) for _ in range(m)] for _ in range(n)]
    return [[rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(m)] for _ in range(n)]


def brute_front(scores):
    front = []
    for a, row_a in enumerate(scores):
        dominated = False
        for b, row_b in enumerate(scores):
            ge = all(row_b[j] >= row_a[j] for j in range(len(row_a)))
            gt = any(row_b[j] > row_a[j] for j in range(len(row_a)))
            dominated |= b != a and ge and gt
        if not dominated:
            front.append(a)
    return front


def solved_sets(scores):
    return [frozenset(j for j, s in enumerate(row) if s >= 1.0) for row in scores]


def reference_greedy(scores):
    """The authors' scan: the first candidate with a strictly larger new coverage wins (ties: lower index)."""
    sets = solved_sets(scores)
    covered, chosen = set(), []
    while True:
        best, best_new = -1, set()
        for i in range(len(scores)):
            if i in chosen:
                continue
            new = sets[i] - covered
            if len(new) > len(best_new):
                best, best_new = i, new
        if not best_new:
            return chosen
        chosen.append(best)
        covered |= best_new


def optimum_cover_size(scores):
    sets = solved_sets(scores)
    universe = set().union(*sets)
    for size in range(len(scores) + 1):
        for combo in itertools.combinations(range(len(scores)), size):
            if set().union(set(), *(sets[i] for i in combo)) == universe:
                return size


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize("binary", [True, False])
def test_pareto_front_matches_brute_force(binary):
    rng = random.Random(1 if binary else 2)
    for _ in range(300):
        scores = random_matrix(rng, binary)
        assert pareto_front(scores) == brute_front(scores)


def test_pareto_front_keeps_duplicate_rows():
    assert pareto_front([[1, 0], [1, 0], [0, 0]]) == [0, 1]


def test_pareto_mean_takes_a_small_front_whole():
    """Algorithm 4: |front| ≤ W → exactly the front (once each, index order), whatever the rng."""
    scores = [[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1, 1]]  # front: 1, 4
    for seed in range(20):
        assert select_parents(scores, 2, random.Random(seed), "pareto_mean") == [1, 4]
        assert select_parents(scores, 16, random.Random(seed), "pareto_mean") == [1, 4]
    assert select_parents([[0, 0, 0]], 16, random.Random(0), "pareto_mean") == [0]  # only the seed: once
    assert select_parents([[0, 0], [0, 0]], 16, random.Random(0), "pareto_mean") == [0, 1]  # equal rows: both


def test_pareto_mean_draws_w_distinct_members_weighted_by_mean():
    # Front: 0, 1, 2 (each best on its own items), 3 is dominated by 0. Means .5, .25, .125 (weights 4 : 2 : 1).
    scores = [[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 0],
              [1, 0, 0, 0, 0, 0, 0, 0]]  # fmt: skip
    w = {0: 4, 1: 2, 2: 1}
    n = 20000
    firsts, pairs = [], []
    for seed in range(n):
        picks = select_parents(scores, 2, random.Random(seed), "pareto_mean")
        assert len(picks) == 2 == len(set(picks)) and set(picks) <= {0, 1, 2}
        firsts.append(picks[0])
        pairs.append(frozenset(picks))
    for i in w:  # the first draw: w_i / 7
        assert abs(firsts.count(i) / n - w[i] / 7) < 0.015
    for i, j in itertools.combinations(w, 2):  # sequential draws without replacement
        expected = w[i] / 7 * w[j] / (7 - w[i]) + w[j] / 7 * w[i] / (7 - w[j])
        assert abs(pairs.count(frozenset((i, j))) / n - expected) < 0.015
    # an all-zero pool: every mean weighs 1e-6, so the draws are uniform (and distinct)
    zero = [[0, 0], [0, 0], [0, 0]]
    firsts = [select_parents(zero, 2, random.Random(seed), "pareto_mean") for seed in range(3000)]
    assert all(len(set(picks)) == 2 for picks in firsts)
    assert all(abs([p[0] for p in firsts].count(i) / 3000 - 1 / 3) < 0.04 for i in range(3))


def test_select_parents_is_deterministic_given_rng_state():
    scores = [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
    for mode in ("pareto_mean", "instance_best_count"):
        assert select_parents(scores, 5, random.Random(7), mode) == select_parents(scores, 5, random.Random(7), mode)


def test_instance_best_count_distinct_and_best_somewhere():
    """The authors' rule: the union of the per-item best sets (an item all fail holds everyone); all of it when
    ≤ W, else W distinct draws."""
    rng = random.Random(3)
    for _ in range(300):
        scores = random_matrix(rng, binary=rng.random() < 0.5)
        k = rng.randint(1, 6)
        picks = select_parents(scores, k, rng, "instance_best_count")
        eligible = {
            i for i, row in enumerate(scores) if any(row[j] == max(r[j] for r in scores) for j in range(len(row)))
        }
        assert len(picks) == len(set(picks)) == min(k, len(eligible)) and set(picks) <= eligible
        if len(eligible) <= k:
            assert picks == sorted(eligible)
    # ties count for both, and the item everybody fails (a tie at 0) counts for both too
    assert instance_best_counts([[1, 0, 0], [1, 1, 0]]) == [2, 3]
    assert instance_best_counts([[0, 0], [0, 0], [0, 0]]) == [2, 2, 2]
    assert select_parents([[0, 0], [0, 0], [0, 0]], 2, random.Random(0), "instance_best_count") != [0]


def test_instance_best_count_weights_by_count():
    # best sets: item0 {0,1}, item1 {1}, item2 {1}, item3 {2}, item4 {0,1,2} (all fail) -> counts 2, 4, 2
    scores = [[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0]]
    assert instance_best_counts(scores) == [2, 4, 2]
    assert select_parents(scores, 3, random.Random(0), "instance_best_count") == [0, 1, 2]
    n = 20000
    firsts = [select_parents(scores, 1, random.Random(seed), "instance_best_count")[0] for seed in range(n)]
    for i, expected in enumerate((0.25, 0.5, 0.25)):
        assert abs(firsts.count(i) / n - expected) < 0.015


# ---------------------------------------------------------------- cover


def test_greedy_set_cover_properties_and_bound():
    rng = random.Random(4)
    for _ in range(300):
        scores = random_matrix(rng, binary=True)
        cover = greedy_set_cover(scores)
        sets = solved_sets(scores)
        assert cover == reference_greedy(scores)
        assert set().union(set(), *(sets[i] for i in cover)) == set().union(*sets)
        covered = set()
        for i in cover:
            assert sets[i] - covered, "every chosen template must add a new item"
            covered |= sets[i]
        n_items = len(set().union(*sets))
        if n_items:
            assert len(cover) <= (math.log(n_items) + 1) * optimum_cover_size(scores)
        else:
            assert cover == []


def test_greedy_set_cover_tie_breaks_on_index():
    # the authors' scan keeps the first of equal gains, whatever the means
    assert greedy_set_cover([[1, 0], [1, 0.5]]) == [0]
    assert greedy_set_cover([[1, 0], [1, 0]]) == [0]
    assert greedy_set_cover([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1]]) == [2, 3]


def test_assign_templates_draws_cover_solvers_or_cover():
    rng = random.Random(5)
    for _ in range(100):
        scores = random_matrix(rng, binary=True)
        m = len(scores[0])
        dev_ids = [f"d{j}" for j in range(m)]
        hard_ids = dev_ids + ["t0", "t1"]
        cover = greedy_set_cover(scores)
        out = assign_templates(hard_ids, dev_ids, scores, cover, 6, rng)
        for hid in hard_ids:
            solvers = {i for i in cover if hid in dev_ids and scores[i][dev_ids.index(hid)] >= 1}
            if solvers:
                assert len(out[hid]) == 6 and set(out[hid]) <= solvers
            elif cover:
                assert len(out[hid]) == 6 and set(out[hid]) <= set(cover)
            else:
                assert hid not in out


def test_assign_templates_never_leaves_the_cover():
    """Algorithm 2: a covered dev item draws from the cover's templates that solve it, not from every solver."""
    scores = [
        [0, 0, 0, 0],  # 0: the seed
        [1, 1, 0, 0],  # 1: cover (2 new items), mean .5
        [1, 0, 0, 0],  # 2: solves d0 too, but the cover does not need it
        [0, 0, 1, 0],  # 3: cover, mean .25
    ]  # d3: nobody solves it
    dev_ids = ["d0", "d1", "d2", "d3"]
    cover = greedy_set_cover(scores)
    assert cover == [1, 3]
    out = assign_templates(dev_ids + ["t0"], dev_ids, scores, cover, 3000, random.Random(0))
    assert set(out["d0"]) == set(out["d1"]) == {1}  # candidate 2 also solves d0: never drawn
    assert set(out["d2"]) == {3}
    for hid in ("d3", "t0"):  # unsolved dev item and train item: the whole cover, weights .5 : .25
        assert set(out[hid]) == {1, 3} and abs(out[hid].count(1) / 3000 - 2 / 3) < 0.03
    assert assign_templates(["d0"], dev_ids, [[0] * 4, [0] * 4], [], 6, random.Random(0)) == {}


# ---------------------------------------------------------------- budget


def test_auto_budget_matches_hand_computation():
    # N = int(max(4 log2 n, 1.5 n)); total = V + 5n + N*M + ((N+1)//m + 1 + [N<m]) * V
    assert auto_budget(72, 300) == 300 + 360 + 108 * 35 + 22 * 300  # N = 108
    assert auto_budget(6, 100) == 100 + 30 + 10 * 35 + 3 * 100  # N = int(10.34) = 10
    assert auto_budget(12, 40, minibatch_size=3) == 40 + 60 + 18 * 3 + 4 * 40  # N = 18
    assert auto_budget(2, 10) == 10 + 10 + 4 * 35 + (2 + 1) * 10  # N = 4 < m: extra final eval


def test_metric_budget_never_overspends():
    b = MetricBudget(10)
    b.charge(7)
    assert b.can_afford(3) and not b.can_afford(4)
    with pytest.raises(BudgetExhausted):
        b.charge(4)
    assert b.used == 7
    c = MetricBudget(0)
    c.load_state_dict(b.state_dict())
    assert (c.total, c.used) == (10, 7)


# ---------------------------------------------------------------- reflection prompt


def test_parse_proposal():
    """gepa's extractor: inside the fences when there are some, else the whole answer; empty is no proposal."""
    assert parse_proposal("Here:\n```\nThink step by step.\n```\n") == "Think step by step."
    assert parse_proposal("```text\nUse units.\n```") == "Use units."
    assert parse_proposal("no fence at all") == "no fence at all"
    assert parse_proposal("```markdown\nonly opening") == "only opening"
    assert parse_proposal("```\n   \n```") is None
    assert parse_proposal("   ") is None


class CharTokenizer:
    """One token per character: token counts are string lengths, so the fitting can be computed by hand."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))


def test_feedback_text_is_the_authors():
    assert feedback_text(FeedbackRecord("q", "r", " 17 ", 0.0)) == (
        "Your final answer is incorrect. The correct answer is '17'.\n\nReward (answer_score) = 0.00")
    assert feedback_text(FeedbackRecord("q", "r", "17", 1.0)) == (
        "Your final answer is correct. The correct answer is '17'.\n\nReward (answer_score) = 1.00")
    wrong_format = feedback_text(FeedbackRecord("q", "r", "17", 0.0, format_ok=False))
    assert wrong_format.startswith("You have to provide final answer, without detailed explanations.\n")
    assert "failed to output in the required format" in wrong_format and "The correct answer is '17'." in wrong_format
    assert "check your output format." in wrong_format and wrong_format.endswith("Reward (answer_score) = 0.00")


def test_build_reflection_prompt_without_a_budget_shows_everything():
    template = InstructionProposalSignature.default_prompt_template
    long_response = "start-of-reasoning " + "x" * 5000 + " FINAL ANSWER 17"
    records = [FeedbackRecord("What is 8+9?", long_response, "17", 0.0), FeedbackRecord("2+2?", "4", "4", 1.0)]
    prompt = build_reflection_prompt("Be careful.", records)
    assert "What is 8+9?" in prompt and "2+2?" in prompt and long_response in prompt and "Be careful." in prompt
    assert "Reward (answer_score) = 0.00" in prompt and "Your final answer is correct." in prompt
    assert template.split("<curr_param>")[0] in prompt
    assert template.split("<side_info>")[1].strip() in prompt
    seed_prompt = build_reflection_prompt("", records)
    assert "question alone" in seed_prompt and "<curr_param>" not in seed_prompt


def test_feedback_fitting_by_tokens_hand_computed():
    """The authors' _truncate_examples_to_fit with one token per character."""
    tok = CharTokenizer()
    cheap = FeedbackRecord("q1", "short answer", "1", 1.0)
    bad_format = FeedbackRecord("q2", "A" * 150 + "M" * 5000 + "Z" * 150, "2", 0.0, format_ok=False)
    normal = FeedbackRecord("q3", "B" * 3000 + "N" * 4000 + "E" * 3000, "3", 0.0)
    records = [cheap, bad_format, normal]
    meta = len(build_reflection_prompt("T", []))
    available = 3000
    budget = meta + PROMPT_MARGIN_TOKENS + available
    prompt = build_reflection_prompt("T", records, tokenizer=tok, token_budget=budget)

    def cost(question, response, record):
        return int(len(f"{question}\n{response}\n{feedback_text(record)}") * 1.2)

    # threshold 1000: the cheap one stays whole, the two others are over it and do not fit in what is left
    remaining = available - cost("q1", cheap.response, cheap)
    head_tail = "A" * 100 + FORMAT_ERROR_MARK + "Z" * 100  # format error: first and last 100 tokens
    remaining -= cost("q2", head_tail, bad_format)
    share = max(100, remaining)  # one normal example left: it gets all of it
    response_budget = share - int(len(f"q3\n{feedback_text(normal)}") * 1.2)
    keep = (response_budget - len(TRUNCATION_MARK)) * 40 // 100
    cut = "B" * keep + TRUNCATION_MARK + "E" * keep
    assert fit_responses(records, available, tok) == [cheap.response, head_tail, cut]
    assert prompt == build_reflection_prompt("T", [cheap, FeedbackRecord("q2", head_tail, "2", 0.0, False),
                                                   FeedbackRecord("q3", cut, "3", 0.0)])
    assert len(prompt) <= budget
    # room for everything: nothing is cut
    assert fit_responses(records, 100_000, tok) == [r.response for r in records]
    # only the format error over its share, and it does not fit: only it is cut
    assert fit_responses([cheap, bad_format], 3000, tok) == [cheap.response, head_tail]
    # a meta-prompt that fills the context alone: one example, as the authors
    one = build_reflection_prompt("T", records, tokenizer=tok, token_budget=meta + 10)
    assert "q1" in one and "q2" not in one and "q3" not in one


def test_feedback_fitting_with_the_policy_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = " ".join(f"step {i} of the reasoning is here." for i in range(3000))
    records = [FeedbackRecord(f"Question {i}?", text, str(i), 0.0, format_ok=i != 1) for i in range(3)]
    for budget in (1500, 4000, 30720):
        prompt = build_reflection_prompt("Be careful.", records, tokenizer=tok, token_budget=budget)
        assert len(tok.encode(prompt, add_special_tokens=False)) <= budget - PROMPT_MARGIN_TOKENS // 2
        assert all(f"Question {i}?" in prompt for i in range(3))
        assert FORMAT_ERROR_MARK.strip() in prompt and TRUNCATION_MARK.strip() in prompt
        assert "step 0 of" in prompt and "step 2999 of the reasoning is here." in prompt  # head and tail kept


# ---------------------------------------------------------------- engine with fake LLMs


def h01(*parts) -> float:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16) / 16**8


class FakeEvaluator:
    """A template solves an item when hash(template, id) < a threshold that rises with the number of 'step's."""

    def __init__(self, crash_after=None):
        self.calls, self.metric_calls, self.log, self.crash_after = 0, 0, [], crash_after

    def __call__(self, template, items):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise KeyboardInterrupt("simulated kill")  # not an Exception: nothing may swallow it
        self.calls += 1
        self.metric_calls += len(items)
        threshold = min(0.9, 0.15 + 0.12 * template.count("step"))
        evals = [Evaluation(float(h01(template, it.id) < threshold), f"reasoning... answer {it.id}") for it in items]
        self.log.append((template, [it.id for it in items], [e.score for e in evals]))
        return evals


def fake_propose(prompt):
    r = h01(prompt)
    if r < 0.08:
        raise RuntimeError("reflection LM timed out")
    if r < 0.2:
        return "```\n   \n```"  # an empty fenced block: invalid
    return f"Analysis...\n```text\nHint {int(r * 1e6)}:" + " step" * (1 + int(r * 100) % 5) + "\n```"


def hard_items(n=60):
    return [HardItem(f"q{i}", f"question {i}?", str(i)) for i in range(n)]


K = 6  # templates per hard sample


def settings(**kw):
    base = dict(min_hard=10, dev_size=25, minibatch_size=3, num_parents=4, max_metric_calls=800, seed=0)
    return GEPASettings(GEPAConfig(**{**base, **kw}), templates_per_sample=K)


def run_engine(tmp_path=None, evaluator=None, propose=fake_propose, items=None, **kw):
    evaluator = evaluator or FakeEvaluator()
    engine = GEPAEngine(items or hard_items(), evaluator, propose, settings(**kw))
    result = engine.run(None if tmp_path is None else tmp_path / "state.json")
    return result, evaluator


def test_engine_budget_accounting_and_strict_acceptance():
    result, ev = run_engine()
    out = result.to_json()
    c = out["counters"]
    assert out["budget"]["used"] == ev.metric_calls <= out["budget"]["total"] == 800
    assert len(out["pool"]) > 1 and c["accepted"] == len(out["pool"]) - 1
    assert c["proposed"] == c["failed"] + c["invalid"] + c["duplicate"] + c["rejected"] + c["accepted"] + c[
        "dropped_for_budget"]  # fmt: skip
    assert c["failed"] > 0 and c["invalid"] > 0 and c["rejected"] > 0
    remaining = 800 - out["budget"]["used"]
    assert remaining < 2 * 3 or (c["dropped_for_budget"] == 1 and remaining < 25)  # stopped only when out of budget
    # every iteration mutates distinct parents, at most W = 4 of them
    assert c["parent_steps"] <= 4 * c["iterations"]
    pool_templates = {p["template"] for p in out["pool"]}
    dev = set(out["dev_ids"])
    # each child minibatch eval is preceded by its parent's eval on the same minibatch
    for k, (template, ids, scores) in enumerate(ev.log):
        if len(ids) == 3 and k > 0 and ev.log[k - 1][1] == ids and ev.log[k - 1][0] != template:
            parent_sum, child_sum = sum(ev.log[k - 1][2]), sum(scores)
            assert (template in pool_templates) == (child_sum > parent_sum)
            assert not set(ids) & dev  # minibatches come from train
    for p in out["pool"][1:]:
        assert 0 <= p["parent"] < p["index"]
    assert out["pool"][0]["template"] == "" and out["pool"][0]["parent"] is None
    for hid, texts in out["assignments"].items():
        assert len(texts) == K and set(texts) <= pool_templates


def test_engine_deterministic_and_seed_sensitive():
    a = json.dumps(run_engine()[0].to_json())
    assert a == json.dumps(run_engine()[0].to_json())
    assert a != json.dumps(run_engine(seed=1)[0].to_json())
    b = run_engine(parent_selection="instance_best_count")[0].to_json()
    assert b["budget"]["used"] <= 800


def test_engine_skips_small_hard_set():
    result, ev = run_engine(items=hard_items(9))
    assert result.skipped and result.to_json()["skipped"] and ev.calls == 0 and result.to_json()["pool"] == []


@pytest.mark.parametrize("n, dev_count", [(10, 5), (11, 5), (449, 224), (450, 225), (599, 299), (1000, 300)])
def test_split_is_the_authors(n, dev_count):
    """dev = min(300, n // 2): half/half below 450 (dev the smaller half), 300 from 600 on; disjoint."""
    ids = [f"q{i}" for i in range(n)]
    dev, train = split_hard_set(ids, 300, seed=7)
    assert len(dev) == dev_count and len(train) == n - dev_count
    order = list(range(n))
    random.Random(7).shuffle(order)
    assert dev == [ids[i] for i in sorted(order[:dev_count])]  # the first of the shuffle, in hard-set order
    assert train == [ids[i] for i in order[dev_count:]]
    assert not set(dev) & set(train) and set(dev) | set(train) == set(ids)


def test_engine_small_hard_set_splits_half_half():
    result, ev = run_engine(items=hard_items(20))
    assert len(result.dev_ids) == 10 and result.budget_used == ev.metric_calls
    dev = set(result.dev_ids)
    assert all(not set(ids) & dev for _, ids, _ in ev.log if len(ids) == 3)  # minibatches come from train
    # one hard prompt has no dev item: no round
    single, ev = run_engine(items=hard_items(1), min_hard=1)
    assert single.skipped and ev.calls == 0


def test_engine_feeds_the_authors_feedback_to_reflection():
    prompts = []

    def propose(prompt):
        prompts.append(prompt)
        return fake_propose(prompt)

    class FormatEvaluator(FakeEvaluator):
        def __call__(self, template, items):
            return [Evaluation(e.score, e.response, format_ok=e.score > 0 or int(it.id[1:]) % 2 == 0)
                    for e, it in zip(super().__call__(template, items), items)]

    run_engine(evaluator=FormatEvaluator(), propose=propose, max_metric_calls=200)
    assert prompts and all("Reward (answer_score) = " in prompt for prompt in prompts)
    assert any("check your output format" in prompt for prompt in prompts)
    assert any("Your final answer is incorrect." in prompt for prompt in prompts)


def test_engine_counts_duplicates():
    result, _ = run_engine(propose=lambda prompt: "```\nalways the same step\n```", max_metric_calls=200)
    c = result.counters
    assert c["duplicate"] > 0 and c["accepted"] <= 1  # a rejected proposal may be retried on another minibatch


@pytest.mark.parametrize("crash_after", [0, 1, 2, 5, 17, 40, 90])
def test_crash_and_restart_gives_identical_result(tmp_path, crash_after):
    reference, ref_ev = run_engine(tmp_path / "ref")
    (tmp_path / "ref").mkdir(exist_ok=True)
    with pytest.raises(KeyboardInterrupt):
        run_engine(tmp_path, FakeEvaluator(crash_after=crash_after))
    resumed, _ = run_engine(tmp_path)
    assert json.dumps(resumed.to_json()) == json.dumps(reference.to_json())
    assert resumed.budget_used == reference.budget_used == ref_ev.metric_calls


def test_repeated_crashes_converge_to_the_same_result(tmp_path):
    reference, _ = run_engine()
    for _ in range(1000):
        try:
            resumed, _ = run_engine(tmp_path, FakeEvaluator(crash_after=5))
            break
        except KeyboardInterrupt:
            continue
    assert json.dumps(resumed.to_json()) == json.dumps(reference.to_json())
    # and a finished state file just returns the result again, without any evaluation
    again, ev = run_engine(tmp_path, FakeEvaluator(crash_after=0))
    assert json.dumps(again.to_json()) == json.dumps(reference.to_json()) and ev.calls == 0


def test_resume_refuses_a_different_run(tmp_path):
    run_engine(tmp_path)
    with pytest.raises(ValueError):
        run_engine(tmp_path, seed=3)
