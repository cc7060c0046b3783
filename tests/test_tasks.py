"""Task suite: answers checked against an independent reading of the images and the question text,
splits disjoint, determinism, vocabulary coverage."""

import hashlib
import re

import numpy as np
import pytest
from scipy import ndimage

from mode_jax.testbed import tasks
from mode_jax.testbed.tokenizer import split_words

CONFIG = tasks.TaskConfig()


@pytest.fixture(scope="module")
def train():
    return tasks.generate("train", 600, seed=3, config=CONFIG)


@pytest.fixture(scope="module")
def heldout():
    return tasks.generate("heldout", 300, seed=3, config=CONFIG)


# ---------------------------------------------------------------- an independent scene reader
def read_scene(image: np.ndarray) -> list[dict]:
    """Objects found by colour segmentation: saturated blobs on the pale, grey-ish background."""
    img = image.astype(np.int32)
    chroma = img.max(-1) - img.min(-1)
    labels, n = ndimage.label(chroma > 60)
    palette = np.array(list(tasks.COLORS.values()))
    objects = []
    for i in range(1, n + 1):
        ys, xs = np.nonzero(labels == i)
        if len(ys) < 30:
            continue
        mean = img[ys, xs].mean(0)
        color = list(tasks.COLORS)[int(np.argmin(((palette - mean) ** 2).sum(1)))]
        blob = labels[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == i
        fill = blob.mean()
        bottom = blob[-1].mean()  # a triangle's base fills its bottom row, a cross's does not
        if fill > 0.95:
            shape = "square"
        elif fill > 0.7:
            shape = "circle"
        else:
            shape = "triangle" if bottom > 0.7 else "cross"
        objects.append({"color": color, "shape": shape,
                        "x": (xs.min() + xs.max()) / 2, "y": (ys.min() + ys.max()) / 2})
    return objects


def _split_choices(s: tasks.Sample) -> tuple[str, str]:
    """(the question without its options, the right option) of a multiple-choice sample, in
    either answer form; checks the listed options and the answer."""
    assert len(set(s.options)) == len(s.options) == 4
    right = s.options[s.answer_index]
    lettered = " ".join(f"{tasks.LETTERS[i]}. {o}" for i, o in enumerate(s.options))
    if s.answer == tasks.LETTERS[s.answer_index]:
        assert s.question.endswith(" " + lettered)
        return s.question[:-len(lettered) - 1], right
    assert s.answer == right and s.question.endswith(" " + " or ".join(s.options))
    return s.question[:-len(" or ".join(s.options)) - 1], right


def _one(objects, **match):
    found = [o for o in objects if all(o[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, objects)
    return found[0]


def _check_vision(s: tasks.Sample) -> None:
    objs = read_scene(s.image)
    q, expected = _split_choices(s) if s.task == "choice" else (s.question, s.answer)
    if m := re.fullmatch(r"what color is the (\w+) \?", q):
        assert _one(objs, shape=m[1])["color"] == expected
    elif m := re.fullmatch(r"what shape is the (\w+) object \?", q):
        assert _one(objs, color=m[1])["shape"] == expected
    elif m := re.fullmatch(r"how many (\w+) are there \?", q):
        shape = {v: k for k, v in tasks.PLURALS.items()}[m[1]]
        assert sum(o["shape"] == shape for o in objs) == int(expected)
    elif m := re.fullmatch(r"where is the (\w+) (\w+) relative to the other object \?", q):
        assert len(objs) == 2  # the named object and the other one
        a = _one(objs, color=m[1], shape=m[2])
        b = objs[1] if objs[0] is a else objs[0]
        dx, dy = a["x"] - b["x"], a["y"] - b["y"]
        side = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else (
            "above" if dy < 0 else "below")
        assert side == expected
    elif m := re.fullmatch(r"where is the (\w+) (\w+) relative to the (\w+) (\w+) \?", q):
        assert len(objs) == 2  # a position scene holds just the two objects it names
        a = _one(objs, color=m[1], shape=m[2])
        b = _one(objs, color=m[3], shape=m[4])
        dx, dy = a["x"] - b["x"], a["y"] - b["y"]
        side = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else (
            "above" if dy < 0 else "below")
        assert side == expected
    elif m := re.fullmatch(r"what shape is (to the left of|to the right of|above|below) the "
                           r"other \?", q):
        assert len(objs) == 2  # a position scene holds just two objects, of distinct shapes
        a, b = objs if objs[0]["shape"] == expected else objs[::-1]
        assert a["shape"] == expected != b["shape"]
        dx, dy = a["x"] - b["x"], a["y"] - b["y"]
        side = ("to the left of" if dx < 0 else "to the right of") if abs(dx) > abs(dy) else (
            "above" if dy < 0 else "below")
        assert side == m[1]
    else:
        raise AssertionError(f"unexpected vision question {q!r}")


def test_vision_answers_match_the_pixels(train, heldout):
    vision = [s for s in train + heldout if s.family == "vision"]
    assert len(vision) == 450
    for s in vision:
        assert s.image.shape == (*CONFIG.image_size, 3) and s.image.dtype == np.uint8
        _check_vision(s)


def test_most_of_the_image_is_background(train):
    # Each merged image token covers 28 x 28 px; most should hold no object pixel.
    for s in [s for s in train if s.family == "vision"][:100]:
        chroma = s.image.max(-1).astype(int) - s.image.min(-1)
        cells = (chroma > 60).reshape(12, 28, 12, 28).any(axis=(1, 3))
        assert cells.mean() < 0.5


def _check_text(s: tasks.Sample, facts: dict) -> None:
    q, expected = _split_choices(s) if s.task == "fact_choice" else (s.question, s.answer)
    filler, core = re.fullmatch(r"(.*?) ?((?:what|where) .*)", q).groups()
    assert filler in tasks.FILLERS
    if m := re.fullmatch(r"what is (\d+) (plus|minus) (\d+) \?", core):
        a, b = int(m[1]), int(m[3])
        assert int(expected) == (a + b if m[2] == "plus" else a - b) >= 0
    elif m := re.fullmatch(r"what is the (first|last) letter of (\w+) \?", core):
        assert expected == m[2][0 if m[1] == "first" else -1]
    elif m := re.fullmatch(r"what is the opposite of (\w+) \?", core):
        pairs = dict(tasks.OPPOSITES) | {b: a for a, b in tasks.OPPOSITES}
        assert expected == pairs[m[1]]
    elif m := re.fullmatch(r"what color is (\w+ \w+) \?", core):
        assert expected == facts[m[1]]["color"]
    elif m := re.fullmatch(r"what does (\w+ \w+) eat \?", core):
        assert expected == facts[m[1]]["food"]
    elif m := re.fullmatch(r"where does (\w+ \w+) live \?", core):
        assert expected == facts[m[1]]["home"]
    else:
        raise AssertionError(f"unexpected text question {q!r}")


def test_lettered_multiple_choice_answers_are_right():
    """The MMBench form (answer = the option's letter) of both multiple-choice tasks."""
    cfg = tasks.TaskConfig(tasks=("choice", "fact_choice"), choice_answer="letter")
    facts = tasks.world(cfg.world_seed)
    samples = tasks.generate("train", 40, seed=1, config=cfg)
    assert {s.answer for s in samples} <= set(tasks.LETTERS[:4])
    for s in samples:
        _check_vision(s) if s.family == "vision" else _check_text(s, facts)
    with pytest.raises(ValueError, match="choice_answer"):
        tasks.generate("train", 2, seed=1, config=tasks.TaskConfig(choice_answer="index"))


def test_shape_and_subject_forms_of_position_questions():
    """"what shape is above the other ?" -> the shape lying there; "where is the red circle
    relative to the other object ?" -> left/right/above/below. Their extra word is in the
    vocabulary of that form only, so the default tokenizer (and model) stay as shipped."""
    cfg = tasks.TaskConfig(tasks=("position",), position_form="shape")
    samples = tasks.generate("train", 40, seed=2, config=cfg)
    assert {s.answer for s in samples} == set(tasks.SHAPES)
    for s in samples:
        _check_vision(s)
        assert set(split_words(s.question)) <= set(tasks.vocabulary(cfg))
    assert set(tasks.vocabulary(cfg)) - set(tasks.vocabulary()) == {"other"}
    subject = tasks.TaskConfig(tasks=("position",), position_form="subject")
    samples = tasks.generate("train", 40, seed=2, config=subject)
    assert {s.answer for s in samples} == set(tasks.RELATIONS)
    for s in samples:
        _check_vision(s)
        assert s.question.endswith("relative to the other object ?")
    assert set(tasks.vocabulary(subject)) - set(tasks.vocabulary()) == {"other"}
    with pytest.raises(ValueError, match="position_form 'where' must be"):
        tasks.generate("train", 2, seed=1, config=tasks.TaskConfig(position_form="where"))


def test_text_answers_are_right(train, heldout):
    facts = tasks.world(CONFIG.world_seed)
    assert set(facts) == set(tasks.ENTITIES)
    for s in train + heldout:
        if s.family == "text":
            assert s.image is None and s.modality == "text"
            _check_text(s, facts)


def test_no_single_name_word_tells_a_fact():
    """Facts need both words of a name: every word is shared by people whose facts differ."""
    facts = tasks.world(0)
    for word in (*tasks.GIVEN_NAMES, *tasks.FAMILY_NAMES):
        people = [e for e in tasks.ENTITIES if word in e.split()]
        assert len(people) == 8
        for attr in ("color", "food", "home"):
            assert len({facts[e][attr] for e in people}) > 1, (word, attr)



def test_the_knowledge_load_scales_with_names_and_arithmetic_max():
    """A larger load adds people and sums, every answer still right; the default is ENTITIES."""
    assert tasks.people() == tasks.ENTITIES and len(set(tasks.people(12))) == 144
    words = [w for person in tasks.people(12) for w in person.split()]
    assert len(set(words)) == 24 and not set(words) & set(tasks.vocabulary()) - set(
        w for person in tasks.ENTITIES for w in person.split())
    cfg = tasks.TaskConfig(tasks=tasks.TEXT_TASKS, names=12, arithmetic_max=19)
    facts = tasks.world(cfg.world_seed, cfg.names)
    cores = tasks.text_cores(cfg)
    assert len(cores["fact"]) == 3 * 144 and len(cores["arithmetic"]) == 20 * 20 + 20 * 21 // 2
    samples = tasks.generate("train", 300, seed=2, config=cfg)
    for s in samples:
        _check_text(s, facts)
    assert any(int(s.answer) > 18 for s in samples if s.task == "arithmetic")
    assert {"38", "kalodor", "vaskkami"} <= set(tasks.vocabulary(cfg))
    for bad in ({"names": 1}, {"names": tasks.MAX_NAMES + 1}, {"arithmetic_max": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tasks.generate("train", 1, seed=0, config=tasks.TaskConfig(**bad))

def test_world_is_fixed_by_its_seed():
    assert tasks.world(0) == tasks.world(0)
    assert tasks.world(0) != tasks.world(1)


def _content(s: tasks.Sample) -> str:
    image = b"" if s.image is None else s.image.tobytes()
    return hashlib.sha256(s.prompt.encode() + image).hexdigest()


def test_splits_are_disjoint(train, heldout):
    assert not {_content(s) for s in train} & {_content(s) for s in heldout}
    assert not {s.key for s in train} & {s.key for s in heldout}
    # Text prompts come from a finite space: had the filler partition been ignored, this many
    # samples would share ~20 prompts. Vision keys land in their split's hash bucket.
    assert not {s.prompt for s in train if s.family == "text"} & {
        s.prompt for s in heldout if s.family == "text"}
    for split, samples in (("train", train), ("heldout", heldout)):
        for s in samples:
            if s.family == "vision":
                in_held = int(s.key[:8], 16) % 100 < CONFIG.heldout_percent
                assert in_held == (split == "heldout")


def test_every_heldout_fact_is_taught_in_train():
    for task, cores in tasks.text_cores(CONFIG).items():
        assert cores, task
        for core in cores:
            train = tasks.split_fillers(core, CONFIG, "train")
            held = tasks.split_fillers(core, CONFIG, "heldout")
            assert len(held) == CONFIG.heldout_fillers and train
            assert sorted(train + held) == sorted(tasks.FILLERS)


def test_deterministic_and_seeded():
    a = tasks.generate("train", 40, seed=5)
    b = tasks.generate("train", 40, seed=5)
    c = tasks.generate("train", 40, seed=6)
    assert [_content(s) for s in a] == [_content(s) for s in b]
    assert [s.key for s in a] == [s.key for s in b]
    assert len({_content(s) for s in a} & {_content(s) for s in c}) < 10


def test_balance_answers_and_vocabulary(train, heldout):
    counts = {t: sum(s.task == t for s in train) for t in tasks.ALL_TASKS}
    assert set(counts.values()) == {60}
    vocab = set(tasks.vocabulary(CONFIG))
    assert 150 <= len(vocab) <= 400
    for s in train + heldout:
        assert 1 <= len(split_words(s.answer)) <= 3
        assert set(split_words(s.question)) <= vocab
        assert set(split_words(s.answer)) | set(s.options) <= vocab
        assert s.family == ("vision" if s.task in tasks.VISION_TASKS else "text")
    answers = {t: {s.answer for s in train if s.task == t} for t in tasks.ALL_TASKS}
    assert answers["position"] == set(tasks.RELATIONS)
    assert answers["count"] == {str(i) for i in range(CONFIG.max_objects + 1)}
    assert answers["choice"] == set(tasks.COLORS) | set(tasks.SHAPES)
    indices = {t: {s.answer_index for s in train if s.task == t} for t in ("choice", "fact_choice")}
    assert indices == {"choice": {0, 1, 2, 3}, "fact_choice": {0, 1, 2, 3}}  # right option moves


def test_small_scene_config():
    config = tasks.TaskConfig(image_size=(168, 224), max_objects=2, object_size=(14, 18),
                              cell=0, tasks=tasks.VISION_TASKS)
    samples = tasks.generate("train", 25, seed=0, config=config)
    assert {s.answer for s in samples if s.task == "count"} <= {"0", "1", "2"}
    for s in samples:
        assert s.image.shape == (168, 224, 3)
        assert len(read_scene(s.image)) <= 2
        _check_vision(s)


def test_crowded_scene_raises():
    config = tasks.TaskConfig(image_size=(112, 112), object_size=(40, 40), cell=0,
                              tasks=("position",))
    with pytest.raises(ValueError, match="no 'position' scene fits"):
        tasks.generate("train", 1, seed=0, config=config)
    cells = tasks.TaskConfig(image_size=(56, 56), tasks=("position",))  # 2 x 2 cells, 1 fits
    with pytest.raises(ValueError, match="no 'position' scene fits"):
        tasks.generate("train", 1, seed=0, config=cells)


def test_cell_placement_puts_each_object_alone_in_one_token(train):
    """Default scenes: every object's pixels lie inside one 28-pixel cell (one merged image
    token), and no two objects are in the same or neighbouring cells."""
    for s in [s for s in train if s.family == "vision"][:60]:
        chroma = s.image.astype(np.int32).max(-1) - s.image.astype(np.int32).min(-1)
        labels, n = ndimage.label(chroma > 60)
        found = []
        for i in range(1, n + 1):
            ys, xs = np.nonzero(labels == i)
            if len(ys) < 30:
                continue
            cy, cx = {int(v) // 28 for v in ys}, {int(v) // 28 for v in xs}
            assert len(cy) == len(cx) == 1, (s.question, sorted(cy), sorted(cx))
            found.append((cy.pop(), cx.pop()))
        for a in found:
            for b in found:
                assert a == b or max(abs(a[0] - b[0]), abs(a[1] - b[1])) > 1


def test_only_selected_tasks():
    config = tasks.TaskConfig(tasks=("count", "arithmetic"))
    assert {s.task for s in tasks.generate("heldout", 10, seed=0, config=config)} == {
        "count", "arithmetic"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=(330, 336)), "multiples of 28"),
    (dict(tasks=("colour",)), "unknown"),
    (dict(heldout_percent=0), "heldout_percent"),
    (dict(heldout_fillers=len(tasks.FILLERS)), "heldout_fillers"),
    (dict(max_objects=1), "max_objects"),
    (dict(object_size=(30, 20)), "object_size"),
    (dict(image_size=(28, 28)), "object_size"),
    (dict(object_size=(14, 14)), "cell 28 must divide"),
    (dict(cell=40), "cell 40 must divide"),
    (dict(max_objects=5), "max_objects"),
    (dict(min_objects=0), "min_objects 0"),
    (dict(min_objects=4), "min_objects 4"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tasks.generate("train", 1, seed=0, config=tasks.TaskConfig(**kwargs))


def test_min_objects_sets_the_fewest_objects_of_look_up_scenes():
    """Scenes read back by the independent reader: colour, shape and choice scenes hold
    min_objects..max_objects objects; count and position scenes keep their own rules."""
    seen = {}
    for fewest in (1, 3):
        config = tasks.TaskConfig(min_objects=fewest, max_objects=3)
        for s in tasks.generate("train", 60, seed=5, config=config):
            if s.family == "vision":
                seen.setdefault((fewest, s.task), set()).add(len(read_scene(s.image)))
    for task in ("color", "shape", "choice"):
        assert seen[(1, task)] == {1, 2, 3} and seen[(3, task)] == {3}
    assert seen[(3, "position")] == {2}
    assert min(seen[(3, "count")]) < 3  # count scenes still draw their own object numbers


def test_bad_split_raises():
    with pytest.raises(ValueError, match="split 'test' unknown"):
        tasks.generate("test", 1, seed=0)


def test_a_checkpoint_is_scored_and_calibrated_on_the_suite_it_recorded(tmp_path):
    """A checkpoint trained with operands up to 29 must be evaluated (evaluate stage) and
    calibrated (GPTQ data) on sums up to 58, not on the default suite's sums up to 18."""
    import json
    import types

    from mode_jax import evaluation
    from mode_jax.calib import sources
    from mode_jax.testbed import tokenizer as tok_lib

    recorded = {"arithmetic_max": 29, "names": 12, "tasks": ["color"], "image_size": [336, 336]}
    (tmp_path / "train_summary.json").write_text(json.dumps({"task_config": recorded}))
    suite = tasks.recorded_config(tmp_path)
    assert (suite.arithmetic_max, suite.names, suite.image_size) == (29, 12, (336, 336))
    assert suite.tasks == tasks.TaskConfig().tasks  # the mix of a training run is not the suite
    # A summary from before these fields stands for the forms its checkpoint was trained on.
    assert (suite.position_form, suite.choice_answer) == ("relation", "letter")
    assert tasks.recorded_config(tmp_path / "elsewhere") == tasks.TaskConfig()

    def sums(samples):
        return [int(s.messages[-1]["content"]) for s in samples
                if " plus " in str(s.messages[-2]["content"])]

    assert max(sums(sources.testbed_samples(300, 0, "gptq", str(tmp_path)))) > 18
    assert max(sums(sources.testbed_samples(300, 0, "gptq"))) <= 18

    tok_lib.save_tokenizer(tok_lib.build_tokenizer(tasks.vocabulary(suite)), tmp_path)
    config = types.SimpleNamespace(model=types.SimpleNamespace(path=str(tmp_path)), seed=0,
                                   eval=types.SimpleNamespace(jsonl="", num_samples=300))
    held_out = evaluation._eval_set(types.SimpleNamespace(config=config, cache={}))
    assert max(int(e.sample.answer) for e in held_out.examples
               if e.sample.task == "arithmetic") > 18


def test_testbed_statistics_prompts_are_vision_only_unless_asked_for_all_tasks():
    from mode_jax.calib import sources

    vision = sources.testbed_samples(40, 0, "stats")
    assert {s.family for s in vision} == {"vision"} and all(len(s.images) == 1 for s in vision)
    both = sources.testbed_samples(40, 0, "stats", stats_tasks="all")
    assert {s.family for s in both} == {"vision", "text"}
    for s in both:
        assert len(s.images) == (s.family == "vision")
        assert s.messages[-1]["role"] == "user"  # prompts only: statistics see no answer
    with pytest.raises(ValueError, match="testbed_stats_tasks"):
        sources.testbed_samples(4, 0, "stats", stats_tasks="text")


@pytest.mark.parametrize("text,needle", [
    ("{not json", "is not valid JSON"),
    ('{"task_config": [1]}', "'task_config' must be an object"),
    ('{"task_config": {"colour_count": 3}}', "task_config does not fit this suite"),
])
def test_a_broken_train_summary_is_named(tmp_path, text, needle):
    (tmp_path / "train_summary.json").write_text(text)
    with pytest.raises(ValueError, match=needle) as err:
        tasks.recorded_config(tmp_path)
    assert "train_summary.json" in str(err.value)


def test_target_cells_hold_the_object_the_question_names(train, heldout):
    """The look-up aid's target (`Sample.target_cells`) is where the pixels of the named object
    are, read from the image: the cell's saturated pixels have the named (or answered) colour;
    questions that name no object (count, the 'shape' position form) have none."""
    palette = np.array(list(tasks.COLORS.values()))
    checked = 0
    for s in [s for s in train + heldout if s.family == "vision"]:
        if s.task == "count":
            assert s.target_cells == ()
            continue
        named = [w for w in s.question.split("?")[0].split() if w in tasks.COLORS]  # subject 1st
        color = named[0] if named else (s.options[s.answer_index] if s.options else s.answer)
        assert len(s.target_cells) == 1  # default scenes: one object per 28-pixel token
        row, col = divmod(s.target_cells[0], s.image.shape[1] // 28)
        patch = s.image[28 * row:28 * row + 28, 28 * col:28 * col + 28].reshape(-1, 3)
        patch = patch.astype(np.int32)
        ink = patch[patch.max(-1) - patch.min(-1) > 60]
        assert len(ink) >= 30, s.question
        nearest = np.argmin(((palette[None] - ink[:, None]) ** 2).sum(-1), axis=1)
        assert np.mean(nearest == list(tasks.COLORS).index(color)) > 0.9, s.question
        checked += 1
    assert checked > 100
    shape_form = tasks.TaskConfig(tasks=("position",), position_form="shape")
    assert all(s.target_cells == () for s in tasks.generate("train", 8, 0, shape_form))
