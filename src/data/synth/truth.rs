//! What a synthetic image really shows (its scene, stored with each row as JSON) and how true an answer about it
//! is: the claims of a response (each group's shape, colour, count and position; a stated total) compared with
//! the scene.
//!
//! Scoring rules (what `ddpo evaluate` reports):
//! - A *mention* is a shape word with the colour, count and position words of its sentence (a count word or
//!   colour just before it; the sentence's position phrase). Each attribute a mention states is one claim.
//! - Mentions are matched to scene groups one to one, most agreeing pairs first (ties: sentence order equals
//!   group order), so a description in any order is matched to what it describes. A mention left without a
//!   group (more mentioned groups than the scene has) makes all its claims false.
//! - A claim is false when it disagrees with its group: the shape is an `object` error, then `colour`, `count`,
//!   `position`. A stated total ("five objects in total") is a `count` claim against the scene's total.
//! - Coverage: the share of scene groups matched by a mention with the right shape and colour, so an answer
//!   that says nothing scores no false claims but zero coverage.

use serde::{Deserialize, Serialize};

use super::*;

/// One group of identical shapes in a scene.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SceneGroup {
    pub shape: String,
    pub colour: String,
    pub count: u32,
    /// left, right, top, bottom or center.
    pub position: String,
}

/// Region names in `REGIONS` order, as stored in a scene.
const REGION_NAMES: [&str; 5] = ["left", "right", "top", "bottom", "center"];

/// Kinds of claims, in report order.
pub const KINDS: [&str; 4] = ["object", "colour", "count", "position"];

/// The scene of a generated row, as stored in the `scene` column.
pub(super) fn scene_json(groups: &[Group]) -> String {
    let scene: Vec<SceneGroup> = groups
        .iter()
        .map(|g| SceneGroup {
            shape: SHAPES[g.shape].0.to_string(),
            colour: COLOURS[g.colour].0.to_string(),
            count: g.count as u32,
            position: REGION_NAMES[g.region].to_string(),
        })
        .collect();
    serde_json::to_string(&scene).expect("a scene serialises")
}

/// Claims and false claims of one response, per kind (`KINDS` order), and coverage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Score {
    pub claims: [u32; 4],
    pub false_claims: [u32; 4],
    /// Scene groups matched with the right shape and colour.
    pub covered: u32,
    pub groups: u32,
}

impl Score {
    pub fn total_false(&self) -> u32 {
        self.false_claims.iter().sum()
    }
}

/// Sums of scores over answers; summable across ranks (`to_vec`/`from_slice`), turned into rates by
/// [`Totals::rates`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub answers: u64,
    /// Answers with at least one false claim.
    pub flawed: u64,
    pub claims: [u64; 4],
    pub false_claims: [u64; 4],
    pub covered: u64,
    pub groups: u64,
}

/// Rates over a set of answers (what `ddpo evaluate` reports and training logs as `eval/hallucination/*`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rates {
    pub answers: u64,
    /// Share of answers with at least one false claim (CHAIR_s-like).
    pub chair_s: f64,
    /// False claims / claims (CHAIR_i-like).
    pub chair_i: f64,
    /// Per kind (`KINDS`): false claims / claims of that kind.
    pub false_rate: std::collections::BTreeMap<String, f64>,
    pub claims: u64,
    pub false_claims: u64,
    /// Scene groups mentioned with the right shape and colour / all scene groups.
    pub coverage: f64,
}

impl Totals {
    pub fn add(&mut self, s: &Score) {
        self.answers += 1;
        self.flawed += u64::from(s.total_false() > 0);
        for k in 0..4 {
            self.claims[k] += u64::from(s.claims[k]);
            self.false_claims[k] += u64::from(s.false_claims[k]);
        }
        self.covered += u64::from(s.covered);
        self.groups += u64::from(s.groups);
    }

    pub fn to_vec(&self) -> Vec<f64> {
        let mut v = vec![self.answers as f64, self.flawed as f64];
        v.extend(
            self.claims
                .iter()
                .chain(&self.false_claims)
                .map(|&x| x as f64),
        );
        v.extend([self.covered as f64, self.groups as f64]);
        v
    }

    /// The inverse of [`Totals::to_vec`] (after a sum over ranks).
    pub fn from_slice(v: &[f64]) -> Self {
        let n = |i: usize| v[i].round() as u64;
        Self {
            answers: n(0),
            flawed: n(1),
            claims: [n(2), n(3), n(4), n(5)],
            false_claims: [n(6), n(7), n(8), n(9)],
            covered: n(10),
            groups: n(11),
        }
    }

    pub fn rates(&self) -> Rates {
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let (claims, false_claims) = (self.claims.iter().sum(), self.false_claims.iter().sum());
        Rates {
            answers: self.answers,
            chair_s: ratio(self.flawed, self.answers),
            chair_i: ratio(false_claims, claims),
            false_rate: KINDS
                .iter()
                .enumerate()
                .map(|(k, name)| {
                    (
                        name.to_string(),
                        ratio(self.false_claims[k], self.claims[k]),
                    )
                })
                .collect(),
            claims,
            false_claims,
            coverage: ratio(self.covered, self.groups),
        }
    }
}

impl Rates {
    /// As metrics: `<prefix>chair_s`, `<prefix>chair_i`, `<prefix>false_<kind>`, `<prefix>coverage`.
    pub fn named(&self, prefix: &str) -> Vec<(String, f64)> {
        let mut v = vec![
            (format!("{prefix}chair_s"), self.chair_s),
            (format!("{prefix}chair_i"), self.chair_i),
        ];
        v.extend(
            self.false_rate
                .iter()
                .map(|(k, r)| (format!("{prefix}false_{k}"), *r)),
        );
        v.push((format!("{prefix}coverage"), self.coverage));
        v
    }
}

impl std::fmt::Display for Rates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "answers            {}", self.answers)?;
        writeln!(f, "CHAIR_s (answers)  {:.4}", self.chair_s)?;
        writeln!(
            f,
            "CHAIR_i (claims)   {:.4}  ({} of {})",
            self.chair_i, self.false_claims, self.claims
        )?;
        for (k, v) in &self.false_rate {
            writeln!(f, "  false {k:<10} {v:.4}")?;
        }
        write!(f, "coverage           {:.4}", self.coverage)
    }
}

/// A shape mentioned in a response with the attributes its sentence gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Mention {
    shape: usize,
    colour: Option<usize>,
    count: Option<u32>,
    region: Option<usize>,
}

/// Scores `response` against `scene`.
pub fn score(response: &str, scene: &[SceneGroup]) -> Score {
    let truth: Vec<Mention> = scene.iter().filter_map(as_mention).collect();
    let (mentions, totals) = parse(response);
    let mut s = Score {
        groups: truth.len() as u32,
        ..Score::default()
    };
    let pairs = match_mentions(&mentions, &truth);
    for (i, m) in mentions.iter().enumerate() {
        let g = pairs.iter().find(|p| p.0 == i).map(|p| &truth[p.1]);
        let checks = [
            (0, Some(m.shape) == g.map(|g| g.shape), true),
            (1, m.colour == g.and_then(|g| g.colour), m.colour.is_some()),
            (2, m.count == g.and_then(|g| g.count), m.count.is_some()),
            (3, m.region == g.and_then(|g| g.region), m.region.is_some()),
        ];
        for (kind, right, stated) in checks {
            if stated {
                s.claims[kind] += 1;
                s.false_claims[kind] += u32::from(!right);
            }
        }
        if g.is_some_and(|g| g.shape == m.shape && g.colour == m.colour) {
            s.covered += 1;
        }
    }
    let total: u32 = truth.iter().filter_map(|g| g.count).sum();
    for t in totals {
        s.claims[2] += 1;
        s.false_claims[2] += u32::from(t != total);
    }
    s
}

fn as_mention(g: &SceneGroup) -> Option<Mention> {
    Some(Mention {
        shape: SHAPES.iter().position(|s| s.0 == g.shape)?,
        colour: COLOURS.iter().position(|c| c.0 == g.colour),
        count: Some(g.count),
        region: REGION_NAMES.iter().position(|r| *r == g.position),
    })
}

/// Pairs (mention, group), one to one, most agreeing first; ties prefer mention i with group i, then order.
fn match_mentions(mentions: &[Mention], truth: &[Mention]) -> Vec<(usize, usize)> {
    let agree = |m: &Mention, g: &Mention| {
        u32::from(m.shape == g.shape)
            + u32::from(m.colour.is_some() && m.colour == g.colour)
            + u32::from(m.count.is_some() && m.count == g.count)
            + u32::from(m.region.is_some() && m.region == g.region)
    };
    let mut cand: Vec<(u32, bool, usize, usize)> = Vec::new();
    for (i, m) in mentions.iter().enumerate() {
        for (j, g) in truth.iter().enumerate() {
            cand.push((agree(m, g), i == j, i, j));
        }
    }
    cand.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then(b.1.cmp(&a.1))
            .then((a.2, a.3).cmp(&(b.2, b.3)))
    });
    let (mut used_m, mut used_g) = (vec![false; mentions.len()], vec![false; truth.len()]);
    let mut out = Vec::new();
    for (_, _, i, j) in cand {
        if !used_m[i] && !used_g[j] {
            used_m[i] = true;
            used_g[j] = true;
            out.push((i, j));
        }
    }
    out
}

/// The mentions of a response and the totals it states.
fn parse(response: &str) -> (Vec<Mention>, Vec<u32>) {
    let lower = response.to_lowercase();
    let (mut mentions, mut totals) = (Vec::new(), Vec::new());
    for sentence in lower.split(['.', '!', '?', ';', '\n']) {
        let words: Vec<&str> = split_words(sentence)
            .into_iter()
            .filter(|w| w.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            .collect();
        let region = region_of(&words);
        let first = mentions.len();
        let (mut colour, mut count) = (None, None);
        for w in &words {
            if let Some(c) = COLOURS.iter().position(|c| c.0 == *w) {
                colour = Some(c);
            } else if let Some(n) = COUNT_WORDS.iter().position(|c| c.0 == *w) {
                count = Some(n as u32 + 1);
            } else if let Some(sh) = SHAPES.iter().position(|s| s.0 == *w || s.1 == *w) {
                mentions.push(Mention {
                    shape: sh,
                    colour: colour.take(),
                    count: count.take(),
                    region,
                });
            }
        }
        let is_total = words.iter().any(|w| *w == "total" || *w == "altogether");
        if mentions.len() == first && is_total {
            // "There are five objects in total": the last number word of the sentence.
            let n = words
                .iter()
                .filter_map(|w| TOTAL_WORDS.iter().position(|t| t == w))
                .next_back();
            totals.extend(n.map(|n| n as u32 + 1));
        }
    }
    (mentions, totals)
}

/// The region a sentence's position phrase names (short or long wording), if any.
fn region_of(words: &[&str]) -> Option<usize> {
    let has = |w: &str| words.contains(&w);
    [
        has("left"),
        has("right"),
        has("top"),
        has("bottom"),
        has("center") || has("middle"),
    ]
    .iter()
    .position(|&b| b)
}

/// The scenes of every row of `files`, by row id (`idx` as text). A file without a `scene` column (data not
/// made by `ddpo synth`) or a row whose scene is not valid is an error naming the file and row.
pub fn read_scenes(
    files: &[PathBuf],
) -> Result<HashMap<String, Vec<SceneGroup>>, crate::data::DataError> {
    use arrow::array::{Array, AsArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut out = HashMap::new();
    for f in files {
        let err = |reason: String| crate::data::DataError::Shard {
            path: f.clone(),
            reason,
        };
        let file = File::open(f).map_err(|e| err(format!("cannot open: {e}")))?;
        let b = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| err(format!("not a readable parquet file: {e}")))?;
        let schema = b.schema().clone();
        let cols = ["idx", "scene"].map(|c| schema.index_of(c).ok());
        let [Some(idx), Some(scene)] = cols else {
            return Err(err(
                "has no `idx` and `scene` columns: only data made by `ddpo synth` carries its scenes".into(),
            ));
        };
        let mask = parquet::arrow::ProjectionMask::roots(b.parquet_schema(), [idx, scene]);
        let reader = b
            .with_projection(mask)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let mut row = 0u64;
        for batch in reader {
            let batch = batch.map_err(|e| err(e.to_string()))?;
            let ids = arrow::compute::cast(batch.column(0), &DataType::Utf8)
                .map_err(|e| err(e.to_string()))?;
            let (ids, scenes) = (ids.as_string::<i32>(), batch.column(1).as_string::<i32>());
            for i in 0..batch.num_rows() {
                let parsed = scenes
                    .is_valid(i)
                    .then(|| serde_json::from_str::<Vec<SceneGroup>>(scenes.value(i)));
                match parsed {
                    Some(Ok(sc)) => {
                        out.insert(ids.value(i).to_owned(), sc);
                    }
                    Some(Err(e)) => return Err(err(format!("row {row}: scene is not valid: {e}"))),
                    None => return Err(err(format!("row {row}: scene is null"))),
                }
                row += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scene(seed: u64, idx: u64, level: Difficulty) -> Vec<SceneGroup> {
        serde_json::from_str(&scene_json(&row_scene(seed, idx, level))).unwrap()
    }

    /// The generator's own chosen answers are true and cover the scene; its rejected answers hold exactly
    /// the injected errors, each under its kind.
    #[test]
    fn chosen_answers_are_true_and_rejected_ones_hold_exactly_their_edits() {
        for level in [Difficulty::Standard, Difficulty::Easy] {
            for idx in 0..400 {
                let row = generate_row(7, idx, 32, level).unwrap();
                let sc = scene(7, idx, level);
                let good = score(&row.chosen, &sc);
                assert_eq!(good.total_false(), 0, "{}\n{sc:?}", row.chosen);
                assert_eq!(good.covered, good.groups, "{}", row.chosen);
                let bad = score(&row.rejected, &sc);
                let mut want = [0u32; 4];
                for e in &row.edits {
                    let kind = match e.attr {
                        Attr::Shape => 0,
                        Attr::Colour => 1,
                        Attr::Count => 2,
                        Attr::Position => 3,
                    };
                    want[kind] += 1;
                }
                assert_eq!(
                    bad.false_claims, want,
                    "{}\n{sc:?}\n{:?}",
                    row.rejected, row.edits
                );
                assert_eq!(bad.claims, good.claims);
            }
        }
    }

    #[test]
    fn totals_survive_a_sum_over_ranks_and_give_rates() {
        let sc = scene(7, 3, Difficulty::Standard);
        let row = generate_row(7, 3, 32, Difficulty::Standard).unwrap();
        let (mut a, mut b) = (Totals::default(), Totals::default());
        a.add(&score(&row.chosen, &sc));
        b.add(&score(&row.rejected, &sc));
        let summed: Vec<f64> = a
            .to_vec()
            .iter()
            .zip(b.to_vec())
            .map(|(x, y)| x + y)
            .collect();
        let mut both = a.clone();
        both.add(&score(&row.rejected, &sc));
        assert_eq!(Totals::from_slice(&summed), both);
        let r = both.rates();
        assert_eq!((r.answers, r.chair_s), (2, 0.5));
        assert_eq!(r.false_claims, row.edits.len() as u64);
        assert_eq!(r.named("eval/hallucination/").len(), 7);
    }

    #[test]
    fn silence_is_not_rewarded_and_invented_groups_are_false() {
        let sc = scene(7, 3, Difficulty::Standard);
        let s = score("Nothing else is visible.", &sc);
        assert_eq!((s.total_false(), s.covered), (0, 0));
        assert!(s.groups >= 1);
        // Four groups where the scene has at most three: the extra mention is false in every claim.
        let many = "There is one red circle on the left. There is one green square on the right. \
                    There is one blue star at the top. There is one pink ring at the bottom.";
        let s = score(many, &sc);
        assert!(s.false_claims[0] >= 1 && s.total_false() >= 4, "{s:?}");
        // A wrong total is a count error; the right one is not.
        let total: u32 = sc.iter().map(|g| g.count).sum();
        let say = |n: u32| {
            format!(
                "There are {} objects in total.",
                TOTAL_WORDS[n as usize - 1]
            )
        };
        assert_eq!(score(&say(total), &sc).false_claims, [0; 4]);
        assert_eq!(score(&say(total % 12 + 1), &sc).false_claims, [0, 0, 1, 0]);
    }
}
