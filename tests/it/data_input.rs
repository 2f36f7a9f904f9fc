//! Bad input on the data side: each case gets a clear error naming file, row or key, never a panic, and no
//! good row is lost. Also the two layouts and row-group streaming.

use std::sync::Arc;

use crate::common::*;
use arrow::array::{ArrayRef, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use ddpo::config::OnBadRow;
use ddpo::data::pipeline::{ExampleStream, Preprocessor};
use ddpo::data::reader::{Layout, ShardReader};
use ddpo::data::DataError;

fn preprocessor(dir: &std::path::Path) -> Preprocessor {
    let model = tiny_model(dir);
    Preprocessor::from_model_dir(&model, "llava_v1", 512, true, 3).unwrap()
}

#[test]
fn corrupt_parquet_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.parquet");
    std::fs::write(&p, b"PAR1 this is not really parquet at all PAR1").unwrap();
    let e = ShardReader::open(&p, 8).unwrap_err().to_string();
    assert!(
        e.contains("broken.parquet") && e.contains("not a readable parquet file"),
        "{e}"
    );

    // A real file cut in half: the footer is gone.
    let good = dir.path().join("good.parquet");
    write_rlhfv(&good, &(0..10).map(good_row).collect::<Vec<_>>(), 4);
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = ShardReader::open(&cut, 8).unwrap_err().to_string();
    assert!(e.contains("cut.parquet"), "{e}");
}

#[test]
fn missing_column_names_layout_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nocol.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("question", DataType::Utf8, true),
        Field::new("chosen", DataType::Utf8, true),
        Field::new("idx", DataType::Int64, true),
        Field::new("image", DataType::Binary, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec!["q"])),
        Arc::new(StringArray::from(vec!["c"])),
        Arc::new(Int64Array::from(vec![0])),
        Arc::new(arrow::array::BinaryArray::from(vec![&b"x"[..]])),
    ];
    write_batches(&p, schema, cols, 10);
    let e = ShardReader::open(&p, 8).unwrap_err().to_string();
    assert!(e.contains("nocol.parquet"), "{e}");
    assert!(e.contains("RLAIF-V") && e.contains("[rejected]"), "{e}");
}

#[test]
fn wrong_column_type_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("types.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("image", DataType::Int64, true),
        Field::new("text", DataType::Utf8, true),
        Field::new("idx", DataType::Int64, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![1])),
        Arc::new(StringArray::from(vec!["{}"])),
        Arc::new(Int64Array::from(vec![0])),
    ];
    write_batches(&p, schema, cols, 10);
    let e = ShardReader::open(&p, 8).unwrap_err().to_string();
    assert!(
        e.contains("types.parquet") && e.contains("column `image` has type Int64"),
        "{e}"
    );
}

/// Bad rows of every kind among good ones: each is reported with shard and row number and its own reason,
/// every good row still comes out, in order.
#[test]
fn bad_rows_are_reported_and_good_rows_kept() {
    let dir = tempfile::tempdir().unwrap();
    let pre = preprocessor(dir.path());
    let mut rows: Vec<Row> = (0..12).map(good_row).collect();
    rows[1].image = Some(b"\x89PNG\r\n\x1a\n garbage".to_vec());
    rows[3].text = Some("{\"question\": \"q\", \"chosen\": ".into());
    rows[5].text = Some(text("q", "", "something"));
    rows[6].text = Some(r#"{"question":"q","chosen":"a b c"}"#.into());
    rows[8].image = None;
    rows[10].text = Some(text("q", "fine answer", "   "));
    let shard = dir.path().join("mixed.parquet");
    write_rlhfv(&shard, &rows, 5);

    let mut stream = ExampleStream::new(&pre, vec![shard.clone()], OnBadRow::Skip);
    let good: Vec<u64> = stream.by_ref().map(|e| e.unwrap().row).collect();
    assert_eq!(good, vec![0, 2, 4, 7, 9, 11]);
    let s = &stream.stats;
    assert_eq!((s.rows, s.ok, s.skipped), (12, 6, 6));
    let msgs: Vec<String> = s.first_errors.iter().map(|e| e.to_string()).collect();
    let expect = [
        (1, "image:"),
        (3, "not valid JSON"),
        (5, "empty chosen response"),
        (6, "no \"rejected\""),
        (8, "image has no bytes"),
        (10, "empty rejected response"),
    ];
    assert_eq!(msgs.len(), expect.len(), "{msgs:#?}");
    for ((row, reason), msg) in expect.iter().zip(&msgs) {
        assert!(
            msg.contains("mixed.parquet")
                && msg.contains(&format!("row {row}:"))
                && msg.contains(reason),
            "expected row {row} / {reason}, got {msg}"
        );
    }

    // The fail policy stops at the first bad row, with the same message.
    let mut stream = ExampleStream::new(&pre, vec![shard], OnBadRow::Fail);
    assert_eq!(stream.next().unwrap().unwrap().row, 0);
    match stream.next().unwrap() {
        Err(DataError::Row(e)) => assert_eq!(e.row, 1, "{e}"),
        other => panic!("expected a row error, got {other:?}"),
    }
}

#[test]
fn rlaifv_layout_is_detected_and_read() {
    let dir = tempfile::tempdir().unwrap();
    let pre = preprocessor(dir.path());
    let p = dir.path().join("rlaifv.parquet");
    write_rlaifv(
        &p,
        &[
            (
                png(20, 20, 1),
                "Describe.",
                "A red circle.",
                "A blue circle.",
                "abc-1",
            ),
            (
                png(20, 30, 2),
                "Describe.",
                "Two squares.",
                "Three squares.",
                "abc-2",
            ),
        ],
    );
    let r = ShardReader::open(&p, 8).unwrap();
    assert_eq!(r.layout(), Layout::RlaifV);
    let rows: Vec<_> = r.map(|x| x.unwrap()).collect();
    assert_eq!(rows[1].id, "abc-2");
    assert_eq!(rows[1].chosen, "Two squares.");
    let ex: Vec<_> = ExampleStream::new(&pre, vec![p], OnBadRow::Fail)
        .map(|e| e.unwrap())
        .collect();
    assert_eq!(ex.len(), 2);
    // "A red circle." vs "A blue circle.": the one-token match "A" is shorter than min_match = 3, so it
    // is dropped and the changed segment is "A red" / "A blue"; "circle . </s>" (3 tokens) stays unchanged.
    assert_eq!(ex[0].chosen_changed, [true, true, false, false, false]);
    assert_eq!(ex[0].rejected_changed, [true, true, false, false, false]);
}

#[test]
fn row_numbers_run_across_row_groups() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("groups.parquet");
    write_rlhfv(&p, &(0..23).map(good_row).collect::<Vec<_>>(), 5);
    let r = ShardReader::open(&p, 2).unwrap();
    assert_eq!(r.num_row_groups(), 5);
    assert_eq!(r.num_rows(), 23);
    let rows: Vec<_> = r.map(|x| x.unwrap()).collect();
    assert_eq!(rows.len(), 23);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.row, i as u64);
        assert_eq!(row.id, i.to_string());
    }
}

#[test]
fn tokenized_pair_has_image_tokens_eos_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let pre = preprocessor(dir.path());
    let p = dir.path().join("one.parquet");
    write_rlhfv(&p, &[good_row(0)], 5);
    let ex = ExampleStream::new(&pre, vec![p], OnBadRow::Fail)
        .next()
        .unwrap()
        .unwrap();
    let img = pre.text.image_token_id();
    let cfg = ddpo::model::config::LlavaConfig::from_dir(&dir.path().join("model")).unwrap();
    assert_eq!(
        ex.prompt_ids.iter().filter(|&&t| t == img).count(),
        cfg.num_image_tokens()
    );
    assert_eq!(*ex.chosen_ids.last().unwrap(), pre.text.eos_id());
    assert_eq!(*ex.rejected_ids.last().unwrap(), pre.text.eos_id());
    // "two red" vs "three blue" after "There are": the 2-token match "There are" is shorter than
    // min_match = 3 and is dropped, so the changed segment starts at the beginning; "circles on the left .
    // </s>" is kept unchanged.
    let dec = |ids: &[u32], mask: &[bool]| -> Vec<String> {
        ids.iter()
            .zip(mask)
            .filter(|(_, &m)| m)
            .map(|(&i, _)| pre.text.tokenizer().id_to_token(i).unwrap())
            .collect()
    };
    assert_eq!(
        dec(&ex.chosen_ids, &ex.chosen_changed),
        ["▁There", "▁are", "▁two", "▁red"]
    );
    assert_eq!(
        dec(&ex.rejected_ids, &ex.rejected_changed),
        ["▁There", "▁are", "▁three", "▁blue"]
    );
    assert_eq!(ex.pixel_values.len(), 3 * 32 * 32);
}
