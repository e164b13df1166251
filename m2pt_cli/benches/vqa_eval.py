"""VQA accuracy with the VQA answer processor exactly as the reference tools run it.

The reference is ``EvalAIAnswerProcessor`` (mmf ``pythia/tasks/processors.py``, copied unchanged into
LLaVA ``llava/eval/m4c_evaluator.py`` and lmms-eval ``lmms_eval/tasks/_task_utils/vqa_eval_metric.py``)
and LLaVA's ``TextVQAAccuracyEvaluator``. Published TextVQA numbers contain its quirks, so they are
kept here on purpose (each one is marked "quirk").
"""

from __future__ import annotations

import re

NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
# The reference's table, entry for entry. Quirks: keys with capitals ("Im", "Ive", ...) never match
# (the text is lowercased first); keys holding "'s" never match (it is split off first);
# "somebody'd" maps to "somebodyd".
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Quirk: the reference's "(?!<=\d)" is a look-ahead for the text "<=" and a digit (never true
# before a period), not the look-behind it resembles: every period not followed by a digit goes,
# so "3." -> "3" and "10:30." -> "10:30" while "3.5" stays.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# Quirk: the reference calls PERIOD_STRIP.sub("", text, re.UNICODE), and sub's third argument is
# count: at most re.UNICODE (32) periods are removed.
PERIOD_STRIP_COUNT = int(re.UNICODE)


def _word_tokenize(text: str) -> str:
    """Lowercase; drop "," and "?"; split "'s" off ("it's" -> "it 's"); trim."""
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def _punctuation(text: str) -> str:
    """Each mark is deleted when it touches a space somewhere in the text (or a comma sits between
    digits: never, once commas are gone), else replaced by a space; then the periods go."""
    out = text
    digit_comma = COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


def _digits_and_articles(text: str) -> str:
    """Number words to digits, articles dropped, then contractions (apostrophe-less forms) mapped."""
    words = [NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_vqa(answer: str) -> str:
    """The VQA answer processor (``EvalAIAnswerProcessor.__call__``). Apply it once: it is not
    idempotent ("whats" -> "what's" -> "what 's")."""
    text = _word_tokenize(answer).replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(text))


def vqa_accuracy(parsed: str, answers: list[str]) -> float:
    """VQA accuracy of ``parsed`` (a prediction already through ``normalize_vqa``) against the raw
    human ``answers``: the mean over the leave-one-out subsets of min(matches / 3, 1), as LLaVA's
    ``TextVQAAccuracyEvaluator`` and lmms-eval's ``textvqa_process_results`` compute it."""
    gts = [normalize_vqa(a) for a in answers]
    if not gts:
        return 0.0
    scores = [min(1.0, sum(a == parsed for a in gts[:i] + gts[i + 1 :]) / 3) for i in range(len(gts))]
    return sum(scores) / len(scores)
