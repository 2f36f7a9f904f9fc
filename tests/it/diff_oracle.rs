//! Proof that `ddpo::data::diff` is CPython's difflib (plus the DDPO changed-segment rule): thousands of
//! deterministic cases are run through `tests/oracles/difflib_oracle.py` in one process and every case's
//! matching blocks and both masks must agree exactly. Python comes from `DDPO_PYTHON` (set by
//! `scripts/with-torch`) or `python3`; if it cannot run, the test fails rather than skipping.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use ddpo::data::diff::{changed_segments, matching_blocks, Match};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Case {
    /// rejected ids (difflib's `a`)
    a: Vec<u32>,
    /// chosen ids (difflib's `b`)
    b: Vec<u32>,
    min_match: usize,
}

#[derive(Deserialize, Debug, PartialEq, Eq)]
struct Expected {
    blocks: Vec<[usize; 3]>,
    chosen: Vec<u8>,
    rejected: Vec<u8>,
}

/// splitmix64: tiny, seedable, good enough to drive case generation deterministically.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn uniform_seq(&mut self, len: usize, alphabet: u32) -> Vec<u32> {
        (0..len)
            .map(|_| (self.next_u64() % alphabet as u64) as u32)
            .collect()
    }
    /// Log-uniform token ids (a rough Zipf): low ids are frequent, like "the", ",", "." in real responses.
    fn zipf_token(&mut self, vocab: u32) -> u32 {
        let x = (self.unit() * (vocab as f64).ln()).exp() as u32;
        x.saturating_sub(1).min(vocab - 1)
    }
    fn zipf_seq(&mut self, len: usize, vocab: u32) -> Vec<u32> {
        (0..len).map(|_| self.zipf_token(vocab)).collect()
    }
}

/// Applies 1..=max_edits segment edits (replace, insert, delete), the way a human correction differs.
fn edit(rng: &mut Rng, base: &[u32], max_edits: usize, vocab: u32) -> Vec<u32> {
    let mut s = base.to_vec();
    for _ in 0..rng.range(1, max_edits) {
        let pos = rng.range(0, s.len());
        match rng.range(0, 2) {
            0 => {
                let del = rng.range(1, 8).min(s.len() - pos);
                let ins: Vec<u32> = (0..rng.range(1, 8))
                    .map(|_| rng.zipf_token(vocab))
                    .collect();
                s.splice(pos..pos + del, ins);
            }
            1 => {
                let ins: Vec<u32> = (0..rng.range(1, 10))
                    .map(|_| rng.zipf_token(vocab))
                    .collect();
                s.splice(pos..pos, ins);
            }
            _ => {
                let del = rng.range(1, 10).min(s.len() - pos);
                s.drain(pos..pos + del);
            }
        }
    }
    s
}

/// Makes 1 or 2 ids take up 5-30% of `s` each (so they are "popular" for difflib's autojunk once len >= 200).
fn make_popular(rng: &mut Rng, s: &mut [u32]) {
    let ids = [rng.range(0, 3) as u32, 40_000 + rng.range(0, 3) as u32];
    for &id in &ids[..rng.range(1, 2)] {
        let frac = 0.05 + 0.25 * rng.unit();
        for x in s.iter_mut() {
            if rng.unit() < frac {
                *x = id;
            }
        }
    }
}

/// Returns (rejected, chosen) in either order so both roles see every shape.
fn maybe_swap(rng: &mut Rng, x: Vec<u32>, y: Vec<u32>) -> (Vec<u32>, Vec<u32>) {
    if rng.range(0, 1) == 0 {
        (x, y)
    } else {
        (y, x)
    }
}

fn gen_cases(n: usize, seed: u64) -> Vec<Case> {
    let mut rng = Rng(seed);
    let mut cases = Vec::with_capacity(n);
    for idx in 0..n {
        let (a, b) = match idx % 10 {
            // Independent random sequences over a tiny alphabet: many equal-length ties.
            0 => {
                let k = rng.range(1, 6) as u32;
                let (la, lb) = (rng.range(0, 80), rng.range(0, 80));
                (rng.uniform_seq(la, k), rng.uniform_seq(lb, k))
            }
            // Independent random sequences over a large alphabet, up to ~600 long.
            1 => {
                let (la, lb) = (rng.range(0, 600), rng.range(0, 600));
                (rng.uniform_seq(la, 32_000), rng.uniform_seq(lb, 32_000))
            }
            // Long sequences with very popular ids (autojunk), edited copies of each other.
            2 => {
                let len = rng.range(200, 600);
                let mut base = rng.zipf_seq(len, 32_000);
                make_popular(&mut rng, &mut base);
                let other = edit(&mut rng, &base, 3, 32_000);
                maybe_swap(&mut rng, base, other)
            }
            // The realistic case: a response and its human correction, 1-3 segment edits apart.
            3..=5 => {
                let len = rng.range(1, 500);
                let base = rng.zipf_seq(len, 32_000);
                let other = edit(&mut rng, &base, 3, 32_000);
                maybe_swap(&mut rng, base, other)
            }
            // Identical pairs.
            6 => {
                let len = rng.range(0, 500);
                let s = rng.zipf_seq(len, 32_000);
                (s.clone(), s)
            }
            // Empty on one side or both.
            7 => {
                let len = rng.range(0, 300);
                let s = rng.zipf_seq(len, 1000);
                match rng.range(0, 2) {
                    0 => (Vec::new(), s),
                    1 => (s, Vec::new()),
                    _ => (Vec::new(), Vec::new()),
                }
            }
            // Repeated patterns with edits: long runs of equal-length candidate matches.
            8 => {
                let (plen, k) = (rng.range(1, 8), rng.range(2, 7) as u32);
                let pat = rng.uniform_seq(plen, k);
                let len = rng.range(0, 400);
                let base: Vec<u32> = pat.iter().copied().cycle().take(len).collect();
                let other = edit(&mut rng, &base, 3, 8);
                maybe_swap(&mut rng, base, other)
            }
            // Near the autojunk threshold (len(b) around 200) with popular ids, small vocab, more edits.
            _ => {
                let len = rng.range(190, 215);
                let mut base = rng.zipf_seq(len, 200);
                if rng.range(0, 1) == 0 {
                    make_popular(&mut rng, &mut base);
                }
                let other = edit(&mut rng, &base, 5, 200);
                maybe_swap(&mut rng, base, other)
            }
        };
        let min_match = rng.range(1, 5);
        cases.push(Case { a, b, min_match });
    }
    cases
}

use crate::common::python;

/// Runs the oracle once over all cases; panics (never skips) if Python is unavailable or fails.
fn run_oracle(cases: &[Case]) -> Vec<Expected> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oracles/difflib_oracle.py");
    let py = python();
    let mut child = Command::new(&py)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the difflib oracle with python `{py}` ({e}); this test needs Python 3 \
                 (set DDPO_PYTHON or put python3 on PATH, e.g. run through scripts/with-torch)"
            )
        });
    let mut input = String::new();
    for c in cases {
        input.push_str(&serde_json::to_string(c).unwrap());
        input.push('\n');
    }
    let mut stdin = child.stdin.take().unwrap();
    // Write from another thread: the oracle answers while it reads, and both pipes can fill up.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .expect("waiting for the difflib oracle");
    writer
        .join()
        .unwrap()
        .expect("writing cases to the difflib oracle");
    assert!(
        out.status.success(),
        "difflib oracle `{py} {}` failed ({}):\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("oracle output is UTF-8");
    let expected: Vec<Expected> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad oracle line {l:?}: {e}")))
        .collect();
    assert_eq!(
        expected.len(),
        cases.len(),
        "the oracle answered {} of {} cases",
        expected.len(),
        cases.len()
    );
    expected
}

fn ours(c: &Case) -> Expected {
    let blocks = matching_blocks(&c.a, &c.b)
        .iter()
        .map(|m: &Match| [m.a, m.b, m.size])
        .collect();
    let mask = changed_segments(&c.b, &c.a, c.min_match);
    Expected {
        blocks,
        chosen: mask.chosen.iter().map(|&x| x as u8).collect(),
        rejected: mask.rejected.iter().map(|&x| x as u8).collect(),
    }
}

fn check_all(cases: &[Case], expected: &[Expected]) {
    let mut failures = Vec::new();
    for (i, (c, want)) in cases.iter().zip(expected).enumerate() {
        let got = ours(c);
        if &got != want {
            failures.push(i);
            if failures.len() <= 5 {
                eprintln!(
                    "MISMATCH case {i}: {}\n  difflib: {want:?}\n  ours:    {got:?}",
                    serde_json::to_string(c).unwrap()
                );
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from difflib (first: {:?})",
        failures.len(),
        cases.len(),
        &failures[..failures.len().min(20)]
    );
}

#[test]
fn matches_python_difflib_on_generated_cases() {
    let cases = gen_cases(6000, 0x0dd0_d1ff_5eed);
    // The generator must really exercise autojunk: count cases whose b is long and has a popular id.
    let autojunk = cases
        .iter()
        .filter(|c| {
            let n = c.b.len();
            n >= 200 && {
                let mut counts = std::collections::HashMap::new();
                c.b.iter()
                    .for_each(|&x| *counts.entry(x).or_insert(0usize) += 1);
                counts.values().any(|&k| k > n / 100 + 1)
            }
        })
        .count();
    assert!(autojunk >= 500, "only {autojunk} cases exercise autojunk");
    let changed = cases.iter().filter(|c| ours(c).chosen.contains(&1)).count();
    assert!(
        changed >= 1000,
        "only {changed} cases have a changed segment"
    );

    let expected = run_oracle(&cases);
    check_all(&cases, &expected);
    eprintln!(
        "{} cases agree with Python difflib ({autojunk} with autojunk, {changed} with changed segments)",
        cases.len()
    );
}

/// Committed cases with difflib's answers stored beside them (made by the oracle), checked without Python.
#[test]
fn matches_committed_difflib_answers() {
    #[derive(Deserialize)]
    struct Stored {
        #[serde(flatten)]
        case: Case,
        expected: Expected,
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oracles/difflib_cases.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let stored: Vec<Stored> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(stored.len() >= 10);
    let cases: Vec<Case> = stored.iter().map(|s| s.case.clone()).collect();
    let expected: Vec<Expected> = stored.into_iter().map(|s| s.expected).collect();
    check_all(&cases, &expected);
}
