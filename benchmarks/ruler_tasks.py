"""RULER-style long-context tasks, generated locally with fixed seeds.

Each sample is a list of token ids (the chat-formatted question ending in an answer
prefix, built to a target length) and the strings a correct answer contains. Tasks, as
in RULER (Hsieh et al., 2024):

    niah_single_noise   one needle (a number) in repeated noise sentences (the passkey task)
    niah_single_number  one needle (a number) in prose
    niah_single_word    one needle (a word) in prose
    niah_single_uuid    one needle (a UUID) in prose
    niah_multikey       one needle among 3 distractor needles with other keys, prose
    niah_multivalue     4 needles of one key, all 4 values asked, prose
    niah_multiquery     4 needles of 4 keys, all 4 asked, prose
    vt                  variable tracking: a chain of 4 assignments hidden in noise
    cwe                 common words: the 10 most frequent words of a numbered list

The prose haystack is the reference documentation that ships inside every Python
(``pydoc_data.topics``), split into sentences; the noise haystack is RULER's. Nothing is
downloaded. A tokenizer is anything with ``encode(text, add_special_tokens=False)`` and
``apply_chat_template`` (a transformers tokenizer), so this module imports no model code.
"""

from __future__ import annotations

import dataclasses
import random
import re
import uuid

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASKS = ("niah_single_noise", "niah_single_number", "niah_single_word", "niah_single_uuid", "niah_multikey",
         "niah_multivalue", "niah_multiquery", "vt", "cwe")
# tokens the answer may take, per task (room left under the target length)
MAX_NEW_TOKENS = {"niah_multivalue": 64, "niah_multiquery": 64, "vt": 48, "cwe": 96}
DEFAULT_NEW_TOKENS = 32

ADJECTIVES = ("ancient amber bitter brave bright calm clever cold curious damp dark eager early faint fancy fierce "
              "fresh gentle giant glossy golden grumpy happy hidden hollow humble icy jolly kind lazy little lively "
              "loud lucky mellow misty modern narrow noble odd orange pale patient plain polite proud purple quick "
              "quiet rapid rare rough round royal rusty shiny silent silver simple sleepy slow smooth soft sour "
              "spicy steady sticky stormy sunny sweet swift tall tender thin tidy tiny vivid warm wild windy wise "
              "wooden young").split()
NOUNS = ("anchor apple arrow badger basket beacon bell berry blanket boat bottle bridge brook button cabin camel "
         "candle canyon castle cedar cherry cliff cloud clover comet copper coral cricket crystal daisy desert "
         "dolphin dragon eagle ember falcon feather fern fiddle forest fossil garden glacier goblet harbor hazel "
         "helmet island jacket jungle kettle ladder lantern lemon lizard maple marble meadow mirror monkey "
         "mountain needle nugget oasis orchid otter paddle parrot pebble pepper pillow planet pocket puzzle "
         "rabbit raven ribbon river rocket saddle sailor shadow shell spider sponge stone sunset thimble tiger "
         "tulip tunnel violin walnut whistle willow window wizard zebra").split()


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt of a task.

    token_ids: the whole prompt (chat template, context, question, answer prefix).
    answers: strings a correct completion contains (all of them).
    needle_spans: (first, end) token positions of each needle in token_ids (empty for cwe).
    answer_starts: per answer, the first token of the needle that holds it (None if none
        does; empty for cwe): where in the prompt each answer is to be found.
    """

    task: str
    length: int
    index: int
    token_ids: tuple[int, ...]
    answers: tuple[str, ...]
    needle_spans: tuple[tuple[int, int], ...]
    max_new_tokens: int
    answer_starts: tuple[int | None, ...] = ()

    def score(self, completion: str) -> float:
        """Share of the answers found in the completion (case-insensitive), as RULER scores."""
        return score(self.answers, completion)


def score(answers, completion: str) -> float:
    """Share of the expected ``answers`` found in ``completion`` (case-insensitive), as RULER scores."""
    text = completion.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def prose_sentences() -> list[str]:
    """Sentences of prose from Python's reference documentation (code and grammar dropped)."""
    from pydoc_data.topics import topics

    sentences = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            lines = para.splitlines()
            # prose paragraphs start at the margin; code, grammar and tables are indented or ruled
            if not lines or lines[0].startswith((" ", "*", "=", "-", "+", "|")) or "::=" in para:
                continue
            text = " ".join(line.strip() for line in lines)
            for sent in re.split(r"(?<=[.!?])\s+", text):
                words = sent.split()
                if 4 <= len(words) <= 60 and sum(c.isalpha() for c in sent) > 0.6 * len(sent):
                    sentences.append(sent)
    return sentences


def cwe_vocabulary() -> list[str]:
    """cwe's words: the documentation's vocabulary (about 2800 words), without the needle words."""
    from pydoc_data.topics import topics

    words = {w.lower() for text in topics.values() for w in re.findall(r"[A-Za-z]{4,12}", text)}
    return sorted(words - set(ADJECTIVES) - set(NOUNS))


class Generator:
    """Builds samples for one tokenizer; sentences are tokenized once.

    Args:
        tokenizer: a transformers tokenizer (``encode``, ``apply_chat_template``).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        marker = "\u2063"
        chat = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                             tokenize=False)
        self.chat_prefix, self.chat_suffix = chat.split(marker)
        sentences = prose_sentences()
        self._prose = [self.encode(" " + s) for s in sentences]
        self._noise = [self.encode(" " + s) for s in re.split(r"(?<=\.)\s", NOISE)]
        self._vocab = cwe_vocabulary()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def sample(self, task: str, length: int, index: int, seed: int = 0, depth: float | None = None) -> Sample:
        """Sample ``index`` of ``task`` at about ``length`` prompt tokens (deterministic).

        ``depth`` in [0, 1] puts the needles that far into the context (default: random depths).
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        rng = random.Random(f"{seed}/{task}/{length}/{index}")
        new_tokens = MAX_NEW_TOKENS.get(task, DEFAULT_NEW_TOKENS)
        build = {"vt": self._variable_tracking, "cwe": self._common_words}.get(task, self._niah)
        head, needles, question, answer_prefix, answers = build(task, rng)
        start = self.encode(self.chat_prefix + head)
        end = self.encode(question + self.chat_suffix) + self.encode(answer_prefix)
        budget = length - new_tokens - len(start) - len(end)
        if task == "cwe":
            # the numbered word list is the whole context
            ids = start + self._word_list(answers, needles, budget, rng) + end
            return Sample(task, length, index, tuple(ids), tuple(answers), (), new_tokens)
        needle_ids = [self.encode(" " + n) for n in needles]
        budget -= sum(map(len, needle_ids))
        if budget < 16:
            raise ValueError(f"length {length} is too short for task {task}")
        filler = self._fill(task, budget, rng)
        ids, spans, starts = self._place(start, filler, needle_ids, end, rng, keep_order=task == "vt", depth=depth)
        # each answer stands where the first needle holding it was placed
        holder = [next((j for j, n in enumerate(needles) if a in n), None) for a in answers]
        answer_starts = tuple(None if j is None else starts[j] for j in holder)
        return Sample(task, length, index, tuple(ids), tuple(answers), tuple(spans), new_tokens, answer_starts)

    def _fill(self, task: str, budget: int, rng: random.Random) -> list[list[int]]:
        """Haystack sentences totalling at most ``budget`` tokens."""
        source = self._noise if task in ("niah_single_noise", "vt") else self._prose
        i = rng.randrange(len(source))
        out, used = [], 0
        while True:
            sentence = source[i % len(source)]
            if used + len(sentence) > budget:
                return out
            out.append(sentence)
            used += len(sentence)
            i += 1

    @staticmethod
    def _place(start, filler, needles, end, rng, keep_order, depth=None):
        """Inserts the needles into the filler at random depths; returns ids, the needle spans in
        prompt order, and each needle's first token by its index in ``needles``."""
        if depth is not None:
            depths = [round(depth * len(filler))] * len(needles)
        else:
            depths = sorted(rng.randrange(len(filler) + 1) for _ in needles)
        order = list(range(len(needles)))
        if not keep_order:
            rng.shuffle(order)
        ids = list(start)
        spans = []
        starts = [0] * len(needles)
        k = 0
        for j in range(len(filler) + 1):
            while k < len(needles) and depths[k] == j:
                needle = needles[order[k]]
                spans.append((len(ids), len(ids) + len(needle)))
                starts[order[k]] = len(ids)
                ids += needle
                k += 1
            if j < len(filler):
                ids += filler[j]
        return ids + list(end), spans, starts

    def _key(self, rng: random.Random, taken: set) -> str:
        while True:
            key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
            if key not in taken:
                taken.add(key)
                return key

    def _value(self, kind: str, rng: random.Random, taken: set) -> str:
        while True:
            if kind == "number":
                value = str(rng.randrange(1_000_000, 10_000_000))
            elif kind == "word":
                value = f"{rng.choice(ADJECTIVES)}{rng.choice(NOUNS)}"
            else:
                value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            if value not in taken:
                taken.add(value)
                return value

    def _niah(self, task: str, rng: random.Random):
        kind = {"niah_single_word": "word", "niah_single_uuid": "uuid"}.get(task, "number")
        noun = {"number": "numbers", "word": "words", "uuid": "uuids"}[kind]
        keys: set = set()
        values: set = set()
        if task == "niah_multivalue":
            key = self._key(rng, keys)
            pairs = [(key, self._value(kind, rng, values)) for _ in range(4)]
            asked = [key]
        else:
            n = 4 if task in ("niah_multikey", "niah_multiquery") else 1
            pairs = [(self._key(rng, keys), self._value(kind, rng, values)) for _ in range(n)]
            asked = [k for k, _ in pairs] if task == "niah_multiquery" else [pairs[0][0]]
        needles = [f"One of the special magic {noun} for {k} is: {v}." for k, v in pairs]
        answers = [v for k, v in pairs if k in asked]
        head = (f"Some special magic {noun} are hidden within the following text. Make sure to memorize it. "
                f"I will quiz you about the {noun} afterwards.\n")
        query = ", ".join(asked)
        if task == "niah_multivalue":
            question = f"\nWhat are all the special magic {noun} for {query} mentioned in the provided text?"
            prefix = f"The special magic {noun} for {query} mentioned in the provided text are"
        elif task == "niah_multiquery":
            question = f"\nWhat are all the special magic {noun} for {query} mentioned in the provided text?"
            prefix = f"The special magic {noun} for {query} mentioned in the provided text are"
        else:
            question = f"\nWhat is the special magic {noun[:-1]} for {query} mentioned in the provided text?"
            prefix = f"The special magic {noun[:-1]} for {query} mentioned in the provided text is"
        return head, needles, question, prefix, answers

    def _variable_tracking(self, task: str, rng: random.Random):
        names: set = set()
        chain = []
        while len(chain) < 5:
            name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if name not in names:
                names.add(name)
                chain.append(name)
        value = str(rng.randrange(10_000, 100_000))
        needles = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
        question = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
        prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
                  f"assigned the value {value}, they are:")
        return head, needles, question, prefix, chain

    def _common_words(self, task: str, rng: random.Random):
        words = rng.sample(self._vocab, len(self._vocab))
        common, rare = words[:10], words[10:]
        head = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n")
        question = "\nQuestion: What are the 10 most common words in the above list?"
        prefix = "Answer: The top 10 words that appear most often in the list are:"
        return head, rare, question, prefix, common

    def _word_list(self, common: list[str], rare: list[str], budget: int, rng: random.Random) -> list[int]:
        """A numbered word list of at most ``budget`` tokens: each common word 30 times, each
        rare word 3 times, with as many rare words as fit (bisection on their number)."""
        shuffle_seed = rng.random()
        lo, hi, best = 0, len(rare), None
        while lo <= hi:
            n = (lo + hi) // 2
            words = common * 30 + rare[:n] * 3
            random.Random(shuffle_seed).shuffle(words)
            ids = self.encode(" " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)))
            if len(ids) <= budget:
                best, lo = ids, n + 1
            else:
                hi = n - 1
        if best is None:
            raise ValueError("the length is too short for the common-words task")
        return best
