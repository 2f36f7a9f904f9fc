//! Generation against transformers: greedy decoding with the KV cache equals
//! `LlavaForConditionalGeneration.generate(do_sample=False)` token for token, for a batch of prompts of
//! different lengths (left-padded) and for each prompt alone, with the oracle run at test time on this machine.
//! K samples of a prompt share its prefill; seeded sampling repeats itself.

use std::path::Path;
use std::process::Command;

use ddpo::data::image::{ImageProcessor, ImageProcessorConfig};
use ddpo::data::template::{Template, TextEncoder};
use ddpo::model::generate::{GenerateOptions, Sampling};
use ddpo::model::llava::Llava;
use tch::{Device, Kind, Tensor};

use crate::common::{ddpo_cmd as ddpo, png, python, text_of, train_on_cpu};

const MAX_NEW: usize = 40;

struct Prompts {
    ids: Vec<Vec<i64>>,
    pixels: Tensor,
    eos: i64,
    pad: i64,
}

/// Three prompts of different lengths with different images, encoded as the training pipeline encodes them.
fn prompts(model: &Path) -> Prompts {
    let cfg = ddpo::model::config::LlavaConfig::from_dir(model).unwrap();
    let tok = TextEncoder::load_tokenizer(model).unwrap();
    let pad = i64::from(tok.token_to_id("<pad>").expect("a <pad> token"));
    let text = TextEncoder::new(
        tok,
        Template::LlavaV1,
        cfg.image_token_index(),
        cfg.num_image_tokens(),
        4096,
    )
    .unwrap();
    let pcfg = ImageProcessorConfig::from_file(&model.join("preprocessor_config.json")).unwrap();
    let image = ImageProcessor::new(pcfg, false);
    let questions = [
        "What is in the image?",
        "Describe the picture.",
        "How many red circles are there on the left of the blue square?",
    ];
    let mut ids = Vec::new();
    let mut pixels = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        let p = text.encode_prompt(q).unwrap();
        ids.push(p.into_iter().map(i64::from).collect());
        let px = image
            .process_bytes(&png(40 + 7 * i as u32, 32, i as u8))
            .unwrap();
        pixels.push(Tensor::from_slice(&px));
    }
    let side = cfg.vision_config.image_size as i64;
    let pixels = Tensor::stack(&pixels, 0).view([-1, 3, side, side]);
    Prompts {
        ids,
        pixels,
        eos: i64::from(text.eos_id()),
        pad,
    }
}

fn greedy(p: &Prompts, samples: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: MAX_NEW,
        sampling: Sampling::Greedy,
        samples,
        seed: 0,
        eos_id: p.eos,
        pad_id: p.pad,
        first_index: 0,
    }
}

/// transformers' answers: `batched` rows and each prompt alone, cut after EOS.
fn oracle(model: &Path, p: &Prompts, tmp: &Path) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let t = p.ids.iter().map(Vec::len).max().unwrap();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for row in &p.ids {
        let pad = t - row.len();
        ids.extend(std::iter::repeat_n(p.pad, pad).chain(row.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, row.len())));
    }
    let b = p.ids.len() as i64;
    let inputs = tmp.join("inputs.safetensors");
    Tensor::write_safetensors(
        &[
            ("input_ids", Tensor::from_slice(&ids).view([b, t as i64])),
            (
                "attention_mask",
                Tensor::from_slice(&mask).view([b, t as i64]),
            ),
            ("pixel_values", p.pixels.shallow_clone()),
        ],
        &inputs,
    )
    .unwrap();
    let out = tmp.join("out.safetensors");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracles/llava_generate.py");
    let o = Command::new(python())
        .arg(script)
        .arg(model)
        .arg(&inputs)
        .arg(&out)
        .args([MAX_NEW.to_string(), p.eos.to_string(), p.pad.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (set DDPO_PYTHON): {e}", python()));
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let got: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();
    let cut = |t: &Tensor| {
        let v = Vec::<i64>::try_from(t.reshape([-1])).unwrap();
        match v.iter().position(|&x| x == p.eos) {
            Some(i) => v[..=i].to_vec(),
            None => v,
        }
    };
    let batched = (0..b).map(|i| cut(&got["batched"].get(i))).collect();
    let single = (0..b).map(|i| cut(&got[&format!("single_{i}")])).collect();
    (batched, single)
}

/// Our greedy answers equal transformers', batched and one prompt at a time, for the model in `model`.
fn check_greedy(model: &Path, tmp: &Path, expect_eos: bool) {
    let (_vs, m) = Llava::load(model, Device::Cpu, Kind::Float).unwrap();
    let p = prompts(model);
    let (want_batched, want_single) = oracle(model, &p, tmp);
    let ours: Vec<Vec<i64>> = m
        .generate(&p.ids, &p.pixels, &greedy(&p, 1))
        .into_iter()
        .map(|mut s| s.remove(0))
        .collect();
    let name = model.display();
    assert_eq!(ours, want_batched, "{name}: batched, left-padded prompts");
    for (i, want) in want_single.iter().enumerate() {
        let alone = m.generate(
            &p.ids[i..=i],
            &p.pixels.narrow(0, i as i64, 1),
            &greedy(&p, 1),
        );
        assert_eq!(&alone[0][0], want, "{name}: prompt {i} alone");
    }
    // The model must say something for the comparison to mean anything.
    assert!(ours.iter().all(|a| a.len() >= 2), "{name}: {ours:?}");
    if expect_eos {
        assert!(
            ours.iter().all(|a| a.last() == Some(&p.eos)),
            "{name}: {ours:?}"
        );
    }
}

/// Random tiny and small models, and a tiny model fine-tuned on synthetic descriptions (whose answers are
/// sentences that end with EOS, so stopping is compared too).
#[test]
fn greedy_generation_equals_transformers_batched_and_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for (preset, seed) in [("tiny", 11), ("small", 1)] {
        let model = d.join(preset);
        ddpo::preset::init_model(&model, preset, seed).unwrap();
        check_greedy(&model, d, false);
    }
    check_greedy(&fine_tuned_tiny(d), d, true);
}

/// A tiny model after 96 SFT steps on easy synthetic scenes.
fn fine_tuned_tiny(d: &Path) -> std::path::PathBuf {
    use ddpo::data::synth::{write_synthetic, Difficulty, SynthOptions};
    write_synthetic(&SynthOptions {
        out_dir: d.join("data"),
        pairs: 512,
        shards: 1,
        seed: 1,
        image_size: 48,
        rows_per_group: 64,
        prefix: "train".into(),
        difficulty: Difficulty::Easy,
    })
    .unwrap();
    ddpo::preset::init_model(&d.join("base"), "tiny", 0).unwrap();
    let text = format!(
        "[model]\npath = \"{d}/base\"\n[data]\ntrain = [\"{d}/data/*.parquet\"]\n[ddpo]\nloss = \"sft\"\n\
         [train]\nepochs = 3\nbatch_size = 16\nmicro_batch_size = 8\nlr = 3e-3\noutput_dir = \"{d}/sft\"\n",
        d = d.display()
    );
    let p = d.join("sft.toml");
    std::fs::write(&p, text).unwrap();
    train_on_cpu(&p)
}

#[test]
fn samples_share_the_prefill_and_a_seed_repeats_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    ddpo::preset::init_model(&model, "tiny", 12).unwrap();
    let (_vs, m) = Llava::load(&model, Device::Cpu, Kind::Float).unwrap();
    let p = prompts(&model);
    // Greedy K = 3: every sample is the prompt's single greedy answer.
    let one = m.generate(&p.ids, &p.pixels, &greedy(&p, 1));
    let three = m.generate(&p.ids, &p.pixels, &greedy(&p, 3));
    for (a, k) in one.iter().zip(&three) {
        assert_eq!(k.len(), 3);
        assert!(k.iter().all(|s| s == &a[0]), "{k:?} vs {a:?}");
    }
    let sampled = |seed| {
        let opts = GenerateOptions {
            sampling: Sampling::Sample {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
            },
            seed,
            ..greedy(&p, 4)
        };
        m.generate(&p.ids, &p.pixels, &opts)
    };
    let a = sampled(5);
    assert_eq!(a, sampled(5), "the same seed gives the same answers");
    assert_ne!(a, sampled(6), "another seed gives other answers");
    // A random model's distribution is broad: the four samples of a prompt are not all the same.
    assert!(a.iter().any(|k| k.iter().any(|s| s != &k[0])), "{a:?}");
}

/// `ddpo generate` over a shard with one bad row: every good prompt answered K times into one complete file,
/// the bad row skipped and named; the answers equal the library's greedy answers; a prompts file works too
/// and a bad line is refused naming it.
#[test]
fn generate_command_answers_every_good_row_and_names_bad_ones() {
    use crate::common::{good_row, write_rlhfv};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = dir.join("tiny");
    ddpo::preset::init_model(&model, "tiny", 13).unwrap();
    let mut rows: Vec<_> = (0..5).map(good_row).collect();
    rows[2].image = Some(b"not an image".to_vec());
    let shard = dir.join("prompts.parquet");
    write_rlhfv(&shard, &rows, 2);
    let out = dir.join("out/answers.parquet");
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let o = ddpo(&[
        "generate",
        "--model",
        &s(&model),
        "--data",
        &s(&shard),
        "--out",
        &s(&out),
        "--samples",
        "2",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
        "--batch-size",
        "3",
    ]);
    let text = text_of(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("prompts.parquet: row 2: image"), "{text}");
    assert!(text.contains("4 prompts, 8 answers"), "{text}");
    let answers = ddpo::generate::read_answers(&out).unwrap();
    assert_eq!(answers.len(), 8);
    let ids: Vec<&str> = answers.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["0", "0", "1", "1", "3", "3", "4", "4"]);
    assert!(answers
        .iter()
        .all(|a| !a.response_ids.is_empty() && a.response_ids.len() <= 6));
    // Greedy: both samples of a prompt are the same, and equal what the library generates for it.
    let (_vs, m) = Llava::load(&model, Device::Cpu, Kind::Float).unwrap();
    let p = prompts_of_rows(&model, &answers);
    let lib = m.generate(
        &p.ids,
        &p.pixels,
        &GenerateOptions {
            max_new_tokens: 6,
            ..greedy(&p, 1)
        },
    );
    for (i, a) in answers.chunks(2).enumerate() {
        assert_eq!(a[0].response_ids, a[1].response_ids);
        let want: Vec<i32> = lib[i][0].iter().map(|&t| t as i32).collect();
        assert_eq!(a[0].response_ids, want, "prompt {}", a[0].id);
    }
    // Nothing but the answers file is left in its folder.
    let left: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().collect();
    assert_eq!(left.len(), 1);
    // A prompts file: an image path relative to it; a bad line is named.
    std::fs::write(dir.join("a.png"), png(30, 30, 9)).unwrap();
    let file = dir.join("prompts.jsonl");
    std::fs::write(
        &file,
        "{\"image\": \"a.png\", \"question\": \"What is here?\", \"id\": \"x\"}\n",
    )
    .unwrap();
    let out2 = dir.join("answers2.parquet");
    let o = ddpo(&[
        "generate",
        "--model",
        &s(&model),
        "--prompts",
        &s(&file),
        "--out",
        &s(&out2),
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "--temperature",
        "0.8",
        "--seed",
        "3",
    ]);
    assert!(o.status.success(), "{}", text_of(&o));
    let a = ddpo::generate::read_answers(&out2).unwrap();
    assert_eq!((a.len(), a[0].id.as_str()), (1, "x"));
    std::fs::write(
        &file,
        "{\"image\": \"a.png\", \"question\": \"q\"}\n{\"image\": 3}\n",
    )
    .unwrap();
    let o = ddpo(&[
        "generate",
        "--model",
        &s(&model),
        "--prompts",
        &s(&file),
        "--out",
        &s(&out2),
        "--device",
        "cpu",
    ]);
    let text = text_of(&o);
    assert!(
        !o.status.success() && text.contains("prompts.jsonl: line 2"),
        "{text}"
    );
}

/// The prompts of answer rows, encoded as `ddpo generate` encodes them.
fn prompts_of_rows(model: &Path, rows: &[ddpo::generate::AnswerRow]) -> Prompts {
    let pre = ddpo::data::pipeline::Preprocessor::from_model_dir(model, "llava_v1", 4096, false, 1)
        .unwrap();
    let rows: Vec<_> = rows
        .iter()
        .step_by(2)
        .map(|r| {
            let ids = pre.text.encode_prompt(&r.question).unwrap();
            (ids, pre.image.process_bytes(&r.image).unwrap())
        })
        .collect();
    let (ids, pixels) = ddpo::data::collate::prompt_batch(
        rows.iter().map(|(i, p)| (i.as_slice(), p.as_slice())),
        pre.image_hw(),
    );
    Prompts {
        ids,
        pixels,
        eos: i64::from(pre.text.eos_id()),
        pad: i64::from(pre.pad_id()),
    }
}

/// A benchmark's prompts file as RLHF-V ships them (base64 `image`, integer `image_id`, `question_id`, keys
/// ddpo does not use) answered into `.jsonl` in the format RLHF-V's evaluation scripts read: one line per
/// answer with `question_id`, `image_id` (kept as given), `prompt`, `text`, `model_id`; the same answers as the
/// parquet output.
#[test]
fn benchmark_prompts_answered_in_the_rlhf_v_answer_format() {
    use base64::Engine as _;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = dir.join("tiny");
    ddpo::preset::init_model(&model, "tiny", 21).unwrap();
    let b64 = |seed| base64::engine::general_purpose::STANDARD.encode(png(36, 30, seed));
    let lines = [
        serde_json::json!({"image_id": 139, "question_id": 7, "question": "What is in the image?",
                           "image": b64(1), "org_idx": 0, "metainfos": {"x": 1}}),
        serde_json::json!({"image_id": 285, "question": "Describe the picture.", "image": b64(2)}),
    ];
    let file = dir.join("obj_halbench_300_with_image.jsonl");
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&file, text.join("\n") + "\n").unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let run = |out: &Path| {
        let o = ddpo(&[
            "generate",
            "--model",
            &s(&model),
            "--prompts",
            &s(&file),
            "--out",
            &s(out),
            "--device",
            "cpu",
            "--max-new-tokens",
            "8",
        ]);
        assert!(o.status.success(), "{}", text_of(&o));
    };
    let jsonl = dir.join("results/obj_halbench_answer.jsonl");
    let parquet = dir.join("results/answers.parquet");
    run(&jsonl);
    run(&parquet);
    let got: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want = ddpo::generate::read_answers(&parquet).unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(
        (&got[0]["image_id"], &got[0]["question_id"]),
        (&serde_json::json!(139), &serde_json::json!(7))
    );
    assert_eq!(
        (&got[1]["image_id"], &got[1]["question_id"]),
        (&serde_json::json!(285), &serde_json::json!(1))
    );
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["prompt"].as_str(), Some(w.question.as_str()));
        assert_eq!(g["text"].as_str(), Some(w.response.as_str()));
        assert_eq!(g["model_id"].as_str(), Some("tiny"));
    }
    assert_eq!(
        want[0].id, "139",
        "the prompt id is the benchmark's image id"
    );
}
