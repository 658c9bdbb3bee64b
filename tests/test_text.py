"""rnn_jax.text: reading, cleaning, tokenizing and numbering text."""

import hashlib
import importlib.resources

import numpy as np
import pytest

from rnn_jax import text

BUNDLED_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"


# --- the bundled corpus -----------------------------------------------------


def test_bundled_file_sha1():
    resource = importlib.resources.files("rnn_jax") / "assets" / "timemachine.txt"
    assert hashlib.sha1(resource.read_bytes()).hexdigest() == BUNDLED_SHA1


def test_read_text_default_is_the_bundled_book():
    book = text.read_text()
    resource = importlib.resources.files("rnn_jax") / "assets" / "timemachine.txt"
    assert book == resource.read_bytes().decode("utf-8")
    assert book.startswith("The Time Machine, by H. G. Wells")


def test_char_vocab_of_the_bundled_book():
    ids, vocab = text.load_corpus()
    assert len(vocab) == 28
    assert vocab["<unk>"] == 0 and vocab.tokens[0] == "<unk>"
    assert set(vocab.tokens[1:]) == set("abcdefghijklmnopqrstuvwxyz ")
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert len(ids) == len(text.tokenize(text.read_text(), "char"))
    assert 0 not in ids  # min_freq 0: nothing is unknown
    assert vocab.decode(ids[:29]) == "the time machine by h g wells"


# --- cleaning and tokens ----------------------------------------------------


def test_preprocess_char_matches_the_book():
    assert text.preprocess("Hello,  World!! 42x", "char") == "hello world x"
    assert text.preprocess("Hello,  World!! 42x", "word") == "hello world x"
    assert text.preprocess("  A\n\nb.  ", "char") == " a b "


def test_raw_char_keeps_everything():
    s = "Hi,\n  Ünïcode 42!"
    assert text.preprocess(s, "raw_char") == s
    assert text.tokenize(s, "raw_char") == list(s)


def test_tokenize_char_and_word():
    assert text.tokenize("Ab, c!", "char") == ["a", "b", " ", "c", " "]
    assert text.tokenize("  The cat's  hat -- the END. ", "word") == [
        "the",
        "cat",
        "s",
        "hat",
        "the",
        "end",
    ]


@pytest.mark.parametrize("fn", [text.preprocess, text.tokenize])
def test_unknown_mode(fn):
    with pytest.raises(ValueError, match=r"tokens.*'char', 'raw_char', 'word'"):
        fn("abc", "bytes")


def test_load_corpus_unknown_mode():
    with pytest.raises(ValueError, match="tokens must be one of"):
        text.load_corpus(tokens="subword")


# --- the vocabulary ---------------------------------------------------------


def test_vocab_order_is_frequency_then_alphabetical():
    vocab = text.Vocab(list("bbbaacdd"))
    assert vocab.tokens == ["<unk>", "b", "a", "d", "c"]
    # ties in the order of first appearance are still sorted alphabetically
    assert text.Vocab(list("ddbbcca")).tokens == ["<unk>", "b", "c", "d", "a"]


def test_vocab_reserved_tokens_follow_unk():
    vocab = text.Vocab(list("aab"), reserved=["<pad>", "<bos>", "a", "<pad>"])
    assert vocab.tokens == ["<unk>", "<pad>", "<bos>", "a", "b"]


def test_min_freq_maps_rare_tokens_to_unk():
    toks = "the cat and the dog and the end".split()
    vocab = text.Vocab(toks, min_freq=2, mode="word")
    assert vocab.tokens == ["<unk>", "the", "and"]
    assert vocab["cat"] == 0 and vocab["dog"] == 0 and vocab["the"] == 1
    ids = vocab.to_ids(toks)
    assert ids.tolist() == [1, 0, 2, 1, 0, 2, 1, 0]
    assert vocab.to_tokens(ids) == ["the", "<unk>", "and", "the", "<unk>", "and", "the", "<unk>"]


def test_min_freq_on_the_book_shrinks_word_vocab():
    _, full = text.load_corpus(tokens="word", min_freq=0)
    ids, small = text.load_corpus(tokens="word", min_freq=10)
    assert len(small) < len(full)
    assert (ids == 0).any()


def test_bad_min_freq():
    with pytest.raises(ValueError, match="min_freq"):
        text.Vocab(list("ab"), min_freq=-1)


def test_to_ids_to_tokens_round_trip():
    toks = text.tokenize("It was the best of times, it was the worst of times", "word")
    vocab = text.Vocab(toks, mode="word")
    ids = vocab.to_ids(toks)
    assert ids.dtype == np.int32 and ids.shape == (len(toks),)
    assert vocab.to_tokens(ids) == toks
    assert vocab.decode(ids) == " ".join(toks)
    assert vocab.to_ids(["never-seen"]).tolist() == [0]
    assert vocab.to_ids([]).shape == (0,)


def test_to_tokens_rejects_out_of_range_ids():
    vocab = text.Vocab(list("ab"))
    with pytest.raises(ValueError, match="out of range"):
        vocab.to_tokens([0, 3])
    with pytest.raises(ValueError, match="out of range"):
        vocab.to_tokens([-1])


def test_join_uses_the_mode_separator():
    assert text.Vocab(["a"], mode="char").join(["a", "b"]) == "ab"
    assert text.Vocab(["a"], mode="raw_char").join(["a", "\n"]) == "a\n"
    assert text.Vocab(["a"], mode="word").join(["a", "b"]) == "a b"


@pytest.mark.parametrize("mode", text.MODES)
def test_json_round_trip(mode):
    toks = text.tokenize("Zebra apple, apple; zebra? Ünïcode\n", mode)
    vocab = text.Vocab(toks, min_freq=1, reserved=["<pad>"], mode=mode)
    back = text.Vocab.from_json(vocab.to_json())
    assert back == vocab
    assert back.tokens == vocab.tokens and back.mode == mode
    assert back.to_ids(toks).tolist() == vocab.to_ids(toks).tolist()
    assert back.join(["x", "y"]) == vocab.join(["x", "y"])


@pytest.mark.parametrize(
    "doc, problem",
    [
        ("not json", "not valid JSON"),
        ('{"format": "other"}', "format"),
        ('{"format": "rnn_jax.vocab", "version": 1, "mode": "bpe", "tokens": []}', "mode"),
        ('{"format": "rnn_jax.vocab", "version": 1, "mode": "char", "tokens": ["a"]}', "<unk>"),
        (
            '{"format": "rnn_jax.vocab", "version": 1, "mode": "char", '
            '"tokens": ["<unk>", "a", "a"]}',
            "unique",
        ),
    ],
)
def test_from_json_rejects_bad_documents(doc, problem):
    with pytest.raises(ValueError, match=problem):
        text.Vocab.from_json(doc)


# --- read_text errors -------------------------------------------------------


def test_read_text_from_a_path(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("Crème brûlée\r\nline two\n".encode())
    assert text.read_text(path) == "Crème brûlée\r\nline two\n"
    assert text.read_text(str(path)) == "Crème brûlée\r\nline two\n"


def test_read_text_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found") as e:
        text.read_text(tmp_path / "nope.txt")
    assert "nope.txt" in str(e.value)


def test_read_text_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        text.read_text(tmp_path)


def test_read_text_unreadable(tmp_path, monkeypatch):
    # A permission error, simulated: the tests may run as root, who can read anything.
    path = tmp_path / "secret.txt"
    path.write_text("hidden")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(text, "open", denied, raising=False)
    with pytest.raises(ValueError, match="unreadable: Permission denied"):
        text.read_text(path)


@pytest.mark.parametrize("content", [b"", b"  \n\t\r\n "])
def test_read_text_empty(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is empty"):
        text.read_text(path)


def test_read_text_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"abc\xe9def")
    with pytest.raises(ValueError, match=r"not valid UTF-8.*0xe9.*offset 3"):
        text.read_text(path)


def test_read_text_drops_a_leading_byte_order_mark(tmp_path):
    """A file saved as UTF-8 with a BOM (Windows editors): the mark was read as the
    text's first character, so raw_char gave it a token of its own."""
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfab\xef\xbb\xbfc")  # one inside the text: a character
    assert text.read_text(path) == "ab\ufeffc"
    ids, vocab = text.load_corpus(path, tokens="raw_char")
    assert vocab.decode(ids) == "ab\ufeffc"
    path.write_bytes(b"\xef\xbb\xbfab\xe9")  # offsets still count the file's bytes
    with pytest.raises(ValueError, match=r"not valid UTF-8.*0xe9.*offset 5"):
        text.read_text(path)
    path.write_bytes(b"\xef\xbb\xbf \n")
    with pytest.raises(ValueError, match="is empty: it contains only a byte-order mark and whi"):
        text.read_text(path)


def test_error_messages_are_one_line(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff")
    for path in (tmp_path / "missing", tmp_path, tmp_path / "bad.txt"):
        with pytest.raises(ValueError) as e:
            text.read_text(path)
        assert "\n" not in str(e.value)


def test_load_corpus_without_tokens(tmp_path):
    path = tmp_path / "digits.txt"
    path.write_text("1234 5678")
    with pytest.raises(ValueError, match="no 'word' tokens"):
        text.load_corpus(path, tokens="word")
    ids, vocab = text.load_corpus(path, tokens="raw_char")
    assert vocab.decode(ids) == "1234 5678"


def test_unknown_tokens_are_listed_once_in_order():
    vocab = text.Vocab("the time machine", mode="char")
    assert vocab.unknown("Time Traveller!") == ["r", "v", "l"]  # preprocessed first
    assert vocab.unknown("") == [] and vocab.unknown("the") == []
    assert text.some(["r", "v", "l"]) == "'r', 'v', 'l'"
    assert text.some(list("abcdefg")) == "'a', 'b', 'c', 'd', 'e', ..."


def test_vocab_refuses_strings_where_it_takes_token_lists():
    """A string reserved token would reserve each character; a word vocabulary given a
    string would map its characters; a 2-D batch of ids decoded to one string."""
    with pytest.raises(ValueError, match=r"reserved: expected a sequence of tokens.*\['<pad>'\]"):
        text.Vocab(["a"], reserved="<pad>")
    assert text.Vocab(["a"], reserved=["<pad>"]).to_tokens([1]) == ["<pad>"]
    words = text.Vocab(text.tokenize("the time machine the", "word"), mode="word")
    with pytest.raises(ValueError, match="tokenize it first|text.tokenize"):
        words.to_ids("the time")
    np.testing.assert_array_equal(words.to_ids(["the", "time"]), words.to_ids(["the", "time"]))
    chars = text.Vocab(text.tokenize("abc", "char"))
    assert chars.decode(chars.to_ids("cab")) == "cab"  # a string is a list of characters
    with pytest.raises(ValueError, match=r"ids: expected one sequence .* shape \(2, 2\)"):
        chars.decode(np.ones((2, 2), np.int32))
