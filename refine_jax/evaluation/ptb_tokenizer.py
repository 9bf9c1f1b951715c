"""PTB tokenisation exactly as the COCO caption evaluation (pycocoevalcap) runs it, in Python.

CoreNLP 3.4.1 `PTBTokenizer -preserveLines -lowerCase`, then the removal of the punctuation
tokens pycocoevalcap drops: a reimplementation of the lexer's rules, checked token for token
against the Java tokenizer (all 35,000 Flickr8k captions, tricky probes, seeded random strings
and a sweep of every BMP character).

Known differences from the Java tokenizer (none occurs on the Flickr8k captions):

- Letters are the BMP letters of Python's Unicode table, minus the code points the Java lexer
  (generated from an older Unicode table) does not know, measured on Python's Unicode 14 table.
  Letters or digits that are new in a later Unicode version are kept here but deleted by Java.
- `java_lower` decides Greek final sigma with a simple in-word scan; Java uses a word
  BreakIterator, so rare mixed letter/digit/punctuation words may lowercase a capital sigma
  differently.
- The line-break characters \\r, \\v, \\f, U+2028 and U+2029 inside one caption are treated as
  spaces. The Java tokenizer ends the line there, which makes pycocoevalcap attach the rest of the
  tokens to the wrong captions; pycocoevalcap itself only replaces "\\n".
- `tokenize_for_eval` sees one caption, as if it were the last line of the file. In pycocoevalcap
  all captions go through Java as one file, and three lexer rules look past the end of a line
  (an abbreviation such as "etc." or "Inc." before an upper-case letter or a blank line, an
  acronym such as "U.S." before a word such as "The", and "no."/"fig." before a digit), so the next
  caption can change how a caption's final token is split. `tokenize_many` reproduces that
  stream behaviour exactly; `evaluate_captions` uses it.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# ==============================================================================================
# PTB tokenisation (CoreNLP 3.4.1 PTBLexer, as run by pycocoevalcap).
# ==============================================================================================

# Code points (BMP) that Python's Unicode table calls letters or digits but the Java lexer deletes
# as untokenizable: they were assigned after the Unicode version the lexer was generated with.
_NEWER_THAN_LEXER = (
    "037f 0528-052f 0560 0588 05ef 0860-086a 0870-0887 0889-088e 08a1 08ad-08c9 0978 0980 09fc "
    "0af9 0c34 0c5a 0c5d 0c80 0cdd 0d04 0d54-0d56 0d5f 0de6-0def 0e86 0e89 0e8c 0e8e-0e93 0e98 "
    "0ea0 0ea8-0ea9 0eac 13f5 13f8-13fd 16f1-16f8 170d 171f 1878 191d-191e 19b0-19c0 19c8-19c9 "
    "1b4c 1c80-1c88 1c90-1cba 1cbd-1cbf 1cf2-1cf3 1cfa 2c2f 2c5f 312e-312f 31bb-31bf 4db6-4dbf "
    "9fcd-9fff a698-a69d a78f a794-a79f a7ab-a7ca a7d0-a7d1 a7d3 a7d5-a7d9 a7f2-a7f7 a8fd-a8fe "
    "a9e0-a9e4 a9e6-a9fe aa7e-aa7f ab30-ab5a ab5c-ab69 ab70-abbf"
)
# Mongolian letters that are combining marks in today's Unicode but letters to the lexer.
_OLD_LETTERS = "\u1885\u1886"


def _unicode_classes() -> dict[str, str]:
    """Regex character classes for the lexer's letters, digits and upper-case letters (BMP only:
    the Java lexer reads UTF-16 units, so characters outside the BMP are untokenizable)."""
    excluded: set[int] = set()
    for part in _NEWER_THAN_LEXER.split():
        lo, _, hi = part.partition("-")
        excluded.update(range(int(lo, 16), int(hi or lo, 16) + 1))
    members: dict[str, list[int]] = {"let": [], "dig": [], "upper": []}
    for cp in range(0x10000):
        if 0xD800 <= cp <= 0xDFFF or cp in excluded:
            continue
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if cat[0] == "L" or ch in _OLD_LETTERS:
            members["let"].append(cp)
        if cat == "Nd":
            members["dig"].append(cp)
        if cat == "Lu":
            members["upper"].append(cp)
    classes = {}
    for name, cps in members.items():
        parts, start = [], cps[0]
        for prev, cur in zip(cps, cps[1:] + [-1], strict=True):
            if cur != prev + 1:
                lo, hi = re.escape(chr(start)), re.escape(chr(prev))
                parts.append(lo if start == prev else f"{lo}-{hi}")
                start = cur
        classes[name] = "[" + "".join(parts) + "]"
    return classes


_CLASSES = _unicode_classes()
_LET = _CLASSES["let"]
_DIG = _CLASSES["dig"]
_ALNUM = _LET[:-1] + _DIG[1:]
_UPPER = _CLASSES["upper"]

_SP = "[ \t\u00a0\u2000-\u200a\u3000]"
_NL = "(?:\r\n|[\r\n\u2028\u2029\x0b\x0c\x85])"
_SPNL = f"(?:{_SP}|{_NL})"
# Letters plus the combining marks and modifier letters the lexer counts as word characters.
_LETTER = (
    _LET[:-1]
    + "\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u037d\u0384\u0385"
    "\u03cf\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f"
    "\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e"
    "\u0670\u06d6-\u06ef\u06fa-\u06ff\u070f\u0711\u0730-\u074f\u0750-\u077f\u07a6-\u07b1"
    "\u07ca-\u07f5\u07fa\u0900-\u0903\u093c\u093e-\u094e\u0951-\u0955\u0962\u0963\u0981-\u0983"
    "\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7\u09e2\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f"
    "\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2\u0bc6-\u0bc8\u0bca-\u0bcd\u0c01-\u0c03"
    "\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd]"
)
_WCHAR = f"(?:{_LETTER}|&[aeiouAEIOU](?ai:acute|grave|uml);)"
_WORD = f"{_WCHAR}(?:{_WCHAR}|{_DIG})*(?:[.!?]{_WCHAR}(?:{_WCHAR}|{_DIG})*)*"
_APOS = "(?:['\u0092\u2019]|(?ai:&apos;))"
_APOS_ANY = "(?:['`\u0091\u0092\u2018\u2019\u201b]|(?ai:&apos;))"
_REDAUX = f"{_APOS}(?:[msdMSD]|(?ai:re|ve|ll))"
_SWORD = "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"
_SREDAUX = f"(?ai:n){_APOS_ANY}(?ai:t)"
_NUM = (f"{_DIG}+", f"{_DIG}*(?:[.:,\u00ad\u066b\u066c]{_DIG}+)+")
_ACRO = (
    r"[A-Za-z](?:\.[A-Za-z])*",
    r"(?ai:canada|sino|korean|eu|japan|non)-(?ai:u\.s)",
    r"(?ai:u\.s\.-(?:u\.k|u\.s\.s\.r))",
)
_SGML_NAME = r"[A-Za-z][A-Za-z0-9_:.\-]*"
_SGML = (
    rf"<(?:[!?][A-Za-z\-][^>\r\n]*|/{_SGML_NAME}"
    rf"|{_SGML_NAME}(?: +{_SGML_NAME}(?: *= *(?:'[^']*'|\"[^\"]*\"))?)* */?) *>"
)
_THING_PART = f"(?:[dDoOlL]{_APOS_ANY}{_ALNUM})?{_ALNUM}+"
_THING = f"{_THING_PART}(?:[-_\u058a\u2010\u2011]{_THING_PART})*"
_HTHING = r"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z](?:\.[A-Za-z])+\.|[A-Za-z0-9\u00ad]+))+"
_THINGA = r"[A-Z]+(?:(?:[+&]|(?ai:&amp;))[A-Z]+)+"
_FILENAME = (
    f"{_ALNUM}+(?:\\.{_ALNUM}+)*\\.(?ai:bat|bmp|bz2|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h"
    "|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip"
    "|3gp|wm[va]|avi|flv|mp[34g])"
)
# Abbreviations whose period is repeated as a sentence end before an upper-case word.
_ABBREV_END = (
    "(?:(?ai:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu(?:rs)?|fri"
    "|ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla"
    "|penn|tenn|va|vt|wisc?|wyo|inc|cos?|corp|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys"
    "|tel|est|ext|sq|jr|sr|bros|(?:ed|ph)\\.d|blvd|rd|esq|etc|al|seq|bldg)"
    "|(?ai:pp?t)[ye](?ai:s)?|A(?ai:z|rk)|D(?ai:el)|I(?ai:ll)|L(?ai:a)|M(?ai:ass|iss)|O(?ai:re)"
    "|P(?ai:a)|T(?ai:ex)|W(?ai:ash))\\."
)
# Abbreviations that are never sentence final (titles and the like), without their period.
_ABBREV_MID = (
    "(?ai:mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl"
    "|pvt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc"
    "|ens|insp|mlle|mme|msgr|sfc|vs|alex|wm|jos|cie|a\\.k\\.a|cf|treas|ph|invt|elec|natl|dept)"
    "|M(?ai:iss)|(?ai:m)[ft](?ai:g)"
)
# Words after which an acronym's period is also read as a sentence end.
_SENTENCE_STARTERS = (
    "A(?ai:bout|ccording|dditionally|fter|n|s|t)?|B(?ai:ut)|E(?ai:arlier)|H(?ai:e|er|ere|owever)"
    "|I(?ai:f|n|t)|L(?ai:ast)|M(?ai:any|ore|r\\.|s\\.)|N(?ai:ow)|O(?ai:nce|ne|ther|ur)"
    "|S(?ai:he|ince|o|ome|uch)|T(?ai:hat|he|heir|hen|here|hese|hey|his)"
    "|W(?ai:e|hen|hile|hat)|Y(?ai:et|ou)|" + _SGML
)
_INSENTP = "[,;:\u3001]"
_MISC_SYMBOL = (
    "[\u00a6-\u00a9\u00ac\u00ae-\u00ba\u00d7\u00f7\u0387\u05be\u05c0\u05c3\u05c6\u05f3\u05f4"
    "\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d\u0703-\u070d\u07f6-\u07f8"
    "\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2032-\u2038\u203b\u203e-\u2042\u2044"
    "\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u2bff\u3012\u30fb\uff01-\uff0f"
    "\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]"
)

# A lexer action maps the matched text (without trailing context) to the token it emits (None:
# nothing) and how many characters it consumes (fewer than matched: the rest is lexed again).
_Action = Callable[[str], tuple[str | None, int]]
_LINE_BREAK = "\n"


def _keep(tok: str) -> tuple[str | None, int]:
    """Emits the match as it is."""
    return tok, len(tok)


def _drop(tok: str) -> tuple[str | None, int]:
    """Consumes the match without a token (whitespace)."""
    return None, len(tok)


def _line_break(tok: str) -> tuple[str | None, int]:
    """Ends the current line (one caption per line)."""
    return _LINE_BREAK, len(tok)


def _const(value: str) -> _Action:
    """Emits a fixed normalised token (e.g. "-LRB-" for "(")."""
    return lambda tok: (value, len(tok))


def _pushback(n: int) -> _Action:
    """Emits all but the last n characters, which are lexed again ("cannot" -> "can" "not")."""
    return lambda tok: (tok[:-n], len(tok) - n)


def _soft_hyphens(tok: str) -> tuple[str | None, int]:
    """Drops soft hyphens (a token of soft hyphens only becomes "-")."""
    return tok.replace("\u00ad", "") or "-", len(tok)


def _nbsp(tok: str) -> tuple[str | None, int]:
    """Keeps a multi-word token ("5 1/2", SGML tags) whole with non-breaking spaces."""
    return tok.replace(" ", "\u00a0"), len(tok)


def _amp(tok: str) -> tuple[str | None, int]:
    """Decodes "&amp;" to "&"."""
    return re.sub("(?i)&amp;", "&", tok), len(tok)


def _parens(tok: str) -> tuple[str | None, int]:
    """PTB-escapes round brackets inside a token (smileys, phone numbers)."""
    return tok.replace("(", "-LRB-").replace(")", "-RRB-"), len(tok)


def _phone(tok: str) -> tuple[str | None, int]:
    """A phone number: one token, spaces made non-breaking, brackets escaped."""
    return _parens(tok.replace(" ", "\u00a0"))


_QUOTE_CHARS = str.maketrans(
    {
        "\u0091": "`",
        "\u2018": "`",
        "\u201b": "`",
        "\u2039": "`",
        "\u0092": "'",
        "\u2019": "'",
        "\u203a": "'",
        "\u0093": "``",
        "\u201c": "``",
        "\u00ab": "``",
        "\u0094": "''",
        "\u201d": "''",
        "\u00bb": "''",
    }
)


def _quotes(opening: bool) -> _Action:
    """Normalises quotes to LaTeX style: ` `` when opening, ' '' otherwise."""
    single, double = ("`", "``") if opening else ("'", "''")

    def act(tok: str) -> tuple[str | None, int]:
        out = re.sub("(?i)&apos;|'", single, tok)
        out = re.sub('(?i)&quot;|"', double, out)
        return out.translate(_QUOTE_CHARS), len(tok)

    return act


def _acronym_at_end(tok: str) -> tuple[str | None, int]:
    """A sentence-final acronym: one letter loses its period; a longer one keeps it and the
    period is lexed again as the sentence end."""
    return (tok[0], 1) if len(tok) == 2 else (tok, len(tok) - 1)


def _abbrev_at_end(tok: str) -> tuple[str | None, int]:
    """A sentence-final abbreviation keeps its period, which is lexed again as the end."""
    return tok, len(tok) - 1


def _dashes(tok: str) -> tuple[str | None, int]:
    """Three or four hyphens are a dash "--"; other runs stay."""
    return ("--" if 3 <= len(tok) <= 4 else tok), len(tok)


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_CURRENCY = {
    "\u00a2": "cents",
    "\u00a3": "#",
    "\u0080": "$",
    "\u00a4": "$",
    "\u20a0": "$",
    "\u20ac": "$",
}

# (alternatives, trailing context or None, action), in the lexer's priority order. At each
# position the longest match wins, trailing context included; ties go to the earlier rule.
_RULE_SPECS: list[tuple[Sequence[str], str | None, _Action]] = [
    ((r"(?ai:c\+\+|[cf]#)",), None, _keep),
    (("(?ai:cannot|'twas)",), None, _pushback(3)),
    ((f"{_APOS}(?ai:tis)", "(?ai:gonna|gotta|lemme|gimme|wanna)"), None, _pushback(2)),
    ((_SGML,), None, _nbsp),
    (("(?ai:&(?:md|mdash|ndash);)", "[\u0096\u0097\u2013\u2014\u2015]"), None, _const("--")),
    (("(?ai:&amp;)",), None, _const("&")),
    (("(?ai:&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);)",), None, _keep),
    ((_WORD,), _REDAUX, _soft_hyphens),
    ((_SWORD,), _SREDAUX, _soft_hyphens),
    ((_WORD,), None, _soft_hyphens),
    (
        (
            f"{_APOS}(?ai:n){_APOS}?",
            f"[lLdDjJ]{_APOS}",
            f"(?ai:dunkin|somethin|ol){_APOS}",
            f"{_APOS}(?ai:em)",
            f"[A-HJ-XZn]{_APOS_ANY}{_LET}{{2,}}",
            f"{_APOS}[2-9]0(?ai:s)",
            f"{_APOS}(?ai:till?)",
            f"{_LET}+[aeiouyAEIOUY]{_APOS_ANY}[aeiouA-Z]{_LET}*",
            f"{_APOS}(?ai:cause)",
            r"(?ai:cont'd\.?)",
            "(?ai:nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)",
            f"(?ai:o){_APOS_ANY}(?ai:o)",
        ),
        None,
        _keep,
    ),
    ((f"(?ai:y){_APOS}",), _LET, _keep),
    ((r'(?ai:https?)://[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-]',), None, _keep),
    (
        (
            r'(?:(?ai:www)\.(?:[^ \t\n\f\r"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}'
            r'|(?:[^ \t\n\f\r"`'
            "'"
            r"<>|.!?(){},-_$]+\.)+(?ai:com|net|org|edu))"
            r'(?:/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-])?',
        ),
        None,
        _keep,
    ),
    (
        (
            r'(?:(?ai:&lt;)|<)?[a-zA-Z0-9][^ \t\n\f\r"<>|(){}\u00a0]*@'
            r'(?:[^ \t\n\f\r"<>|(){}.\u00a0]+\.)*[^ \t\n\f\r"<>|(){}.\u00a0]+(?:(?ai:&gt;)|>)?',
        ),
        None,
        _keep,
    ),
    (("@[a-zA-Z_][a-zA-Z_0-9]*", f"#{_LETTER}+"), None, _keep),
    ((_REDAUX,), "[^A-Za-z]", _quotes(False)),
    ((_SREDAUX,), None, _quotes(False)),
    ((f"{_DIG}{{1,2}}[\\-/]{_DIG}{{1,2}}[\\-/]{_DIG}{{2,4}}",), None, _keep),
    (tuple(f"[\\-+]?{num}" for num in _NUM), None, _soft_hyphens),
    (
        (
            "[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)",
        ),
        None,
        _keep,
    ),
    ((f"(?:{_DIG}{{1,4}}[- \u00a0])?{_DIG}{{1,4}}(?:\\\\?/|\u2044){_DIG}{{1,4}}",), None, _nbsp),
    (("[\u00bc\u00bd\u00be\u2153-\u215e]",), None, lambda t: (_FRACTIONS.get(t, t), len(t))),
    (
        (
            r"-(?ai:rrb|lrb|rcb|lcb|rsb|lsb)-",
            r"(?ai:c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls)",
            f"(?ai:cap){_APOS}(?ai:n)",
            f"(?ai:c){_APOS}(?ai:est)",
        ),
        None,
        _amp,
    ),
    (
        (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}",),
        None,
        _keep,
    ),
    ((r"[A-Z]*\$", "#"), None, _keep),
    (
        ("[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",),
        None,
        lambda t: (_CURRENCY.get(t, t), len(t)),
    ),
    (
        tuple(f"{acro}\\." for acro in _ACRO),
        f"{_SPNL}+(?:{_SENTENCE_STARTERS}){_SPNL}",
        _acronym_at_end,
    ),
    ((r"(?ai:ca|figs?|prop|nos?|art|bldg|pp|op)\.",), f"{_SPNL}?{_DIG}", _keep),
    ((r"(?ai:pt[eyEY]|co)\.",), f"{_SP}(?ai:ltd|lim)", _keep),
    ((_ABBREV_END,), f"{_SPNL}(?:{_SPNL}|{_UPPER}|{_SGML})", _abbrev_at_end),
    ((_ABBREV_END,), "(?s:..)", _keep),
    ((_ABBREV_END,), None, _abbrev_at_end),
    (tuple(f"(?:{a})\\." for a in (_ABBREV_MID, *_ACRO)), None, _keep),
    ((_ABBREV_MID, *_ACRO), _SP, _keep),
    (_ACRO, _SPNL, _keep),
    ((f"{_APOS}[0-9][0-9]",), _SPNL, _keep),
    ((_FILENAME,), f"(?:{_SPNL}|[.?!,]|\\Z)", _keep),
    ((_WORD + r"\.",), _INSENTP, _soft_hyphens),
    (
        (
            r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00a0])?[0-9]{2,4}[\- \u00a0])"  # noqa: E501
            r"[0-9]{3,4}[\- \u00a0]?[0-9]{3,5}",
            r"(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}",
        ),
        None,
        _phone,
    ),
    (('"|(?ai:&quot;)',), "[A-Za-z0-9$]", _quotes(True)),
    (('"|(?ai:&quot;)',), None, _quotes(False)),
    ((r"[+%&\u2030\u2031~^|\\]",), None, _keep),
    (("<<", ">>"), None, _keep),
    (("<|(?ai:&lt;)",), None, _const("<")),
    ((">|(?ai:&gt;)",), None, _const(">")),
    ((r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]",), "[^A-Za-z0-9]", _parens),
    (
        (
            r"[\-^x=~<>']_[\-^x=~<>']",
            r"\([\-^x=~<>'][_.]?[\-^x=~<>']\)",
            r"\([\^x=~<>']-[\^x=~<>'`]\)",
        ),
        None,
        _parens,
    ),
    ((r"\{",), None, _const("-LCB-")),
    ((r"\}",), None, _const("-RCB-")),
    ((r"\[",), None, _const("-LSB-")),
    ((r"\]",), None, _const("-RSB-")),
    ((r"\(",), None, _const("-LRB-")),
    ((r"\)",), None, _const("-RRB-")),
    ((r"-+",), None, _dashes),
    ((r"\.{3,5}", r"(?:\.[ \u00a0]){2,4}\.", "[\u0085\u2026]"), None, _const("...")),
    (
        (
            "@+",
            "#+",
            "_+",
            r"\*+",
            r"(?:\\\*){1,3}",
            _INSENTP,
            "[?!]+",
            "[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]",
            "=",
            "/",
        ),
        None,
        _keep,
    ),
    ((_HTHING + r"\.",), _INSENTP, _soft_hyphens),
    ((_HTHING,), None, _soft_hyphens),
    ((_THING + r"\.",), _INSENTP, _keep),
    ((_THING,), None, _keep),
    ((_THINGA + r"\.",), _INSENTP, _amp),
    ((_THINGA,), None, _amp),
    (("'",), "[A-Za-z][^ \t\n\r\u00a0]", _quotes(True)),
    ((_REDAUX,), None, _quotes(False)),
    (
        (
            _APOS,
            "''",
            "[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091-\u0094\u201e\u201f\u2039\u203a"
            "\u00ab\u00bb]{1,2}",
        ),
        None,
        _quotes(False),
    ),
    ((_MISC_SYMBOL,), None, _keep),
    ((f"\x00|{_SP}+|[\u200b\u200e\u200f\ufeff]|(?ai:&nbsp;)",), None, _drop),
    ((_NL,), None, _line_break),
]


@dataclass(frozen=True)
class _Rule:
    """A compiled lexer rule: its alternatives, whether they carry trailing context, its action."""

    patterns: tuple[re.Pattern[str], ...]
    has_context: bool
    action: _Action


@functools.cache
def _rules() -> tuple[_Rule, ...]:
    """The compiled rules, on first use: compiling them takes a fifth of a second, which every
    process importing the metrics would otherwise pay."""
    return tuple(
        _Rule(
            tuple(
                re.compile(f"(?:{alt})" if context is None else f"(?P<m>{alt})(?:{context})")
                for alt in alternatives
            ),
            context is not None,
            action,
        )
        for alternatives, context, action in _RULE_SPECS
    )


# Fast path: plain words, lone commas/periods and runs of spaces lex to themselves (or nothing);
# the words below are the plain words some rule splits.
_FAST = re.compile(r"[A-Za-z]+(?=[ \n]|\Z)|[.,](?=\n|\Z| [^.])| +")
_SPLIT_WORDS = frozenset({"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"})


def _lex(text: str) -> list[list[str]]:
    """Splits `text` into lines of PTB tokens (original case), as the Java lexer would."""
    lines: list[list[str]] = [[]]
    pos, end = 0, len(text)
    while pos < end:
        fast = _FAST.match(text, pos)
        if fast is not None and fast.group().lower() not in _SPLIT_WORDS:
            if fast.group()[0] != " ":
                lines[-1].append(fast.group())
            pos = fast.end()
            continue
        best_len, best_text, best_action = 0, "", None
        for rule in _rules():
            for pattern in rule.patterns:
                m = pattern.match(text, pos)
                if m is not None and m.end() - pos > best_len:
                    best_len = m.end() - pos
                    best_text = m.group("m") if rule.has_context else m.group()
                    best_action = rule.action
        if best_action is None:  # untokenizable character: the lexer deletes it
            pos += 1
            continue
        token, consumed = best_action(best_text)
        pos += consumed
        if token == _LINE_BREAK:
            lines.append([])
        elif token is not None:
            lines[-1].append(token)
    return lines


def _in_word(ch: str) -> bool:
    """Roughly whether `ch` continues a word for Java's final-sigma rule."""
    return ch.isalnum() or ch in ".'\u2019" or unicodedata.category(ch).startswith("M")


def _is_cased(ch: str) -> bool:
    """Whether `ch` is a cased letter (has an upper, lower or title case)."""
    return ch.islower() or ch.isupper() or ch.istitle()


def java_lower(token: str) -> str:
    """Lowercases like Java's String.toLowerCase: capital sigma becomes final sigma only after a
    cased letter and with no cased letter later in the same word."""
    if token.isascii() or "\u03a3" not in token:
        return token.lower()
    out = []
    for i, ch in enumerate(token):
        if ch != "\u03a3":
            out.append(ch.lower())
            continue
        j = i - 1
        while j >= 0 and _in_word(token[j]) and not _is_cased(token[j]):
            j -= 1
        final = j >= 0 and _in_word(token[j])
        k = i + 1
        while final and k < len(token) and _in_word(token[k]):
            final = not _is_cased(token[k])
            k += 1
        out.append("\u03c2" if final else "\u03c3")
    return "".join(out)


#: The tokens pycocoevalcap's PTBTokenizer drops after tokenising. It compares them after the
#: Java tokenizer lowercased everything, so the bracket tokens ("-lrb-", ...) survive.
PTB_PUNCTUATION = frozenset(
    {
        "''",
        "'",
        "``",
        "`",
        "-LRB-",
        "-RRB-",
        "-LCB-",
        "-RCB-",
        ".",
        "?",
        "!",
        ",",
        ":",
        "-",
        "--",
        "...",
        ";",
    }
)
_INNER_LINE_BREAKS = str.maketrans(
    {"\n": " ", "\r": " ", "\x0b": " ", "\x0c": " ", "\u2028": " ", "\u2029": " "}
)


def _finish_line(tokens: list[str]) -> str:
    """Lowercases a line's tokens and drops the punctuation tokens, as pycocoevalcap does."""
    line = " ".join(java_lower(t) for t in tokens)
    return " ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION)


def tokenize_many(captions: Sequence[str]) -> list[str]:
    """Eval-tokenises captions exactly as pycocoevalcap's PTBTokenizer does one batch: all captions
    go through the lexer as one text, one line each, so a caption may see the next one."""
    if not captions:
        return []
    lines = _lex("\n".join(c.translate(_INNER_LINE_BREAKS) for c in captions))
    lines += [[] for _ in range(len(captions) - len(lines))]
    return [_finish_line(tokens) for tokens in lines[: len(captions)]]


def tokenize_for_eval(caption: str) -> str:
    """Eval-tokenises one caption like pycocoevalcap's PTBTokenizer: PTB tokens, lowercased,
    punctuation tokens removed, joined by single spaces."""
    return _finish_line(_lex(caption.translate(_INNER_LINE_BREAKS))[0])
