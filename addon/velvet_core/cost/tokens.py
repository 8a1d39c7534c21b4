"""Offline token counts for streams that carry no usage: tiktoken with encodings shipped in velvet.

tiktoken downloads its encoding files at first use, which fails without internet. velvet ships the two it
needs (``encodings/*.tiktoken.gz``: OpenAI's published o200k_base and cl100k_base files, MIT, byte for byte
— tests check them against the sha256 tiktoken pins) and builds :class:`tiktoken.Encoding` from them.

Prompt tokens follow OpenAI's documented approximation (the "How to count tokens with tiktoken" cookbook):
3 tokens per message, 1 per ``name``, 3 to prime the reply, and its formula for function definitions.
Images, audio and files in a prompt are not counted, nor hidden reasoning tokens in the answer: the
figures are estimates, stored with ``usage_estimated``.
"""

from __future__ import annotations

import base64
import gzip
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tiktoken

ENCODINGS_DIR = Path(__file__).with_name("encodings")

_ENDOFTEXT, _ENDOFPROMPT = "<|endoftext|>", "<|endofprompt|>"
# pattern and special tokens as in tiktoken_ext/openai_public.py
_SPEC: dict[str, tuple[str, dict[str, int]]] = {
    "o200k_base": ("|".join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]), {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018}),
    "cl100k_base": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|"""
        r"""\s*[\r\n]|\s+(?!\S)|\s""",
        {_ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
         _ENDOFPROMPT: 100276}),
}
DEFAULT_ENCODING = "o200k_base"  # every current model (gpt-4o, gpt-4.1, o-series, gpt-5) and unknown ones

_cache: dict[str, tiktoken.Encoding] = {}
_lock = threading.Lock()


def ranks(name: str) -> dict[bytes, int]:
    """A shipped encoding's token ranks, read from its file (the format of tiktoken's ``.tiktoken`` files)."""
    data = gzip.decompress((ENCODINGS_DIR / f"{name}.tiktoken.gz").read_bytes())
    return {base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in data.splitlines() if line)}


def encoding(name: str) -> tiktoken.Encoding:
    """A shipped encoding, loaded once per process (about 0.4 s and 45 MiB for o200k_base) and kept."""
    enc = _cache.get(name)
    if enc is not None:
        return enc
    with _lock:
        if name not in _cache:
            import tiktoken

            pat, special = _SPEC[name]
            enc = tiktoken.Encoding(name, pat_str=pat, mergeable_ranks=ranks(name), special_tokens=special)
            # the Rust core holds its own copy; tiktoken keeps the Python one only to pickle the encoding:
            # dropping it saves about 27 MiB
            enc._mergeable_ranks = {}
            _cache[name] = enc
        return _cache[name]


def encoding_name(model: str | None) -> str:
    """The encoding of ``model``: cl100k_base for gpt-4, gpt-3.5 and their kin, else o200k_base."""
    if not model:
        return DEFAULT_ENCODING
    from tiktoken.model import encoding_name_for_model

    name = model.split(":", 2)[1] if model.startswith("ft:") and model.count(":") >= 2 else model
    try:
        found = encoding_name_for_model(name)
    except KeyError:
        return DEFAULT_ENCODING
    if found.startswith("o200k"):  # o200k_harmony (gpt-oss) is o200k_base plus special tokens
        return "o200k_base"
    return found if found in _SPEC else "cl100k_base"  # r50k/p50k: retired models, cl100k is closest


class Counter:
    """Counts tokens of API request and answer shapes with one encoding."""

    def __init__(self, model: str | None) -> None:
        self.name = encoding_name(model)
        self.enc = encoding(self.name)
        self.func_init = 7 if self.name == "o200k_base" else 10  # cookbook: gpt-4o vs gpt-4/3.5

    def text(self, s: Any) -> int:
        # encode_ordinary: special-token text such as "<|endoftext|>" in a prompt is counted as text
        return len(self.enc.encode_ordinary(s)) if isinstance(s, str) and s else 0

    def content(self, value: Any) -> int:
        """A message's content: a string, or parts of which the text ones count."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return sum(self.text(p.get("text")) + self.text(p.get("refusal"))
                       for p in value if isinstance(p, dict))
        return 0

    def tool_calls(self, calls: Any) -> int:
        if not isinstance(calls, list):
            return 0
        n = 0
        for c in calls:
            fn = c.get("function") if isinstance(c, dict) else None
            if isinstance(fn, dict):
                n += self.text(fn.get("name")) + self.text(fn.get("arguments"))
        return n

    def messages(self, messages: Any) -> int:
        """Chat messages: 3 per message, its string values, 1 per name, 3 for the reply's priming."""
        if not isinstance(messages, list):
            return 0
        n = 3
        for m in messages:
            if not isinstance(m, dict):
                continue
            n += 3
            for key, value in m.items():
                if key == "content":
                    n += self.content(value)
                elif key == "tool_calls":
                    n += self.tool_calls(value)
                elif isinstance(value, str):
                    n += self.text(value)
                    if key == "name":
                        n += 1
        return n

    def tools(self, tools: Any) -> int:
        """Function definitions, by the cookbook's formula (nested schemas beyond the first level uncounted)."""
        if not isinstance(tools, list) or not tools:
            return 0
        n = 0
        for t in tools:
            if not isinstance(t, dict):
                continue
            fn: dict[str, Any] = t["function"] if isinstance(t.get("function"), dict) else t  # responses: flat
            desc = str(fn.get("description") or "").removesuffix(".")
            n += self.func_init + self.text(f"{fn.get('name') or ''}:{desc}")
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            if isinstance(props, dict) and props:
                n += 3
                for key, p in props.items():
                    p = p if isinstance(p, dict) else {}
                    n += 3
                    if isinstance(p.get("enum"), list):
                        n -= 3
                        n += sum(3 + self.text(str(item)) for item in p["enum"])
                    pdesc = str(p.get("description") or "").removesuffix(".")
                    n += self.text(f"{key}:{p.get('type') or ''}:{pdesc}")
        return n + 12

    def responses_input(self, req: dict[str, Any]) -> int:
        """A Responses API request: instructions and input (a string or a list of items)."""
        items = req.get("input")
        msgs: list[dict[str, Any]] = []
        if isinstance(req.get("instructions"), str):
            msgs.append({"role": "system", "content": req["instructions"]})
        if isinstance(items, str):
            msgs.append({"role": "user", "content": items})
        n = 0
        for it in items if isinstance(items, list) else ():
            if not isinstance(it, dict):
                continue
            if "content" in it or it.get("type") == "message":
                msgs.append({"role": it.get("role") or "user", "content": it.get("content")})
            elif it.get("type") == "function_call":
                n += 3 + self.text(it.get("name")) + self.text(it.get("arguments"))
            elif it.get("type") == "function_call_output":
                n += 3 + self.content(it.get("output"))
        return n + self.messages(msgs)

    def prompt(self, prompt: Any) -> int:
        """A legacy completions prompt: text, texts, or token ids already."""
        if isinstance(prompt, str):
            return self.text(prompt)
        if isinstance(prompt, list):
            return sum(self.text(p) if isinstance(p, str) else len(p) if isinstance(p, list) else 1
                       for p in prompt)
        return 0

    def answer(self, kind: str, body: Any, text: str) -> int:
        """The answer rebuilt from a stream: every choice's text, refusal and tool calls (chat,
        completions), or the output items (responses); the reassembled text when there is nothing else."""
        n = 0
        if isinstance(body, dict) and kind == "responses":
            for it in body.get("output") or ():
                if not isinstance(it, dict):
                    continue
                n += self.content(it.get("content"))
                n += self.text(it.get("name")) + self.text(it.get("arguments"))
        elif isinstance(body, dict):
            for ch in body.get("choices") or ():
                if not isinstance(ch, dict):
                    continue
                msg: dict[str, Any] = ch["message"] if isinstance(ch.get("message"), dict) else {}
                n += self.text(msg.get("content")) + self.text(msg.get("refusal")) + self.text(ch.get("text"))
                n += self.tool_calls(msg.get("tool_calls"))
        return n or self.text(text)


def estimate(kind: str, model: str | None, request: Any, body: Any, text: str) -> tuple[int, int]:
    """(input, output) tokens of a ``kind`` call (chat.completions, completions, responses) whose stream
    gave no usage: from the request JSON and the answer rebuilt from the stream."""
    c = Counter(model)
    req = request if isinstance(request, dict) else {}
    if kind == "responses":
        inp = c.responses_input(req) + c.tools(req.get("tools"))
    elif kind == "completions":
        inp = c.prompt(req.get("prompt")) + c.text(req.get("suffix"))
    else:
        inp = c.messages(req.get("messages")) + c.tools(req.get("tools")) + c.tools(
            [{"function": f} for f in req.get("functions") or () if isinstance(f, dict)])
    return inp, c.answer(kind, body, text)
