//! The DDPO changed-segment diff (RLHF-V `get_diff_ids`, docs/algorithm.md).
//!
//! Which tokens get weight γ is decided by Python's `difflib.SequenceMatcher(None, rejected, chosen)`, so the
//! matcher here is an exact port of it — longest-match tie-breaking and autojunk included — rather than a
//! "better" diff: a different (even if equally minimal) alignment marks different tokens and changes the loss.
//! `tests/it/diff_oracle.rs` checks it against CPython's own difflib on thousands of cases.

use std::collections::HashMap;

/// One matching block, `a[a..a + size] == b[b..b + size]` (difflib's `Match`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Match {
    pub a: usize,
    pub b: usize,
    pub size: usize,
}

/// difflib's `get_matching_blocks()` for `SequenceMatcher(None, a, b)`: same blocks, same tie-breaking,
/// autojunk (when `b.len() >= 200`, elements occurring more than `b.len()/100 + 1` times in `b` are
/// "popular": they cannot start a match but can extend one), adjacent blocks merged as difflib does, and the
/// final sentinel `(a.len(), b.len(), 0)`.
pub fn matching_blocks(a: &[u32], b: &[u32]) -> Vec<Match> {
    let mut m = Matcher::new(a, b);
    let (la, lb) = (a.len(), b.len());

    // difflib's explicit stack (no recursion); the order only matters up to the sort below, kept anyway.
    let mut queue = vec![(0usize, la, 0usize, lb)];
    let mut blocks = Vec::new();
    while let Some((alo, ahi, blo, bhi)) = queue.pop() {
        let x = m.find_longest_match(alo, ahi, blo, bhi);
        let (i, j, k) = (x.a, x.b, x.size);
        if k > 0 {
            blocks.push(x);
            if alo < i && blo < j {
                queue.push((alo, i, blo, j));
            }
            if i + k < ahi && j + k < bhi {
                queue.push((i + k, ahi, j + k, bhi));
            }
        }
    }
    blocks.sort_unstable();

    // Collapse blocks that touch on both sides, as difflib does. With no junk set every block found is
    // already maximal within its bounds, so this never fires here; it is kept so the port stays literal.
    let mut out = Vec::with_capacity(blocks.len() + 1);
    let (mut i1, mut j1, mut k1) = (0usize, 0usize, 0usize);
    for blk in blocks {
        if i1 + k1 == blk.a && j1 + k1 == blk.b {
            k1 += blk.size;
        } else {
            if k1 > 0 {
                out.push(Match {
                    a: i1,
                    b: j1,
                    size: k1,
                });
            }
            (i1, j1, k1) = (blk.a, blk.b, blk.size);
        }
    }
    if k1 > 0 {
        out.push(Match {
            a: i1,
            b: j1,
            size: k1,
        });
    }
    out.push(Match {
        a: la,
        b: lb,
        size: 0,
    });
    out
}

/// Per-token "changed" flags for one preference pair; `true` tokens get weight γ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedMask {
    pub chosen: Vec<bool>,
    pub rejected: Vec<bool>,
}

/// RLHF-V `get_diff_ids` on response token ids: `a` = rejected, `b` = chosen; blocks shorter than
/// `min_match` are dropped (the sentinel is kept); each gap between consecutive kept blocks (and before the
/// first) pairs a rejected range with a chosen range, and when BOTH are non-empty all their tokens are marked.
/// Pure insertions/deletions are not marked; identical responses mark nothing.
pub fn changed_segments(chosen: &[u32], rejected: &[u32], min_match: usize) -> ChangedMask {
    let mut mask = ChangedMask {
        chosen: vec![false; chosen.len()],
        rejected: vec![false; rejected.len()],
    };
    let blocks = matching_blocks(rejected, chosen);
    let last = blocks.len() - 1; // never empty: the sentinel is always there
    let (mut ra, mut cb) = (0usize, 0usize); // ends of the previous kept block in rejected / chosen
    for (idx, blk) in blocks.iter().enumerate() {
        if idx != last && blk.size < min_match {
            continue;
        }
        // Blocks are strictly increasing in both sequences, so these ranges are well formed.
        if blk.a > ra && blk.b > cb {
            mask.rejected[ra..blk.a].fill(true);
            mask.chosen[cb..blk.b].fill(true);
        }
        ra = blk.a + blk.size;
        cb = blk.b + blk.size;
    }
    mask
}

/// Token weights for the DDPO score: `gamma` where `mask` is true, else 1.0.
pub fn token_weights(mask: &[bool], gamma: f32) -> Vec<f32> {
    mask.iter().map(|&m| if m { gamma } else { 1.0 }).collect()
}

/// difflib's `SequenceMatcher` state for one `(a, b)` pair: `b2j` without popular elements, plus reusable
/// scratch for the `j2len` rows so each `find_longest_match` allocates nothing.
struct Matcher<'s> {
    a: &'s [u32],
    b: &'s [u32],
    /// element -> ascending positions in `b`; popular elements removed (autojunk), as in `__chain_b`.
    b2j: HashMap<u32, Vec<usize>>,
    /// `prev[j + 1]` = difflib's `j2len[j]` (previous row), `cur[j + 1]` = `newj2len[j]`; 0 means absent.
    /// Only entries listed in the matching `*_touched` are non-zero, so clearing costs what filling did.
    prev: Vec<usize>,
    cur: Vec<usize>,
    prev_touched: Vec<usize>,
    cur_touched: Vec<usize>,
}

impl<'s> Matcher<'s> {
    fn new(a: &'s [u32], b: &'s [u32]) -> Self {
        let mut b2j: HashMap<u32, Vec<usize>> = HashMap::new();
        for (j, &x) in b.iter().enumerate() {
            b2j.entry(x).or_default().push(j);
        }
        // autojunk: difflib's default; popularity is judged on the whole of b, once.
        let n = b.len();
        if n >= 200 {
            let ntest = n / 100 + 1;
            b2j.retain(|_, idxs| idxs.len() <= ntest);
        }
        Matcher {
            a,
            b,
            b2j,
            prev: vec![0; n + 1],
            cur: vec![0; n + 1],
            prev_touched: Vec::new(),
            cur_touched: Vec::new(),
        }
    }

    /// difflib's `find_longest_match(alo, ahi, blo, bhi)` with `isjunk=None`: the longest match starting
    /// earliest in a, then earliest in b, found among non-popular elements and then extended both ways by
    /// equal elements (popular ones included). With no junk set, difflib's junk-extension loops never run.
    fn find_longest_match(&mut self, alo: usize, ahi: usize, blo: usize, bhi: usize) -> Match {
        let (a, b) = (self.a, self.b);
        let (mut besti, mut bestj, mut bestsize) = (alo, blo, 0usize);
        for (i, x) in a.iter().enumerate().take(ahi).skip(alo) {
            if let Some(js) = self.b2j.get(x) {
                let start = js.partition_point(|&j| j < blo);
                for &j in &js[start..] {
                    if j >= bhi {
                        break;
                    }
                    // j2len.get(j - 1, 0) + 1; prev[0] stays 0 and entries below blo are never set.
                    let k = self.prev[j] + 1;
                    self.cur[j + 1] = k;
                    self.cur_touched.push(j + 1);
                    if k > bestsize {
                        besti = i + 1 - k;
                        bestj = j + 1 - k;
                        bestsize = k;
                    }
                }
            }
            // j2len = newj2len: forget the old row, promote the new one.
            for &t in &self.prev_touched {
                self.prev[t] = 0;
            }
            self.prev_touched.clear();
            std::mem::swap(&mut self.prev, &mut self.cur);
            std::mem::swap(&mut self.prev_touched, &mut self.cur_touched);
        }
        for &t in &self.prev_touched {
            self.prev[t] = 0;
        }
        self.prev_touched.clear();

        // Popular elements are not in b2j, so the best match may continue through them on either side.
        while besti > alo && bestj > blo && a[besti - 1] == b[bestj - 1] {
            besti -= 1;
            bestj -= 1;
            bestsize += 1;
        }
        while besti + bestsize < ahi
            && bestj + bestsize < bhi
            && a[besti + bestsize] == b[bestj + bestsize]
        {
            bestsize += 1;
        }
        Match {
            a: besti,
            b: bestj,
            size: bestsize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(a: usize, b: usize, size: usize) -> Match {
        Match { a, b, size }
    }

    fn bits(s: &str) -> Vec<bool> {
        s.chars().map(|c| c == '1').collect()
    }

    // Expected values below were produced with CPython 3.11's difflib.

    #[test]
    fn blocks_docstring_examples() {
        // SequenceMatcher(None, "abxcd", "abcd").get_matching_blocks()
        let a: Vec<u32> = "abxcd".bytes().map(u32::from).collect();
        let b: Vec<u32> = "abcd".bytes().map(u32::from).collect();
        assert_eq!(
            matching_blocks(&a, &b),
            vec![m(0, 0, 2), m(3, 2, 2), m(5, 4, 0)]
        );
        // " abcd" vs "abcd abcd": the longest match starts earliest in a.
        let a: Vec<u32> = " abcd".bytes().map(u32::from).collect();
        let b: Vec<u32> = "abcd abcd".bytes().map(u32::from).collect();
        assert_eq!(matching_blocks(&a, &b), vec![m(0, 4, 5), m(5, 9, 0)]);
    }

    #[test]
    fn blocks_tie_breaking_and_empty() {
        // "ab" vs "acab": the whole "ab" is matched at b[2], not the "a" prefix.
        assert_eq!(
            matching_blocks(&[1, 2], &[1, 3, 1, 2]),
            vec![m(0, 2, 2), m(2, 4, 0)]
        );
        assert_eq!(matching_blocks(&[], &[]), vec![m(0, 0, 0)]);
        assert_eq!(matching_blocks(&[1, 2], &[]), vec![m(2, 0, 0)]);
        assert_eq!(matching_blocks(&[], &[1, 2]), vec![m(0, 2, 0)]);
        assert_eq!(matching_blocks(&[1, 2, 3], &[4, 5]), vec![m(3, 2, 0)]);
        // Repeats: [1,1,2] vs [1,2,1,1] -> (0,2,2), (3,4,0).
        assert_eq!(
            matching_blocks(&[1, 1, 2], &[1, 2, 1, 1]),
            vec![m(0, 2, 2), m(3, 4, 0)]
        );
    }

    #[test]
    fn blocks_autojunk() {
        // b has 200 elements, 7 appears 50 times (> 200/100 + 1 = 3): popular.
        // a = [7, 7, 7]: no non-popular match; the empty match at (0, 0) extends forward through b[0..]
        // only because b starts with 7s.
        let mut b: Vec<u32> = (0..200)
            .map(|i| if i % 4 == 0 { 7 } else { 1000 + i })
            .collect();
        let a = vec![7u32, 7, 7];
        // b[0] = 7, b[1] = 1001: the extension from (0,0) gives size 1; then the rest a[1..3] vs b[1..200]
        // finds nothing (7 cannot start a match; at (1,1) a[1]=7 != b[1]).
        assert_eq!(matching_blocks(&a, &b), vec![m(0, 0, 1), m(3, 200, 0)]);
        // A popular element cannot start a match elsewhere: put a non-popular prefix mismatch first.
        b[0] = 5;
        assert_eq!(matching_blocks(&a, &b), vec![m(3, 200, 0)]);
        // But it extends a non-popular match: a = [1003, 7, 1005] matches b[3..6].
        let a = vec![1003u32, 7, 1005];
        assert_eq!(matching_blocks(&a, &b), vec![m(0, 3, 3), m(3, 200, 0)]);
        // Below 200 elements there is no autojunk.
        let b2: Vec<u32> = b[..199].to_vec();
        assert_eq!(
            matching_blocks(&[7, 7, 7], &b2),
            vec![m(0, 4, 1), m(1, 8, 1), m(2, 12, 1), m(3, 199, 0)]
        );
    }

    #[test]
    fn identical_marks_nothing() {
        let x = [5u32, 6, 7, 8, 9, 2];
        let mk = changed_segments(&x, &x, 3);
        assert_eq!(mk.chosen, vec![false; 6]);
        assert_eq!(mk.rejected, vec![false; 6]);
        let mk = changed_segments(&[], &[], 3);
        assert!(mk.chosen.is_empty() && mk.rejected.is_empty());
    }

    #[test]
    fn empty_side_marks_nothing() {
        // One side empty: every gap has an empty range, so nothing is a change.
        let mk = changed_segments(&[1, 2, 3], &[], 3);
        assert_eq!(mk.chosen, vec![false; 3]);
        assert!(mk.rejected.is_empty());
        let mk = changed_segments(&[], &[1, 2, 3], 1);
        assert!(mk.chosen.is_empty());
        assert_eq!(mk.rejected, vec![false; 3]);
    }

    #[test]
    fn one_word_replaced() {
        // "the cat sat on the mat ." with "cat" -> "dog"
        let chosen = [1u32, 20, 3, 4, 1, 5, 6];
        let rejected = [1u32, 10, 3, 4, 1, 5, 6];
        let mk = changed_segments(&chosen, &rejected, 1);
        assert_eq!(mk.chosen, bits("0100000"));
        assert_eq!(mk.rejected, bits("0100000"));
        // With min_match 3 the leading single-token block [1] is dropped: gap (0..2, 0..2) is the change.
        let mk = changed_segments(&chosen, &rejected, 3);
        assert_eq!(mk.chosen, bits("1100000"));
        assert_eq!(mk.rejected, bits("1100000"));
    }

    #[test]
    fn multi_token_replacement_of_unequal_length() {
        let rejected = [1u32, 2, 3, 10, 11, 4, 5, 6];
        let chosen = [1u32, 2, 3, 20, 21, 22, 4, 5, 6];
        let mk = changed_segments(&chosen, &rejected, 3);
        assert_eq!(mk.rejected, bits("00011000"));
        assert_eq!(mk.chosen, bits("000111000"));
    }

    #[test]
    fn pure_insertion_and_deletion_not_marked() {
        let rejected = [1u32, 2, 3, 4, 5, 6];
        let chosen = [1u32, 2, 3, 9, 9, 4, 5, 6];
        let mk = changed_segments(&chosen, &rejected, 3);
        assert_eq!(mk.chosen, vec![false; 8]);
        assert_eq!(mk.rejected, vec![false; 6]);
        // Swapped roles: a pure deletion from rejected to chosen.
        let mk = changed_segments(&rejected, &chosen, 3);
        assert_eq!(mk.chosen, vec![false; 6]);
        assert_eq!(mk.rejected, vec![false; 8]);
        // Appended tail only.
        let mk = changed_segments(&[1, 2, 3, 4], &[1, 2, 3], 3);
        assert_eq!(mk.chosen, vec![false; 4]);
    }

    #[test]
    fn short_block_dropped_merges_neighbouring_gaps() {
        // rejected: 1 2 3 | 10 | 7 | 11 | 4 5 6 ; chosen: 1 2 3 | 20 | 7 | 21 | 4 5 6
        // difflib blocks: (0,0,3) (4,4,1) (6,6,3) (9,9,0).
        let rejected = [1u32, 2, 3, 10, 7, 11, 4, 5, 6];
        let chosen = [1u32, 2, 3, 20, 7, 21, 4, 5, 6];
        assert_eq!(
            matching_blocks(&rejected, &chosen),
            vec![m(0, 0, 3), m(4, 4, 1), m(6, 6, 3), m(9, 9, 0)]
        );
        // min_match 1: two separate one-token changes, the shared 7 stays unmarked.
        let mk = changed_segments(&chosen, &rejected, 1);
        assert_eq!(mk.chosen, bits("000101000"));
        assert_eq!(mk.rejected, bits("000101000"));
        // min_match 2: the [7] block is dropped, so 10 7 11 vs 20 7 21 is one change.
        let mk = changed_segments(&chosen, &rejected, 2);
        assert_eq!(mk.chosen, bits("000111000"));
        assert_eq!(mk.rejected, bits("000111000"));
    }

    #[test]
    fn dropped_block_can_turn_insertion_into_change() {
        // rejected: 1 2 3 | 8 10 | 4 5 6 ; chosen: 1 2 3 | 9 9 8 | 4 5 6.
        // difflib blocks: (0,0,3) (3,5,1) (5,6,3) (8,9,0): "9 9" inserted, "10" deleted around the shared 8.
        let rejected = [1u32, 2, 3, 8, 10, 4, 5, 6];
        let chosen = [1u32, 2, 3, 9, 9, 8, 4, 5, 6];
        assert_eq!(
            matching_blocks(&rejected, &chosen),
            vec![m(0, 0, 3), m(3, 5, 1), m(5, 6, 3), m(8, 9, 0)]
        );
        let mk = changed_segments(&chosen, &rejected, 1);
        assert_eq!(mk.chosen, vec![false; 9]);
        assert_eq!(mk.rejected, vec![false; 8]);
        // Dropping the one-token [8] block leaves gap (3..5, 3..6): both non-empty, a change.
        let mk = changed_segments(&chosen, &rejected, 3);
        assert_eq!(mk.rejected, bits("00011000"));
        assert_eq!(mk.chosen, bits("000111000"));
    }

    #[test]
    fn one_block_can_span_an_edit_boundary() {
        // rejected 1 2 3 8 4 5 6 vs chosen 1 2 3 9 9 8 4 5 6: "8 4 5 6" is the longest block, so the change
        // reads as a pure insertion of "9 9" before it and nothing is marked.
        let rejected = [1u32, 2, 3, 8, 4, 5, 6];
        let chosen = [1u32, 2, 3, 9, 9, 8, 4, 5, 6];
        assert_eq!(
            matching_blocks(&rejected, &chosen),
            vec![m(0, 0, 3), m(3, 5, 4), m(7, 9, 0)]
        );
        let mk = changed_segments(&chosen, &rejected, 3);
        assert_eq!(mk.chosen, vec![false; 9]);
        assert_eq!(mk.rejected, vec![false; 7]);
    }

    #[test]
    fn no_blocks_kept_marks_everything() {
        let mk = changed_segments(&[1, 2, 9], &[1, 2, 8], 3);
        assert_eq!(mk.chosen, vec![true; 3]);
        assert_eq!(mk.rejected, vec![true; 3]);
    }

    #[test]
    fn weights() {
        assert_eq!(token_weights(&bits("0110"), 5.0), vec![1.0, 5.0, 5.0, 1.0]);
        assert!(token_weights(&[], 5.0).is_empty());
    }
}
