//! Drawing. Signed distance functions in pixel units, antialiased by coverage, with a dark outline.

use super::*;

/// Unit vectors at -90° + 36°·k (k = 0..10): the star's alternating outer and inner vertices.
/// Written out so that no platform-dependent `sin`/`cos` is involved.
pub(super) const STAR_DIRS: [(f32, f32); 10] = [
    (0.0, -1.0),
    (0.587_785_3, -0.809_017),
    (0.951_056_5, -0.309_017),
    (0.951_056_5, 0.309_017),
    (0.587_785_3, 0.809_017),
    (0.0, 1.0),
    (-0.587_785_3, 0.809_017),
    (-0.951_056_5, 0.309_017),
    (-0.951_056_5, -0.309_017),
    (-0.587_785_3, -0.809_017),
];
pub(super) const SQRT3_2: f32 = 0.866_025_4;

#[derive(Debug, Clone, Copy)]
pub(super) struct Instance {
    pub(super) shape: Shape,
    pub(super) cx: f32,
    pub(super) cy: f32,
    pub(super) r: f32,
    pub(super) fill: [f32; 3],
}

/// Exact signed distance to a polygon (negative inside); after Inigo Quilez.
pub(super) fn polygon_sdf(v: &[(f32, f32)], px: f32, py: f32) -> f32 {
    let n = v.len();
    let (dx, dy) = (px - v[0].0, py - v[0].1);
    let mut d = dx * dx + dy * dy;
    let mut s = 1.0f32;
    let mut j = n - 1;
    for i in 0..n {
        let (ex, ey) = (v[j].0 - v[i].0, v[j].1 - v[i].1);
        let (wx, wy) = (px - v[i].0, py - v[i].1);
        let t = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0);
        let (bx, by) = (wx - ex * t, wy - ey * t);
        d = d.min(bx * bx + by * by);
        let c1 = py >= v[i].1;
        let c2 = py < v[j].1;
        let c3 = ex * wy > ey * wx;
        if (c1 && c2 && c3) || (!c1 && !c2 && !c3) {
            s = -s;
        }
        j = i;
    }
    s * d.sqrt()
}

/// Signed distance (pixels, negative inside) from `(x, y)`, relative to the centre, to a shape of
/// nominal radius `r`; `line` is the outline width, which keeps ring walls thick enough to show colour.
pub(super) fn shape_sdf(shape: Shape, r: f32, line: f32, x: f32, y: f32) -> f32 {
    match shape {
        Shape::Circle => (x * x + y * y).sqrt() - r,
        Shape::Ring => {
            let t = (0.45 * r).max(2.0 * line + 1.5);
            ((x * x + y * y).sqrt() - (r - 0.5 * t)).abs() - 0.5 * t
        }
        Shape::Square => {
            let s = 0.82 * r;
            let (qx, qy) = (x.abs() - s, y.abs() - s);
            let (ox, oy) = (qx.max(0.0), qy.max(0.0));
            (ox * ox + oy * oy).sqrt() + qx.max(qy).min(0.0)
        }
        Shape::Diamond => {
            let v = [(0.0, -r), (0.8 * r, 0.0), (0.0, r), (-0.8 * r, 0.0)];
            polygon_sdf(&v, x, y)
        }
        Shape::Triangle => {
            // Equilateral, pointing up, centroid at the origin, slightly enlarged to look balanced.
            let k = 1.12 * r;
            let v = [(0.0, -k), (SQRT3_2 * k, 0.5 * k), (-SQRT3_2 * k, 0.5 * k)];
            polygon_sdf(&v, x, y)
        }
        Shape::Star => {
            let outer = 1.2 * r;
            let inner = 0.5 * outer;
            let mut v = [(0.0f32, 0.0f32); 10];
            for (k, d) in STAR_DIRS.iter().enumerate() {
                let m = if k % 2 == 0 { outer } else { inner };
                v[k] = (d.0 * m, d.1 * m);
            }
            polygon_sdf(&v, x, y)
        }
    }
}

/// Places every shape of every group: a 2x2 grid of cells per region, `count` of them used.
/// Shape instances; `big` draws each shape about two thirds of the image wide, centred towards its region.
pub(super) fn layout(groups: &[Group], size: f32, rng: &mut Rng, big: bool) -> Vec<Instance> {
    let mut out = Vec::new();
    if big {
        for g in groups {
            let [x0, y0, x1, y1] = REGIONS[g.region];
            let fill = COLOURS[g.colour].1.map(f32::from);
            let r = size * rng.uniform(0.28, 0.34);
            let clamp = |v: f32| v.clamp(r * 1.1, size - r * 1.1);
            for k in 0..g.count {
                // Two shapes sit side by side (or one above the other) around the region's centre.
                let off = if g.count == 2 {
                    (k as f32 - 0.5) * r * 0.9
                } else {
                    0.0
                };
                out.push(Instance {
                    shape: SHAPE_KINDS[g.shape],
                    cx: clamp(0.5 * (x0 + x1) * size + off),
                    cy: clamp(0.5 * (y0 + y1) * size),
                    r: if g.count == 2 { 0.6 * r } else { r },
                    fill,
                });
            }
        }
        return out;
    }
    for g in groups {
        let [x0, y0, x1, y1] = REGIONS[g.region];
        let (w, h) = ((x1 - x0) * size, (y1 - y0) * size);
        // Grid of cells: one big cell for a single shape, two along the longer side for a pair, 2x2
        // otherwise (so fewer shapes are drawn larger).
        let (cols, rows) = match g.count {
            1 => (1, 1),
            2 if w >= h => (2, 1),
            2 => (1, 2),
            _ => (2, 2),
        };
        let (cw, ch) = (w / cols as f32, h / rows as f32);
        let fill = COLOURS[g.colour].1.map(f32::from);
        for cell in rng.sample(cols * rows, g.count) {
            let (col, row) = ((cell % cols) as f32, (cell / cols) as f32);
            let r = 0.5 * cw.min(ch) * rng.uniform(0.72, 0.9);
            let (sx, sy) = ((0.5 * cw - 1.2 * r).max(0.0), (0.5 * ch - 1.2 * r).max(0.0));
            let cx = x0 * size + (col + 0.5) * cw + sx * rng.uniform(-1.0, 1.0);
            let cy = y0 * size + (row + 0.5) * ch + sy * rng.uniform(-1.0, 1.0);
            out.push(Instance {
                shape: SHAPE_KINDS[g.shape],
                cx,
                cy,
                r,
                fill,
            });
        }
    }
    out
}

/// Draws the scene into an RGB8 buffer of `size`×`size` pixels.
pub(super) fn render(groups: &[Group], seed: u64, idx: u64, size: u32, big: bool) -> Vec<u8> {
    let mut rng = Rng::for_row(seed, idx, 3);
    let n = size as usize;
    let sf = size as f32;
    // Light two-colour gradient background in a random direction.
    let c0: [f32; 3] = [0; 3].map(|_| rng.uniform(205.0, 250.0));
    let c1: [f32; 3] = [0; 3].map(|_| rng.uniform(205.0, 250.0));
    let wx = rng.unit();
    let wy = 1.0 - wx;
    let (flip_x, flip_y) = (rng.below(2) == 1, rng.below(2) == 1);
    let mut buf = vec![0f32; n * n * 3];
    let denom = (n.max(2) - 1) as f32;
    for y in 0..n {
        let fy = (if flip_y { n - 1 - y } else { y }) as f32 / denom;
        for x in 0..n {
            let fx = (if flip_x { n - 1 - x } else { x }) as f32 / denom;
            let t = wx * fx + wy * fy;
            let p = (y * n + x) * 3;
            for c in 0..3 {
                buf[p + c] = c0[c] + (c1[c] - c0[c]) * t;
            }
        }
    }
    // Shapes: fill colour inside, a darker outline band at the edge, antialiased over one pixel.
    let outline = (sf / 96.0).max(1.0);
    for inst in layout(groups, sf, &mut rng, big) {
        let dark = inst.fill.map(|v| v * 0.45);
        let reach = 1.3 * inst.r + 2.0;
        let xa = ((inst.cx - reach).floor().max(0.0)) as usize;
        let xb = ((inst.cx + reach).ceil().min(sf)) as usize;
        let ya = ((inst.cy - reach).floor().max(0.0)) as usize;
        let yb = ((inst.cy + reach).ceil().min(sf)) as usize;
        for y in ya..yb {
            for x in xa..xb {
                let d = shape_sdf(
                    inst.shape,
                    inst.r,
                    outline,
                    x as f32 + 0.5 - inst.cx,
                    y as f32 + 0.5 - inst.cy,
                );
                let cover = (0.5 - d).clamp(0.0, 1.0);
                if cover <= 0.0 {
                    continue;
                }
                let inner = (0.5 - (d + outline)).clamp(0.0, 1.0);
                let p = (y * n + x) * 3;
                for c in 0..3 {
                    buf[p + c] = buf[p + c] * (1.0 - cover)
                        + dark[c] * (cover - inner)
                        + inst.fill[c] * inner;
                }
            }
        }
    }
    // Mild luminance noise, then 8-bit.
    let mut out = vec![0u8; n * n * 3];
    for (px, o) in buf.chunks_exact(3).zip(out.chunks_exact_mut(3)) {
        let noise = rng.below(9) as f32 - 4.0;
        for c in 0..3 {
            o[c] = (px[c] + noise + 0.5).floor().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

pub(super) fn render_png(
    groups: &[Group],
    seed: u64,
    idx: u64,
    size: u32,
    big: bool,
) -> Result<Vec<u8>, image::ImageError> {
    let rgb = render(groups, seed, idx, size, big);
    let mut png = Vec::with_capacity(rgb.len());
    PngEncoder::new_with_quality(&mut png, CompressionType::Default, FilterType::Adaptive)
        .write_image(&rgb, size, size, ExtendedColorType::Rgb8)?;
    Ok(png)
}
