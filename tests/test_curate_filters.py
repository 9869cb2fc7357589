"""The per-document functions: cleaning, langid, quality filters, safety, dedup primitives."""

import random

import numpy as np
import pytest

from lm.curate.c4 import C4Filter
from lm.curate.chain import DocumentProcessor
from lm.curate.clean import clean_text, decode
from lm.curate.code_filters import code_quality
from lm.curate.config import default_config
from lm.curate.dedup import Decontaminator, MinHasher, connected_components, exact_key
from lm.curate.filters import fineweb_quality, gopher_quality, gopher_repetition
from lm.curate.langid import LanguageIdentifier
from lm.curate.safety import Blocklist, PiiScrubber, UrlBlocklist
from lm.curate.synthetic import code, prose
from lm.curate.textstats import TextView, duplicate_ngram_char_fraction

CFG = default_config().to_dict()
CLEAN = CFG["clean"]


def good_prose(seed: int = 0, n: int = 300) -> str:
    return prose(random.Random(seed), n)


def test_decode_rejects_binary_invalid_and_empty():
    assert decode(b"") == (None, "empty")
    assert decode(b"  \n ") == (None, "empty")
    assert decode(b"abc\x00def") == (None, "binary")
    assert decode(b"caf\xe9") == (None, "invalid_utf8")
    assert decode("café".encode()) == ("café", None)
    assert decode(b"\xef\xbb\xbfhello") == ("hello", None)  # BOM dropped


def test_clean_repairs_mojibake_normalizes_and_strips_controls():
    mojibake = "The cafÃ© served crÃ¨me brÃ»lÃ©e."
    assert clean_text(mojibake, is_code=False, is_web=False, cfg=CLEAN) == (
        "The café served crème brûlée."
    )
    decomposed = "cafe\u0301 \x07bell\x1b  and\u00a0space\r\nnext line   \n\n\n\nend"
    out = clean_text(decomposed, is_code=False, is_web=False, cfg=CLEAN)
    assert out == "café bell and space\nnext line\n\nend"
    code_text = "def f():\n    return  1   \n"
    assert clean_text(code_text, is_code=True, is_web=False, cfg=CLEAN) == "def f():\n    return  1"


def test_clean_removes_web_boilerplate_but_not_long_prose():
    page = "Skip to content\nAccept all cookies\n" + good_prose() + "\nShare on Facebook\n"
    out = clean_text(page, is_code=False, is_web=True, cfg=CLEAN)
    assert "Skip to content" not in out and "Share on Facebook" not in out
    assert out.startswith(good_prose().split()[0])
    assert clean_text(page, is_code=False, is_web=False, cfg=CLEAN).startswith("Skip")


def test_langid_matches_the_reference_model():
    li = LanguageIdentifier(prefix_chars=1000)
    texts = [
        good_prose(),
        "Der schnelle braune Fuchs springt über den faulen Hund. Das Wetter ist heute schön.",
        "El rápido zorro marrón salta sobre el perro perezoso. Hoy hace buen tiempo.",
        "Быстрая коричневая лиса прыгает через ленивую собаку.",
    ]
    for text in texts:
        lang, score = li.classify(text)
        ref_lang, ref_score = li._reference.classify(text[:1000])
        assert lang == ref_lang and score == pytest.approx(ref_score, abs=1e-6)
    assert [li.classify(t)[0] for t in texts] == ["en", "de", "es", "ru"]


def test_gopher_quality_rules_and_thresholds():
    q = dict(CFG["gopher_quality"])
    assert gopher_quality(TextView(good_prose()), q) is None
    assert gopher_quality(TextView("the cat and the dog " * 5), q) == "too_few_words"
    long_words = " ".join(["extraordinarilylongwords"] * 60 + ["the", "and"])
    assert gopher_quality(TextView(long_words), q) == "mean_word_length_high"
    hashes = good_prose() + " #tag" * 80
    assert gopher_quality(TextView(hashes), q) == "symbol_word_ratio"
    bullets = "\n".join(f"- item number {i} of the list and more" for i in range(30))
    assert gopher_quality(TextView(bullets), q) == "bullet_lines"
    numbers = " ".join(str(10_000 + i) for i in range(300)) + " the and of"
    assert gopher_quality(TextView(numbers), q) == "alpha_words"
    no_stop = " ".join(["garden window letter morning village market"] * 20)
    assert gopher_quality(TextView(no_stop), q) == "stop_words"
    q["min_stop_words"] = 0
    assert gopher_quality(TextView(no_stop), q) is None  # every threshold comes from config


def test_gopher_repetition_rules():
    r = CFG["gopher_repetition"]
    assert gopher_repetition(TextView(good_prose()), r) is None
    lines = "\n".join([f"line {i} is unique here." for i in range(10)] + ["same line."] * 6)
    assert gopher_repetition(TextView(lines), r) == "dup_line_frac"
    rng = random.Random(1)
    para = prose(rng, 60).strip()
    twice = good_prose(2, 150) + "\n\n" + para + "\n\n" + para
    assert gopher_repetition(TextView(twice), r).startswith(("dup_para", "dup_"))
    spam = ("buy cheap shoes " * 40) + good_prose(3, 100)
    assert gopher_repetition(TextView(spam), r) in ("top_2gram_char_frac", "top_3gram_char_frac")


def test_duplicate_ngram_fraction_counts_each_character_once():
    view = TextView("a b c d e a b c d e x")
    # The second "a b c d e" is the only repeated 5-gram: 5 of 11 one-character words.
    assert duplicate_ngram_char_fraction(view, 5) == pytest.approx(5 / 11)
    assert duplicate_ngram_char_fraction(TextView("a b c d e f g"), 5) == 0.0


def test_c4_keeps_sentences_and_drops_pages():
    c4 = C4Filter(CFG["c4"], ["badword"])
    page = good_prose()
    noisy = "Menu\nPlease enable javascript to view this site properly.\n" + page
    noisy += "\nThis site uses cookies to improve things for you.\nCited fact [1] is here now.\n"
    out, reason = c4(noisy, TextView(noisy).norm_words)
    assert reason is None
    assert "Menu" not in out and "javascript" not in out and "cookies" not in out
    assert "Cited fact is here now." in out
    assert c4(page, TextView(page).norm_words) == (page, None)  # nothing to drop: unchanged
    for text, why in [
        (page + "\nLorem ipsum dolor sit amet.", "lorem_ipsum"),
        (page + "\nfunction() { return 1; }", "curly_brace"),
        (page + "\nA badword appears here.", "bad_words"),
        ("Only one sentence here.\nAnd a second one here.", "too_few_sentences"),
    ]:
        assert c4(text, TextView(text).norm_words)[1] == why


def test_fineweb_rules():
    f = CFG["fineweb"]
    assert fineweb_quality(TextView(good_prose()), f) is None
    no_punct = "\n".join(f"heading number {i} without any end mark" for i in range(20))
    assert fineweb_quality(TextView(no_punct), f) == "line_punct_frac"
    short = "\n".join(["Short line."] * 3 + [f"Item {i}." for i in range(10)])
    assert fineweb_quality(TextView(short), f) == "short_line_frac"
    long_dups = "\n".join(["This is a long line that repeats many times over here."] * 9)
    assert fineweb_quality(TextView(long_dups + "\n" + good_prose()), f) == "dup_line_char_frac"


def test_code_filters():
    c = CFG["code"]
    assert code_quality(TextView(code(random.Random(0))), "py", c) is None
    assert code_quality(TextView("x = 1\n"), "json", c) == "data_or_config_file"
    assert code_quality(TextView("a" * 1200), "py", c) == "max_line_length"
    assert code_quality(TextView(("x = '" + "ab " * 60 + "'\n") * 5), "py", c) == (
        "mean_line_length"
    )
    assert code_quality(TextView("{}[]();:,.<>=+-*/ \n" * 20), "py", c) == "alnum_frac"
    generated = "# Code generated by protoc. DO NOT EDIT.\n" + code(random.Random(1))
    assert code_quality(TextView(generated), "py", c) == "autogenerated"
    blob = "DATA = '" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0123456789" * 40 + "'\n"
    assert code_quality(TextView(blob), "py", c) in ("encoded_data", "max_line_length")


def test_pii_scrubber_replaces_each_kind_and_counts():
    scrub = PiiScrubber(CFG["pii"]["kinds"].split(","))
    text = (
        "Mail bob@mail.example.org or +1 415-555-0199. "
        "Host 10.0.0.1 and fe80::1ff:fe23:4567:890a.\n"
        "aws AKIAABCDEFGHIJKLMNOP token ghp_0123456789abcdefghijABCDEFGHIJ012345 "
        "slack xoxb-1234567890-abcdef google AIzaSyA1234567890abcdefghijklmnopqrstuv\n"
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEabc\n-----END RSA PRIVATE KEY-----\n"
        'password = "hunter22hunter"\nversion 3.10.12 and 1.2.3.4.5 and 999.1.1.1 stay\n'
    )
    out, counts = scrub.scrub(text)
    assert counts == {
        "email": 1, "phone": 1, "ipv4": 1, "ipv6": 1, "aws_key": 1, "github_token": 1,
        "slack_token": 1, "google_api_key": 1, "private_key": 1, "secret_assignment": 1,
    }  # fmt: skip
    assert 'password = "<SECRET>"' in out and "<PRIVATE_KEY>" in out
    assert "3.10.12" in out and "1.2.3.4.5" in out and "999.1.1.1" in out
    assert "bob@" not in out and "hunter22" not in out
    plain = good_prose()
    assert scrub.scrub(plain) == (plain, {})
    python = "x = a[::2]\nd = {'k': 1}\nt = '12:30:45'\n"
    assert scrub.scrub(python) == (python, {})


def test_blocklists():
    bl = Blocklist(["zorblax", "bad phrase"], min_hits=2, max_fraction=0.01)
    view = TextView(good_prose())
    assert bl.check(view.norm_words, view.lower_text) is None
    text = good_prose() + " zorblax and a bad phrase."
    v = TextView(text)
    assert bl.hits(v.norm_words, v.lower_text) == 2
    assert bl.check(v.norm_words, v.lower_text) is None  # 2 hits in 300 words: under 1%
    assert Blocklist(["zorblax", "bad phrase"], 2, 0.001).check(v.norm_words, v.lower_text)
    urls = UrlBlocklist(["spam.example"])
    assert urls.check("https://www.spam.example/page") == "blocklisted_domain"
    assert urls.check("https://notspam.example/page") is None


def test_minhash_finds_near_duplicates_not_distinct_documents():
    mh = MinHasher(14, 8, 5, seed=1)
    a = good_prose(0, 500)
    words = a.split(" ")
    words[100] = "lighthouse"
    b = " ".join(words)
    c = good_prose(1, 500)
    sa, sb, sc = (mh.signature(TextView(t)) for t in (a, b, c))
    assert sa.shape == (112,) and sa.dtype == np.uint32
    assert mh.jaccard_estimate(sa, sb) > 0.9 and mh.jaccard_estimate(sa, sc) < 0.1
    assert set(mh.band_keys(sa)) & set(mh.band_keys(sb))
    assert not set(mh.band_keys(sa)) & set(mh.band_keys(sc))
    assert mh.signature(TextView("too short")) is None
    assert exact_key(TextView("Hello,  World!")) == exact_key(TextView("hello world"))


def test_connected_components_keep_smallest_id():
    roots = connected_components([("d", "c"), ("c", "b"), ("x", "y"), ("b", "d")])
    assert roots == {"b": "b", "c": "b", "d": "b", "x": "x", "y": "x"}


def test_decontamination_by_13_grams():
    passage = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    dc = Decontaminator([passage], ngram=13)
    tail = " ONE two, three four five six seven eight nine ten eleven twelve thirteen!"
    assert dc.check(TextView(good_prose() + tail)) == "eval_ngram_overlap"
    assert dc.check(TextView(good_prose() + " one two three four five six seven")) is None


def test_processor_routes_code_and_prose():
    proc = DocumentProcessor(CFG)
    base = dict(source="t", path="", url="", web=False, html=False, text=None, reject=None)
    doc = proc.process(dict(base, id="a", ext="py", kind="code", code_language="python",
                            raw=code(random.Random(0)).encode(), bytes_in=1))  # fmt: skip
    assert doc["rejected"] is None and doc["language"] == "code:python"
    assert [s for s, _ in doc["trace"]] == ["decode", "clean", "code", "blocklist", "pii"]
    doc = proc.process(dict(base, id="b", ext="txt", kind="prose", code_language="",
                            raw=good_prose().encode(), bytes_in=1))  # fmt: skip
    assert doc["rejected"] is None and doc["language"] == "en" and len(doc["band_keys"]) == 14
    html = (
        b"<html><body><nav>Home | About</nav><article>"
        + b"".join(b"<p>" + p.encode() + b"</p>" for p in good_prose().split("\n\n"))
        + b"</article></body></html>"
    )
    doc = proc.process(dict(base, id="c", ext="html", kind="prose", code_language="",
                            raw=html, bytes_in=len(html), html=True, web=True))  # fmt: skip
    assert (
        doc["rejected"] is None and "<p>" not in doc["text"] and "Home | About" not in doc["text"]
    )
