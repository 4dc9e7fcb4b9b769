"""Text that is not valid Unicode, repaired one way for every input: each bad piece becomes U+FFFD and is counted.

A Python `str` can hold what no encoder accepts: lone surrogates (U+D800..U+DFFF). They reach us two ways, and a
tokenizer given one raises UnicodeEncodeError, so every path that takes text from outside repairs it first:

    bytes that were not UTF-8   argv, stdin and files decoded with `surrogateescape` keep each bad byte as U+DC80..
                                U+DCFF; `repair_decoded` turns them back into bytes and decodes those with
                                'replace', so a bad byte costs one U+FFFD and the good UTF-8 around it is kept
    JSON string escapes         `"\\ud800"` is valid JSON (a request body, a .jsonl line) that decodes to a lone
                                surrogate; `repair_json` makes every surrogate in such text one U+FFFD

Both return (text, how many were replaced), so the caller can say how many.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")
# surrogateescape's range: one code point per undecodable byte 0x80..0xFF. Other surrogates cannot come from bytes.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_NOT_AN_ESCAPED_BYTE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def repair_json(text: str) -> tuple[str, int]:
    """`text` from a JSON string with each lone surrogate as U+FFFD; (text, surrogates replaced)."""
    return _SURROGATE.subn("\ufffd", text)


def repair_decoded(text: str) -> tuple[str, int]:
    """`text` decoded with `surrogateescape` (argv, stdin, a file) with each byte that was not UTF-8 as U+FFFD, and
    any other lone surrogate (text handed in through the Python API) as one too; (text, bytes and surrogates
    replaced)."""
    if _SURROGATE.search(text) is None:  # the common case: nothing to do, no copies
        return text, 0
    bad_bytes = len(_ESCAPED_BYTE.findall(text))
    text, others = _NOT_AN_ESCAPED_BYTE.subn("\ufffd", text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), bad_bytes + others
