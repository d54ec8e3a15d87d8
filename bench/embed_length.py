"""Where LLM embedding time goes as inputs grow: `python bench/embed_length.py [TOKENS ...]`.

Embeds one input of each length with the default model (corral.load()) and times
scaled_dot_product_attention apart from the rest; attention grows as T^2, the rest as T
(docs/embeddings.md has a run).
"""

import sys
import time

import torch.nn.functional as F

import corral
from corral.embed.llm_embed import embed_rows


def main(lengths: list[int]) -> None:
    llm = corral.load()
    spent = [0.0]
    attention = F.scaled_dot_product_attention

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return attention(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    F.scaled_dot_product_attention = timed
    for T in lengths:
        ids = [1] + [451 + i % 300 for i in range(T - 1)]
        spent[0] = 0.0
        started = time.perf_counter()
        embed_rows(llm.model, [ids])
        total = time.perf_counter() - started
        print(f"{T:6d} tokens  {total:7.2f} s  attention {spent[0]:7.2f} s ({spent[0] / total:.0%})", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1024, 2048, 4096, 8192])
