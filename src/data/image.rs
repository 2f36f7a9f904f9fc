//! Image decoding and CLIP image preprocessing, bit-exact with Hugging Face transformers' slow
//! `CLIPImageProcessor` (the PIL-based one llava-hf checkpoints use), and LLaVA-1.5's `expand2square`.
//!
//! The pipeline, in transformers' order, for one RGB `u8` image:
//! 1. optional `pad_to_square` (LLaVA `image_aspect_ratio = "pad"`): the shorter side is padded, centred at
//!    offset `(long - short) // 2`, with the colour `tuple(int(m * 255) for m in image_mean)`;
//! 2. resize (`do_resize`): the shortest edge to `size.shortest_edge`, the long edge to
//!    `int(shortest_edge * long / short)` (truncated, transformers' `get_resize_output_image_size`), or to an
//!    exact `{height, width}`, with Pillow's `Image.resize` on the `u8` image. The resampler below is a port of
//!    Pillow's `src/libImaging/Resample.c`: `precompute_coeffs` (filter support widened by the downscale
//!    factor, bounds rounded with `(int)(x + 0.5)`, weights normalised by their sum), the 8-bit fixed-point path
//!    (`PRECISION_BITS = 32 - 8 - 2`, coefficients rounded half away from zero, accumulator seeded with
//!    `1 << (PRECISION_BITS - 1)`, result `>> PRECISION_BITS` clipped to `0..=255`), horizontal pass into an
//!    intermediate `u8` image, then vertical pass; a pass whose size does not change is skipped, as Pillow does;
//! 3. centre crop (`do_center_crop`): `top = (h - crop_h) // 2`, `left = (w - crop_w) // 2`; along an axis where
//!    the image is smaller than the crop it is zero-padded (`u8` 0, before rescaling) with
//!    `ceil((crop - n) / 2)` before it, as transformers' `center_crop` does;
//! 4. rescale (`do_rescale`): `float32(float64(v) * rescale_factor)`;
//! 5. normalise (`do_normalize`): `(x - float32(mean)) / float32(std)` in float32;
//! 6. channels first: `pixel_values[0]` is `[3, H, W]`, RGB.
//!
//! Steps 4-5 depend only on the `u8` value and channel, so they are a 3×256 lookup table. Only the resized
//! pixels that survive the crop are computed (each output pixel of Pillow's resampler depends only on its own
//! coefficients, so this changes nothing numerically).
//!
//! Decoding uses the `image` crate. PNG, GIF, BMP, TIFF and lossless WebP decode to the same pixels as PIL;
//! JPEG decoders differ (PIL uses libjpeg-turbo), typically by a level or two. Like `PIL.Image.open`, EXIF
//! orientation is not applied. Alpha is dropped without compositing (PIL's `convert("RGB")`), greyscale is
//! replicated, palettes are expanded.

use std::io::Cursor;
use std::ops::Range;
use std::path::{Path, PathBuf};

use image::{ImageFormat, ImageReader, RgbImage};
use serde_json::{json, Map, Value};

/// One bad value in a `preprocessor_config.json`: the key, what it must be, and what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}` must {expected}, found {found}")]
pub struct ValueError {
    pub key: String,
    pub expected: String,
    pub found: String,
}

impl ValueError {
    fn new(key: &str, expected: impl Into<String>, found: impl std::fmt::Display) -> Self {
        Self {
            key: key.to_owned(),
            expected: expected.into(),
            found: found.to_string(),
        }
    }
}

/// Errors from reading processor configs and decoding images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A `preprocessor_config.json` that is not valid JSON, misspells a value or asks for something this
    /// implementation does not do exactly (e.g. an unsupported `resample`).
    #[error("image processor config {origin}: not valid JSON: {source}")]
    Json {
        origin: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("image processor config {origin}: {source}")]
    Config {
        origin: String,
        #[source]
        source: ValueError,
    },
    #[error("unrecognised image format ({len} bytes, starting {head})")]
    UnknownFormat { len: usize, head: String },
    #[error("cannot decode {format:?} image ({len} bytes): {source}")]
    Decode {
        format: ImageFormat,
        len: usize,
        #[source]
        source: image::ImageError,
    },
    /// A decoding error of [`open`], with the file it came from.
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: Box<ImageError>,
    },
    #[error("image has no pixels ({width}x{height})")]
    Empty { width: u32, height: u32 },
}

/// OpenAI CLIP's normalisation constants (transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// PIL resampling filters this module implements exactly (`PILImageResampling` codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// `PIL.Image.Resampling.BILINEAR` = 2 (triangle filter, support 1).
    Bilinear,
    /// `PIL.Image.Resampling.BICUBIC` = 3 (cubic convolution, a = -0.5, support 2).
    Bicubic,
}

impl Resample {
    /// The integer transformers writes as `resample`.
    pub fn pil_code(self) -> u8 {
        match self {
            Resample::Bilinear => 2,
            Resample::Bicubic => 3,
        }
    }

    pub fn from_pil_code(code: i64) -> Result<Self, ValueError> {
        match code {
            2 => Ok(Resample::Bilinear),
            3 => Ok(Resample::Bicubic),
            _ => {
                let name = match code {
                    0 => "NEAREST",
                    1 => "LANCZOS",
                    4 => "BOX",
                    5 => "HAMMING",
                    _ => "not a PIL filter",
                };
                Err(ValueError::new(
                    "resample",
                    "be 2 (BILINEAR) or 3 (BICUBIC), the filters implemented here",
                    format!("{code} ({name})"),
                ))
            }
        }
    }

    fn support(self) -> f64 {
        match self {
            Resample::Bilinear => 1.0,
            Resample::Bicubic => 2.0,
        }
    }

    /// Pillow's `bilinear_filter` / `bicubic_filter`, operation for operation.
    #[inline]
    fn eval(self, x: f64) -> f64 {
        let x = if x < 0.0 { -x } else { x };
        match self {
            Resample::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Resample::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// The resize target (`size` in `preprocessor_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeSize {
    /// `{"shortest_edge": N}` (or a bare int): shortest edge to N, aspect ratio kept.
    ShortestEdge(u32),
    /// `{"height": H, "width": W}` (or `[H, W]`): exactly this size.
    Exact { height: u32, width: u32 },
}

/// A `preprocessor_config.json` of a CLIP image processor. Missing keys take `CLIPImageProcessor`'s defaults;
/// unknown keys are ignored. (De)serialises through [`ImageProcessorConfig::from_json`] /
/// [`ImageProcessorConfig::to_json`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "Value", into = "Value")]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    pub size: ResizeSize,
    pub resample: Resample,
    pub do_center_crop: bool,
    /// `(height, width)`.
    pub crop_size: (u32, u32),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    /// Recorded for round-tripping; images are always converted to RGB here (the vision tower needs three
    /// channels).
    pub do_convert_rgb: bool,
}

impl Default for ImageProcessorConfig {
    /// `CLIPImageProcessor()`'s defaults (224 px).
    fn default() -> Self {
        Self::clip(224)
    }
}

impl TryFrom<Value> for ImageProcessorConfig {
    type Error = ValueError;
    fn try_from(v: Value) -> Result<Self, ValueError> {
        Self::parse(&v)
    }
}

impl From<ImageProcessorConfig> for Value {
    fn from(c: ImageProcessorConfig) -> Value {
        c.to_json()
    }
}

impl ImageProcessorConfig {
    /// The openai/clip-vit-large-patch14-336 processor (as in llava-hf/llava-1.5-7b-hf) at `image_size`:
    /// shortest edge and square crop `image_size`, bicubic, rescale 1/255, OpenAI CLIP mean/std.
    pub fn clip(image_size: u32) -> Self {
        ImageProcessorConfig {
            do_resize: true,
            size: ResizeSize::ShortestEdge(image_size),
            resample: Resample::Bicubic,
            do_center_crop: true,
            crop_size: (image_size, image_size),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ImageError> {
        let text = std::fs::read_to_string(path).map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let origin = path.display().to_string();
        let value: Value = serde_json::from_str(&text).map_err(|source| ImageError::Json {
            origin: origin.clone(),
            source,
        })?;
        Self::parse(&value).map_err(|source| ImageError::Config { origin, source })
    }

    /// Parses an already-loaded `preprocessor_config.json` object.
    pub fn from_json(value: &Value) -> Result<Self, ImageError> {
        Self::parse(value).map_err(|source| ImageError::Config {
            origin: "(JSON value)".into(),
            source,
        })
    }

    /// The `preprocessor_config.json` `init-model` writes; `CLIPImageProcessor.from_pretrained` loads it back
    /// to the same settings.
    pub fn to_json(&self) -> Value {
        let size = match self.size {
            ResizeSize::ShortestEdge(n) => json!({ "shortest_edge": n }),
            ResizeSize::Exact { height, width } => json!({ "height": height, "width": width }),
        };
        json!({
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": self.do_resize,
            "size": size,
            "resample": self.resample.pil_code(),
            "do_center_crop": self.do_center_crop,
            "crop_size": { "height": self.crop_size.0, "width": self.crop_size.1 },
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "do_convert_rgb": self.do_convert_rgb,
        })
    }

    fn parse(value: &Value) -> Result<Self, ValueError> {
        let obj = value
            .as_object()
            .ok_or_else(|| ValueError::new("(top level)", "be a JSON object", kind(value)))?;
        let mut c = Self::default();
        // `null` means "not set" (transformers' defaults apply), as in Python.
        let get = |key: &str| obj.get(key).filter(|v| !v.is_null());
        for (key, slot) in [
            ("do_resize", &mut c.do_resize),
            ("do_center_crop", &mut c.do_center_crop),
            ("do_rescale", &mut c.do_rescale),
            ("do_normalize", &mut c.do_normalize),
            ("do_convert_rgb", &mut c.do_convert_rgb),
        ] {
            if let Some(v) = get(key) {
                *slot = v
                    .as_bool()
                    .ok_or_else(|| ValueError::new(key, "be true or false", v))?;
            }
        }
        if let Some(v) = get("size") {
            c.size = parse_size(v)?;
        }
        if let Some(v) = get("crop_size") {
            c.crop_size = parse_crop_size(v)?;
        }
        if let Some(v) = get("resample") {
            let code = v
                .as_i64()
                .ok_or_else(|| ValueError::new("resample", "be a PIL filter number", v))?;
            c.resample = Resample::from_pil_code(code)?;
        }
        if let Some(v) = get("rescale_factor") {
            c.rescale_factor = v
                .as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| ValueError::new("rescale_factor", "be a number", v))?;
        }
        if let Some(v) = get("image_mean") {
            c.image_mean = parse_channels("image_mean", v)?;
        }
        if let Some(v) = get("image_std") {
            c.image_std = parse_channels("image_std", v)?;
            if c.image_std.contains(&0.0) {
                return Err(ValueError::new("image_std", "not contain 0", v));
            }
        }
        Ok(c)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn positive(key: &str, v: &Value) -> Result<u32, ValueError> {
    v.as_u64()
        .filter(|&n| n > 0 && n <= u32::MAX as u64)
        .map(|n| n as u32)
        .ok_or_else(|| ValueError::new(key, "be a positive integer", v))
}

fn height_width(key: &str, m: &Map<String, Value>) -> Option<Result<(u32, u32), ValueError>> {
    match (m.get("height"), m.get("width")) {
        (Some(h), Some(w)) => Some(
            positive(&format!("{key}.height"), h)
                .and_then(|h| Ok((h, positive(&format!("{key}.width"), w)?))),
        ),
        _ => None,
    }
}

fn pair(key: &str, a: &[Value]) -> Result<(u32, u32), ValueError> {
    match a {
        [h, w] => Ok((positive(key, h)?, positive(key, w)?)),
        [n] => positive(key, n).map(|n| (n, n)),
        _ => Err(ValueError::new(
            key,
            "as a list be [height, width]",
            format!("{} elements", a.len()),
        )),
    }
}

/// transformers' `get_size_dict(size, default_to_square=False)` as CLIP's `resize` reads it. A dict with
/// `shortest_edge` resizes the shortest edge (a `longest_edge` beside it is ignored by CLIP, so here too).
fn parse_size(v: &Value) -> Result<ResizeSize, ValueError> {
    match v {
        Value::Number(_) => positive("size", v).map(ResizeSize::ShortestEdge),
        Value::Array(a) => match a.as_slice() {
            [n] => positive("size", n).map(ResizeSize::ShortestEdge),
            _ => pair("size", a).map(|(height, width)| ResizeSize::Exact { height, width }),
        },
        Value::Object(m) => {
            if let Some(n) = m.get("shortest_edge") {
                positive("size.shortest_edge", n).map(ResizeSize::ShortestEdge)
            } else if let Some(hw) = height_width("size", m) {
                hw.map(|(height, width)| ResizeSize::Exact { height, width })
            } else {
                Err(ValueError::new(
                    "size",
                    "have `shortest_edge` or `height` and `width`",
                    v,
                ))
            }
        }
        _ => Err(ValueError::new(
            "size",
            "be an integer or an object",
            kind(v),
        )),
    }
}

/// transformers' `get_size_dict(crop_size, default_to_square=True)`.
fn parse_crop_size(v: &Value) -> Result<(u32, u32), ValueError> {
    match v {
        Value::Number(_) => positive("crop_size", v).map(|n| (n, n)),
        Value::Array(a) => pair("crop_size", a),
        Value::Object(m) => height_width("crop_size", m)
            .unwrap_or_else(|| Err(ValueError::new("crop_size", "have `height` and `width`", v))),
        _ => Err(ValueError::new(
            "crop_size",
            "be an integer or an object",
            kind(v),
        )),
    }
}

fn parse_channels(key: &str, v: &Value) -> Result<[f64; 3], ValueError> {
    let num = |x: &Value| {
        x.as_f64()
            .filter(|f| f.is_finite())
            .ok_or_else(|| ValueError::new(key, "hold numbers", x))
    };
    match v {
        Value::Number(_) => num(v).map(|x| [x; 3]),
        Value::Array(a) if a.len() == 3 => Ok([num(&a[0])?, num(&a[1])?, num(&a[2])?]),
        Value::Array(a) => Err(ValueError::new(key, "have 3 values (R, G, B)", a.len())),
        _ => Err(ValueError::new(key, "be a number or a list of 3", kind(v))),
    }
}

/// Decodes any supported format (by content, not name) to 8-bit RGB. Errors carry the detected format and the
/// `image` crate's reason; the caller adds where the bytes came from (file, shard and row).
pub fn decode(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .expect("reading from memory cannot fail");
    let Some(format) = reader.format() else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(ImageError::UnknownFormat {
            len: bytes.len(),
            head: if head.is_empty() {
                "(empty)".into()
            } else {
                head.join(" ")
            },
        });
    };
    let img = reader.decode().map_err(|source| ImageError::Decode {
        format,
        len: bytes.len(),
        source,
    })?;
    let rgb = img.into_rgb8();
    if rgb.width() == 0 || rgb.height() == 0 {
        return Err(ImageError::Empty {
            width: rgb.width(),
            height: rgb.height(),
        });
    }
    Ok(rgb)
}

/// Reads and decodes an image file; errors name the path.
pub fn open(path: &Path) -> Result<RgbImage, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(&bytes).map_err(|e| ImageError::File {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

/// CLIP preprocessing (plus LLaVA's optional pad-to-square), bit-exact with transformers.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub config: ImageProcessorConfig,
    /// LLaVA-1.5 `image_aspect_ratio = "pad"`: `expand2square` with the mean colour before the processor.
    pub pad_to_square: bool,
}

impl ImageProcessor {
    pub fn new(config: ImageProcessorConfig, pad_to_square: bool) -> Self {
        ImageProcessor {
            config,
            pad_to_square,
        }
    }

    /// `(height, width)` of the output. It is fixed (independent of the image) when the processor centre-crops
    /// or resizes to an exact size — the case for every CLIP vision tower, see [`Self::fixed_output_size`].
    /// Otherwise this is the size a square image gets (and `(0, 0)` with neither resize nor crop).
    pub fn output_size(&self) -> (usize, usize) {
        self.fixed_output_size().unwrap_or(match self.config.size {
            ResizeSize::ShortestEdge(n) if self.config.do_resize => (n as usize, n as usize),
            _ => (0, 0),
        })
    }

    /// The output `(height, width)` when it does not depend on the image.
    pub fn fixed_output_size(&self) -> Option<(usize, usize)> {
        let c = &self.config;
        if c.do_center_crop {
            Some((c.crop_size.0 as usize, c.crop_size.1 as usize))
        } else if let (true, ResizeSize::Exact { height, width }) = (c.do_resize, c.size) {
            Some((height as usize, width as usize))
        } else {
            None
        }
    }

    /// The output `(height, width)` for an input image of `height × width` pixels.
    pub fn output_size_for(&self, height: u32, width: u32) -> (usize, usize) {
        let (h, w) = self.padded_size(height, width);
        let (h, w) = self.resized_size(h, w);
        if self.config.do_center_crop {
            (
                self.config.crop_size.0 as usize,
                self.config.crop_size.1 as usize,
            )
        } else {
            (h as usize, w as usize)
        }
    }

    /// The `expand2square` fill colour: `tuple(int(x * 255) for x in image_mean)`.
    pub fn pad_color(&self) -> [u8; 3] {
        self.config.image_mean.map(|m| (m * 255.0) as u8)
    }

    fn padded_size(&self, height: u32, width: u32) -> (u32, u32) {
        if self.pad_to_square {
            let side = height.max(width);
            (side, side)
        } else {
            (height, width)
        }
    }

    /// transformers' `get_resize_output_image_size(default_to_square=False)`: the long edge is
    /// `int(shortest_edge * long / short)`, truncated; ties (square) go to the `width <= height` branch.
    fn resized_size(&self, height: u32, width: u32) -> (u32, u32) {
        if !self.config.do_resize || height == 0 || width == 0 {
            return (height, width);
        }
        match self.config.size {
            ResizeSize::Exact { height, width } => (height, width),
            ResizeSize::ShortestEdge(s) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // Python: int * int is exact, then true division rounds once, then int() truncates.
                let new_long = ((s as u64 * long as u64) as f64 / short as f64) as u32;
                if width <= height {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    /// CHW float32, RGB, `3 * H * W` values: exactly transformers' `pixel_values[0]` for this image.
    pub fn preprocess(&self, img: &RgbImage) -> Vec<f32> {
        let padded;
        let img = if self.pad_to_square && img.width() != img.height() {
            padded = expand2square(img, self.pad_color());
            &padded
        } else {
            img
        };
        let (in_h, in_w) = (img.height(), img.width());
        let (rh, rw) = self.resized_size(in_h, in_w);
        let c = &self.config;
        let empty = in_h == 0 || in_w == 0;

        // Crop geometry per axis: which resized rows/columns are kept, and where they land.
        let (ys, oh) = crop_axis(rh as usize, c.crop_size.0 as usize, c.do_center_crop, empty);
        let (xs, ow) = crop_axis(rw as usize, c.crop_size.1 as usize, c.do_center_crop, empty);

        // The kept window of the resized image, u8 RGB, `ys.src.len()` rows of `xs.src.len()` pixels.
        let window: Vec<u8> = if ys.src.is_empty() || xs.src.is_empty() {
            Vec::new()
        } else if c.do_resize && (rh, rw) != (in_h, in_w) {
            resize_window(img, rw as usize, rh as usize, c.resample, &xs.src, &ys.src)
        } else {
            // No resize (or PIL's same-size early return: a copy).
            copy_window(img, &xs.src, &ys.src)
        };

        let lut = self.value_table();
        let plane = oh * ow;
        let mut out = vec![0f32; 3 * plane];
        for (ch, table) in lut.iter().enumerate() {
            out[ch * plane..(ch + 1) * plane].fill(table[0]);
        }
        let (wy, wx) = (ys.src.len(), xs.src.len());
        for r in 0..wy {
            let row = &window[r * wx * 3..(r + 1) * wx * 3];
            let base = (ys.dst + r) * ow + xs.dst;
            for (ch, table) in lut.iter().enumerate() {
                let dst = &mut out[ch * plane + base..ch * plane + base + wx];
                for (d, px) in dst.iter_mut().zip(row.chunks_exact(3)) {
                    *d = table[px[ch] as usize];
                }
            }
        }
        out
    }

    /// [`decode`] then [`Self::preprocess`].
    pub fn process_bytes(&self, bytes: &[u8]) -> Result<Vec<f32>, ImageError> {
        Ok(self.preprocess(&decode(bytes)?))
    }

    /// The float each `u8` value of each channel becomes: rescale in float64 then cast to float32
    /// (transformers' `rescale`), then normalise in float32 (transformers' `normalize`).
    fn value_table(&self) -> [[f32; 256]; 3] {
        let c = &self.config;
        let mut t = [[0f32; 256]; 3];
        for (ch, table) in t.iter_mut().enumerate() {
            let mean = c.image_mean[ch] as f32;
            let std = c.image_std[ch] as f32;
            for (v, slot) in table.iter_mut().enumerate() {
                let mut x = if c.do_rescale {
                    (v as f64 * c.rescale_factor) as f32
                } else {
                    v as f32
                };
                if c.do_normalize {
                    x = (x - mean) / std;
                }
                *slot = x;
            }
        }
        t
    }
}

/// LLaVA's `expand2square`: a `side × side` image of `background`, the original pasted at
/// `(0, (w - h) // 2)` (landscape) or `((h - w) // 2, 0)` (portrait).
pub fn expand2square(img: &RgbImage, background: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(background));
    let (x0, y0) = if w > h {
        (0, (w - h) / 2)
    } else {
        ((h - w) / 2, 0)
    };
    let (side, w, x0) = (side as usize, w as usize, x0 as usize);
    let src: &[u8] = img.as_raw();
    let dst: &mut [u8] = &mut out;
    for y in 0..h as usize {
        let d = ((y + y0 as usize) * side + x0) * 3;
        dst[d..d + w * 3].copy_from_slice(&src[y * w * 3..(y + 1) * w * 3]);
    }
    out
}

/// One axis of the centre crop: the kept source range and its offset in the output.
struct CropAxis {
    src: Range<usize>,
    dst: usize,
}

/// transformers' `center_crop` along one axis of length `n` to `crop`: start `(n - crop) // 2` when it fits;
/// otherwise the whole axis, placed after `ceil((crop - n) / 2)` zero pixels. Returns the axis and the output
/// length.
fn crop_axis(n: usize, crop: usize, do_crop: bool, empty: bool) -> (CropAxis, usize) {
    let src_len = if empty { 0 } else { n };
    if !do_crop {
        return (
            CropAxis {
                src: 0..src_len,
                dst: 0,
            },
            src_len,
        );
    }
    if empty {
        return (CropAxis { src: 0..0, dst: 0 }, crop);
    }
    if n >= crop {
        let start = (n - crop) / 2;
        (
            CropAxis {
                src: start..start + crop,
                dst: 0,
            },
            crop,
        )
    } else {
        (
            CropAxis {
                src: 0..n,
                dst: (crop - n).div_ceil(2),
            },
            crop,
        )
    }
}

fn copy_window(img: &RgbImage, xs: &Range<usize>, ys: &Range<usize>) -> Vec<u8> {
    let w = img.width() as usize;
    let src: &[u8] = img.as_raw();
    let mut out = Vec::with_capacity(ys.len() * xs.len() * 3);
    for y in ys.clone() {
        out.extend_from_slice(&src[(y * w + xs.start) * 3..(y * w + xs.end) * 3]);
    }
    out
}

/// Pillow's `PRECISION_BITS` for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `clip8`: `(acc >> PRECISION_BITS)` clamped to `0..=255` (arithmetic shift, as in C on every
/// platform Pillow builds for).
#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Fixed-point resampling coefficients for one axis (Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`).
struct AxisCoeffs {
    ksize: usize,
    /// Per output index: first input index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `out_size * ksize` fixed-point weights.
    coeffs: Vec<i32>,
}

impl AxisCoeffs {
    fn new(in_size: usize, out_size: usize, filter: Resample) -> Self {
        if in_size == out_size {
            // Pillow skips the pass (`need_horizontal` / `need_vertical` false). One tap of weight 1.0 is the
            // identity in fixed point: (v << 22 + 1 << 21) >> 22 == v.
            return AxisCoeffs {
                ksize: 1,
                bounds: (0..out_size).map(|i| (i, 1)).collect(),
                coeffs: vec![1 << PRECISION_BITS; out_size],
            };
        }
        // box = (0, in_size) as C floats: `(double)(in1 - in0) / outSize`.
        let in0 = 0f32;
        let in1 = in_size as f32;
        let scale = (in1 - in0) as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut coeffs = vec![0i32; out_size * ksize];
        let mut k = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = in0 as f64 + (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C `(int)` truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (xmax - xmin).max(0) as usize;
            let mut ww = 0.0;
            for (x, slot) in k.iter_mut().take(n).enumerate() {
                let w = filter.eval(((x as i64 + xmin) as f64 - center + 0.5) * ss);
                *slot = w;
                ww += w;
            }
            let row = &mut coeffs[xx * ksize..xx * ksize + n];
            for (dst, &w) in row.iter_mut().zip(&k[..n]) {
                let w = if ww != 0.0 { w / ww } else { w };
                let scaled = w * (1u32 << PRECISION_BITS) as f64;
                *dst = if w < 0.0 {
                    (-0.5 + scaled) as i32
                } else {
                    (0.5 + scaled) as i32
                };
            }
            bounds.push((xmin as usize, n));
        }
        AxisCoeffs {
            ksize,
            bounds,
            coeffs,
        }
    }

    #[inline(always)]
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (start, n) = self.bounds[i];
        (start, &self.coeffs[i * self.ksize..i * self.ksize + n])
    }
}

/// Pillow's `Image.resize((out_w, out_h))` of an RGB image, computing only output columns `xs` and rows `ys`
/// (row-major RGB `u8`, `ys.len() × xs.len()` pixels).
fn resize_window(
    img: &RgbImage,
    out_w: usize,
    out_h: usize,
    filter: Resample,
    xs: &Range<usize>,
    ys: &Range<usize>,
) -> Vec<u8> {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let src: &[u8] = img.as_raw();
    let horiz = AxisCoeffs::new(in_w, out_w, filter);
    let vert = AxisCoeffs::new(in_h, out_h, filter);

    // Input rows the vertical pass reads for the wanted output rows.
    let row0 = ys.clone().map(|y| vert.bounds[y].0).min().unwrap_or(0);
    let row1 = ys
        .clone()
        .map(|y| vert.bounds[y].0 + vert.bounds[y].1)
        .max()
        .unwrap_or(0);

    // Horizontal pass: input rows row0..row1, output columns xs -> intermediate u8 image.
    let tw = xs.len();
    let mut tmp = vec![0u8; (row1 - row0) * tw * 3];
    let seed = 1i32 << (PRECISION_BITS - 1);
    for (r, y) in (row0..row1).enumerate() {
        let src_row = &src[y * in_w * 3..(y + 1) * in_w * 3];
        let dst_row = &mut tmp[r * tw * 3..(r + 1) * tw * 3];
        for (px, x) in dst_row.chunks_exact_mut(3).zip(xs.clone()) {
            let (start, k) = horiz.taps(x);
            let taps = &src_row[start * 3..(start + k.len()) * 3];
            let (mut s0, mut s1, mut s2) = (seed, seed, seed);
            for (p, &w) in taps.chunks_exact(3).zip(k) {
                s0 += p[0] as i32 * w;
                s1 += p[1] as i32 * w;
                s2 += p[2] as i32 * w;
            }
            px[0] = clip8(s0);
            px[1] = clip8(s1);
            px[2] = clip8(s2);
        }
    }

    // Vertical pass over the intermediate rows; accumulate a whole output row at a time (integer sums, so the
    // order of the taps does not matter).
    let row_len = tw * 3;
    let mut out = vec![0u8; ys.len() * row_len];
    let mut acc = vec![0i32; row_len];
    for (r, y) in ys.clone().enumerate() {
        let (start, k) = vert.taps(y);
        acc.fill(seed);
        for (j, &w) in k.iter().enumerate() {
            let t = start + j - row0;
            let tmp_row = &tmp[t * row_len..(t + 1) * row_len];
            for (a, &v) in acc.iter_mut().zip(tmp_row) {
                *a += v as i32 * w;
            }
        }
        for (d, &a) in out[r * row_len..(r + 1) * row_len].iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    out
}

/// Pillow-exact `Image.resize((width, height), resample)` of a whole RGB image.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Resample) -> RgbImage {
    let (w, h) = (width as usize, height as usize);
    let data = if img.width() == 0 || img.height() == 0 || w == 0 || h == 0 {
        vec![0u8; w * h * 3]
    } else if (width, height) == img.dimensions() {
        img.as_raw().clone()
    } else {
        resize_window(img, w, h, filter, &(0..w), &(0..h))
    };
    RgbImage::from_raw(width, height, data).expect("buffer has width*height*3 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: Value) -> Result<ImageProcessorConfig, ImageError> {
        ImageProcessorConfig::from_json(&v)
    }

    #[test]
    fn parses_dict_spellings() {
        let c = cfg(json!({
            "crop_size": {"height": 336, "width": 300},
            "do_center_crop": true,
            "do_convert_rgb": true,
            "do_normalize": true,
            "do_rescale": true,
            "do_resize": true,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "processor_class": "LlavaProcessor",
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": 336}
        }))
        .unwrap();
        assert_eq!(c.size, ResizeSize::ShortestEdge(336));
        assert_eq!(c.crop_size, (336, 300));
        assert_eq!(c.resample, Resample::Bicubic);
        assert_eq!(c.rescale_factor, 1.0 / 255.0);
        assert_eq!(c.image_std, OPENAI_CLIP_STD);
    }

    #[test]
    fn parses_legacy_int_spellings_and_defaults() {
        // openai/clip-vit-large-patch14-336's own file: ints, no do_rescale / rescale_factor.
        let c = cfg(json!({
            "crop_size": 336, "do_center_crop": true, "do_normalize": true, "do_resize": true,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3, "size": 336
        }))
        .unwrap();
        assert_eq!(c, ImageProcessorConfig::clip(336));
        let c = cfg(json!({"size": {"height": 30, "width": 20}, "resample": 2, "image_mean": 0.5}))
            .unwrap();
        assert_eq!(
            c.size,
            ResizeSize::Exact {
                height: 30,
                width: 20
            }
        );
        assert_eq!(c.resample, Resample::Bilinear);
        assert_eq!(c.image_mean, [0.5; 3]);
        assert_eq!(cfg(json!({})).unwrap(), ImageProcessorConfig::clip(224));
        assert_eq!(
            cfg(json!({"image_mean": null})).unwrap(),
            ImageProcessorConfig::clip(224)
        );
    }

    #[test]
    fn round_trips_through_json_and_serde() {
        for c in [
            ImageProcessorConfig::clip(336),
            cfg(
                json!({"size": {"height": 30, "width": 20}, "crop_size": [8, 9], "resample": 2,
                       "do_normalize": false, "rescale_factor": 0.5}),
            )
            .unwrap(),
        ] {
            assert_eq!(cfg(c.to_json()).unwrap(), c);
            let s = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<ImageProcessorConfig>(&s).unwrap(), c);
        }
        let j = ImageProcessorConfig::clip(336).to_json();
        assert_eq!(j["size"], json!({"shortest_edge": 336}));
        assert_eq!(j["crop_size"], json!({"height": 336, "width": 336}));
        assert_eq!(j["resample"], json!(3));
        assert_eq!(j["image_processor_type"], json!("CLIPImageProcessor"));
        assert_eq!(
            serde_json::to_string(&j["rescale_factor"]).unwrap(),
            "0.00392156862745098"
        );
    }

    #[test]
    fn rejects_unsupported_resample_and_bad_values() {
        let e = cfg(json!({"resample": 1})).unwrap_err().to_string();
        assert!(
            e.contains("resample") && e.contains("LANCZOS") && e.contains("BICUBIC"),
            "{e}"
        );
        let e = cfg(json!({"resample": 0})).unwrap_err().to_string();
        assert!(e.contains("NEAREST"), "{e}");
        for (bad, needle) in [
            (json!({"size": {"longest_edge": 3}}), "shortest_edge"),
            (json!({"size": 0}), "positive"),
            (json!({"crop_size": "big"}), "crop_size"),
            (json!({"image_mean": [0.5, 0.5]}), "3 values"),
            (json!({"image_std": [0.5, 0.0, 0.5]}), "image_std"),
            (json!({"do_resize": "yes"}), "do_resize"),
            (json!([1, 2]), "object"),
        ] {
            let e = cfg(bad.clone()).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad} -> {e}");
        }
        let err =
            serde_json::from_value::<ImageProcessorConfig>(json!({"resample": 5})).unwrap_err();
        assert!(err.to_string().contains("HAMMING"), "{err}");
    }

    #[test]
    fn from_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("preprocessor_config.json");
        std::fs::write(&p, r#"{"resample": 4}"#).unwrap();
        let e = ImageProcessorConfig::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("preprocessor_config.json") && e.contains("BOX"),
            "{e}"
        );
        std::fs::write(&p, "{not json").unwrap();
        let e = ImageProcessorConfig::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("preprocessor_config.json") && e.contains("JSON"),
            "{e}"
        );
        let missing = dir.path().join("nope.json");
        let e = ImageProcessorConfig::from_file(&missing).unwrap_err();
        assert!(matches!(e, ImageError::Io { .. }) && e.to_string().contains("nope.json"));
    }

    fn png(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn corrupt_images_are_errors_not_panics() {
        let img = RgbImage::from_fn(17, 9, |x, y| image::Rgb([x as u8 * 9, y as u8 * 20, 7]));
        let good = png(&img);
        assert_eq!(decode(&good).unwrap(), img);

        // Truncated PNG: the format is known, the decoder's reason is kept.
        let e = decode(&good[..good.len() / 2]).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::Decode {
                    format: ImageFormat::Png,
                    ..
                }
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains("Png") && msg.contains("bytes):"), "{msg}");
        assert!(std::error::Error::source(&e).is_some());

        // Corrupted chunk data (bad CRC / bad zlib stream).
        let mut bad = good.clone();
        for b in bad.iter_mut().skip(40).take(20) {
            *b ^= 0x5a;
        }
        assert!(matches!(decode(&bad), Err(ImageError::Decode { .. })));

        // Not an image at all.
        let e = decode(b"hello, this is not an image").unwrap_err();
        assert!(matches!(e, ImageError::UnknownFormat { .. }), "{e:?}");
        assert!(e.to_string().contains("68 65 6c 6c"), "{e}");
        assert!(matches!(decode(&[]), Err(ImageError::UnknownFormat { .. })));

        // A JPEG header with nothing after it.
        let e = decode(&[0xff, 0xd8, 0xff, 0xe0, 0, 16, b'J', b'F']).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::Decode {
                    format: ImageFormat::Jpeg,
                    ..
                }
            ),
            "{e:?}"
        );

        let p = ImageProcessor::new(ImageProcessorConfig::clip(8), false);
        assert!(p.process_bytes(&good[..30]).is_err());
        assert_eq!(p.process_bytes(&good).unwrap().len(), 3 * 8 * 8);
    }

    #[test]
    fn decode_converts_to_rgb() {
        let gray = image::GrayImage::from_fn(5, 4, |x, y| image::Luma([(x * 40 + y) as u8]));
        let mut buf = Vec::new();
        gray.write_to(&mut Cursor::new(&mut buf), ImageFormat::Png)
            .unwrap();
        let rgb = decode(&buf).unwrap();
        assert_eq!(rgb.get_pixel(3, 2).0, [122, 122, 122]);
        let rgba = image::RgbaImage::from_fn(3, 3, |x, _| image::Rgba([10, 20, 30, x as u8 * 100]));
        let mut buf = Vec::new();
        rgba.write_to(&mut Cursor::new(&mut buf), ImageFormat::Png)
            .unwrap();
        // Alpha is dropped, not composited (PIL's convert("RGB")).
        assert_eq!(decode(&buf).unwrap().get_pixel(0, 0).0, [10, 20, 30]);
    }

    #[test]
    fn geometry() {
        let p = ImageProcessor::new(ImageProcessorConfig::clip(336), false);
        assert_eq!(p.resized_size(375, 500), (336, 448));
        assert_eq!(p.resized_size(500, 375), (448, 336));
        // 336 * 640 / 427 = 503.6 -> 503 (truncated, not rounded).
        assert_eq!(p.resized_size(427, 640), (336, 503));
        assert_eq!(p.output_size(), (336, 336));
        assert_eq!(p.fixed_output_size(), Some((336, 336)));
        assert_eq!(p.pad_color(), [122, 116, 104]);
        let mut c = ImageProcessorConfig::clip(32);
        c.do_center_crop = false;
        let p = ImageProcessor::new(c, false);
        assert_eq!(p.fixed_output_size(), None);
        assert_eq!(p.output_size_for(48, 64), (32, 42));
        let img = RgbImage::new(64, 48);
        assert_eq!(p.preprocess(&img).len(), 3 * 32 * 42);
        let p = ImageProcessor::new(p.config, true);
        assert_eq!(p.output_size_for(48, 64), (32, 32));
    }

    #[test]
    fn crop_pads_small_images_with_zero_pixels() {
        let mut c = ImageProcessorConfig::clip(8);
        c.do_resize = false;
        c.crop_size = (7, 4);
        let p = ImageProcessor::new(c, false);
        let img = RgbImage::from_pixel(6, 4, image::Rgb([255, 255, 255]));
        let out = p.preprocess(&img);
        let lut = p.value_table();
        // Rows: 4 < 7, pad ceil(3/2) = 2 above, 1 below. Columns: 6 >= 4, start (6 - 4) // 2 = 1.
        for y in 0..7 {
            for x in 0..4 {
                let expect = if (2..6).contains(&y) {
                    lut[0][255]
                } else {
                    lut[0][0]
                };
                assert_eq!(out[y * 4 + x], expect, "({y}, {x})");
            }
        }
    }

    #[test]
    fn expand2square_offsets() {
        let img = RgbImage::from_pixel(5, 2, image::Rgb([1, 2, 3]));
        let sq = expand2square(&img, [9, 9, 9]);
        assert_eq!(sq.dimensions(), (5, 5));
        // (5 - 2) // 2 = 1 row above.
        let rows: Vec<u8> = (0..5).map(|y| sq.get_pixel(0, y).0[0]).collect();
        assert_eq!(rows, [9, 1, 1, 9, 9]);
        let img = RgbImage::from_pixel(2, 5, image::Rgb([1, 2, 3]));
        let sq = expand2square(&img, [9, 9, 9]);
        let cols: Vec<u8> = (0..5).map(|x| sq.get_pixel(x, 0).0[0]).collect();
        assert_eq!(cols, [9, 1, 1, 9, 9]);
    }

    #[test]
    fn same_size_resize_is_identity_and_constant_images_stay_constant() {
        let img = RgbImage::from_fn(13, 7, |x, y| {
            image::Rgb([(x * 19) as u8, (y * 31) as u8, 200])
        });
        assert_eq!(resize(&img, 13, 7, Resample::Bicubic), img);
        // Only one axis changes: the other pass is skipped, so its pixels are untouched.
        let r = resize(&img, 13, 20, Resample::Bicubic);
        assert_eq!(r.dimensions(), (13, 20));
        let flat = RgbImage::from_pixel(31, 17, image::Rgb([255, 0, 128]));
        for (w, h) in [(5, 3), (64, 40), (31, 9), (2, 90)] {
            for f in [Resample::Bilinear, Resample::Bicubic] {
                let r = resize(&flat, w, h, f);
                assert!(r.pixels().all(|p| p.0 == [255, 0, 128]), "{w}x{h} {f:?}");
            }
        }
    }

    #[test]
    fn windowed_resize_equals_full_resize_then_crop() {
        let img = RgbImage::from_fn(53, 41, |x, y| {
            image::Rgb([
                (x * 7 + y * 3) as u8,
                ((x ^ y) * 11) as u8,
                if (x / 4 + y / 4) % 2 == 0 { 0 } else { 255 },
            ])
        });
        let full = resize(&img, 30, 23, Resample::Bicubic);
        let win = resize_window(&img, 30, 23, Resample::Bicubic, &(4..26), &(3..20));
        for (r, y) in (3..20).enumerate() {
            for (c, x) in (4..26).enumerate() {
                assert_eq!(
                    &win[(r * 22 + c) * 3..(r * 22 + c) * 3 + 3],
                    &full.get_pixel(x, y).0
                );
            }
        }
    }
}
