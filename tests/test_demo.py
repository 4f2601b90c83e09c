"""The demo's answers read as text: the stop token that ends a reply is not printed."""

from jalign.data.chat import NemoChatFormat
from jalign.data.tokenizer import Tokenizer
from jalign.demo import answer_text


def test_an_answer_ends_before_the_turn_token_that_stopped_it():
  tok, fmt = Tokenizer.tiny(), NemoChatFormat()
  stop = tok.encode(fmt.turn_start)[-1]
  words = tok.encode("the cat sat")
  assert "\x11" in tok.decode(words + [stop])  # what the demo printed after every answer
  assert answer_text(tok, words + [stop], stop) == tok.decode(words).strip() == "the cat sat"
  assert answer_text(tok, words, stop) == "the cat sat"  # cut by the length limit: nothing to drop
