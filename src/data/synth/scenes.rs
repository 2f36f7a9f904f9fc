//! Scenes, answers and hallucinations.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Group {
    pub(super) colour: usize,
    pub(super) shape: usize,
    /// 1..=4
    pub(super) count: usize,
    pub(super) region: usize,
}

/// What a rejected answer got wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Attr {
    Colour,
    Shape,
    Count,
    Position,
}

pub(super) const ATTRS: [Attr; 4] = [Attr::Colour, Attr::Shape, Attr::Count, Attr::Position];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Edit {
    pub(super) group: usize,
    pub(super) attr: Attr,
}

/// One generated row.
#[derive(Debug, Clone)]
pub(super) struct SynthRow {
    pub(super) idx: u64,
    pub(super) question: String,
    pub(super) chosen: String,
    pub(super) rejected: String,
    pub(super) png: Vec<u8>,
    pub(super) edits: Vec<Edit>,
    /// What the image shows, as JSON (`truth::SceneGroup` list): the `scene` column.
    pub(super) scene: String,
}

impl SynthRow {
    /// The `text` column, as RLHF-V stores it (Python `json.dumps` style).
    pub(super) fn text_json(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).expect("a string serialises");
        format!(
            "{{\"question\": {}, \"chosen\": {}, \"rejected\": {}}}",
            q(&self.question),
            q(&self.chosen),
            q(&self.rejected)
        )
    }
}

/// Per-group sentence choices shared by the chosen and the rejected answer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Wording {
    pub(super) template: usize,
    pub(super) long_positions: bool,
}

pub(super) fn generate_row(
    seed: u64,
    idx: u64,
    image_size: u32,
    level: Difficulty,
) -> Result<SynthRow, image::ImageError> {
    let groups = row_scene(seed, idx, level);
    let png = render_png(&groups, seed, idx, image_size, level == Difficulty::Easy)?;
    let texts = write_texts(&groups, &mut Rng::for_row(seed, idx, 2), level);
    Ok(SynthRow {
        idx,
        question: texts.question,
        chosen: texts.chosen,
        rejected: texts.rejected,
        png,
        edits: texts.edits,
        scene: truth::scene_json(&groups),
    })
}

/// The scene of row `idx` (its own random stream, so text and drawing choices never shift it).
pub(super) fn row_scene(seed: u64, idx: u64, level: Difficulty) -> Vec<Group> {
    draw_scene(&mut Rng::for_row(seed, idx, 1), level)
}

pub(super) fn draw_scene(rng: &mut Rng, level: Difficulty) -> Vec<Group> {
    if level == Difficulty::Easy {
        return vec![Group {
            colour: rng.below(COLOURS.len()),
            shape: rng.below(SHAPES.len()),
            count: 1 + rng.below(2),
            region: rng.below(REGIONS.len()),
        }];
    }
    let n = match rng.below(10) {
        0..=2 => 1,
        3..=6 => 2,
        _ => 3,
    };
    let colours = rng.sample(COLOURS.len(), n);
    let regions = rng.sample(REGIONS.len(), n);
    (0..n)
        .map(|g| Group {
            colour: colours[g],
            shape: rng.below(SHAPES.len()),
            count: 1 + rng.below(4),
            region: regions[g],
        })
        .collect()
}

/// A row's question and answers.
#[derive(Debug, Clone)]
pub(super) struct Texts {
    pub(super) question: String,
    pub(super) chosen: String,
    pub(super) rejected: String,
    pub(super) edits: Vec<Edit>,
}

pub(super) fn write_texts(groups: &[Group], rng: &mut Rng, level: Difficulty) -> Texts {
    let (question, kind) = *rng.pick(&QUESTIONS);
    let long_positions = rng.below(2) == 1;
    let wordings: Vec<Wording> = groups
        .iter()
        .map(|_| Wording {
            template: rng.below(GROUP_TEMPLATES.len()),
            long_positions,
        })
        .collect();
    let total: usize = groups.iter().map(|g| g.count).sum();
    let intro_t = rng.below(INTROS.len());
    let total_t = rng.below(TOTALS.len());
    let closing_t = rng.below(CLOSINGS.len());
    let (mut intro, total_sentence, mut closing) = match kind {
        QuestionKind::Describe => (true, false, rng.below(2) == 0),
        QuestionKind::Shapes => (rng.below(10) < 3, false, rng.below(2) == 0),
        QuestionKind::Count => (false, true, rng.below(10) < 3),
    };
    let pre = |intro: bool| -> Vec<String> {
        let mut v = Vec::new();
        if intro {
            v.push(INTROS[intro_t].replace("{groups}", GROUP_WORDS[groups.len() - 1]));
        }
        if total_sentence {
            v.push(
                TOTALS[total_t]
                    .replace("{be}", BE[usize::from(total != 1)])
                    .replace("{total}", TOTAL_WORDS[total - 1])
                    .replace("{objects}", OBJECTS[usize::from(total != 1)]),
            );
        }
        v
    };
    let compose = |gs: &[Group], intro: bool, closing: bool| -> String {
        let mut sentences = pre(intro);
        for (g, w) in gs.iter().zip(&wordings) {
            sentences.push(group_sentence(g, *w));
        }
        if closing {
            sentences.push(CLOSINGS[closing_t].to_string());
        }
        sentences.join(" ")
    };
    let (wrong, edits) = hallucinate(groups, rng, level);
    // Keep both answers at least 15 words (a wrong position can be a word shorter than the right one):
    // add a closing, then an opening sentence, when short.
    let words = |s: &str| s.split_whitespace().count();
    let shortest = |intro, closing| {
        words(&compose(groups, intro, closing)).min(words(&compose(&wrong, intro, closing)))
    };
    if shortest(intro, closing) < 15 {
        closing = true;
    }
    if shortest(intro, closing) < 15 {
        intro = true;
    }
    let chosen = compose(groups, intro, closing);
    let rejected = compose(&wrong, intro, closing);
    Texts {
        question: question.to_string(),
        chosen,
        rejected,
        edits,
    }
}

pub(super) fn group_sentence(g: &Group, w: Wording) -> String {
    let plural = g.count != 1;
    let pos = if w.long_positions {
        POSITIONS_LONG[g.region]
    } else {
        POSITIONS_SHORT[g.region]
    };
    let shape = if plural {
        SHAPES[g.shape].1
    } else {
        SHAPES[g.shape].0
    };
    GROUP_TEMPLATES[w.template]
        .replace("{be}", BE[usize::from(plural)])
        .replace("{count}", COUNT_WORDS[g.count - 1].0)
        .replace("{Count}", COUNT_WORDS[g.count - 1].1)
        .replace("{colour}", COLOURS[g.colour].0)
        .replace("{shape}", shape)
        .replace("{pos}", pos.0)
        .replace("{Pos}", pos.1)
}

/// Puts 1-3 wrong attributes into a copy of the scene description. Wrong colours and positions are ones
/// the scene does not use, so the rejected text stays plausible on its own.
pub(super) fn hallucinate(
    groups: &[Group],
    rng: &mut Rng,
    level: Difficulty,
) -> (Vec<Group>, Vec<Edit>) {
    if level == Difficulty::Easy {
        let mut wrong = groups.to_vec();
        let free: Vec<usize> = (0..COLOURS.len())
            .filter(|&c| c != groups[0].colour)
            .collect();
        wrong[0].colour = *rng.pick(&free);
        return (
            wrong,
            vec![Edit {
                group: 0,
                attr: Attr::Colour,
            }],
        );
    }
    let want = match rng.below(20) {
        0..=9 => 1,
        10..=16 => 2,
        _ => 3,
    };
    let mut wrong = groups.to_vec();
    let mut edits = Vec::new();
    let mut used_colours: Vec<usize> = groups.iter().map(|g| g.colour).collect();
    let mut used_regions: Vec<usize> = groups.iter().map(|g| g.region).collect();
    let slots = rng.sample(groups.len() * ATTRS.len(), groups.len() * ATTRS.len());
    for slot in slots {
        if edits.len() == want {
            break;
        }
        let (group, attr) = (slot / ATTRS.len(), ATTRS[slot % ATTRS.len()]);
        let g = &mut wrong[group];
        match attr {
            Attr::Colour => {
                let free: Vec<usize> = (0..COLOURS.len())
                    .filter(|c| !used_colours.contains(c))
                    .collect();
                if free.is_empty() {
                    continue;
                }
                g.colour = *rng.pick(&free);
                used_colours.push(g.colour);
            }
            Attr::Shape => {
                let other: Vec<usize> = (0..SHAPES.len()).filter(|&s| s != g.shape).collect();
                g.shape = *rng.pick(&other);
            }
            Attr::Count => {
                let other: Vec<usize> = (1..=4).filter(|&c| c != g.count).collect();
                g.count = *rng.pick(&other);
            }
            Attr::Position => {
                let free: Vec<usize> = (0..REGIONS.len())
                    .filter(|r| !used_regions.contains(r))
                    .collect();
                if free.is_empty() {
                    continue;
                }
                g.region = *rng.pick(&free);
                used_regions.push(g.region);
            }
        }
        edits.push(Edit { group, attr });
    }
    edits.sort_by_key(|e| (e.group, e.attr as u8));
    (wrong, edits)
}
