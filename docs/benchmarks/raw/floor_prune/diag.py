"""Per layer: are the needle's code tokens kept after prefill? Unbatched, seed-7 needle prompts."""
import json
import sys

import torch

sys.path.insert(0, "/work/main/tests")
import needles

from kvpolicy import make_cache
from kvpolicy.models import load_model

model, tok = load_model()
inputs, answers, lengths = needles.build(tok, seed=int(sys.argv[1]) if len(sys.argv) > 1 else 7)
out = {}
for mode in ("cache_only", "prune_hidden"):
    rows = []
    for r, (code, n) in enumerate(zip(answers, lengths)):
        ids = inputs["input_ids"][r, -n:].unsqueeze(0)
        # code tokens: tokens of the needle sentence's number
        sent = tok(f" is {code}.", add_special_tokens=False)["input_ids"]
        code_ids = tok(f" is {code}.", add_special_tokens=False, return_offsets_mapping=True)
        lst = ids[0].tolist()
        start = next(i for i in range(len(lst)) if lst[i:i + len(sent)] == sent)
        pos = list(range(start + 1, start + len(sent) - 1))  # digits only (drop " is" and ".")
        cache = make_cache(f"/tmp/floor_prune/floor08_{mode}.yaml")
        with torch.no_grad():
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                               max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
        ans = tok.decode(g[0, n:], skip_special_tokens=True)
        kept = []
        for layer_idx in range(len(cache.layers)):
            kp = set(cache.kept_positions(layer_idx)[0, 0].tolist())
            kept.append(sum(p in kp for p in pos))
        rows.append({"code": code, "found": code in ans, "answer": ans, "digit_tokens": len(pos),
                     "digit_tokens_kept_per_layer": kept})
        print(mode, r, code in ans, repr(ans), kept, flush=True)
    out[mode] = rows
json.dump(out, open(sys.argv[2], "w"), indent=1)
