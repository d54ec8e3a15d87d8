"""Write the tokenizer parity corpus to tests/data/tokenizer_text/ (deterministic; about 1.2 MB).

    python scripts/make_tokenizer_corpus.py [--shared /work/shared/data] [--out tests/data/tokenizer_text]

Five JSONL files of {"text": ...} documents, each a unit the tests compare on its own:
english (public-domain Gutenberg text), multilingual (hand-written sentences in 25 languages, real
machine-translated / Chinese prompts from the shared data, and seeded synthetic text in 20 scripts),
code (synthetic code in ten languages), digits (numbers in many notations and scripts) and
whitespace (runs of every Unicode space, CR/LF mixes, contractions). The synthetic parts come from a
seeded random.Random, so the same command gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240601

# Sentences written for this corpus (a few well-known pangrams among them).
# fmt: off
SENTENCES = {
    "ru": ["Съешь же ещё этих мягких французских булок, да выпей чаю.",
           "Вчера вечером мы долго гуляли по набережной и обсуждали новые книги.",
           "«Ёлки-палки», — сказал он, увидев счёт за электричество: 4 317,50 ₽."],
    "uk": ["Чуєш їх, доцю, га? Кумедна ж ти, прощайся без ґольфів!", "Сьогодні в Києві тепло й сонячно."],
    "el": ["Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.", "Η βιβλιοθήκη ανοίγει στις εννέα το πρωί· μην αργήσεις;"],
    "ar": ["صِف خَلقَ خَودِ كَمِثلِ الشَمسِ إِذ بَزَغَت", "ذهبت إلى المكتبة صباح اليوم لأستعير كتابا عن تاريخ العلوم.",
           "هل تعرف كم الساعة الآن؟ إنها الثالثة والنصف."],
    "he": ["דג סקרן שט בים מאוכזב ולפתע מצא חברה.", "מחר נלך לים אם מזג האוויר יהיה נעים."],
    "fa": ["امروز هوا خیلی خوب است و ما به پارک می‌رویم.", "کتاب‌ها را روی میز گذاشتم."],
    "hi": ["आज सुबह मैंने बाज़ार से ताज़ी सब्ज़ियाँ खरीदीं।", "क्या आप कल शाम को खाली हैं? चलिए फ़िल्म देखते हैं।"],
    "bn": ["আমি প্রতিদিন সকালে বই পড়ি।", "আজ বৃষ্টি হবে কি না কে জানে?"],
    "ta": ["நான் நேற்று சென்னைக்குச் சென்றேன்.", "இந்த புத்தகம் மிகவும் சுவாரசியமாக உள்ளது."],
    "th": ["วันนี้อากาศดีมาก เราจะไปเที่ยวทะเลกัน", "ฉันชอบกินข้าวเหนียวมะม่วงมากที่สุด"],
    "ja": ["いろはにほへと ちりぬるを わかよたれそ つねならむ",
           "今日は東京で新しいカメラを買いました。週末に京都へ行く予定です。",
           "コンピューター・プログラミングは楽しい！「ｈｅｌｌｏ」と全角で書いてみる。"],
    "ko": ["다람쥐 헌 쳇바퀴에 타고파.", "오늘 저녁에 친구들과 함께 한국 음식을 먹었습니다.", "내일은 비가 올까요?"],
    "zh": ["我能吞下玻璃而不伤身体。", "今天下午我们在图书馆讨论了机器学习的最新进展。",
           "臺灣的夜市非常熱鬧，尤其是週末。"],
    "vi": ["Tôi có thể ăn thủy tinh mà không hại gì.", "Hôm nay trời đẹp quá, chúng ta đi dạo nhé!"],
    "tr": ["Pijamalı hasta yağız şoföre çabucak güvendi.", "İstanbul'da ıslak ışıklar; İĞDIR ve ığdır."],
    "pl": ["Zażółć gęślą jaźń.", "Pchnąć w tę łódź jeża lub ośm skrzyń fig."],
    "de": ["Falsches Üben von Xylophonmusik quält jeden größeren Zwerg.", "Die Straße heißt „Am Weißen Fluß“."],
    "fr": ["Voix ambiguë d'un cœur qui, au zéphyr, préfère les jattes de kiwis.",
           "L'été dernier, j'ai vu « Les Misérables »."],
    "es": ["El veloz murciélago hindú comía feliz cardillo y kiwi.", "¿Dónde está la estación? ¡Allí!"],
    "ka": ["სწრაფი ყავისფერი მელა ხტება ზარმაც ძაღლზე."],
    "hy": ["Բարև ձեզ, ինչպե՞ս եք։"],
    "am": ["ሰላም ለዓለም። እንዴት ነህ?"],
    "is": ["Kæmi ný öxi hér, ykist þjófum nú bæði víl og ádrepa."],
    "emoji": ["👩‍💻 writes code; 🧑🏽‍🚀 flies. 🏳️‍🌈 🇯🇵 🇺🇦 ❤️‍🔥 👍🏻👍🏿 ✨🤖🎉",
              "I ❤ ☕ and 🍕! (╯°□°)╯︵ ┻━┻ ¯\\_(ツ)_/¯"],
    "marks": ["e\u0301 a\u0308 n\u0303 Z̤͔ͧ̑̓ä͖̭̈̇l͖͎g͞ơ̶ ﬁﬂ ǅ Å Ω ｆｕｌｌ ⅷ ㎏ ℌ𝔢𝔩𝔩𝔬 𝐁𝐨𝐥𝐝 ⓐⓑ"],
}
# fmt: on


def _chars(*ranges: tuple[int, int]) -> list[str]:
    return [chr(c) for lo, hi in ranges for c in range(lo, hi + 1)]


# Letter sets for synthetic words; some (CJK, Hangul, astral scripts) cover rare characters on purpose.
SCRIPTS = {
    "cyrillic": _chars((0x430, 0x44F), (0x410, 0x42F), (0x451, 0x451), (0x456, 0x457)),
    "greek": _chars((0x3B1, 0x3C9), (0x391, 0x3A9), (0x3AC, 0x3AF)),
    "arabic": _chars((0x621, 0x64A), (0x64B, 0x652)),
    "hebrew": _chars((0x5D0, 0x5EA)),
    "devanagari": _chars((0x915, 0x939), (0x93E, 0x94D)),
    "bengali": _chars((0x995, 0x9B9), (0x9BE, 0x9CC)),
    "tamil": _chars((0xB95, 0xBB9), (0xBBE, 0xBCD)),
    "thai": _chars((0xE01, 0xE2E), (0xE30, 0xE3A), (0xE40, 0xE4E)),
    "hangul": _chars((0xAC00, 0xD7A3)),
    "hiragana": _chars((0x3041, 0x3096)),
    "katakana": _chars((0x30A1, 0x30FA), (0x30FC, 0x30FC)),
    "cjk": _chars((0x4E00, 0x9FFF)),
    "cjk_ext_b": _chars((0x20000, 0x2A6DF)),
    "georgian": _chars((0x10D0, 0x10F0)),
    "armenian": _chars((0x561, 0x586)),
    "ethiopic": _chars((0x1200, 0x135A)),
    "latin_ext": _chars((0xC0, 0xFF), (0x100, 0x17F), (0x1E00, 0x1EFF)),
    "math_alnum": _chars((0x1D400, 0x1D6A5)),
    "emoji": _chars((0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF)),
    "cherokee_runic": _chars((0x13A0, 0x13F4), (0x16A0, 0x16EA)),
}
SCRIPT_PUNCT = ["", "", ",", ".", "、", "。", "،", "؟", "।", "!", "?", ";", ":", "»", "…", "—", "·"]
EMOJI_SEQS = ["👨‍👩‍👧‍👦", "🧑🏾‍🔬", "🏴‍☠️", "🇫🇷", "🇧🇷", "🫶🏼", "✌️", "☺︎", "🔥", "💯", "🙏🏽", "🤦‍♀️"]


def synthetic_words(rng: random.Random, script: str, n: int) -> str:
    letters = SCRIPTS[script]
    words = []
    for _ in range(n):
        word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 9)))
        words.append(word + rng.choice(SCRIPT_PUNCT))
        if rng.random() < 0.05:
            words.append(rng.choice(EMOJI_SEQS))
        if rng.random() < 0.04:
            words.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
    sep = "" if script in ("cjk", "cjk_ext_b", "hiragana", "katakana", "thai") and rng.random() < 0.7 else " "
    return sep.join(words)


def multilingual_docs(rng: random.Random, shared: Path | None, target: int) -> list[str]:
    docs = []
    if shared is not None:  # real non-English text: machine-translated prompts (MIT) and Chinese (Apache-2.0)
        for line in (shared / "web" / "messy_mix.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("labels", {}).get("lang") not in (None, "en"):
                docs.append(row["text"])
    langs = sorted(SENTENCES)
    for lang in langs:  # every hand-written sentence at least once, unchanged
        docs.append("\n".join(SENTENCES[lang]))
    scripts = sorted(SCRIPTS)
    size = sum(len(d.encode()) for d in docs)
    while size < target:
        parts = []
        for _ in range(rng.randint(2, 6)):
            if rng.random() < 0.5:
                lang = rng.choice(langs)
                parts.append(" ".join(rng.choice(SENTENCES[lang]) for _ in range(rng.randint(1, 4))))
            else:
                parts.append(synthetic_words(rng, rng.choice(scripts), rng.randint(5, 60)))
        doc = rng.choice(["\n", "\n\n", " ", "\n\n\n"]).join(parts)
        docs.append(doc)
        size += len(doc.encode())
    return docs


# ---- code ---------------------------------------------------------------------------------------

IDENTS = (
    "x y idx value buf count total_len HTTPServer parse_json kMaxSize __init__ self tmp2 resultSet user_id dataFrame"
    " π naïve données переменная 変数 _"
).split()


def _ident(rng: random.Random) -> str:
    return rng.choice(IDENTS) + (str(rng.randint(0, 99)) if rng.random() < 0.2 else "")


def _code_python(rng: random.Random) -> str:
    a, b, c = _ident(rng), _ident(rng), _ident(rng)
    ind = rng.choice(["    ", "  ", "\t"])
    return (
        f'@dataclass(frozen=True)\nclass {a.title()}Config:\n{ind}"""Settings for {b}."""\n\n'
        f"{ind}{b}: int = {rng.randint(0, 10**6)}\n{ind}{c}: float = {rng.random():.6g}\n\n"
        f"def {a}({b}: list[int], *, {c}: str | None = None) -> dict[str, int]:\n"
        f"{ind}# TODO(alice): it's O(n^2); don't ship\n"
        f"{ind}out = {{k: v ** 2 for k, v in enumerate({b}) if v % {rng.randint(2, 9)} == 0}}\n"
        f"{ind}if {c} is not None and not {c}.startswith('__'):\n"
        f'{ind}{ind}raise ValueError(f"bad {{{c}!r}}: expected <= {rng.randint(1, 999)}")\n'
        f"{ind}return out\n\n\nif __name__ == \"__main__\":\n{ind}print({a}([1, 2, 3]))  # → {{'0': 1}}\n"
    )


def _code_c(rng: random.Random) -> str:
    a, b = _ident(rng).replace("π", "pi"), _ident(rng)
    return (
        f"#include <stdio.h>\n#include <stdint.h>\n\n/* {b}: returns -1 on error */\n"
        f"static int {a}(const uint8_t *buf, size_t n) {{\n\tuint32_t h = 0x{rng.getrandbits(32):08x}u;\n"
        f"\tfor (size_t i = 0; i < n; ++i) {{\n\t\th ^= buf[i];\n\t\th *= 16777619u;\n\t}}\n"
        f'\tif (h == 0xFFFFFFFF) return -1;\n\tprintf("%s: %08x\\n", __func__, h);\n\treturn (int)(h & 0x7f);\n}}\n'
    )


def _code_js(rng: random.Random) -> str:
    a, b = _ident(rng), _ident(rng)
    return (
        f"export const {a} = async ({b} = {{}}) => {{\n  const res = await fetch(`/api/v1/items/${{{b}.id ?? 0}}`);\n"
        f"  if (!res.ok) throw new Error(`HTTP ${{res.status}}`);\n  return (await res.json()).filter(x => x.score >= "
        f"{rng.random():.3f} && /^[a-z0-9_-]{{3,16}}$/i.test(x.name));\n}};\n"
    )


def _code_rust(rng: random.Random) -> str:
    a = _ident(rng).lower()
    return (
        f"impl<'a> Parser<'a> {{\n    pub fn {a}(&mut self, s: &'a str) -> Result<Vec<u64>, Box<dyn Error>> {{\n"
        f"        let v: Vec<u64> = s.split(',').map(|t| t.trim().parse()).collect::<Result<_, _>>()?;\n"
        f'        println!("{{:?}} ({{}} items)", v, v.len());\n        Ok(v)\n    }}\n}}\n'
    )


def _code_markup(rng: random.Random) -> str:
    n = rng.randint(1, 500)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>Item #{n}</title>\n'
        f"<style>.card{{margin:0 auto;padding:{rng.randint(0, 32)}px;"
        f"color:#{rng.getrandbits(24):06x}}}</style></head>\n"
        f'<body>\n  <div class="card" data-id="{n}">&lt;b&gt;bold&lt;/b&gt; &amp; &#x1F600;</div>\n</body>\n</html>\n'
    )


def _code_data(rng: random.Random) -> str:
    rows = ",\n".join(
        f'    {{"id": {i}, "name": "item_{i}", "price": {rng.random() * 1000:.2f}, "tags": ["a", "b"]}}'
        for i in range(rng.randint(1, 5))
    )
    return (
        f'{{\n  "version": "1.{rng.randint(0, 20)}.{rng.randint(0, 99)}",\n  "items": [\n{rows}\n  ],\n'
        f'  "enabled": true, "ratio": -1.5e-3, "nested": {{"empty": [], "null": null}}\n}}\n'
        f"---\nserver:\n  host: 127.0.0.1\n  port: {rng.randint(1024, 65535)}\n  paths: [/v1, '/v2/*']\n"
    )


def _code_shell_sql(rng: random.Random) -> str:
    return (
        "#!/usr/bin/env bash\nset -euo pipefail\nfor f in ./data/*.txt; do\n"
        "  wc -l \"$f\" | awk '{print $1}' >> out.log 2>&1\n"
        f'done\n[[ -n "${{HOME:-}}" ]] && echo "ok" || exit {rng.randint(1, 9)}\n\n'
        f"SELECT u.id, COUNT(*) AS n FROM users u LEFT JOIN orders o ON o.user_id = u.id\n"
        f"WHERE u.created_at >= '2024-0{rng.randint(1, 9)}-01' GROUP BY u.id HAVING n > {rng.randint(0, 50)};\n"
    )


def _code_doc(rng: random.Random) -> str:
    return (
        f"## Results ({rng.randint(1, 9)} runs)\n\n| model | acc | ms/tok |\n|---|---:|---:|\n"
        f"| base | {rng.random():.3f} | {rng.uniform(1, 90):.1f} |\n\n"
        f"$$\\mathcal{{L}} = -\\sum_{{t=1}}^{{T}} \\log p_\\theta(x_t \\mid x_{{<t}})$$\n\n"
        f"```diff\n-    return x\n+    return x + {rng.randint(1, 9)}\n```\n> Note: `x_{{t}}` isn't defined.\n"
    )


CODE_MAKERS = [_code_python, _code_c, _code_js, _code_rust, _code_markup, _code_data, _code_shell_sql, _code_doc]


def code_docs(rng: random.Random, target: int) -> list[str]:
    docs, size = [], 0
    while size < target:
        doc = "\n".join(rng.choice(CODE_MAKERS)(rng) for _ in range(rng.randint(1, 4)))
        docs.append(doc)
        size += len(doc.encode())
    return docs


# ---- digits and whitespace ----------------------------------------------------------------------

# fmt: off
DIGIT_SETS = ["0123456789", "٠١٢٣٤٥٦٧٨٩", "۰۱۲۳۴۵۶۷۸۹", "०१२३४५६७८९", "০১২৩৪৫৬৭৮৯",
              "０１２３４５６７８９", "๐๑๒๓๔๕๖๗๘๙"]
# fmt: on


def _number(rng: random.Random) -> str:
    kind = rng.randrange(12)
    n = rng.randint(0, 10 ** rng.randint(1, 40))
    if kind == 0:
        return f"{n:,}"
    if kind == 1:
        return f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 9)}f}"
    if kind == 2:
        return f"{rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30):.6e}"
    if kind == 3:
        return hex(n) if rng.random() < 0.5 else f"0b{n % 4096:b}"
    if kind == 4:
        return (
            f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:00Z"
        )
    if kind == 5:
        return ".".join(str(rng.randint(0, 255)) for _ in range(4)) + f":{rng.randint(1, 65535)}"
    if kind == 6:
        return f"+1 ({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"
    if kind == 7:
        digits = rng.choice(DIGIT_SETS)
        return "".join(digits[int(d)] for d in str(n))
    if kind == 8:
        return f"{rng.randint(0, 99)}/{rng.randint(1, 99)} {rng.randint(1, 99)}% ½ ¾ x² 10⁻³ Ⅻ ①"
    if kind == 9:
        return f"v{rng.randint(0, 9)}.{rng.randint(0, 99)}.{rng.randint(0, 999)}-rc{rng.randint(1, 9)}"
    if kind == 10:
        return f"{rng.randint(0, 999)} + {rng.randint(0, 999)} * ({rng.randint(0, 99)} - {rng.randint(0, 9)}) = ?"
    return str(n)


def digit_docs(rng: random.Random, target: int) -> list[str]:
    docs, size = [], 0
    while size < target:
        lines = []
        for _ in range(rng.randint(3, 30)):
            sep = rng.choice([" ", ", ", "\t", " | ", "", "; "])
            lines.append(sep.join(_number(rng) for _ in range(rng.randint(1, 8))))
        doc = "\n".join(lines)
        docs.append(doc)
        size += len(doc.encode())
    return docs


# fmt: off
SPACES = [" ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\n\n", "\u00a0", "\u2002", "\u2003", "\u2009", "\u200a",
          "\u3000", "\u202f", "\u205f", "\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\u200b", "\u1680",
          " \n ", "\t\t\n"]
# fmt: on
WORDS = (
    "the cat I'm YOU'RE it's they'Ll WE'VE she'D don't 'tis rock'n'roll ’s it’s ''s foo Bar é x 42 ( ) { } . ... --"
    " λ 日本 😀 ' \" # a'B"
).split()


def whitespace_docs(rng: random.Random, target: int) -> list[str]:
    docs, size = [], 0
    while size < target:
        parts = []
        if rng.random() < 0.3:
            parts.append(rng.choice(SPACES) * rng.randint(1, 5))  # leading whitespace
        for _ in range(rng.randint(5, 120)):
            parts.append(rng.choice(WORDS))
            ws = rng.choice(SPACES)
            parts.append(ws * (rng.randint(1, 40) if rng.random() < 0.15 else 1))
        if rng.random() < 0.2:
            parts.append(" " * rng.randint(1, 300))  # long trailing run
        doc = "".join(parts)
        docs.append(doc)
        size += len(doc.encode())
    return docs


def english_docs(shared: Path | None, target: int) -> list[str]:
    if shared is None:
        return []
    docs, size = [], 0
    for name in ("alice_in_wonderland.txt", "frankenstein.txt"):
        text = (shared / "corpus" / "gutenberg" / name).read_text(encoding="utf-8")
        chunk = []
        for para in text.split("\n\n"):  # documents of whole paragraphs, about 3 KB each
            chunk.append(para)
            if sum(len(p) for p in chunk) > 3000:
                docs.append("\n\n".join(chunk))
                size += len(docs[-1].encode())
                chunk = []
                if size >= target:
                    return docs
        if chunk:
            docs.append("\n\n".join(chunk))
            size += len(docs[-1].encode())
    return docs


def write_jsonl(path: Path, docs: list[str]) -> int:
    data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    path.write_text(data, encoding="utf-8", newline="\n")
    return len(data.encode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path("/work/shared/data"), help="shared data folder (corpus/, web/)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/tokenizer_text")
    args = ap.parse_args()
    shared = args.shared if args.shared.is_dir() else None
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    files = {
        "english.jsonl": english_docs(shared, 330_000),
        "multilingual.jsonl": multilingual_docs(rng, shared, 380_000),
        "code.jsonl": code_docs(rng, 200_000),
        "digits.jsonl": digit_docs(rng, 110_000),
        "whitespace.jsonl": whitespace_docs(rng, 110_000),
    }
    total = 0
    for name, docs in files.items():
        n = write_jsonl(args.out / name, docs)
        total += n
        print(f"{name}: {len(docs)} documents, {n:,} bytes")
    print(f"total {total:,} bytes")


if __name__ == "__main__":
    main()
