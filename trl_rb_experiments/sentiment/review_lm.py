"""The offline default of the sentiment experiment: a small GPT-2 that writes movie reviews, built in code.

Nothing is downloaded. A hand-written grammar produces short movie reviews (positive, negative, mixed and neutral
sentences over a vocabulary of a few hundred words); a word-level tokenizer covers exactly that vocabulary; a
few-layer GPT-2 (~0.8M parameters) is trained on the generated text, deterministically (fixed seeds, fixed data
order). Its samples are review-like and of mixed sentiment (mean VADER compound near 0), so an RL run that rewards
positive sentiment has room to move.

The built model is cached in a versioned folder (``review_lm_path()``) and reused; the build happens in a temporary
folder that is renamed into place, under a file lock, so concurrent processes never see a half-written model.

Token conventions of the built tokenizer:
    - every encoded text starts with ``<bos>`` (a post-processor adds it; trl tokenizes prompts with the default
      ``add_special_tokens=True``); the model was trained on ``<bos> review <eos>``;
    - generation ends at ``<eos>`` (``generation_config.eos_token_id``); ``<pad>`` is a separate token;
    - decoding puts a space before every word, like GPT-2's byte-level BPE, so ``prompt + completion`` reads right
      and ``decode`` of a whole text starts with a space.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

__all__ = [
    "REVIEW_LM_VERSION",
    "build_review_lm",
    "build_review_tokenizer",
    "generate_reviews",
    "load_review_lm",
    "review_lm_path",
    "review_prompts",
    "review_vocabulary",
    "train_texts",
]

# Bump when the grammar, tokenizer, architecture or training recipe changes: a new folder is built.
REVIEW_LM_VERSION = 1
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")

# ---------------------------------------------------------------------------------------------------------------
# The grammar. Phrases are lower-case words separated by spaces; punctuation is its own word.
# ---------------------------------------------------------------------------------------------------------------

# fmt: off
SUBJECTS = [
    "the movie", "this movie", "the film", "this film", "the story", "the plot", "the acting", "the cast",
    "the script", "the music", "the ending", "the director", "the dialogue", "the main character", "the set design",
    "the soundtrack", "the camera work", "the lead actor", "the lead actress", "the villain", "the first half",
    "the second half", "the pacing", "the humor", "the sequel", "the photography", "the score", "the lead role",
    "the writing", "the editing", "the final scene", "the opening scene", "the hero", "the young star",
]
BE = ["was", "is", "felt", "seemed", "looked"]
INTENSIFIERS = ["very", "really", "quite", "so", "pretty", "truly", "extremely", "rather"]
POS_ADJ = [
    "great", "wonderful", "brilliant", "excellent", "amazing", "beautiful", "fantastic", "superb", "fun", "funny",
    "charming", "lovely", "perfect", "powerful", "clever", "enjoyable", "impressive", "delightful", "touching",
    "smart", "fresh", "good", "solid", "strong", "nice", "sweet", "gorgeous", "stunning", "entertaining",
    "inspiring", "hilarious", "warm",
]
NEG_ADJ = [
    "terrible", "awful", "boring", "bad", "horrible", "dull", "stupid", "poor", "weak", "lame", "annoying",
    "painful", "ugly", "silly", "pointless", "disappointing", "awkward", "messy", "mediocre", "ridiculous",
    "pathetic", "tedious", "dreadful", "clumsy", "cheap", "sad", "confusing", "worst",
]
NEU_ADJ = [
    "long", "short", "slow", "quiet", "loud", "dark", "simple", "strange", "old", "new", "different", "familiar",
    "typical", "french", "british", "quick", "fast", "modern", "unusual", "serious", "colorful", "musical",
]
GENRES = [
    "movie", "film", "story", "comedy", "drama", "thriller", "horror movie", "romance", "western", "musical",
    "war film", "mystery", "family film", "documentary", "cartoon", "crime story",
]
POS_NOUN = ["masterpiece", "gem", "classic", "treat", "joy to watch", "triumph", "must see"]
NEG_NOUN = ["mess", "waste of time", "disaster", "failure", "bore", "letdown", "joke"]
POS_VERB = ["loved", "enjoyed", "liked", "adored", "admired", "appreciated"]
NEG_VERB = ["hated", "disliked", "regret watching", "could not stand", "was bored by"]
NEU_VERB = ["watched", "saw", "remember", "noticed", "rented", "bought", "finally saw"]
OBJECTS = [
    "movie", "film", "story", "plot", "acting", "music", "ending", "characters", "dialogue", "cast", "script",
    "effects", "soundtrack", "villain", "hero", "jokes", "songs", "scenery",
]
WHEN = [
    "last night", "on tv", "at the cinema", "on a rainy sunday", "last week", "years ago", "on a plane",
    "at home", "this weekend", "at a festival",
]
WHO = [
    "my wife", "my husband", "my friends", "my kids", "my family", "my brother", "my sister", "my parents",
    "my girlfriend", "my boyfriend", "a friend", "my class",
]
PEOPLE = [
    "young woman", "old man", "small boy", "lonely girl", "police officer", "teacher", "doctor", "soldier",
    "family", "group of friends", "writer", "farmer", "detective", "singer", "lawyer", "nurse", "king", "thief",
]
ACTIONS = [
    "moves to a new city", "falls in love", "loses a job", "tries to find a lost father", "returns home",
    "travels across the country", "joins the army", "opens a restaurant", "solves a murder", "starts a band",
    "buys an old house", "goes back to school", "plans a robbery", "meets a stranger", "runs for mayor",
    "fights a monster", "writes a book", "wins the lottery",
]
FEEL_POS = ["smile", "laugh", "happy", "feel good", "want more"]
FEEL_NEG = ["sleep", "angry", "bored", "cringe", "want my money back"]
AUDIENCE = ["anyone", "everyone", "my friends", "families", "fans of the genre", "kids", "adults", "you"]
OPENERS = ["overall ,", "honestly ,", "in the end ,", "to be fair ,", "sadly ,", "luckily ,", "and", "also ,"]
SCORES = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
# fmt: on


def _choice(rng: random.Random, items: list[str]) -> str:
    return items[rng.randrange(len(items))]


def _adj(rng: random.Random, polarity: str) -> str:
    pool = {"pos": POS_ADJ, "neg": NEG_ADJ, "neu": NEU_ADJ}[polarity]
    word = _choice(rng, pool)
    if rng.random() < 0.35:
        word = f"{_choice(rng, INTENSIFIERS)} {word}"
    return word


def _sentence(rng: random.Random, polarity: str) -> str:
    """One sentence of the given polarity ('pos', 'neg' or 'neu'), ending in ' .' or ' !'."""
    subj, be = _choice(rng, SUBJECTS), _choice(rng, BE)
    kind = rng.randrange(7 if polarity != "neu" else 5)
    if polarity == "neu":
        if kind == 0:
            return f"i {_choice(rng, NEU_VERB)} it {_choice(rng, WHEN)} with {_choice(rng, WHO)} ."
        if kind == 1:
            return f"the film is about a {_choice(rng, PEOPLE)} who {_choice(rng, ACTIONS)} ."
        if kind == 2:
            return f"{subj} {be} {_adj(rng, 'neu')} ."
        if kind == 3:
            return f"it is a {_adj(rng, 'neu')} {_choice(rng, GENRES)} ."
        return f"i {_choice(rng, NEU_VERB)} the {_choice(rng, OBJECTS)} ."
    other = "neg" if polarity == "pos" else "pos"
    if kind == 0:
        return f"{subj} {be} {_adj(rng, polarity)} ."
    if kind == 1:
        return f"{subj} {be} {_adj(rng, polarity)} and {_adj(rng, polarity)} ."
    if kind == 2:
        verbs = POS_VERB if polarity == "pos" else NEG_VERB
        return f"i {_choice(rng, verbs)} the {_choice(rng, OBJECTS)} ."
    if kind == 3:
        nouns = POS_NOUN if polarity == "pos" else NEG_NOUN
        noun = _choice(rng, nouns) if rng.random() < 0.5 else f"{_adj(rng, polarity)} {_choice(rng, GENRES)}"
        return f"it was a {noun} {'!' if rng.random() < 0.3 else '.'}"
    if kind == 4:
        # A contrast: the clause after "but" carries the sentence's polarity.
        return f"{subj} {be} {_adj(rng, other)} but {_choice(rng, SUBJECTS)} {be} {_adj(rng, polarity)} ."
    if kind == 5:
        if rng.random() < 0.5:
            # Negation of the opposite polarity ("not good" is negative).
            return f"{subj} {be} not {_choice(rng, POS_ADJ if other == 'pos' else NEG_ADJ)} ."
        feel = FEEL_POS if polarity == "pos" else FEEL_NEG
        return f"{subj} made me {_choice(rng, feel)} ."
    if polarity == "pos":
        return f"i would recommend it to {_choice(rng, AUDIENCE)} . {_choice(rng, SCORES[6:])} out of ten ."
    return f"i would not recommend it to {_choice(rng, AUDIENCE)} . {_choice(rng, SCORES[:4])} out of ten ."


# Share of sentences of each polarity, by the review's overall tone.
_TONES = {
    "pos": (("pos", 0.7), ("neg", 0.1), ("neu", 0.2)),
    "neg": (("pos", 0.1), ("neg", 0.7), ("neu", 0.2)),
    "mixed": (("pos", 0.4), ("neg", 0.4), ("neu", 0.2)),
}


def _review(rng: random.Random) -> str:
    r = rng.random()
    tone = "pos" if r < 0.35 else "neg" if r < 0.8 else "mixed"
    polarities, weights = zip(*_TONES[tone], strict=True)
    n_sentences = rng.randint(2, 4)
    sentences = []
    for i in range(n_sentences):
        # Reviews often open with a neutral sentence: the prompt then does not give the tone away.
        polarity = "neu" if i == 0 and rng.random() < 0.5 else rng.choices(polarities, weights)[0]
        sentence = _sentence(rng, polarity)
        if i > 0 and rng.random() < 0.15:
            sentence = f"{_choice(rng, OPENERS)} {sentence}"
        sentences.append(sentence)
    return " ".join(sentences)


def generate_reviews(n: int, seed: int = 0) -> list[str]:
    """``n`` reviews from the grammar (deterministic in ``seed``); words separated by single spaces."""
    rng = random.Random(seed)
    return [_review(rng) for _ in range(n)]


def review_vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted (the tokenizer's vocabulary without special tokens)."""
    lists = [  # fmt: skip
        SUBJECTS,
        BE,
        INTENSIFIERS,
        POS_ADJ,
        NEG_ADJ,
        NEU_ADJ,
        GENRES,
        POS_NOUN,
        NEG_NOUN,
        POS_VERB,
        NEG_VERB,
        NEU_VERB,
        OBJECTS,
        WHEN,
        WHO,
        PEOPLE,
        ACTIONS,
        FEEL_POS,
        FEEL_NEG,
        AUDIENCE,
        OPENERS,
        SCORES,
    ]
    glue = "i it with the film is about a who was and but not made me would recommend to out of ten . ! ,"
    words = set(glue.split())
    for items in lists:
        for phrase in items:
            words.update(phrase.split())
    return sorted(words)


def train_texts(n: int = 20000, seed: int = 0) -> list[str]:
    """The review LM's training text: ``n`` reviews from the grammar."""
    return generate_reviews(n, seed=seed)


def _prompt_split(prompt: str) -> str:
    # A stable hash of the prompt text decides its split, so train and test prompts never overlap.
    return "test" if zlib.crc32(prompt.encode()) % 5 == 0 else "train"


def review_prompts(split: str = "train", n_reviews: int = 4000, seed: int = 12345) -> list[str]:
    """Prompts for the sentiment experiment: the first 2-4 words of grammar reviews, de-duplicated in order.

    ``split`` is ``"train"`` or ``"test"``; a prompt belongs to exactly one split (by a hash of its text), so the
    test prompts are held out. Reviews are drawn with a seed different from the LM's training text.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    for _ in range(n_reviews):
        words = _review(rng).split()
        prompt = " ".join(words[: rng.randint(2, 4)])
        if _prompt_split(prompt) == split:
            seen.setdefault(prompt, None)
    return list(seen)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer, model, build and cache.
# ---------------------------------------------------------------------------------------------------------------


def build_review_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``review_vocabulary()``: ids 0-3 are <pad>, <bos>, <eos>, <unk>.

    Encoding splits on whitespace and punctuation and prepends <bos>; decoding puts a space before every word.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in review_vocabulary():
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.decoder = decoders.Sequence([decoders.Replace(Regex("^"), " "), decoders.Fuse()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=64,
        clean_up_tokenization_spaces=False,
    )


def review_lm_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the cached review LM: ``{cache}/review-lm-v{REVIEW_LM_VERSION}``.

    ``cache`` is ``cache_dir`` if given, else ``$TRL_RB_CACHE``, else ``$XDG_CACHE_HOME/trl-rb``, else
    ``~/.cache/trl-rb``.
    """
    if cache_dir is None:
        if os.environ.get("TRL_RB_CACHE"):
            cache_dir = os.environ["TRL_RB_CACHE"]
        elif os.environ.get("XDG_CACHE_HOME"):
            cache_dir = Path(os.environ["XDG_CACHE_HOME"]) / "trl-rb"
        else:
            cache_dir = Path.home() / ".cache" / "trl-rb"
    return Path(cache_dir).expanduser() / f"review-lm-v{REVIEW_LM_VERSION}"


def _batches(ids: list[list[int]], batch_size: int, steps: int, seed: int) -> Iterator[list[list[int]]]:
    """``steps`` batches of training sequences in a deterministic order.

    Each epoch is shuffled, then cut into windows of 32 batches; within a window sequences are sorted by length
    so that a batch pads little, and the window's batches are shuffled again.
    """
    rng = random.Random(seed)
    produced = 0
    while True:
        order = list(range(len(ids)))
        rng.shuffle(order)
        window = 32 * batch_size
        for start in range(0, len(order) - batch_size + 1, window):
            chunk = sorted(order[start : start + window], key=lambda i: len(ids[i]))
            batches = [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
            rng.shuffle(batches)
            for batch in batches:
                if produced == steps:
                    return
                produced += 1
                yield [ids[i] for i in batch]


def build_review_lm(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_texts: int = 20000,
    steps: int = 800,
    batch_size: int = 32,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    lr: float = 3e-3,
    max_position_offset: int = 6,
    progress: bool = True,
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """Train the review LM from scratch and save model and tokenizer to ``out_dir`` (created; must not be a file).

    The result depends only on the arguments (same seed, same weights, on the same torch build and thread count):
    the text, the initialization and the batch order are all seeded.

    Training sequences are ``<bos> review <eos>`` with the loss on every position after <bos>. Each batch's
    position ids start at a random offset in ``[0, max_position_offset]``: trl scores left-padded prompts with
    positions counted from the padding, while generation may count from the first real token, so the model is
    trained not to care.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    import torch

    # One thread: the matrices are small enough that a second thread only adds synchronization (much slower on a
    # busy machine), and the weights then do not depend on the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(
            out_dir, seed, n_texts, steps, batch_size, n_layer, n_embd, n_head, lr, max_position_offset, progress
        )
    finally:
        torch.set_num_threads(threads)


def _build(out_dir, seed, n_texts, steps, batch_size, n_layer, n_embd, n_head, lr, max_position_offset, progress):
    import torch
    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_review_tokenizer()
    texts = train_texts(n_texts, seed=seed)
    encoded = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    longest = max(len(x) for x in encoded)
    n_positions = 64
    if longest + max_position_offset > n_positions:
        raise ValueError(f"training texts of {longest} tokens do not fit {n_positions} positions")

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        # Linear warmup, then cosine decay to 10% of the peak rate.
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    gen = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id
    bar = tqdm(total=steps, desc="building review LM", disable=not progress)
    for batch in _batches(encoded, batch_size, steps, seed):
        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for i, x in enumerate(batch):
            input_ids[i, : len(x)] = torch.tensor(x)
        attention = (input_ids != pad).long()
        labels = input_ids.masked_fill(attention == 0, -100)
        offset = int(torch.randint(0, max_position_offset + 1, (1,), generator=gen))
        position_ids = torch.arange(width).unsqueeze(0) + offset
        loss = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    model.eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, tokenizer


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX); elsewhere a no-op (the atomic rename still protects)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def load_review_lm(
    cache_dir: str | os.PathLike | None = None, *, progress: bool = True, **build_kwargs
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """The review LM and its tokenizer, built into ``review_lm_path(cache_dir)`` on first use, then loaded.

    Safe against concurrent callers (several processes of one ``accelerate launch``, parallel tests): one builds
    under a file lock in a temporary folder that is renamed into place; the others wait and load the result.
    ``build_kwargs`` go to ``build_review_lm`` (only for the first build; tests use them for a faster build into
    their own cache dir).
    """
    from transformers import AutoTokenizer, GPT2LMHeadModel

    path = review_lm_path(cache_dir)
    if not _is_complete(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path.parent / f".{path.name}.lock"):
            if not _is_complete(path):
                tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
                try:
                    build_review_lm(tmp, progress=progress, **build_kwargs)
                    if path.exists():  # a stale, incomplete folder from an interrupted older build
                        shutil.rmtree(path)
                    os.replace(tmp, path)
                except OSError:
                    # Without a file lock (no fcntl) another process may have renamed its build into place first.
                    shutil.rmtree(tmp, ignore_errors=True)
                    if not _is_complete(path):
                        raise
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    model = GPT2LMHeadModel.from_pretrained(path)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
