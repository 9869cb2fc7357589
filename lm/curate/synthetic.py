"""Generated corpora for the curation tests and the benchmark (seeded: same bytes every time).

Prose is random English-like text built from common words, with real sentence and paragraph
structure so that it passes every quality filter unless a test breaks it on purpose; code is
small Python modules. `write_mixed_corpus` lays out one of every case the pipeline must handle
and returns what each file is expected to become.
"""

from __future__ import annotations

import os
import random

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their been has when who will more no if "
    "out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three place small found house "
    "river garden window letter morning village market winter summer teacher country history "
    "music paper mountain question answer story family friend evening forest island harbor "
    "bridge station library machine pattern science theory method system measure number "
    "result change energy water light sound color voice reason memory simple careful quiet "
    "bright ancient modern gentle narrow distant strong early late open close follow carry "
    "build write read learn travel describe explain remember discover wonder"
).split()


def prose(rng: random.Random, n_words: int = 400) -> str:
    """Paragraphs of 3-6 sentences of 8-18 words; one paragraph per line, blank-line separated."""
    paragraphs, count = [], 0
    while count < n_words:
        sentences = []
        for _ in range(rng.randint(3, 6)):
            k = rng.randint(8, 18)
            words = [rng.choice(_WORDS) for _ in range(k)]
            words[0] = words[0].capitalize()
            sentences.append(" ".join(words) + rng.choice([".", ".", ".", "!", "?"]))
            count += k
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


def code(rng: random.Random, n_functions: int = 6) -> str:
    """A small, plausible Python module."""
    out = ['"""Utilities for the example package."""', "", "import math", ""]
    for i in range(n_functions):
        name = f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}_{i}"
        arg = rng.choice(["value", "items", "count", "scale"])
        out += [
            f"def {name}({arg}, factor={rng.randint(2, 9)}):",
            f'    """Return the {rng.choice(_WORDS)} {rng.choice(_WORDS)} of {arg}."""',
            f"    total = {rng.randint(0, 99)}",
            "    for step in range(factor):",
            f"        total += math.sqrt(abs(hash(({arg}, step)) % {rng.randint(50, 999)}))",
            "    return total",
            "",
        ]
    return "\n".join(out) + "\n"


EVAL_PASSAGE = (
    "In the quiet valley of the seven lanterns an old clockmaker built a tower that counted "
    "the seasons instead of the hours and every child in the village learned to read it."
)


def write_mixed_corpus(root: str, seed: int = 0) -> dict[str, str]:
    """Writes the test corpus under `root`; returns file name -> expected outcome, where the
    outcome is `kept`, `kept_one_of:<group>` or `<step>/<reason>`."""
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    expected: dict[str, str] = {}

    def put(name: str, data: str | bytes, outcome: str) -> None:
        raw = data if isinstance(data, bytes) else data.encode("utf-8")
        with open(os.path.join(root, name), "wb") as f:
            f.write(raw)
        expected[name] = outcome

    for i in range(6):
        put(f"prose_{i}.txt", prose(rng), "kept")
    base = prose(rng, 500)
    words = base.split(" ")
    for j in (40, 200, 350):
        words[j] = "lighthouse"
    put("near_a.txt", base, "kept_one_of:near")
    put("near_b.txt", " ".join(words), "kept_one_of:near")
    dup = prose(rng)
    put("exact_1.txt", dup, "kept_one_of:exact")
    put("exact_2.txt", dup.upper().replace(" ", "  "), "kept_one_of:exact")
    pii = prose(rng).split("\n\n")
    pii[0] += " Write to jane.doe@example.com or call (415) 555-0123 today."
    pii[1] += " The server at 192.168.10.20 and 2001:db8:85a3::8a2e:370:7334 answered."
    pii[2] += (
        " The old key AKIAIOSFODNN7EXAMPLE and ghp_abcdefghijklmnopqrstuvwxyz0123456789 leaked."
    )
    put("pii.txt", "\n\n".join(pii), "kept")
    for i in range(3):
        put(f"module_{i}.py", code(rng), "kept")
    put("secrets.py", code(rng) + 'API_KEY = "sk_live_0123456789abcdef"\n', "kept")
    put("minified.js", "var a=1;" * 200 + "\n", "code/max_line_length")
    put("generated.py", "# This file was automatically generated. DO NOT EDIT.\n" + code(rng),
        "code/autogenerated")  # fmt: skip
    put("data.json", '{"a": [1, 2, 3], "b": {"c": "d"}}\n' * 20, "code/data_or_config_file")
    put("lorem.txt", prose(rng) + "\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit.\n",
        "c4/lorem_ipsum")  # fmt: skip
    put("short.txt", "Too short to be a document, but it is the text we have.\n",
        "gopher_quality/too_few_words")  # fmt: skip
    put("repeated.txt", ("The same line appears here again and again in this file.\n" * 40),
        "gopher_repetition/dup_line_frac")  # fmt: skip
    german = (
        "Der schnelle braune Fuchs springt über den faulen Hund und die Katze schläft "
        "ruhig im warmen Haus. Wir gehen morgen mit den Kindern in den großen Wald. "
    ) * 6
    put("german.txt", german, "langid/language:de")
    blocked = prose(rng) + "\n\nThe zorblax met a zorblax, and then the zorblax left the town.\n"
    put("blocked.txt", blocked, "blocklist/blocklisted_words")
    contaminated = prose(rng).split("\n\n")
    contaminated[1] += " " + EVAL_PASSAGE
    put("contaminated.txt", "\n\n".join(contaminated), "decontam/eval_ngram_overlap")
    put("invalid.txt", prose(rng).encode("utf-8")[:500] + b"\xff\xfe\xc3\x28 broken",
        "decode/invalid_utf8")  # fmt: skip
    put("binary.txt", bytes(range(256)) * 4, "decode/binary")
    put("empty.txt", "", "decode/empty")
    put("blank.txt", "   \n\n  \n", "decode/empty")
    put("big.txt", prose(rng, 6000), "decode/oversized")
    return expected
