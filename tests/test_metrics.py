"""Metrics against a perfect causal model (an oracle of the right sequences) and numpy."""

import jax
import numpy as np
import pytest

from mode_jax.eval import metrics
from mode_jax.testbed import tasks
from mode_jax.testbed import tokenizer as tk

V = 40


@pytest.fixture(scope="module")
def tok():
    return tk.build_tokenizer(tasks.vocabulary())


@pytest.fixture(scope="module")
def samples():
    # Text questions keep sequences short; the metrics never look at the images.
    return tasks.generate("heldout", 30, seed=0, config=tasks.TaskConfig(tasks=tasks.TEXT_TASKS))


class Oracle:
    """A causal 'model' that knows the right continuation of every given sequence.

    Its logits at position t depend only on tokens <= t and put (almost) all mass on the token
    that follows that prefix in one of the reference sequences.
    """

    def __init__(self, sequences, vocab_size):
        self.next = {}
        for seq in sequences:
            for t in range(1, len(seq)):
                self.next[tuple(seq[:t])] = seq[t]
        self.vocab_size = vocab_size

    def logits(self, ids: np.ndarray) -> np.ndarray:
        out = np.zeros((*ids.shape, self.vocab_size), np.float32)
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                nxt = self.next.get(tuple(ids[b, : t + 1].tolist()))
                if nxt is not None:
                    out[b, t, nxt] = 50.0
        return out


def _greedy(oracle, prompt_ids, end_id, max_new=5):
    ids = list(prompt_ids)
    for _ in range(max_new):
        nxt = int(np.argmax(oracle.logits(np.asarray([ids]))[0, -1]))
        if nxt == end_id:
            break
        ids.append(nxt)
    return ids[len(prompt_ids):]


def _pad(rows):
    """Right-pad 1-D arrays into [B, T] (pad id 0, mask False)."""
    t = max(len(r) for r in rows)
    out = np.zeros((len(rows), t), rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def test_perfect_model_exact_match_is_100_percent(tok, samples):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    examples = [tk.encode_example(tok, s.prompt, s.answer)[0] for s in samples]
    oracle = Oracle([e.tolist() for e in examples], len(tok))
    preds = [tok.decode(_greedy(oracle, tk.encode_prompt(tok, s.prompt), end),
                        skip_special_tokens=True) for s in samples]
    correct = metrics.exact_match(preds, [s.answer for s in samples])
    assert correct.all()
    # A model that learned some answers wrong scores exactly the right fraction.
    wrong = {1, 4, 7}
    bad = [tk.encode_example(tok, s.prompt, "9" if s.answer != "9" else "8")[0] if i in wrong
           else e for i, (s, e) in enumerate(zip(samples, examples, strict=True))]
    oracle = Oracle([e.tolist() for e in bad], len(tok))
    preds = [tok.decode(_greedy(oracle, tk.encode_prompt(tok, s.prompt), end),
                        skip_special_tokens=True) for s in samples]
    correct = metrics.exact_match(preds, [s.answer for s in samples])
    assert set(np.flatnonzero(~correct)) == wrong
    acc = metrics.breakdown(correct, np.ones(len(samples)), {"task": [s.task for s in samples]})
    assert acc["all"] == pytest.approx(1 - len(wrong) / len(samples))


def test_perfect_model_multiple_choice_is_100_percent(tok, samples):
    mc = [s for s in samples if s.options]
    assert len(mc) >= 3
    rows, masks, owner = [], [], []
    for i, s in enumerate(mc):
        for k in range(len(s.options)):
            option = tasks.LETTERS[k] if s.answer in tasks.LETTERS else s.options[k]
            ids, mask = tk.encode_example(tok, s.prompt, option, include_end=False)
            rows.append(ids)
            masks.append(mask)
            owner.append(i)
    right = [tk.encode_example(tok, s.prompt, s.answer)[0].tolist() for s in mc]
    oracle = Oracle(right, len(tok))
    ids, mask = _pad(rows), _pad(masks)
    scores = np.asarray(metrics.option_scores(oracle.logits(ids), ids, mask))
    per_question = [[scores[r] for r in range(len(rows)) if owner[r] == i] for i in range(len(mc))]
    chosen = metrics.choose(per_question)
    np.testing.assert_array_equal(chosen, [s.answer_index for s in mc])


def _log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _random_case(seed, b=3, t=9):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (b, t, V)).astype(np.float32)
    ids = rng.integers(0, V, (b, t))
    mask = np.zeros((b, t), bool)
    mask[0, 5:8] = True
    mask[1, 2] = True
    mask[2, 6:] = True
    return rng, logits, ids, mask


def test_nll_perplexity_and_token_logprobs_match_numpy():
    _, logits, ids, mask = _random_case(0)
    lp = _log_softmax(logits)
    ref = np.zeros(ids.shape)
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            ref[b, t] = lp[b, t - 1, ids[b, t]]
    np.testing.assert_allclose(metrics.token_logprobs(logits, ids), ref, rtol=1e-5, atol=1e-5)
    nll, count = metrics.answer_nll(logits, ids, mask)
    np.testing.assert_allclose(nll, -(ref * mask).sum(1), rtol=1e-5)
    np.testing.assert_array_equal(count, mask.sum(1))
    assert metrics.perplexity(nll, count) == pytest.approx(np.exp(-ref[mask].mean()), rel=1e-5)
    np.testing.assert_allclose(metrics.option_scores(logits, ids, mask, normalize=True),
                               (ref * mask).sum(1) / mask.sum(1), rtol=1e-5)


def test_kl_is_zero_against_itself_and_matches_numpy():
    rng, logits, ids, mask = _random_case(1)
    kl, count = metrics.answer_kl(logits, logits, mask)
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)
    other = logits + rng.normal(0, 1, logits.shape).astype(np.float32)
    kl, count = metrics.answer_kl(logits, other, mask)
    p, q = _log_softmax(logits), _log_softmax(other)
    per_pos = (np.exp(p) * (p - q)).sum(-1)
    at = np.zeros_like(mask)
    at[:, :-1] = mask[:, 1:]
    np.testing.assert_allclose(kl, (per_pos * at).sum(1), rtol=1e-4)
    assert (np.asarray(kl) > 0).all()
    np.testing.assert_array_equal(count, mask.sum(1))
    # Logits at positions that predict no masked token do not count.
    other2 = other.copy()
    other2[~at] += rng.normal(0, 5, other2[~at].shape).astype(np.float32)
    np.testing.assert_allclose(metrics.answer_kl(logits, other2, mask)[0], kl, rtol=1e-6)
    # Pure function: the same under jit.
    jitted = jax.jit(metrics.answer_kl)(logits, other, mask)[0]
    np.testing.assert_allclose(jitted, kl, rtol=1e-6)


def test_choose_matches_brute_force():
    rng = np.random.default_rng(2)
    scores = [rng.normal(size=rng.integers(2, 6)).tolist() for _ in range(50)]
    expected = [max(range(len(s)), key=lambda k, s=s: s[k]) for s in scores]
    np.testing.assert_array_equal(metrics.choose(scores), expected)


def test_exact_match_normalization():
    preds = ["East Morvale", "A .", " red ", "blue", "12"]
    answers = ["east morvale", "A.", "red", "red", "1 2"]
    np.testing.assert_array_equal(metrics.exact_match(preds, answers),
                                  [True, True, True, False, False])


def test_breakdown_matches_loops():
    rng = np.random.default_rng(3)
    n = 40
    sums, counts = rng.uniform(0, 5, n), rng.integers(1, 4, n).astype(float)
    family = rng.choice(["vision", "text"], n).tolist()
    task = rng.choice(["a", "b", "c"], n).tolist()
    out = metrics.breakdown(sums, counts, {"family": family, "task": task})
    assert out["all"] == pytest.approx(sums.sum() / counts.sum())
    for name, labels in (("family", family), ("task", task)):
        for lab in set(labels):
            sel = [i for i in range(n) if labels[i] == lab]
            assert out[name][lab] == pytest.approx(sums[sel].sum() / counts[sel].sum())


def test_bad_inputs_raise():
    _, logits, ids, mask = _random_case(4)
    with pytest.raises(ValueError, match="does not match logits"):
        metrics.answer_nll(logits, ids[:, :-1], mask)
    with pytest.raises(ValueError, match="logits shapes differ"):
        metrics.answer_kl(logits, logits[:, :, :-1], mask)
    bad = mask.copy()
    bad[0, 0] = True
    with pytest.raises(ValueError, match="position 0"):
        metrics.answer_kl(logits, logits, bad)
    empty = mask.copy()
    empty[1] = False
    with pytest.raises(ValueError, match="no masked continuation"):
        metrics.option_scores(logits, ids, empty)
    with pytest.raises(ValueError, match="2 predictions for 1 answers"):
        metrics.exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="group 'task' has 2 labels"):
        metrics.breakdown([1.0, 2.0, 3.0], [1, 1, 1], {"task": ["a", "b"]})


def test_answer_margins_match_a_loop_and_the_sign_of_greedy_correctness():
    """Margins against a plain loop over positions and vocabulary; positive exactly when the
    argmax at every position is the answer token."""
    rng = np.random.default_rng(3)
    logprobs = [jax.nn.log_softmax(rng.normal(size=(n, 9)) * 3) for n in (1, 2, 3, 1)]
    logprobs = [np.asarray(lp) for lp in logprobs]
    answers = [list(rng.integers(0, 9, len(lp))) for lp in logprobs]
    answers[0] = [int(np.argmax(logprobs[0][0]))]  # one greedy-correct answer at least
    margins = metrics.answer_margins(logprobs, answers)
    for lp, ids, m in zip(logprobs, answers, margins, strict=True):
        gaps = [lp[t, a] - max(lp[t, v] for v in range(lp.shape[1]) if v != a)
                for t, a in enumerate(ids)]
        assert m == pytest.approx(min(gaps))
        assert (m > 0) == all(int(np.argmax(lp[t])) == a for t, a in enumerate(ids))
    assert margins[0] > 0
    with pytest.raises(ValueError, match="answer 1"):
        metrics.answer_margins(logprobs[:2], [[1], [1, 2, 3]])
