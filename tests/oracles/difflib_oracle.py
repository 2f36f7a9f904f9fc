#!/usr/bin/env python3
"""Oracle for src/data/diff.rs: CPython's own difflib plus the DDPO changed-segment rule (docs/algorithm.md).

stdin:  JSON lines {"a": [...], "b": [...], "min_match": k}   (a = rejected ids, b = chosen ids)
stdout: JSON lines {"blocks": [[i, j, n], ...], "chosen": [0/1, ...], "rejected": [0/1, ...]}

The rule is written here independently of the Rust code, in the shape of RLHF-V's utils/diff_lib.py
(get_match_info -> complete_modification_spans -> keep gaps whose two spans are both non-empty).
"""
import difflib
import json
import sys


def changed(a, b, blocks, min_match):
    # Keep blocks of at least min_match tokens, and always the final (len(a), len(b), 0) sentinel.
    kept = [m for m in blocks[:-1] if m[2] >= min_match] + [blocks[-1]]
    a_spans = [(m[0], m[0] + m[2]) for m in kept]
    b_spans = [(m[1], m[1] + m[2]) for m in kept]
    rejected = [0] * len(a)
    chosen = [0] * len(b)
    a_prev_end = 0
    b_prev_end = 0
    for (a_start, a_end), (b_start, b_end) in zip(a_spans, b_spans):
        a_gap = range(a_prev_end, a_start)
        b_gap = range(b_prev_end, b_start)
        if len(a_gap) > 0 and len(b_gap) > 0:
            for t in a_gap:
                rejected[t] = 1
            for t in b_gap:
                chosen[t] = 1
        a_prev_end, b_prev_end = a_end, b_end
    return chosen, rejected


def main():
    out = sys.stdout
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        case = json.loads(line)
        a, b, k = case["a"], case["b"], case["min_match"]
        blocks = [tuple(m) for m in difflib.SequenceMatcher(None, a, b).get_matching_blocks()]
        chosen, rejected = changed(a, b, blocks, k)
        out.write(json.dumps({"blocks": [list(m) for m in blocks], "chosen": chosen, "rejected": rejected},
                             separators=(",", ":")))
        out.write("\n")
    out.flush()


if __name__ == "__main__":
    main()
