"""Incremental detokenization (engine/detokenizer.py) and stop strings over it (engine/text_output.py),
with the tiny checkpoint's byte-level BPE tokenizer: characters of 2 to 4 bytes split over tokens.

The properties: the streamed pieces concatenate to the full decode; every prefix of the stream is a
prefix of the full decode (so no U+FFFD is sent for a character still arriving); the ids decoded
per token stay bounded at any output length; stop strings cut where a full-text search says.
"""

from __future__ import annotations

import random
import time

import pytest

from maverick_ray.engine.detokenizer import CONTEXT, REPLACEMENT, WINDOW_LIMIT, IncrementalDetokenizer
from maverick_ray.engine.text_output import StopStrings, TextOutput

TEXTS = ["héllo 世界 🎉🚀 naïve café — 日本語のテキスト 👩‍👩‍👧 done",
         "🙂" * 40, "中文" * 30 + " mixed with ascii " + "ε" * 20,
         "emoji at the end 🎉"]


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    from maverick_ray.checkpoint.tokenizer import ChatTokenizer

    return ChatTokenizer.from_pretrained(tiny_ckpt)


def stream(decode, ids: list[int]) -> list[str]:
    """The pieces an IncrementalDetokenizer returns as `ids` arrive one by one, then its flush."""
    d, grown, pieces = IncrementalDetokenizer(decode), [], []
    for i in ids:
        grown.append(i)
        pieces.append(d.step(grown))
    pieces.append(d.flush(grown))
    return pieces


def assert_streams_as_full_decode(decode, ids: list[int]) -> None:
    full = decode(ids)
    pieces = stream(decode, ids)
    assert "".join(pieces) == full
    sent = ""
    for p in pieces[:-1]:
        sent += p
        assert full.startswith(sent), (sent, full)   # nothing sent that the final text does not have


def test_the_tokenizer_splits_characters_over_tokens(tok):
    """The premise of the tests below: single tokens decode to U+FFFD (partial characters)."""
    ids = tok.encode(TEXTS[0])
    assert sum(REPLACEMENT in tok.decode([i]) for i in ids) >= 10
    assert tok.decode(ids) == TEXTS[0]


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_text_streams_without_replacement_characters(tok, text):
    ids = tok.encode(text)
    pieces = stream(tok.decode, ids)
    assert "".join(pieces) == text
    assert not any(REPLACEMENT in p for p in pieces)
    assert pieces[-1] == ""  # valid UTF-8: nothing left for the flush


def test_random_token_sequences_stream_as_their_full_decode(tok):
    """Random ids (bytes that are often invalid UTF-8, special tokens, merges): the stream is the
    full decode, U+FFFD included exactly where the final text has it."""
    rng = random.Random(1234)
    vocab = tok.vocab_size
    byte_heavy = [i for i in range(vocab) if REPLACEMENT in tok.decode([i])]
    with_fffd = 0
    for n in range(400):
        length = rng.randint(1, 120)
        pool = byte_heavy if n % 2 else range(vocab)
        ids = [rng.choice(pool) for _ in range(length)]
        assert_streams_as_full_decode(tok.decode, ids)
        with_fffd += REPLACEMENT in tok.decode(ids)
    assert with_fffd > 100  # the cases where the final text really is invalid were exercised


def test_random_valid_text_over_random_cuts(tok):
    """Valid multi-byte text, with special tokens inserted at random: never a U+FFFD."""
    rng = random.Random(7)
    alphabet = list("ab €ü中文日本🙂🎉🚀ε—") + ["xyz", " the"]
    special = tok.hf.all_special_ids
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        ids = tok.encode(text)
        for _ in range(rng.randint(0, 3)):
            ids.insert(rng.randint(0, len(ids)), rng.choice(special))
        pieces = stream(tok.decode, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any(REPLACEMENT in p for p in pieces)


def test_decode_work_per_token_is_bounded_at_2k_tokens(tok):
    """O(1) per token: at 2048 output tokens no call decodes more than the window's ids, and the
    average stays a small constant (the old path decoded all n ids every token: n(n+1)/2 in all)."""
    calls: list[int] = []

    def counting_decode(ids):
        calls.append(len(ids))
        return tok.decode(ids)

    ids = (tok.encode(TEXTS[0] + " ") * 80)[:2048]
    assert len(ids) == 2048
    pieces = stream(counting_decode, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert max(calls) <= WINDOW_LIMIT + 4    # a character of up to 4 byte tokens may delay the move
    assert sum(calls) / len(ids) < WINDOW_LIMIT + CONTEXT
    # and the wall time per token does not grow with the output length
    per_token = {}
    for n in (256, 2048):
        d, grown = IncrementalDetokenizer(tok.decode), []
        t = time.perf_counter()
        for i in ids[:n]:
            grown.append(i)
            d.step(grown)
        per_token[n] = (time.perf_counter() - t) / n
    old = time.perf_counter()
    for k in range(1948, 2048):  # the old path: decode every output id, at tokens 1949..2048
        tok.decode(ids[:k + 1])
    old = (time.perf_counter() - old) / 100
    print(f"\nper-token decode at 2k tokens: incremental {per_token[2048] * 1e6:.1f} us "
          f"(at 256 tokens {per_token[256] * 1e6:.1f} us); full decode (old) {old * 1e6:.1f} us")
    assert per_token[2048] < old


# ---- stop strings over the stream ------------------------------------------------------------
def reference_stop(tok, ids: list[int], stops: list[str]) -> tuple[str, bool]:
    """The old path: after each token decode the whole output and cut at the earliest stop string
    it contains (so the first stop to complete wins, as in vLLM)."""
    for k in range(1, len(ids) + 1):
        full = tok.decode(ids[:k])
        hits = [full.find(s) for s in stops if s in full]
        if hits:
            return full[:min(hits)], True
    return tok.decode(ids), False


def run_text_output(tok, ids: list[int], stops: list[str]) -> tuple[list[str], bool]:
    out, grown = TextOutput(tok.decode, stops), []
    pieces = []
    for i in ids:
        grown.append(i)
        piece, stopped = out.add(grown)
        pieces.append(piece)
        if stopped:
            return pieces, True
    pieces.append(out.tail(grown))
    return pieces, False


def test_stop_string_spanning_tokens_and_multibyte_characters(tok):
    text = "first line 世界🎉 then STOP here and more"
    ids = tok.encode(text)
    for stops in (["STOP"], ["界🎉 th"], ["🎉"], ["nope", "ine 世"], ["here", "then"]):
        pieces, stopped = run_text_output(tok, ids, stops)
        want, _ = reference_stop(tok, ids, stops)
        assert stopped and "".join(pieces) == want, stops
        assert not any(REPLACEMENT in p for p in pieces)


def test_held_back_text_is_sent_when_no_stop_completes(tok):
    text = "the end is ST"          # "ST" could become "STOP": held back, then sent by tail()
    ids = tok.encode(text)
    out, grown, sent = TextOutput(tok.decode, ["STOP"]), [], ""
    for i in ids:
        grown.append(i)
        piece, stopped = out.add(grown)
        assert not stopped
        sent += piece
    assert sent == "the end is " and out.tail(grown) == "ST"


def test_stop_strings_do_not_end_the_output_before_min_tokens(tok):
    """As vLLM: before min_tokens the text goes out whole, stop strings included; from then on a
    stop string ends the output."""
    ids = tok.encode("STOP and more STOP tail")
    out, grown, sent, stopped_at = TextOutput(tok.decode, ["STOP"]), [], "", None
    min_tokens = len(tok.encode("STOP and"))
    for i in ids:
        grown.append(i)
        piece, stopped = out.add(grown, stops_active=len(grown) >= min_tokens)
        sent += piece
        if stopped:
            stopped_at = len(grown)
            break
    assert sent == "STOP and more " and stopped_at == len(tok.encode("STOP and more STOP"))


def test_random_stop_strings_match_a_full_text_search(tok):
    rng = random.Random(99)
    alphabet = list("abc 世界🙂") + ["ab", "🎉x"]
    outcomes = []
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids = tok.encode(text)
        stops = []
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(text))
            stops.append(text[i:i + rng.randint(1, 4)] if rng.random() < 0.7 else "zz" + text[i])
        pieces, stopped = run_text_output(tok, ids, stops)
        want, want_stopped = reference_stop(tok, ids, stops)
        assert ("".join(pieces), stopped) == (want, want_stopped), (text, stops)
        outcomes.append(stopped)
    assert 50 < sum(outcomes) < 280  # both outcomes were exercised


def test_stop_strings_hold_back_only_a_possible_start():
    s = StopStrings(["abc", "xy"])
    assert s.feed("hello a") == ("hello ", False) and s.pending == "a"
    assert s.feed("b") == ("", False) and s.pending == "ab"
    assert s.feed("d x") == ("abd ", False) and s.pending == "x"
    assert s.feed("yz") == ("", True)
    s = StopStrings([])
    assert s.feed("abc") == ("abc", False)


# ---- through the real engine ---------------------------------------------------------------------
def test_engine_streams_the_full_decode_of_random_weight_output(tiny_ckpt, tok):
    """The tiny model's random weights emit byte tokens that are often invalid UTF-8: every
    request's streamed events concatenate to the decode of its output ids, every prefix of the
    stream is a prefix of that decode, and stop strings cut where the old full-decode path cut."""
    from maverick_ray.config import EngineConfig, ParallelConfig
    from maverick_ray.engine.engine import Engine
    from maverick_ray.engine.sampling import SamplingParams

    prompts = [tok.encode(t) for t in ("世界 🎉", "hello", "ü€ 🚀🚀")]
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=4, max_model_len=256),
                tokenizer=tok) as eng:
        runs = []
        for seed in range(6):
            for prompt in prompts:
                stream = eng.add_request(prompt, SamplingParams(max_tokens=60, temperature=1.0, seed=seed,
                                                                ignore_eos=True))
                runs.append([ev for ev in stream])
        with_fffd = 0
        for events in runs:
            ids = [ev.token_id for ev in events if ev.token_id is not None]
            full = tok.decode(ids)
            with_fffd += REPLACEMENT in full
            sent = ""
            for ev in events:
                sent += ev.text
                assert full.startswith(sent)
            assert sent == full and events[-1].finish_reason == "length"
        assert with_fffd >= 1  # invalid UTF-8 did occur, and came out exactly where it is
        # stop strings: a piece of an earlier output, cut exactly as the full-decode path cuts
        events = runs[1]
        ids = [ev.token_id for ev in events if ev.token_id is not None]
        text = tok.decode(ids)
        stop = text[len(text) // 2:len(text) // 2 + 3]
        got = eng.generate(prompts[1], SamplingParams(max_tokens=60, temperature=1.0, seed=0, ignore_eos=True,
                                                      stop=[stop]))
        want, stopped = reference_stop(tok, ids, [stop])
        assert stopped and got["finish_reason"] == "stop" and got["text"] == want
