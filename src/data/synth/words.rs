//! Words. Everything the generator says is assembled from these tables; `vocabulary()` reads them.

/// Colour name and fill colour.
pub(super) const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 38, 38]),
    ("green", [34, 160, 60]),
    ("blue", [37, 85, 220]),
    ("yellow", [240, 200, 25]),
    ("purple", [135, 60, 190]),
    ("orange", [245, 135, 25]),
    ("pink", [240, 120, 185]),
    ("black", [30, 30, 30]),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Ring,
    Diamond,
}

pub(super) const SHAPE_KINDS: [Shape; 6] = [
    Shape::Circle,
    Shape::Square,
    Shape::Triangle,
    Shape::Star,
    Shape::Ring,
    Shape::Diamond,
];

/// Singular and plural names, in `SHAPE_KINDS` order.
pub(super) const SHAPES: [(&str, &str); 6] = [
    ("circle", "circles"),
    ("square", "squares"),
    ("triangle", "triangles"),
    ("star", "stars"),
    ("ring", "rings"),
    ("diamond", "diamonds"),
];

/// Regions in normalised image coordinates `[x0, y0, x1, y1]`; they do not overlap.
/// Order: left, right, top, bottom, center.
pub(super) const REGIONS: [[f32; 4]; 5] = [
    [0.02, 0.22, 0.30, 0.78],
    [0.70, 0.22, 0.98, 0.78],
    [0.30, 0.02, 0.70, 0.30],
    [0.30, 0.70, 0.70, 0.98],
    [0.33, 0.33, 0.67, 0.67],
];

/// Position phrases (mid-sentence, sentence start), in `REGIONS` order; two wordings.
pub(super) const POSITIONS_SHORT: [(&str, &str); 5] = [
    ("on the left", "On the left"),
    ("on the right", "On the right"),
    ("at the top", "At the top"),
    ("at the bottom", "At the bottom"),
    ("in the center", "In the center"),
];
pub(super) const POSITIONS_LONG: [(&str, &str); 5] = [
    ("on the left side", "On the left side"),
    ("on the right side", "On the right side"),
    ("near the top", "Near the top"),
    ("near the bottom", "Near the bottom"),
    ("in the middle", "In the middle"),
];

/// Counts 1-4 (mid-sentence, sentence start).
pub(super) const COUNT_WORDS: [(&str, &str); 4] = [
    ("one", "One"),
    ("two", "Two"),
    ("three", "Three"),
    ("four", "Four"),
];
/// Totals 1-12.
pub(super) const TOTAL_WORDS: [&str; 12] = [
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve",
];
pub(super) const BE: [&str; 2] = ["is", "are"];
pub(super) const OBJECTS: [&str; 2] = ["object", "objects"];
pub(super) const GROUP_WORDS: [&str; 3] = ["one group", "two groups", "three groups"];

/// One sentence per group. Placeholders: `{count}`/`{Count}`, `{colour}`, `{shape}` (number-agreeing),
/// `{be}` (is/are), `{pos}`/`{Pos}`.
pub(super) const GROUP_TEMPLATES: [&str; 5] = [
    "There {be} {count} {colour} {shape} {pos}.",
    "{Count} {colour} {shape} {be} {pos}.",
    "I can see {count} {colour} {shape} {pos}.",
    "{Pos}, there {be} {count} {colour} {shape}.",
    "The image contains {count} {colour} {shape} {pos}.",
];
/// Opening sentences; `{groups}` is "one group", "two groups", ...
pub(super) const INTROS: [&str; 4] = [
    "The image shows simple colored shapes on a light background.",
    "This is a simple picture of geometric shapes on a plain light background.",
    "The picture contains {groups} of shapes.",
    "The image shows {groups} of colored shapes.",
];
/// Total counts; `{be}`, `{total}`, `{objects}` agree with the true total.
pub(super) const TOTALS: [&str; 3] = [
    "There {be} {total} {objects} in total.",
    "In total, I can count {total} {objects}.",
    "Altogether the image has {total} {objects}.",
];
pub(super) const CLOSINGS: [&str; 3] = [
    "The background is light and there is nothing else in the image.",
    "No other objects appear in the picture.",
    "Nothing else is visible.",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum QuestionKind {
    Describe,
    Shapes,
    Count,
}

pub(super) const QUESTIONS: [(&str, QuestionKind); 13] = [
    ("Describe the image.", QuestionKind::Describe),
    ("Describe this image in detail.", QuestionKind::Describe),
    ("What do you see in this picture?", QuestionKind::Describe),
    ("What is shown in the image?", QuestionKind::Describe),
    (
        "Can you describe what is in the picture?",
        QuestionKind::Describe,
    ),
    (
        "Please give a detailed description of the image.",
        QuestionKind::Describe,
    ),
    (
        "What shapes can you see in this picture?",
        QuestionKind::Shapes,
    ),
    (
        "Which shapes and colors appear in the image?",
        QuestionKind::Shapes,
    ),
    ("Where are the shapes in this image?", QuestionKind::Shapes),
    (
        "How many objects are there and where are they?",
        QuestionKind::Count,
    ),
    (
        "How many shapes are in the image, and where are they located?",
        QuestionKind::Count,
    ),
    (
        "Count the objects in the image and tell me where they are.",
        QuestionKind::Count,
    ),
    (
        "How many objects can you count in this picture?",
        QuestionKind::Count,
    ),
];

/// Splits text into words (letters, digits, hyphens), punctuation marks, and `{placeholders}`.
pub(super) fn split_words(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphanumeric() || c == b'-' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'-') {
                i += 1;
            }
            out.push(&s[start..i]);
        } else if c == b'{' {
            let start = i;
            while i < bytes.len() && bytes[i] != b'}' {
                i += 1;
            }
            i = (i + 1).min(bytes.len());
            out.push(&s[start..i]);
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else {
            // One punctuation mark (the tables are ASCII; keep whole UTF-8 characters anyway).
            let len = s[i..].chars().next().map_or(1, char::len_utf8);
            out.push(&s[i..i + len]);
            i += len;
        }
    }
    out
}
