use ddpo::data::image::*;
#[test]
fn scratch() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image/images");
    for f in ["jpeg420_333x250.jpg", "jpeg444_333x250.jpg"] {
        let img = decode(&std::fs::read(dir.join(f)).unwrap()).unwrap();
        std::fs::write(format!("/tmp/{f}.rgb"), img.as_raw()).unwrap();
        let p = ImageProcessor::new(ImageProcessorConfig::clip(336), false);
        let out = p.preprocess(&img);
        let b: Vec<u8> = out.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(format!("/tmp/{f}.336.f32"), b).unwrap();
    }
    // timing
    let img = image::RgbImage::from_fn(500, 375, |x, y| image::Rgb([(x * 7 + y) as u8, (x ^ y) as u8, (x * y) as u8]));
    let p = ImageProcessor::new(ImageProcessorConfig::clip(336), true);
    let q = ImageProcessor::new(ImageProcessorConfig::clip(336), false);
    for pr in [&q, &p] {
        let t = std::time::Instant::now();
        let mut s = 0f32;
        for _ in 0..50 { s += pr.preprocess(&img)[1000]; }
        println!("pad={} {:.2} ms/image ({s})", pr.pad_to_square, t.elapsed().as_secs_f64() * 1000.0 / 50.0);
    }
}
