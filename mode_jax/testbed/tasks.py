"""Seeded synthetic multimodal task suite for the testbed model.

Two families, five sub-tasks each, short answers (one or two words) over a vocabulary of about
250 words, so that a tiny Kimi-VL-style model learns them on CPU in minutes:
- vision: rendered scenes of a few coloured shapes on a lightly textured, mostly empty background
  (so most image tokens are redundant, as in real photos): `color`, `shape`, `count`, `position`
  and `choice` (multiple choice on colour or shape);
- text: knowledge that has to live in the weights: `fact` (colour, food, home of 64 invented
  people with two-word names), `fact_choice` (its multiple-choice form), `arithmetic`
  (plus/minus below 10), `spelling` (first/last letter of a word), `opposite` (antonyms).
  `TaskConfig.names` and `arithmetic_max` scale the number of people and of sums up.

Multiple choice lists four options and, by default (`choice_answer="option"`), is answered by
naming one: "what color is the circle ? red or blue or green or yellow" -> "blue", scored by the
log-likelihood of each option (cloze style). `choice_answer="letter"` gives MMBench's lettered
form ("... A. red B. blue ..." -> "B"), which user benchmarks use; the testbed model never
learned it (every training run, and a text-only probe of 1200 steps on the bare matching task
"which option is rice ?", stayed at chance), so the suite does not train it by default.

Splits never overlap. A vision sample's split is decided by a hash of its scene and question
(rejection-sampled), so no scene+question can fall in both. A text sample is a *core* question
(e.g. "what color is zorblat ?") behind one of `FILLERS`; per core a fixed hash picks
`heldout_fillers` fillers for the held-out split and leaves the rest to train, so every held-out
prompt is unseen in training while the fact it asks for is taught there with other fillers.

With the default 336 x 336 images (24 x 24 patches, 144 image tokens) image tokens outnumber the
other prompt tokens (chat markers included) by more than 4 to 1 in every vision prompt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mode_jax.testbed.tokenizer import format_chat, split_words

SPLITS = ("train", "heldout")
VISION_TASKS = ("color", "shape", "count", "position", "choice")
TEXT_TASKS = ("fact", "fact_choice", "arithmetic", "spelling", "opposite")
ALL_TASKS = VISION_TASKS + TEXT_TASKS

COLORS = {"red": (215, 35, 35), "green": (30, 160, 50), "blue": (35, 75, 225),
          "yellow": (240, 205, 20), "purple": (135, 50, 190), "orange": (250, 130, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
RELATIONS = ("left", "right", "above", "below")
POSITION_FORMS = ("relation", "subject", "shape")  # how position questions are asked
PLACES = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Invented people, named by a given and a family name (64 = 8 x 8). Every name word is shared
# by 8 people, so no single token tells a fact: the model must combine both words (a
# nonlinear lookup, the kind of knowledge that lives in MLP/expert weights).
GIVEN_NAMES = ("zorblat", "quenfir", "mivado", "trelkin", "ospira", "vantu", "glimber", "harvok")
FAMILY_NAMES = ("bexley", "runoga", "pelistra", "dravin", "sulmet", "yorrik", "fendal", "kalopi")
_SYLLABLES = ("ka", "lo", "mi", "ru", "ve", "to", "sa", "ni")
MAX_NAMES = len(GIVEN_NAMES) + len(_SYLLABLES) ** 2


def people(names: int = len(GIVEN_NAMES)) -> tuple[str, ...]:
    """The `names` x `names` invented people: the first `names` given and family names, the
    fixed ones above and then invented ones ("kalodor vaskami"), so 8 gives `ENTITIES`."""
    if not 2 <= names <= MAX_NAMES:
        raise ValueError(f"names must be in 2..{MAX_NAMES}, got {names}")
    extra = [a + b for a in _SYLLABLES for b in _SYLLABLES]
    given = (*GIVEN_NAMES, *(f"{e}dor" for e in extra))[:names]
    family = (*FAMILY_NAMES, *(f"vask{e}" for e in extra))[:names]
    return tuple(f"{g} {f}" for g in given for f in family)


ENTITIES = people()
FOODS = ("apples", "bread", "fish", "rice", "cheese", "honey", "soup", "plums")
DIRECTIONS = ("north", "south", "east", "west")
TOWNS = ("morvale", "kestrin", "dunhollow", "brisk", "lanmoor", "quill")
SPELL_WORDS = ("apple", "river", "stone", "cloud", "garden", "window", "tiger", "lemon", "music",
               "paper", "house", "bridge", "forest", "candle", "jacket", "violin", "zebra",
               "yogurt", "kettle", "pencil", "ocean", "basket", "wagon", "hammer", "island",
               "needle", "quartz", "mirror", "desk", "flag", "vortex", "ninja")
OPPOSITES = (("big", "small"), ("hot", "cold"), ("up", "down"), ("fast", "slow"),
             ("day", "night"), ("wet", "dry"), ("light", "dark"), ("open", "closed"),
             ("early", "late"), ("happy", "sad"), ("full", "empty"), ("loud", "quiet"),
             ("hard", "soft"), ("young", "old"), ("rich", "poor"), ("thick", "thin"))
FILLERS = ("", "please tell me:", "quick question:", "hey,", "i wonder,", "answer briefly:",
           "tell me,", "question:")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What the generator makes. `world_seed` fixes the invented facts: keep it for a model."""

    image_size: tuple[int, int] = (336, 336)  # (H, W) pixels, multiples of 28
    tasks: tuple[str, ...] = ALL_TASKS
    heldout_percent: int = 10  # share of vision scene+question hashes that are held out
    heldout_fillers: int = 2  # of len(FILLERS) fillers per text core
    world_seed: int = 0
    # The knowledge load of the text family: names x names invented people (3 facts each) and
    # plus/minus over operands 0..arithmetic_max.
    names: int = 8
    arithmetic_max: int = 9
    object_size: tuple[int, int] = (10, 12)  # object half-size range in pixels
    max_objects: int = 3  # 2..4 objects per scene; count answers are 0..max_objects
    # Fewest objects in a colour, shape or choice scene (1..max_objects). A one-object scene
    # asks no look-up ("the red object" is the only one), so training may set 2 to spend every
    # such question on finding the named object; count and position scenes ignore it.
    min_objects: int = 1
    # 0: objects anywhere. > 0: every object sits in its own cell of this many pixels (28 is
    # one merged image token), with the 8 cells around it left empty, so one image token holds
    # one whole object; object_size must then fit: 2 * high + 2 <= cell.
    cell: int = 28
    choice_answer: str = "option"  # multiple choice answered by the option ("option") or letter
    # "relation": "where is the red circle relative to the blue square ?" -> left/right/above/
    # below (two named roles to bind). "subject": "where is the red circle relative to the other
    # object ?" -> the same answers, one named object (the scene holds two). "shape": "what shape
    # is to the left of the other ?" -> the shape lying there (no roles). See README, "relative
    # position", for what each taught.
    position_form: str = "relation"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One question. `prompt` is chat-formatted with one `<|media_pad|>` per image (image first).

    `family` is "vision" or "text"; `task` the sub-task; multiple-choice samples carry `options`
    and `answer_index`, and their `answer` is the option itself or its letter (`TaskConfig.
    choice_answer`). `key` identifies the content
    (equal keys = same sample); `image` is [H, W, 3] uint8 or None.
    """

    prompt: str
    question: str
    answer: str
    family: str
    task: str
    image: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    options: tuple[str, ...] = ()
    answer_index: int | None = None
    key: str = ""
    # Raster indices of the 28-pixel cells (= merged image tokens) the question's named object
    # touches ("the red object", "the circle"); () when it names none (count, text). Training's
    # look-up aid reads them; the content, and so `key`, is the same without them.
    target_cells: tuple[int, ...] = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def modality(self) -> str:
        return "image" if self.image is not None else "text"

    @property
    def images(self) -> tuple[np.ndarray, ...]:
        """The images in prompt order (a benchmark question may have several)."""
        return () if self.image is None else (self.image,)

    def messages(self) -> list[dict]:
        """The user turn as chat messages (image first), for `apply_chat_template`/processors."""
        content = [{"type": "image"}] if self.image is not None else []
        return [{"role": "user", "content": [*content, {"type": "text", "text": self.question}]}]


def _digest(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def format_choices(question: str, options: Sequence[str]) -> str:
    """MMBench-style question with lettered options: "q A. x B. y ..." (letters A..Z)."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"need 2 to {len(LETTERS)} options, got {len(options)}")
    listed = " ".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))
    return f"{question} {listed}"


def multiple_choice(question: str, options: Sequence[str], index: int, answer_by: str
                    ) -> tuple[str, str]:
    """(question with its options, answer) in the `TaskConfig.choice_answer` form."""
    if answer_by == "letter":
        return format_choices(question, options), LETTERS[index]
    return f"{question} {' or '.join(options)}", options[index]


# ---------------------------------------------------------------- the world of invented facts
def world(seed: int = 0, names: int = len(GIVEN_NAMES)) -> dict[str, dict[str, str]]:
    """Fixed facts per person of `people(names)`: color, food, home ("direction town"), drawn
    from `seed`."""
    rng = np.random.default_rng([seed, 7])
    facts = {}
    for name in people(names):
        facts[name] = {
            "color": str(rng.choice(list(COLORS))),
            "food": str(rng.choice(FOODS)),
            "home": f"{rng.choice(DIRECTIONS)} {rng.choice(TOWNS)}",
        }
    return facts


_FACT_QUESTIONS = {"color": "what color is {} ?", "food": "what does {} eat ?",
                   "home": "where does {} live ?"}


def _text_cores(task: str, facts: dict, arithmetic_max: int = 9
                ) -> list[tuple[str, str, tuple[str, ...]]]:
    """(core question, answer, option pool) for every question a text task can ask."""
    if task in ("fact", "fact_choice"):
        attrs = ("color", "food", "home") if task == "fact" else ("color", "food")
        pools = {"color": tuple(COLORS), "food": FOODS, "home": ()}
        return [(_FACT_QUESTIONS[a].format(e), facts[e][a], pools[a])
                for e in facts for a in attrs]
    if task == "arithmetic":
        operands = range(arithmetic_max + 1)
        plus = [(f"what is {a} plus {b} ?", str(a + b), ()) for a in operands for b in operands]
        minus = [(f"what is {a} minus {b} ?", str(a - b), ())
                 for a in operands for b in range(a + 1)]
        return plus + minus
    if task == "spelling":
        return [(f"what is the {which} letter of {w} ?", w[0] if which == "first" else w[-1], ())
                for w in SPELL_WORDS for which in ("first", "last")]
    if task == "opposite":
        pairs = OPPOSITES + tuple((b, a) for a, b in OPPOSITES)
        return [(f"what is the opposite of {a} ?", b, ()) for a, b in pairs]
    raise ValueError(f"unknown text task {task!r} (allowed: {TEXT_TASKS})")


def split_fillers(core: str, config: TaskConfig, split: str) -> list[str]:
    """The fillers `core` may appear behind in `split` (a fixed, seed-independent partition)."""
    order = sorted(FILLERS, key=lambda f: _digest("filler", config.world_seed, core, f))
    held = order[:config.heldout_fillers]
    return held if split == "heldout" else order[config.heldout_fillers:]


def _text_sample(task: str, rng: np.random.Generator, config: TaskConfig, split: str,
                 facts: dict) -> Sample:
    cores = _text_cores(task, facts, config.arithmetic_max)
    core, answer, pool = cores[rng.integers(len(cores))]
    fillers = split_fillers(core, config, split)
    filler = fillers[rng.integers(len(fillers))]
    question = f"{filler} {core}".strip()
    options, index = (), None
    if task == "fact_choice":
        distractors = [o for o in pool if o != answer]
        options = [answer, *rng.choice(distractors, size=3, replace=False).tolist()]
        options = tuple(str(o) for o in rng.permutation(options))
        index = options.index(answer)
        question, answer = multiple_choice(question, options, index, config.choice_answer)
    return Sample(prompt=format_chat(question, with_image=False), question=question,
                  answer=answer, family="text", task=task, options=options, answer_index=index,
                  key=_digest("text", question, answer))


# ---------------------------------------------------------------- rendered scenes
@dataclasses.dataclass(frozen=True)
class Shape:
    """One drawn object: centre (cx, cy) and half-size r in pixels."""

    shape: str
    color: str
    cx: int
    cy: int
    r: int


def place(rng, kinds: Sequence[tuple[str, str]], config: TaskConfig) -> tuple[Shape, ...] | None:
    """Non-overlapping objects of the given (shape, color) kinds, or None if placement fails."""
    if config.cell:
        return _place_in_cells(rng, kinds, config)
    h, w = config.image_size
    placed: list[Shape] = []
    for shape, color in kinds:
        for _ in range(50):
            r = int(rng.integers(config.object_size[0], config.object_size[1] + 1))
            cx, cy = int(rng.integers(r + 4, w - r - 4)), int(rng.integers(r + 4, h - r - 4))
            if all((cx - o.cx) ** 2 + (cy - o.cy) ** 2 > (r + o.r + 8) ** 2 for o in placed):
                placed.append(Shape(shape, color, cx, cy, r))
                break
        else:
            return None
    return tuple(placed)


def _place_in_cells(rng, kinds, config: TaskConfig) -> tuple[Shape, ...] | None:
    """One object per cell, no two in neighbouring cells, centred with a small jitter."""
    cell = config.cell
    rows, cols = config.image_size[0] // cell, config.image_size[1] // cell
    taken: list[tuple[int, int]] = []
    placed: list[Shape] = []
    for shape, color in kinds:
        for _ in range(50):
            i, j = int(rng.integers(rows)), int(rng.integers(cols))
            if all(max(abs(i - a), abs(j - b)) > 1 for a, b in taken):
                break
        else:
            return None
        r = int(rng.integers(config.object_size[0], config.object_size[1] + 1))
        slack = cell // 2 - r - 1
        dx, dy = (int(rng.integers(-slack, slack + 1)) for _ in range(2))
        taken.append((i, j))
        placed.append(Shape(shape, color, j * cell + cell // 2 + dx, i * cell + cell // 2 + dy, r))
    return tuple(placed)


def render(objects: Sequence[Shape], image_size: tuple[int, int], texture_seed: int) -> np.ndarray:
    """[H, W, 3] uint8: a pale tinted background with faint noise and stripes, then the objects."""
    h, w = image_size
    rng = np.random.default_rng(texture_seed)
    tint = np.round(rng.uniform(200, 235) + rng.uniform(-10, 10, size=3)).astype(np.int16)
    angle, period = rng.uniform(0, np.pi), rng.uniform(20, 60)
    ky, kx = (np.float32(2 * np.pi / period * f(angle)) for f in (np.sin, np.cos))
    ys, xs = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
    phase = ys[:, None] * ky + xs[None, :] * kx
    gray = (np.sin(phase) * np.float32(4.0)).astype(np.int16)  # faint stripes
    gray += rng.integers(-6, 7, size=(h, w), dtype=np.int16)  # pixel noise
    background = np.empty((h, w, 3), np.uint8)
    for c in range(3):  # int16 per channel: a float (h, w, 3) pass costs twice as much
        background[..., c] = np.clip(gray + tint[c], 0, 255)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for o in objects:
        fill = tuple(int(c) for c in np.clip(np.array(COLORS[o.color]) + rng.integers(-20, 21, 3),
                                             0, 255))
        x, y, r = o.cx, o.cy, o.r
        if o.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o.shape == "square":
            s = int(round(r * 0.85))
            draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(x, y - r), (x - r, y + int(0.8 * r)), (x + r, y + int(0.8 * r))], fill)
        elif o.shape == "cross":
            t = max(3, int(round(r * 0.35)))
            draw.rectangle((x - r, y - t, x + r, y + t), fill=fill)
            draw.rectangle((x - t, y - r, x + t, y + r), fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r} (allowed: {SHAPES})")
    return np.asarray(image)


def position_question(form: str, a: Shape, b: Shape) -> tuple[str, str]:
    """(question, answer) about where `a` lies relative to `b` in `form` (POSITION_FORMS)."""
    where = relation(a, b)
    if form == "relation":
        return f"where is the {a.color} {a.shape} relative to the {b.color} {b.shape} ?", where
    if form == "subject":
        return f"where is the {a.color} {a.shape} relative to the other object ?", where
    return f"what shape is {PLACES[where]} the other ?", a.shape


def relation(a: Shape, b: Shape) -> str | None:
    """Where a lies relative to b, if one axis clearly dominates (>= 40 px and 2x the other)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= 40 and abs(dx) >= 2 * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= 40 and abs(dy) >= 2 * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def object_cells(o: Shape, image_size: tuple[int, int], cell: int = 28) -> tuple[int, ...]:
    """Raster indices of the `cell`-pixel cells that `o`'s bounding box overlaps."""
    cols = image_size[1] // cell
    rows = range(max(o.cy - o.r, 0) // cell, min(o.cy + o.r, image_size[0] - 1) // cell + 1)
    span = range(max(o.cx - o.r, 0) // cell, min(o.cx + o.r, image_size[1] - 1) // cell + 1)
    return tuple(r * cols + c for r in rows for c in span)


def _distinct_kinds(rng, n: int) -> list[tuple[str, str]]:
    shapes = rng.choice(SHAPES, size=n, replace=False)
    colors = rng.choice(list(COLORS), size=n, replace=False)
    return [(str(s), str(c)) for s, c in zip(shapes, colors, strict=True)]


def _scene_question(task: str, rng, config: TaskConfig):
    """(objects, question, answer, options, answer_index, named object or None) for one vision
    task, or None to retry."""
    if task == "count":
        target = str(rng.choice(SHAPES))
        n = int(rng.integers(0, config.max_objects + 1))
        others = [s for s in SHAPES if s != target]
        low = 1 if n == 0 else 0
        n_other = int(rng.integers(low, max(low, config.max_objects - n) + 1))
        kinds = [(target, str(rng.choice(list(COLORS)))) for _ in range(n)]
        kinds += [(str(rng.choice(others)), str(rng.choice(list(COLORS)))) for _ in range(n_other)]
        objects = place(rng, kinds, config)
        if objects is None:
            return None
        return objects, f"how many {PLURALS[target]} are there ?", str(n), (), None, None
    # A position question's scene holds exactly its two objects: "where is a relative to b"
    # then needs a's place against the scene's other object, not a search among distractors.
    n = 2 if task == "position" else int(rng.integers(config.min_objects,
                                                       config.max_objects + 1))
    objects = place(rng, _distinct_kinds(rng, n), config)
    if objects is None:
        return None
    target = objects[rng.integers(len(objects))]
    if task == "color":
        return objects, f"what color is the {target.shape} ?", target.color, (), None, target
    if task == "shape":
        return (objects, f"what shape is the {target.color} object ?", target.shape, (), None,
                target)
    if task == "position":
        wanted = str(rng.choice(RELATIONS))
        pairs = [(a, b) for a in objects for b in objects
                 if a is not b and relation(a, b) == wanted]
        if not pairs:
            return None
        a, b = pairs[rng.integers(len(pairs))]
        named = None if config.position_form == "shape" else a  # "shape" names no object
        return objects, *position_question(config.position_form, a, b), (), None, named
    if task == "choice":
        if rng.integers(2):
            q, answer, pool = f"what color is the {target.shape} ?", target.color, list(COLORS)
        else:
            q, answer, pool = f"what shape is the {target.color} object ?", target.shape, SHAPES
        distractors = rng.choice([p for p in pool if p != answer], size=3, replace=False)
        options = tuple(str(o) for o in rng.permutation([answer, *distractors.tolist()]))
        index = options.index(answer)
        return (objects, *multiple_choice(q, options, index, config.choice_answer), options, index,
                target)
    raise ValueError(f"unknown vision task {task!r} (allowed: {VISION_TASKS})")


def _vision_sample(task: str, rng: np.random.Generator, config: TaskConfig, split: str) -> Sample:
    for _ in range(1000):  # a valid config succeeds within ~20 tries (held-out keeps 10%)
        made = _scene_question(task, rng, config)
        if made is None:
            continue
        objects, question, answer, options, index, named = made
        texture_seed = int(rng.integers(2**31))
        key = _digest("vision", config.image_size, texture_seed, objects, question)
        in_heldout = int(key[:8], 16) % 100 < config.heldout_percent
        if in_heldout == (split == "heldout"):
            break
    else:
        raise ValueError(f"no {task!r} scene fits: object_size {config.object_size} is too large "
                         f"for image_size {config.image_size} with {config.max_objects} objects")
    image = render(objects, config.image_size, texture_seed)
    return Sample(prompt=format_chat(question, with_image=True), question=question, answer=answer,
                  family="vision", task=task, image=image, options=options, answer_index=index,
                  key=key, target_cells=object_cells(named, config.image_size) if named else ())


# ---------------------------------------------------------------- public entry points
def _check(config: TaskConfig, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} unknown (allowed: {SPLITS})")
    bad = [t for t in config.tasks if t not in ALL_TASKS]
    if bad or not config.tasks:
        raise ValueError(f"tasks {bad or '()'} unknown or empty (allowed: {ALL_TASKS})")
    people(config.names)  # raises for a names count out of range
    if not 1 <= config.arithmetic_max <= 99:
        raise ValueError(f"arithmetic_max must be in 1..99, got {config.arithmetic_max}")
    h, w = config.image_size
    if h % 28 or w % 28 or h <= 0 or w <= 0:
        raise ValueError(f"image_size {config.image_size} must be positive multiples of 28")
    low, high = config.object_size
    if not 6 <= low <= high or 2 * high + 8 >= min(h, w):
        raise ValueError(f"object_size {config.object_size} must be 6 <= low <= high with "
                         f"2 * high + 8 < {min(h, w)} (the image side)")
    if config.cell and (config.cell < 8 or h % config.cell or w % config.cell
                        or 2 * high + 2 > config.cell):
        raise ValueError(f"cell {config.cell} must divide image_size {config.image_size} and "
                         f"hold the largest object: 2 * {high} + 2 <= cell")
    if not 1 <= config.min_objects <= config.max_objects:
        raise ValueError(f"min_objects {config.min_objects} must be in 1..max_objects "
                         f"({config.max_objects})")
    if not 2 <= config.max_objects <= len(SHAPES):
        raise ValueError(f"max_objects {config.max_objects} must be in 2..{len(SHAPES)} (scenes "
                         "with distinct shapes; position questions need two objects)")
    if not 0 < config.heldout_percent < 100:
        raise ValueError(f"heldout_percent {config.heldout_percent} must be in 1..99")
    if config.choice_answer not in ("option", "letter"):
        raise ValueError(f"choice_answer {config.choice_answer!r} must be 'option' or 'letter'")
    if config.position_form not in POSITION_FORMS:
        raise ValueError(f"position_form {config.position_form!r} must be one of "
                         f"{POSITION_FORMS}")
    if not 0 < config.heldout_fillers < len(FILLERS):
        raise ValueError(f"heldout_fillers {config.heldout_fillers} must be in "
                         f"1..{len(FILLERS) - 1}")


def generate(split: str, n: int, seed: int, config: TaskConfig = TaskConfig()) -> list[Sample]:
    """`n` samples of `split`, sub-tasks in equal shares (round robin), order shuffled by `seed`.

    Deterministic in (split, n, seed, config). Different seeds give different samples of the same
    split; the two splits never share a sample, whatever the seeds.
    """
    _check(config, split)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    facts = world(config.world_seed, config.names)
    order = rng.permutation(n)
    samples: list[Sample | None] = [None] * n
    for i in range(n):
        task = config.tasks[i % len(config.tasks)]
        if task in VISION_TASKS:
            samples[order[i]] = _vision_sample(task, rng, config, split)
        else:
            samples[order[i]] = _text_sample(task, rng, config, split, facts)
    return samples


def recorded_config(checkpoint: str | Path) -> TaskConfig:
    """The task settings a testbed checkpoint was trained with (the "task_config" of its
    train_summary.json; the task mix itself is left at the default), else the defaults. Held-out
    and calibration sets of a checkpoint are drawn from these, so a checkpoint trained on a
    changed suite is scored on the suite it learned."""
    summary = Path(checkpoint) / "train_summary.json"
    if not summary.is_file():
        return TaskConfig()
    try:
        doc = json.loads(summary.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{summary} is not valid JSON ({err})") from None
    trained = doc.get("task_config", {}) if isinstance(doc, dict) else None
    if not isinstance(trained, dict):
        raise ValueError(f"{summary}: 'task_config' must be an object of task settings")
    trained.setdefault("choice_answer", "letter")  # checkpoints from before the option form
    trained.setdefault("position_form", "relation")  # and from before the shape form
    try:
        return TaskConfig(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in trained.items() if k != "tasks"})
    except TypeError as err:  # an unknown key
        raise ValueError(f"{summary}: task_config does not fit this suite ({err})") from None


def text_cores(config: TaskConfig = TaskConfig()) -> dict[str, list[str]]:
    """Every core question per text task: the facts the model must hold in its weights."""
    facts = world(config.world_seed, config.names)
    return {t: [c for c, _, _ in _text_cores(t, facts, config.arithmetic_max)] for t in TEXT_TASKS}


def vocabulary(config: TaskConfig = TaskConfig()) -> list[str]:
    """Every word `generate` can emit under `config` (sorted): what the tokenizer must cover."""
    facts = world(config.world_seed, config.names)
    texts = [*FILLERS, *COLORS, *SHAPES, *PLURALS.values(), *RELATIONS, *LETTERS,
             *(str(i) for i in range(config.max_objects + 1)),
             "what color is the ? what shape is the object ? how many are there ?",
             "where is the relative to the ?"]
    if config.position_form == "shape":
        texts += [*PLACES.values(), "the other"]
    if config.position_form == "subject":
        texts += ["the other object"]
    for task in TEXT_TASKS:
        for core, answer, pool in _text_cores(task, facts, config.arithmetic_max):
            texts += [core, answer, *pool]
    texts += [".", "or"]  # after option letters (format_choices), between options
    return sorted({w for text in texts for w in split_words(text)})
